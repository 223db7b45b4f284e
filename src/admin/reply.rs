//! The one error body of the admin API: `{"ok":false,"error":{"code","message"}}`, for
//! every route, the default 404 and the extractors' refusals (a query or a JSON body that
//! does not decode).

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::contract::{ErrorCode, Refusal};
use crate::store::StoreError;

/// Code of a path that names nothing (the default 404, an unknown resource).
pub const NOT_FOUND: &str = "not_found";
/// Code of a part of the node that does not answer (an actor stopped during shutdown).
pub const UNAVAILABLE: &str = "unavailable";

/// An error answer with `code` and a sentence for humans.
pub fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "ok": false,
        "error": {"code": code, "message": message.to_string()},
    }))
}

/// An error answer carrying a contract refusal.
pub fn refusal(status: StatusCode, r: &Refusal) -> HttpResponse {
    error(status, r.code.as_str(), &r.message)
}

/// The status of a refusal by the contract's rules, for the routes that pass an
/// application's request on (`POST /api/events`, `/api/search`, `/api/copies`): 413 for a
/// body over its limit, 503 for a part of the node that cannot take it now, 403 for a
/// resource of another creator, 400 for the rest (the request itself is wrong).
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::StoreUnavailable | ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::NotCreator => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A refusal answered with the status of its code ([`status_of`]).
pub fn refused(r: &Refusal) -> HttpResponse {
    refusal(status_of(r.code), r)
}

/// 400 `invalid_field`.
pub fn invalid_field(message: impl std::fmt::Display) -> HttpResponse {
    error(StatusCode::BAD_REQUEST, ErrorCode::InvalidField.as_str(), message)
}

/// 503 `store_unavailable` (the message reads "store unavailable: ..." or "corrupt record: ...").
pub fn store(e: &StoreError) -> HttpResponse {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::StoreUnavailable.as_str(),
        e,
    )
}

/// 503 `unavailable`: an actor of the node did not answer.
pub fn actor_gone(e: actix::MailboxError) -> HttpResponse {
    error(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE, e)
}

/// The default service: 404 `not_found`.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        NOT_FOUND,
        format!("no route {} {}", req.method(), req.path()),
    )
}

/// A query string that does not decode: 400 `invalid_field`.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|e, _| {
        let answer = invalid_field(&e);
        actix_web::error::InternalError::from_response(e, answer).into()
    })
}

/// A JSON body that does not decode: 400 `invalid_json`, or 413 `payload_too_large`.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default().error_handler(|e, _| {
        let answer = match &e {
            actix_web::error::JsonPayloadError::OverflowKnownLength { .. }
            | actix_web::error::JsonPayloadError::Overflow { .. } => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge.as_str(),
                &e,
            ),
            _ => error(StatusCode::BAD_REQUEST, ErrorCode::InvalidJson.as_str(), &e),
        };
        actix_web::error::InternalError::from_response(e, answer).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_s_status_follows_its_code_on_every_route_that_uses_it() {
        for (code, status) in [
            (ErrorCode::PayloadTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            (ErrorCode::StoreUnavailable, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorCode::Busy, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorCode::NotCreator, StatusCode::FORBIDDEN),
            (ErrorCode::InvalidJson, StatusCode::BAD_REQUEST),
            (ErrorCode::NotPartner, StatusCode::BAD_REQUEST),
            (ErrorCode::UnsupportedAction, StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(status_of(code), status, "{}", code.as_str());
            assert_eq!(refused(&Refusal::new(code, "x")).status(), status);
        }
    }
}
