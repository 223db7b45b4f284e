//! The NATS subject `REMOTECOPY` (`protocols/nats-subjects.md`): Gorgone's body (`source`,
//! `destination`, optional `cache_dir`) plus `peer`, the partner the copy goes to. The reply
//! is `{"ok":true,"copy_id":...}`, or the node's usual refusal (`{"ok":false,"error":...}`,
//! with the log line, the metric and the error event of [`crate::answers::Answers`]).

use std::sync::Arc;

use futures::StreamExt;
use serde_json::{json, Value};

use super::{CopyRequest, CopyService, PLACE};
use crate::answers::{Answers, Refused};
use crate::contract::{ErrorCode, Refusal};

/// The subject (Gorgone's event name).
pub const SUBJECT_REMOTECOPY: &str = "REMOTECOPY";
/// Largest `REMOTECOPY` body read.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// Subscribes and answers until shutdown; a subscription failure is logged and the node
/// runs without the subject.
pub(super) async fn spawn(service: Arc<CopyService>) {
    let nats = service.env.nats.clone();
    let mut sub = match nats.subscribe(SUBJECT_REMOTECOPY).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(subject = SUBJECT_REMOTECOPY, cause = %e, "cannot subscribe; REMOTECOPY is not served");
            return;
        }
    };
    let answers = Answers::new(nats, service.env.metrics.clone(), PLACE);
    let mut stop = service.env.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = sub.next() => m,
                _ = crate::shutdown::signalled(&mut stop) => None,
            };
            let Some(msg) = msg else {
                return;
            };
            match parse(&msg.payload) {
                Ok(req) => match service.submit(req) {
                    Ok(job) => {
                        answers
                            .reply(
                                msg.reply,
                                &json!({"ok": true, "copy_id": job.id, "state": job.state}),
                            )
                            .await
                    }
                    Err(refusal) => refuse(&answers, &msg, &refusal).await,
                },
                Err(refusal) => refuse(&answers, &msg, &refusal).await,
            }
        }
    });
}

async fn refuse(answers: &Answers, msg: &async_nats::Message, refusal: &Refusal) {
    answers
        .refuse(
            Refused {
                subject: SUBJECT_REMOTECOPY,
                action: None,
                body: &msg.payload,
                reply: msg.reply.clone(),
            },
            refusal,
        )
        .await;
}

/// The request in a `REMOTECOPY` body (and in a `POST /api/copies` body: one decoder, one
/// set of codes).
///
/// # Errors
/// Too large, not JSON, a missing or non-string field.
pub(crate) fn parse(body: &[u8]) -> Result<CopyRequest, Refusal> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Refusal::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| Refusal::new(ErrorCode::InvalidJson, e.to_string()))?;
    let field = |name: &str| -> Result<String, Refusal> {
        match &v[name] {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Err(Refusal::new(
                ErrorCode::MissingField,
                format!("{name} is required"),
            )),
            _ => Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("{name} must be a string"),
            )),
        }
    };
    // Gorgone's staging directory: this node stages in its own data directory, where a
    // copy can resume; the field is accepted as a string and otherwise unused.
    if !matches!(v["cache_dir"], Value::Null | Value::String(_)) {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            "cache_dir must be a string",
        ));
    }
    Ok(CopyRequest {
        source: field("source")?,
        peer: field("peer")?,
        destination: field("destination")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gorgone_bodies_with_a_peer_parse() {
        let r = parse(br#"{"source":"/a","destination":"b","cache_dir":"/var/cache","peer":"p"}"#).unwrap();
        assert_eq!(
            (r.source.as_str(), r.peer.as_str(), r.destination.as_str()),
            ("/a", "p", "b")
        );
        assert_eq!(
            parse(br#"{"source":"/a","destination":"b"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(
            parse(br#"{"source":1,"peer":"p","destination":"b"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidField
        );
        assert_eq!(parse(b"nope").unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(
            parse(&vec![b' '; MAX_BODY_BYTES + 1]).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
    }
}
