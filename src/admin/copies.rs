//! `/api/copies`: remote copies to partners (`protocols/admin-http.md`). `POST` checks the
//! request and queues the job (202 with its `id`); the job then runs in the node
//! ([`crate::copy::job`]); `GET` lists the jobs (newest first) or shows one: `state`
//! (`queued`, `running`, `done`, `failed` with its `reason`), `bytes_sent`, `bytes_acked`,
//! `total`.
//!
//! The source is read on this node's disk, below `--copy-source-root` only: an operator
//! holding the admin token is trusted with what is there, and with no more (a symlink out
//! of it is resolved and refused), up to `--copy-max-bytes`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{reply, AdminState};
use crate::copy::remotecopy;

pub async fn start(s: web::Data<AdminState>, payload: web::Payload) -> HttpResponse {
    let body = match super::events::read_body(payload, remotecopy::MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let submitted = remotecopy::parse(&body).and_then(|req| s.copies.submit(req));
    match submitted {
        Ok(job) => {
            let mut answer = serde_json::to_value(&job).unwrap_or_else(|_| json!({"id": job.id}));
            answer["ok"] = json!(true);
            HttpResponse::Accepted().json(answer)
        }
        Err(r) => reply::refused(&r),
    }
}

pub async fn list(s: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok().json(s.copies.jobs())
}

pub async fn one(s: web::Data<AdminState>, id: web::Path<String>) -> HttpResponse {
    match s.copies.job(&id) {
        Some(job) => HttpResponse::Ok().json(job),
        None => reply::error(StatusCode::NOT_FOUND, reply::NOT_FOUND, "no such copy"),
    }
}
