//! The `PROPALGATION_ERROR` event: what the node publishes for every refused message.

use serde_json::Value;

use super::Refusal;

/// Offending messages are echoed on `PROPALGATION_ERROR` cut at this size.
pub const ERROR_ECHO_BYTES: usize = 4096;

/// The `PROPALGATION_ERROR` body for a refused message.
pub fn error_event(refusal: &Refusal, subject: &str, body: &[u8]) -> Value {
    let cut = &body[..body.len().min(ERROR_ECHO_BYTES)];
    serde_json::json!({
        "error": refusal.to_json(),
        "subject": subject,
        "event": String::from_utf8_lossy(cut),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{ErrorCode, SUBJECT_PROPAGATION};

    #[test]
    fn error_event_cuts_the_echo() {
        let body = vec![b'a'; 10_000];
        let v = error_event(
            &Refusal::new(ErrorCode::InvalidJson, "x"),
            SUBJECT_PROPAGATION,
            &body,
        );
        assert_eq!(v["event"].as_str().unwrap().len(), ERROR_ECHO_BYTES);
        assert_eq!(v["error"]["code"], "invalid_json");
    }
}
