//! The receiver's side of a snapshot job (`protocols/journal-sync.md`, "Snapshot"): the
//! frames an origin sends on the sync stream it opened, applied by that origin's session
//! in order with the rest of what comes from it.
//!
//! Each complete part is applied in one commit by the version rule, through the session's
//! [`Applier`] (outbox rows published and confirmed before the `snapshot_ack`, so notices
//! are at least once with their `Nats-Msg-Id`), then the resources of the origin this node
//! holds in the key range the part covers but the part does not hold (deleted in the
//! origin's compacted journal) are removed with `REMOVE_RESOURCE` notices, and the job's
//! progress is persisted. A part applied twice (a crash before the progress was written)
//! changes nothing the second time: store effect exactly once. At `snapshot_end` the rest
//! of the key range is swept and the applied mark moves to the snapshot's position.
//!
//! Every count, index and byte the origin sends is checked ([`ReceiverJob::take_part`],
//! [`ReceiverJob::check_end`]); a refusal is an `error` frame, a log line, a metric
//! (`oc_refusals_total{place="snapshot"}`), and nothing applied; the stream then closes.

use std::collections::HashSet;
use std::sync::Arc;

use futures::io::{BufWriter, ReadHalf, WriteHalf};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::contract::{now_ms, Action, JournalEntry, Refusal};
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, FrameError, SyncFrame};
use crate::store::{ResourceKey, SNAPSHOT_REMOVAL_USER};
use crate::sync::snapshot::{page_bytes, receiver_key, PartLimits, ReceiverJob};

use super::apply::{retry, Applier, RunOutcome};
use super::InboundEnv;

/// Resources read per sweep query.
const SWEEP_PAGE: usize = 1024;
/// Bytes counted for a frame without data.
const SMALL_FRAME_BYTES: usize = 64;

/// A frame from the snapshot stream, holding its bytes of the session's budget.
pub(super) struct SnapshotInput {
    pub generation: u64,
    pub frame: Result<Option<SyncFrame>, FrameError>,
    pub _held: Option<OwnedSemaphorePermit>,
}

/// Reads the snapshot stream's frames into the session's inputs, each taking its bytes of
/// the session's budget first (a sender that does not wait for acks is held back). An
/// origin silent for `idle` ends the stream, as its close would: it resumes on a new one.
pub(super) async fn read_frames<I: From<SnapshotInput> + Send + 'static>(
    mut r: ReadHalf<Stream>,
    max: usize,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    tx: mpsc::Sender<I>,
    generation: u64,
    idle: std::time::Duration,
) {
    loop {
        let frame = tokio::time::timeout(idle, wire::read_frame::<SyncFrame, _>(&mut r, max))
            .await
            .unwrap_or(Ok(None));
        let (bytes, end) = match &frame {
            Ok(Some(SyncFrame::SnapshotPart { data, .. })) => {
                (data.len().saturating_add(SMALL_FRAME_BYTES), false)
            }
            Ok(Some(_)) => (SMALL_FRAME_BYTES, false),
            _ => (SMALL_FRAME_BYTES, true),
        };
        let n = u32::try_from(bytes.min(budget_bytes)).unwrap_or(u32::MAX);
        let held = budget.clone().acquire_many_owned(n).await.ok();
        let input = SnapshotInput {
            generation,
            frame,
            _held: held,
        };
        if tx.send(input.into()).await.is_err() || end {
            return;
        }
    }
}

/// The open snapshot stream of one origin and its job.
pub(super) struct SnapshotIn {
    pub generation: u64,
    writer: BufWriter<WriteHalf<Stream>>,
    reader: tokio::task::JoinHandle<()>,
    job: Option<ReceiverJob>,
}

/// What the session does after a snapshot frame.
pub(super) enum Step {
    Continue,
    /// The stream is done with (refused, ended): drop it.
    Close,
    /// The snapshot is applied: the applied mark is now this position.
    Applied(u64),
    Shutdown,
}

impl Drop for SnapshotIn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl SnapshotIn {
    pub(super) fn new(
        generation: u64,
        writer: BufWriter<WriteHalf<Stream>>,
        reader: tokio::task::JoinHandle<()>,
    ) -> Self {
        SnapshotIn {
            generation,
            writer,
            reader,
            job: None,
        }
    }

    /// Handles one frame of the origin `peer`, whose applied mark is `applied`.
    pub(super) async fn on_frame(
        &mut self,
        env: &Arc<InboundEnv>,
        log: &LogThrottle,
        peer: PeerId,
        applier: &mut Applier,
        applied: u64,
        frame: SyncFrame,
    ) -> Step {
        let origin = peer.to_string();
        match frame {
            SyncFrame::SnapshotBegin { job, position, total } => {
                let key = receiver_key(&origin);
                let Some(stored) = retry(env, "read snapshot job", || env.store.meta(&key)).await else {
                    return Step::Shutdown;
                };
                let stored: Option<ReceiverJob> = stored.and_then(|b| serde_json::from_slice(&b).ok());
                let current = match stored {
                    Some(j) if j.job == job && j.position == position => j,
                    _ => ReceiverJob {
                        job,
                        position,
                        ..ReceiverJob::default()
                    },
                };
                if !self.save(env, &origin, &current).await {
                    return Step::Shutdown;
                }
                tracing::info!(%peer, job, position, total, next_part = current.next_part, resources = current.resources, "snapshot from partner");
                let ready = SyncFrame::SnapshotReady {
                    job,
                    next_part: current.next_part,
                    after: current.after.clone(),
                    resources: current.resources,
                };
                self.job = Some(current);
                self.reply(&ready).await
            }
            SyncFrame::SnapshotPart {
                job,
                index,
                data,
                continued,
            } => {
                let limits = PartLimits {
                    max_part: page_bytes(env.tuning.max_frame_bytes),
                    max_line: usize::try_from(env.tuning.sync_max_bytes).unwrap_or(usize::MAX),
                };
                let Some(state) = self.job.as_mut() else {
                    return self.refuse(env, log, peer, no_job(job)).await;
                };
                let before_after = state.after.clone();
                let part = match state.take_part(&origin, job, index, &data, continued, limits) {
                    Ok(part) => part,
                    Err(refusal) => return self.refuse(env, log, peer, refusal).await,
                };
                let position = state.position;
                if let Some(part) = part {
                    let last = part.entries.last().map(|(k, _)| k.clone());
                    let count = part.entries.len() as u64;
                    let keys: HashSet<ResourceKey> = part.entries.iter().map(|(k, _)| k.clone()).collect();
                    let mut entries: Vec<JournalEntry> = part.entries.into_iter().map(|(_, e)| e).collect();
                    entries.sort_by_key(|e| e.seq);
                    if let Some(step) = apply(applier, applied, entries).await {
                        return step;
                    }
                    if let Some(upto) = &last {
                        if let Some(step) = sweep(
                            env,
                            applier,
                            &origin,
                            applied,
                            position,
                            before_after,
                            Some(upto.clone()),
                            &keys,
                        )
                        .await
                        {
                            return step;
                        }
                    }
                    let Some(state) = self.job.as_mut() else {
                        return Step::Close;
                    };
                    state.applied(last, count);
                    let saved = state.clone();
                    if !self.save(env, &origin, &saved).await {
                        return Step::Shutdown;
                    }
                    Metrics::add(&env.metrics.snapshot_parts_applied, 1);
                }
                self.reply(&SyncFrame::SnapshotAck { job, index }).await
            }
            SyncFrame::SnapshotEnd {
                job,
                parts,
                resources,
            } => {
                let Some(state) = self.job.clone() else {
                    return self.refuse(env, log, peer, no_job(job)).await;
                };
                if let Err(refusal) = state.check_end(job, parts, resources) {
                    return self.refuse(env, log, peer, refusal).await;
                }
                if !state.done {
                    let none = HashSet::new();
                    if let Some(step) = sweep(
                        env,
                        applier,
                        &origin,
                        applied,
                        state.position,
                        state.after.clone(),
                        None,
                        &none,
                    )
                    .await
                    {
                        return step;
                    }
                    // The applied mark moves to the snapshot's position, in the apply's commit.
                    if let Some(step) = apply(applier, state.position.max(applied), Vec::new()).await {
                        return step;
                    }
                    let mut done = state.clone();
                    done.done = true;
                    if !self.save(env, &origin, &done).await {
                        return Step::Shutdown;
                    }
                    self.job = Some(done);
                    tracing::info!(%peer, job, position = state.position, resources, parts, "snapshot applied");
                }
                match self
                    .reply(&SyncFrame::SnapshotDone {
                        job,
                        position: state.position,
                    })
                    .await
                {
                    Step::Continue => Step::Applied(state.position.max(applied)),
                    other => other,
                }
            }
            other => {
                let refusal = Refusal::new(
                    crate::contract::ErrorCode::InvalidField,
                    format!(
                        "{} is not a frame of a snapshot sender",
                        wire::Frame::kind(&other)
                    ),
                );
                self.refuse(env, log, peer, refusal).await
            }
        }
    }

    async fn save(&self, env: &Arc<InboundEnv>, origin: &str, job: &ReceiverJob) -> bool {
        // Numbers and strings: serializing cannot fail.
        let bytes = serde_json::to_vec(job).unwrap_or_default();
        let key = receiver_key(origin);
        retry(env, "persist snapshot job", || {
            env.store.set_meta(&key, Some(bytes.clone()))
        })
        .await
        .is_some()
    }

    async fn reply(&mut self, frame: &SyncFrame) -> Step {
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            wire::write_frame(&mut self.writer, frame),
        )
        .await
        {
            Ok(Ok(())) => Step::Continue,
            _ => Step::Close,
        }
    }

    /// Counts, logs (throttled) and answers a refusal; the stream then closes.
    pub(super) async fn refuse(
        &mut self,
        env: &Arc<InboundEnv>,
        log: &LogThrottle,
        peer: PeerId,
        refusal: Refusal,
    ) -> Step {
        env.metrics.refused("snapshot", refusal.code);
        if let Some(count) = log.hit(peer, refusal.code.as_str()) {
            tracing::warn!(%peer, code = refusal.code.as_str(), count, reason = %refusal.message, "snapshot frame refused");
        }
        let frame = SyncFrame::Error(ErrorFrame::new(None, refusal.code, refusal.message));
        let _ = self.reply(&frame).await;
        Step::Close
    }
}

/// Applies `entries` (and moves the applied mark to `up_to`); `Some` when the session must
/// stop or drop the stream.
async fn apply(applier: &mut Applier, up_to: u64, entries: Vec<JournalEntry>) -> Option<Step> {
    match applier.apply(up_to, entries).await {
        RunOutcome::Applied { .. } => None,
        RunOutcome::NotPartner(_) => Some(Step::Close),
        RunOutcome::Shutdown => Some(Step::Shutdown),
    }
}

/// Removes the origin's live resources with `after < key <= upto` that `kept` does not
/// hold and whose version is older than the snapshot's `position`.
#[allow(clippy::too_many_arguments)]
async fn sweep(
    env: &Arc<InboundEnv>,
    applier: &mut Applier,
    origin: &str,
    applied: u64,
    position: u64,
    after: Option<ResourceKey>,
    upto: Option<ResourceKey>,
    kept: &HashSet<ResourceKey>,
) -> Option<Step> {
    let mut from = after;
    loop {
        let (f, u) = (from.clone(), upto.clone());
        let Some(page) = retry(env, "read resources to sweep", || {
            env.store
                .origin_resources(origin, f.clone(), u.clone(), SWEEP_PAGE)
        })
        .await
        else {
            return Some(Step::Shutdown);
        };
        let last = page.last().map(|r| (r.data_type.clone(), r.id.clone()))?;
        let full = page.len() >= SWEEP_PAGE;
        let removals: Vec<JournalEntry> = page
            .into_iter()
            .filter(|r| r.version < position && !kept.contains(&(r.data_type.clone(), r.id.clone())))
            .map(|r| JournalEntry {
                origin: origin.to_owned(),
                seq: position,
                action: Action::Delete,
                data_type: r.data_type,
                user: SNAPSHOT_REMOVAL_USER.to_owned(),
                resource: r.resource.into(),
                time_ms: now_ms(),
            })
            .collect();
        if !removals.is_empty() {
            Metrics::add(&env.metrics.snapshot_removed, removals.len() as u64);
            if let Some(step) = apply(applier, applied, removals).await {
                return Some(step);
            }
        }
        if !full {
            return None;
        }
        from = Some(last);
    }
}

/// A snapshot frame of a job this stream has not begun.
fn no_job(job: u64) -> Refusal {
    Refusal::new(
        crate::contract::ErrorCode::InvalidField,
        format!("no snapshot job {job} begun on this stream"),
    )
}
