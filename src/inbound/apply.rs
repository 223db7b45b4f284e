//! Applying one contiguous run of an origin's entries: refuse what is forged, one store
//! commit (resources by version, outbox rows, the applied mark), and the outbox rows
//! published on NATS, with the server's confirmation awaited, while that commit writes and
//! syncs (publish-then-commit-then-ack, invariant 4). Each step that fails is retried with
//! backoff ([`retry`]) while the session waits: nothing is reported applied (so nothing is
//! acknowledged) that is not both stored and published.

use std::sync::Arc;

use libp2p::PeerId;

use crate::backoff::Backoff;
use crate::contract::{ErrorCode, JournalEntry, Refusal};
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p::wire::{ErrorFrame, ResourceFrame};
use crate::store::ApplyOutcome;

use super::InboundEnv;

/// What became of a run.
pub(super) enum RunOutcome {
    /// Stored and published up to `up_to`; `replies` are the `error` frames of the entries
    /// refused, to send before the ack.
    Applied { up_to: u64, replies: Vec<ResourceFrame> },
    /// The partnership ended while its streams were open: nothing applied, this `error`
    /// frame is the answer and the streams close.
    NotPartner(ResourceFrame),
    /// Shutdown came before the run was stored and published.
    Shutdown,
}

/// Applies the runs of one origin (the sending peer itself).
pub(super) struct Applier {
    env: Arc<InboundEnv>,
    log: Arc<LogThrottle>,
    peer: PeerId,
    origin: String,
    /// Outbox rows published and not yet removed: they go with the next apply commit, or
    /// at the next gap check when no batch comes (a crash before then republishes them,
    /// a duplicate that `Nats-Msg-Id` lets readers drop).
    published: Vec<u64>,
}

impl Applier {
    pub(super) fn new(env: Arc<InboundEnv>, log: Arc<LogThrottle>, peer: PeerId) -> Applier {
        Applier {
            env,
            log,
            peer,
            origin: peer.to_string(),
            published: Vec::new(),
        }
    }

    /// Checks, stores and publishes `run`: contiguous, in seq order, ending at `up_to`.
    pub(super) async fn apply(&mut self, up_to: u64, run: Vec<JournalEntry>) -> RunOutcome {
        if !self.env.partners.contains(&self.peer) {
            return RunOutcome::NotPartner(self.no_longer_partner());
        }
        let (valid, mut replies) = self.refuse_forged(run);
        let seqs: Vec<u64> = valid.iter().map(|e| e.seq).collect();
        let valid: Arc<[JournalEntry]> = valid.into();
        let (env, origin) = (self.env.clone(), self.origin.clone());
        let published = std::mem::take(&mut self.published);
        let timeout = env.tuning.io_timeout;
        // The rows are published while the store commits them (publish, then commit, then
        // ack: invariant 4); the ack waits for both.
        let (rows_tx, rows_rx) = tokio::sync::oneshot::channel();
        let commit = async {
            let started = std::time::Instant::now();
            let committed = env
                .store
                .apply_batch_publishing_early(&origin, up_to, valid.clone(), published.clone(), rows_tx)
                .await;
            env.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
            committed
        };
        let publish = async {
            // No rows: the store failed before deciding them.
            let rows = rows_rx.await.ok()?;
            let sent = match env.publisher.publish_rows(&rows, timeout).await {
                Ok(()) => true,
                Err(e) => {
                    step_failed("publish", &e, None);
                    false
                }
            };
            Some((rows, sent))
        };
        let (outcomes, rows, sent) = match tokio::join!(commit, publish) {
            (Ok(outcomes), Some((rows, sent))) => (outcomes, rows, sent),
            (committed, _) => {
                if let Err(e) = committed {
                    step_failed("apply", &e, None);
                }
                // Committed and published again one after the other (rows published by the
                // failed attempt are duplicates). A commit that succeeded without handing its
                // rows over (no backend does) would find the entries applied: its rows stay in
                // the outbox, published at start-up.
                let Some((outcomes, rows)) = retry(&env, "apply", || {
                    env.store
                        .apply_batch_clearing(&origin, up_to, valid.clone(), published.clone())
                })
                .await
                else {
                    return RunOutcome::Shutdown;
                };
                (outcomes, rows, false)
            }
        };
        Metrics::add(&env.metrics.apply_commits, 1);
        env.feed.applied.advanced();
        // `self.peer` is a partner (checked above): its label is one of a bounded set.
        let applied = valid.iter().zip(&outcomes);
        env.metrics.applied_lag(
            &self.origin,
            applied
                .filter(|(_, o)| matches!(o, ApplyOutcome::Applied))
                .map(|(e, _)| e.time_ms),
        );
        for (seq, outcome) in seqs.iter().zip(&outcomes) {
            if let Some(frame) = self.report(*seq, outcome) {
                replies.push(frame);
            }
        }
        if !rows.is_empty() {
            if !sent
                && retry(&env, "publish", || env.publisher.publish_rows(&rows, timeout))
                    .await
                    .is_none()
            {
                return RunOutcome::Shutdown;
            }
            Metrics::add(&env.metrics.nats_published, rows.len() as u64);
            // Removed with the next commit: a row left behind is published again at
            // start-up, a duplicate, never a loss.
            self.published.extend(rows.iter().map(|r| r.id));
        }
        RunOutcome::Applied { up_to, replies }
    }

    /// Counts and logs the end of the partnership; the `error` frame that answers it.
    fn no_longer_partner(&self) -> ResourceFrame {
        self.env.metrics.refused("inbound", ErrorCode::NotPartner);
        self.env.metrics.forget_origin(&self.origin);
        if let Some(count) = self.log.hit(self.peer, "not_partner") {
            tracing::warn!(peer = %self.peer, code = "not_partner", count, "no longer a partner; its streams are closed");
        }
        let refusal = Refusal::new(
            ErrorCode::NotPartner,
            "this node no longer accepts events from you",
        );
        error_frame(None, &refusal)
    }

    /// Splits `run` into the entries to store and the `error` frames of the forged ones
    /// (counted and logged).
    fn refuse_forged(&self, run: Vec<JournalEntry>) -> (Vec<JournalEntry>, Vec<ResourceFrame>) {
        let mut replies = Vec::new();
        let mut valid = Vec::with_capacity(run.len());
        for entry in run {
            match check(&entry, &self.origin) {
                Ok(()) => valid.push(entry),
                Err(refusal) => {
                    self.env.metrics.refused("inbound", refusal.code);
                    if let Some(count) = self.log.hit(self.peer, refusal.code.as_str()) {
                        tracing::warn!(peer = %self.peer, seq = entry.seq, code = refusal.code.as_str(), count, reason = %refusal.message, "event refused");
                    }
                    replies.push(error_frame(Some(entry.seq), &refusal));
                }
            }
        }
        (valid, replies)
    }

    /// Counts one stored entry's outcome; the `error` frame of a refusal by the store.
    fn report(&self, seq: u64, outcome: &ApplyOutcome) -> Option<ResourceFrame> {
        let metrics = &self.env.metrics;
        let refusal = match outcome {
            ApplyOutcome::Applied => {
                Metrics::add(&metrics.events_applied, 1);
                return None;
            }
            ApplyOutcome::Stale => {
                Metrics::add(&metrics.events_stale, 1);
                return None;
            }
            ApplyOutcome::Conflict { owner } => {
                metrics.refused("inbound", ErrorCode::Conflict);
                if let Some(count) = self.log.hit(self.peer, "conflict") {
                    tracing::warn!(peer = %self.peer, seq, code = "conflict", count, %owner, "event refused");
                }
                Refusal::new(ErrorCode::Conflict, format!("the resource belongs to {owner}"))
            }
            ApplyOutcome::Rejected { reason } => {
                metrics.refused("inbound", ErrorCode::InvalidDocument);
                if let Some(count) = self.log.hit(self.peer, "invalid_document") {
                    tracing::warn!(peer = %self.peer, seq, code = "invalid_document", count, %reason, "event refused by the store");
                }
                Refusal::new(
                    ErrorCode::InvalidDocument,
                    format!("this node's store cannot hold the resource: {reason}"),
                )
            }
        };
        Some(error_frame(Some(seq), &refusal))
    }

    /// Removes the published outbox rows no apply commit took along.
    pub(super) async fn clear_published(&mut self) {
        if self.published.is_empty() {
            return;
        }
        match self.env.store.outbox_remove(self.published.clone()).await {
            Ok(()) => self.published.clear(),
            Err(e) => {
                tracing::warn!(cause = %e, rows = self.published.len(), "cannot clear published outbox rows")
            }
        }
    }
}

/// Refuses an entry the sending peer `origin` may not send: another origin, another
/// creator, or no resource id.
fn check(entry: &JournalEntry, origin: &str) -> Result<(), Refusal> {
    if entry.origin != origin {
        return Err(Refusal::new(
            ErrorCode::ForgedOrigin,
            format!("origin {} is not the sending peer {origin}", entry.origin),
        ));
    }
    match entry.creator_id() {
        Some(c) if c == origin => {}
        Some(c) => {
            return Err(Refusal::new(
                ErrorCode::NotCreator,
                format!("creator_id {c} is not the sending peer {origin}"),
            ))
        }
        None => {
            return Err(Refusal::new(
                ErrorCode::NotCreator,
                "resource has no string creator_id",
            ))
        }
    }
    if entry.resource_id().is_none_or(str::is_empty) {
        return Err(Refusal::new(ErrorCode::InvalidField, "resource has no string id"));
    }
    Ok(())
}

pub(super) fn error_frame(seq: Option<u64>, refusal: &Refusal) -> ResourceFrame {
    ResourceFrame::Error(ErrorFrame::new(seq, refusal.code, refusal.message.clone()))
}

/// Retries `op` with backoff until it succeeds; `None` when shutdown came first.
pub(super) async fn retry<T, E, F, Fut>(env: &InboundEnv, what: &str, mut op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut shutdown = env.shutdown.clone();
    let mut backoff = Backoff::new(env.tuning.backoff_min, env.tuning.backoff_max);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => step_failed(what, &e, Some(backoff.current())),
        }
        if !backoff.wait_or(crate::shutdown::signalled(&mut shutdown)).await {
            return None;
        }
    }
}

/// The log line of an inbound step that failed (the ack waits); `retry_in` when it is retried.
fn step_failed(what: &str, cause: &dyn std::fmt::Display, retry_in: Option<std::time::Duration>) {
    match retry_in {
        Some(retry_in) => {
            tracing::warn!(what, cause = %cause, ?retry_in, "inbound step failed; holding the ack")
        }
        None => tracing::warn!(what, cause = %cause, "inbound step failed; holding the ack"),
    }
}

#[cfg(test)]
mod tests {
    use super::check;
    use crate::contract::{Action, ErrorCode, JournalEntry};

    fn entry(origin: &str, resource: serde_json::Value) -> JournalEntry {
        JournalEntry {
            origin: origin.into(),
            seq: 1,
            action: Action::Create,
            data_type: "D".into(),
            user: "u".into(),
            resource: resource.into(),
            time_ms: 1,
        }
    }

    #[test]
    fn only_the_sending_peers_own_resources_pass() {
        let code = |e: &JournalEntry| check(e, "o").err().map(|r| r.code);
        assert_eq!(
            code(&entry("o", serde_json::json!({"id": "r", "creator_id": "o"}))),
            None
        );
        let forged = entry("x", serde_json::json!({"id": "r", "creator_id": "x"}));
        assert_eq!(code(&forged), Some(ErrorCode::ForgedOrigin));
        let foreign = entry("o", serde_json::json!({"id": "r", "creator_id": "x"}));
        assert_eq!(code(&foreign), Some(ErrorCode::NotCreator));
        let anonymous = entry("o", serde_json::json!({"id": "r", "creator_id": 7}));
        assert_eq!(code(&anonymous), Some(ErrorCode::NotCreator));
        let no_id = entry("o", serde_json::json!({"id": "", "creator_id": "o"}));
        assert_eq!(code(&no_id), Some(ErrorCode::InvalidField));
    }
}
