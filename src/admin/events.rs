//! `POST /api/events`: the `PROPALGATION_EVENT` contract for scripts without NATS. The body
//! is read up to `--max-event-bytes`, then decoded, checked and journaled by the intake
//! ([`crate::intake::IntakeEnv::submit`]); the answer is the reply body NATS would carry.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use futures::StreamExt;
use serde_json::Value;

use super::{reply, AdminState};
use crate::contract::ErrorCode;

pub async fn publish(s: web::Data<AdminState>, payload: web::Payload) -> HttpResponse {
    let body = match read_body(payload, s.submit.max_event_bytes).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let answer = s.submit.submit(&body).await;
    HttpResponse::build(status_of(&answer)).json(answer)
}

/// The request body, read up to `max` bytes; past it, 413 `payload_too_large` at once (a
/// huge body is never held).
///
/// # Errors
/// The answer to send instead.
pub async fn read_body(mut payload: web::Payload, max: usize) -> Result<web::BytesMut, HttpResponse> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| reply::error(StatusCode::BAD_REQUEST, ErrorCode::InvalidJson.as_str(), e))?;
        if body.len().saturating_add(chunk.len()) > max {
            return Err(reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge.as_str(),
                format!("the body is larger than the limit of {max} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// 200 for an accepted event; a refusal's status follows its code.
fn status_of(answer: &Value) -> StatusCode {
    if answer["ok"] == true {
        return StatusCode::OK;
    }
    answer["error"]["code"]
        .as_str()
        .and_then(ErrorCode::parse)
        .map_or(StatusCode::BAD_REQUEST, reply::status_of)
}
