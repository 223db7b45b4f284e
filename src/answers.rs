//! Answering applications on the site's NATS: the reply to a request, and for a refused
//! message the one refusal report every NATS-facing part gives (intake, commands, search):
//! a log line with its fields, `oc_refusals_total{place,code}`, an error event on
//! `PROPALGATION_ERROR` echoing the start of the message, and `{"ok":false,"error":...}` to
//! the requester when it asked for a reply.

use std::sync::Arc;

use async_nats::{Client, Subject};
use serde_json::{json, Value};

use crate::contract::{self, Refusal};
use crate::metrics::Metrics;

/// Publishes replies and refusal reports for one part of the node (`place`).
#[derive(Clone)]
pub struct Answers {
    nats: Client,
    metrics: Arc<Metrics>,
    /// The `place` label of the refusals counter and log lines: `intake`, `commands`, ...
    place: &'static str,
}

/// What a refusal report says about the refused message.
pub(crate) struct Refused<'a> {
    /// The subject the message came on.
    pub subject: &'a str,
    /// The action it asked for, when known (`PB_SEARCH`, ...).
    pub action: Option<&'a str>,
    /// The message as received; the error event echoes at most `contract::ERROR_ECHO_BYTES`.
    pub body: &'a [u8],
    /// Where the requester waits for the answer, if it asked for one.
    pub reply: Option<Subject>,
}

impl Answers {
    pub(crate) fn new(nats: Client, metrics: Arc<Metrics>, place: &'static str) -> Self {
        Answers { nats, metrics, place }
    }

    /// Reports one refused message: log line, metric, error event and the reply.
    pub(crate) async fn refuse(&self, what: Refused<'_>, refusal: &Refusal) {
        tracing::warn!(
            place = self.place,
            subject = what.subject,
            action = what.action.unwrap_or(""),
            code = refusal.code.as_str(),
            reason = %refusal.message,
            bytes = what.body.len(),
            "message refused"
        );
        self.metrics.refused(self.place, refusal.code);
        let mut error_event = contract::error_event(refusal, what.subject, what.body);
        if let Some(action) = what.action {
            error_event["action"] = json!(action);
        }
        self.publish(Subject::from_static(contract::SUBJECT_ERROR), &error_event)
            .await;
        self.reply(what.reply, &json!({"ok": false, "error": refusal.to_json()}))
            .await;
    }

    /// Publishes `body` on `reply` when the requester asked for an answer.
    pub(crate) async fn reply(&self, reply: Option<Subject>, body: &Value) {
        if let Some(reply) = reply {
            self.publish(reply, body).await;
        }
    }

    /// Publishes `body` on `subject`; a failure is logged (the answer is best effort: the
    /// requester's own timeout tells it).
    pub(crate) async fn publish(&self, subject: Subject, body: &Value) {
        if let Err(e) = self.nats.publish(subject.clone(), body.to_string().into()).await {
            tracing::warn!(place = self.place, %subject, cause = %e, "cannot publish answer");
        }
    }
}
