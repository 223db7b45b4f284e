//! `POST /api/search`: runs a `PB_SEARCH` (the same body as on NATS) through the command
//! router and streams its `SEARCH_EVENT` bodies as JSON lines (`application/x-ndjson`) until
//! the one with `done: true`. Bounded: [`SEARCH_STREAM_TIMEOUT`] and [`SEARCH_STREAM_BYTES`];
//! past either, a last line `{"ok":false,"error":{"code":"timeout"|"too_large",...}}`.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use futures::StreamExt;
use serde_json::{json, Value};

use super::{reply, AdminState};
use crate::commands::router::Dispatch;
use crate::contract::{self, CommandAction, Decoded, ErrorCode, Refusal};
use crate::search::SUBJECT_SEARCH_EVENT;

/// Longest a search streams its results.
pub const SEARCH_STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of results one search streams.
pub const SEARCH_STREAM_BYTES: usize = 16 * 1024 * 1024;
/// Longest wait for the router's first answer (`{"ok":true,"query_id"}` or a refusal).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn search(s: web::Data<AdminState>, payload: web::Payload) -> HttpResponse {
    let env = &s.submit;
    let body = match super::events::read_body(payload, env.max_event_bytes).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let command = match contract::decode_intake(&body, &env.own_id, env.max_event_bytes) {
        Ok(Decoded::Command(c)) if c.action == CommandAction::Search => c,
        Ok(_) => {
            return reply::refused(&Refusal::new(
                ErrorCode::UnsupportedAction,
                "POST /api/search takes a PB_SEARCH",
            ))
        }
        Err(r) => return reply::refused(&r),
    };
    match start(&s, command).await {
        Ok((query_id, results)) => HttpResponse::Ok()
            .content_type("application/x-ndjson")
            .streaming(stream(query_id, results)),
        Err(answer) => answer,
    }
}

/// Subscribes to `SEARCH_EVENT` (before the search starts: no result is missed), hands the
/// search to the router and waits for its query id.
async fn start(
    s: &AdminState,
    command: contract::AppCommand,
) -> Result<(String, async_nats::Subscriber), HttpResponse> {
    let nats_down = |e: &dyn std::fmt::Display| {
        reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NatsUnavailable.as_str(),
            e,
        )
    };
    let results = s
        .nats
        .subscribe(SUBJECT_SEARCH_EVENT)
        .await
        .map_err(|e| nats_down(&e))?;
    let inbox = s.nats.new_inbox();
    let mut accepted = s.nats.subscribe(inbox.clone()).await.map_err(|e| nats_down(&e))?;
    let dispatch = Dispatch {
        command,
        reply: Some(inbox.into()),
    };
    s.submit
        .commands
        .send(dispatch)
        .await
        .map_err(|e| reply::error(StatusCode::SERVICE_UNAVAILABLE, reply::UNAVAILABLE, e))?;
    let answer = match tokio::time::timeout(ACCEPT_TIMEOUT, accepted.next()).await {
        Ok(Some(m)) => serde_json::from_slice::<Value>(&m.payload).unwrap_or(Value::Null),
        _ => return Err(nats_down(&"no answer from the search service")),
    };
    match answer["query_id"].as_str() {
        Some(id) if answer["ok"] == true => Ok((id.to_owned(), results)),
        _ => {
            let code = answer["error"]["code"]
                .as_str()
                .and_then(ErrorCode::parse)
                .unwrap_or(ErrorCode::Busy);
            let message = answer["error"]["message"].as_str().unwrap_or("search refused");
            Err(reply::refused(&Refusal::new(code, message)))
        }
    }
}

/// What the stream still has to do.
struct Streaming {
    query_id: String,
    results: async_nats::Subscriber,
    deadline: tokio::time::Instant,
    bytes: usize,
    finished: bool,
}

fn stream(
    query_id: String,
    results: async_nats::Subscriber,
) -> impl futures::Stream<Item = Result<web::Bytes, std::convert::Infallible>> {
    let state = Streaming {
        query_id,
        results,
        deadline: tokio::time::Instant::now() + SEARCH_STREAM_TIMEOUT,
        bytes: 0,
        finished: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let line = next_line(&mut st).await;
        Some((Ok(line), st))
    })
}

/// The next `SEARCH_EVENT` of this search as one line, or the last line.
async fn next_line(st: &mut Streaming) -> web::Bytes {
    loop {
        let msg = match tokio::time::timeout_at(st.deadline, st.results.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return last(st, reply::UNAVAILABLE, "NATS subscription closed"),
            Err(_) => return last(st, "timeout", "no final SEARCH_EVENT in time"),
        };
        let Ok(body) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        if body["query_id"].as_str() != Some(st.query_id.as_str()) {
            continue;
        }
        st.bytes = st.bytes.saturating_add(msg.payload.len());
        if st.bytes > SEARCH_STREAM_BYTES {
            return last(st, "too_large", "the results passed the stream's byte limit");
        }
        st.finished = body["done"] == true;
        let mut line = msg.payload.to_vec();
        line.push(b'\n');
        return line.into();
    }
}

fn last(st: &mut Streaming, code: &str, message: &str) -> web::Bytes {
    st.finished = true;
    let mut line = json!({"ok": false, "error": {"code": code, "message": message}}).to_string();
    line.push('\n');
    line.into()
}
