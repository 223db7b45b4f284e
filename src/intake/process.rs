//! Handling one batch: refusals answered, redeliveries recognised, accepted events journaled
//! in one commit (retried with backoff while the store is down), then the applications
//! answered and the JetStream messages acknowledged.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::Subject;
use serde_json::json;

use super::source::Incoming;
use super::{IntakeEnv, PLACE};
use crate::answers::Refused;
use crate::backoff::Backoff;
use crate::commands::router::Dispatch;
use crate::contract::{self, Decoded, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::outbound::service::JournalAdvanced;

/// How long core-NATS intake retries a failing journal before answering `store_unavailable`.
const CORE_RETRY_BUDGET: Duration = Duration::from_secs(5);
/// First wait before asking a failing store again.
const STORE_RETRY_MIN: Duration = Duration::from_millis(50);

/// Where the answer to an accepted event goes.
pub(super) enum Reply {
    /// The NATS reply subject, when the application asked for one.
    Nats(Option<Subject>),
    /// `POST /api/events` waiting for its body.
    Http(tokio::sync::oneshot::Sender<serde_json::Value>),
}

impl IntakeEnv {
    pub(super) async fn process(&self, batch: Vec<Incoming>) {
        let journaled_before = self.journaled_before(&batch).await;
        // A redelivery can share a batch with its first delivery (one that waited past the
        // ack wait in the client): only the first is journaled.
        let mut in_batch = HashSet::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        let mut stream_seqs = Vec::new();
        // Whether an error event went out, which must reach the server before the acks.
        let mut published = false;
        for msg in &batch {
            if let Some(js) = &msg.js {
                if js.redelivered {
                    tracing::debug!(stream_seq = js.stream_seq, "redelivered");
                }
                if journaled_before.contains(&js.stream_seq) || !in_batch.insert(js.stream_seq) {
                    tracing::debug!(
                        stream_seq = js.stream_seq,
                        "event journaled already (a redelivery, or a second delivery in this batch)"
                    );
                    continue;
                }
            }
            match contract::decode_intake(&msg.payload, &self.own_id, self.max_event_bytes) {
                Ok(Decoded::Accept(e)) => {
                    events.push(e);
                    replies.push(Reply::Nats(msg.reply.clone()));
                    stream_seqs.extend(msg.js.as_ref().map(|js| js.stream_seq));
                }
                Ok(Decoded::OwnEcho) => Metrics::add(&self.metrics.intake_echoes, 1),
                Ok(Decoded::Command(command)) => {
                    // Waits for room in the router's mailbox: intake slows, nothing is dropped.
                    let dispatch = Dispatch {
                        command,
                        reply: msg.reply.clone(),
                    };
                    if self.commands.send(dispatch).await.is_err() {
                        tracing::error!("command router stopped; command dropped");
                    }
                }
                Err(refusal) => {
                    self.refuse(msg, &refusal).await;
                    published = true;
                }
            }
        }
        let durable = batch.iter().any(|m| m.js.is_some());
        if !events.is_empty() {
            published |= !self.journal(events, replies, stream_seqs, durable).await;
        }
        if durable && published {
            // Error events must be on the server before their messages are acknowledged.
            if tokio::time::timeout(self.io_timeout, self.nats.flush())
                .await
                .is_err()
            {
                tracing::warn!("NATS flush timed out; intake messages stay unacknowledged and come back");
                return;
            }
        }
        for msg in batch {
            if let Some(js) = msg.js {
                if let Err(e) = js.message.ack_with(AckKind::Ack).await {
                    // Redelivered later, and recognised as journaled.
                    tracing::debug!(cause = %e, "cannot acknowledge intake message");
                }
            }
        }
    }

    /// Stream sequences of messages in `batch` that were journaled already. Every JetStream
    /// message is checked, whatever its delivery count: the count and the consumer's state
    /// are the server's bookkeeping, which a crash or a server bug can get wrong, while a
    /// stream sequence recorded in the journal commit is proof that message was journaled.
    async fn journaled_before(&self, batch: &[Incoming]) -> Vec<u64> {
        let seqs: Vec<u64> = batch
            .iter()
            .filter_map(|m| m.js.as_ref())
            .map(|js| js.stream_seq)
            .collect();
        if seqs.is_empty() {
            return Vec::new();
        }
        let mut backoff = Backoff::new(STORE_RETRY_MIN, self.backoff_max);
        loop {
            match self.store.intake_seen(seqs.clone()).await {
                Ok(seen) => return seen,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::error!(cause = %e, retry_in = ?delay, "cannot check which events were journaled already; intake waits");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Forgets journaled stream sequences the server can never redeliver: those below both
    /// the consumer's ack floor and the stream's first stored sequence. The ack floor alone is
    /// not trusted: some nats-server versions let it run ahead of messages still pending
    /// (nats-server #4086, #5227, #5727), and forgetting one of those journals it twice when
    /// it comes back. A message the stream no longer holds cannot come back at all.
    pub(super) async fn prune(&self) {
        match tokio::time::timeout(self.io_timeout, self.redelivery_floor()).await {
            Ok(Ok(floor)) => match self.store.intake_forget_below(floor).await {
                Ok(()) => tracing::debug!(below = floor, "intake records pruned"),
                Err(e) => tracing::debug!(cause = %e, "cannot prune intake records"),
            },
            Ok(Err(e)) => tracing::debug!(cause = %e, "cannot read the intake floor; nothing pruned"),
            Err(_) => tracing::debug!("intake floor not read in time; nothing pruned"),
        }
    }

    /// The lowest stream sequence the server might still deliver to the intake consumer.
    async fn redelivery_floor(&self) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        let consumer = self.consumer.lock().ok().and_then(|c| c.clone());
        let Some(mut consumer) = consumer else {
            return Ok(0);
        };
        let ack_floor = consumer.info().await?.ack_floor.stream_sequence;
        let js = jetstream::new(self.nats.clone());
        let first_stored = js
            .get_stream(&self.stream_name)
            .await?
            .info()
            .await?
            .state
            .first_sequence;
        Ok(redelivery_floor(ack_floor, first_stored))
    }

    /// Appends the batch; retries while the store is down (JetStream keeps the messages, so
    /// waiting is lossless), within a budget for core NATS whose messages cannot wait.
    /// Returns false when the events were refused (an error event was published).
    async fn journal(
        &self,
        events: Vec<contract::NewEvent>,
        replies: Vec<Reply>,
        stream_seqs: Vec<u64>,
        durable_source: bool,
    ) -> bool {
        let count = events.len();
        let stream_range = (
            stream_seqs.iter().min().copied(),
            stream_seqs.iter().max().copied(),
        );
        // Lent to each attempt: a retry needs them again, and a copy per attempt cost a
        // copy of every resource's JSON.
        let events: Arc<[contract::NewEvent]> = events.into();
        let stream_seqs: Arc<[u64]> = stream_seqs.into();
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(STORE_RETRY_MIN, self.backoff_max);
        let seqs = loop {
            match self
                .store
                .append_journal_lent(&self.own_id, events.clone(), stream_seqs.clone())
                .await
            {
                Ok(seqs) => break Ok(seqs),
                Err(e) if durable_source || started.elapsed() < CORE_RETRY_BUDGET => {
                    let delay = backoff.next_delay();
                    tracing::error!(cause = %e, count, retry_in = ?delay, "journal append failed; intake waits");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => break Err(e),
            }
        };
        match seqs {
            Ok(seqs) => {
                Metrics::add(&self.metrics.intake_accepted, count as u64);
                Metrics::add(&self.metrics.journal_commits, 1);
                self.feed.journal.advanced();
                for (&seq, reply) in seqs.iter().zip(replies) {
                    // JetStream messages have no reply subject (the server's PubAck answered):
                    // no body to build for them.
                    if matches!(reply, Reply::Nats(None)) {
                        continue;
                    }
                    let body = json!({"ok": true, "origin": self.own_id, "seq": seq});
                    self.answer(reply, body).await;
                }
                if let Some(&last) = seqs.last() {
                    tracing::debug!(count, head = last, stream_first = ?stream_range.0, stream_last = ?stream_range.1, "journaled");
                    self.links.do_send(JournalAdvanced { head: last });
                }
                true
            }
            Err(e) => {
                // Core NATS has no redelivery: the application learns it must retry.
                tracing::error!(cause = %e, count, "journal append failed; events refused");
                let refusal = Refusal::new(ErrorCode::StoreUnavailable, format!("not journaled: {e}"));
                // One error event for the whole batch, counting its events (they were each
                // valid; the message echo of `Answers::refuse` would name only one).
                self.metrics.refused(PLACE, refusal.code);
                let error_event = json!({"error": refusal.to_json(), "subject": contract::SUBJECT_PROPAGATION, "count": count});
                self.answers
                    .publish(Subject::from_static(contract::SUBJECT_ERROR), &error_event)
                    .await;
                let refused = json!({"ok": false, "error": refusal.to_json()});
                for reply in replies {
                    self.answer(reply, refused.clone()).await;
                }
                false
            }
        }
    }

    async fn answer(&self, reply: Reply, body: serde_json::Value) {
        match reply {
            Reply::Nats(subject) => self.answers.reply(subject, &body).await,
            // A dropped receiver: the HTTP client went away; the event is journaled anyway.
            Reply::Http(tx) => {
                let _ = tx.send(body);
            }
        }
    }

    /// `POST /api/events`: one `PROPALGATION_EVENT` body decoded, checked and journaled by the
    /// rules and the path of the NATS intake; returns the reply body it would publish.
    /// Commands (`PB_SEARCH`, ...) are refused: they answer on NATS (`POST /api/search`).
    pub async fn submit(&self, body: &[u8]) -> serde_json::Value {
        let event = match contract::decode_intake(body, &self.own_id, self.max_event_bytes) {
            Ok(Decoded::Accept(e)) => e,
            Ok(Decoded::OwnEcho) => {
                let echo = Refusal::new(
                    ErrorCode::InvalidField,
                    "from_app names this node: an echo of its own",
                );
                return self.refuse_submitted(body, &echo).await;
            }
            Ok(Decoded::Command(_)) => {
                let command = Refusal::new(
                    ErrorCode::UnsupportedAction,
                    "commands go through NATS; PB_SEARCH through POST /api/search",
                );
                return self.refuse_submitted(body, &command).await;
            }
            Err(refusal) => return self.refuse_submitted(body, &refusal).await,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.journal(vec![event], vec![Reply::Http(tx)], Vec::new(), false)
            .await;
        rx.await.unwrap_or_else(|_| {
            json!({"ok": false, "error": Refusal::new(ErrorCode::StoreUnavailable, "not journaled").to_json()})
        })
    }

    /// The refusal report of the intake (log line, metric, error event) for a body of
    /// `POST /api/events`, and the reply body.
    async fn refuse_submitted(&self, body: &[u8], refusal: &Refusal) -> serde_json::Value {
        let refused = Refused {
            subject: "POST /api/events",
            action: None,
            body,
            reply: None,
        };
        self.answers.refuse(refused, refusal).await;
        json!({"ok": false, "error": refusal.to_json()})
    }

    /// Reply (when asked), error event, log line and metric for one refused message.
    async fn refuse(&self, msg: &Incoming, refusal: &Refusal) {
        let refused = Refused {
            subject: msg.subject.as_str(),
            action: None,
            body: &msg.payload,
            reply: msg.reply.clone(),
        };
        self.answers.refuse(refused, refusal).await;
    }
}

/// Below this stream sequence nothing can be delivered again: the consumer acknowledged it
/// (`ack_floor`, inclusive) and the stream no longer stores it (`first_stored` is the lowest
/// sequence it holds). The lower of the two, so that a wrong ack floor forgets nothing.
fn redelivery_floor(ack_floor: u64, first_stored: u64) -> u64 {
    ack_floor.min(first_stored)
}

#[cfg(test)]
mod tests {
    use super::redelivery_floor;

    #[test]
    fn an_ack_floor_ahead_of_a_stored_message_forgets_nothing_it_may_redeliver() {
        // The stream still holds 8000 (pending, journaled): its record must stay.
        assert_eq!(redelivery_floor(9_999, 8_000), 8_000);
    }

    #[test]
    fn acknowledged_and_removed_messages_are_forgotten() {
        assert_eq!(redelivery_floor(7_999, 8_000), 7_999);
        assert_eq!(redelivery_floor(0, 1), 0);
    }
}
