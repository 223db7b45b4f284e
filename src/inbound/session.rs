//! One partner's inbound session: a task that owns the partner's resource streams, reads
//! their frames (within the partner's byte budget), feeds the entries to its [`Reorder`]
//! buffer, applies the contiguous runs ([`super::apply`]), acknowledges them, and runs the
//! journal pulls the buffer asks for ([`pull_until`]). The decisions are the buffer's; this
//! file moves bytes.

use std::sync::Arc;
use std::time::Duration;

use futures::io::{BufWriter, ReadHalf, WriteHalf};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::contract::{ErrorCode, JournalEntry, Refusal};
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError, ResourceFrame};
use crate::p2p::StreamKind;
use crate::sync;

use super::apply::{error_frame, retry, Applier, RunOutcome};
use super::reorder::{Buffered, Pull, Reorder};
use super::snapshot::{SnapshotIn, SnapshotInput, Step};
use super::InboundEnv;

/// Inputs buffered between the stream readers and a session (also bounded in bytes: the
/// entries they carry hold permits of the session's byte budget).
const SESSION_INBOX: usize = 4096;
/// Streams (and sync ticks) waiting for a session to take them; beyond, a new stream is
/// reset.
const ATTACH_QUEUE: usize = 16;
/// A hole in the reorder buffer still there after this is filled by a pull.
const GAP_GRACE: Duration = Duration::from_secs(1);
/// Bytes counted for an input that carries no entry (a `hello`, a `large` marker).
const SMALL_INPUT_BYTES: usize = 64;

/// What the actor hands to a session.
pub(super) enum Attach {
    Stream {
        kind: StreamKind,
        reader: ReadHalf<Stream>,
        writer: BufWriter<WriteHalf<Stream>>,
    },
    /// Time for the safety-net sync.
    PeriodicSync,
    /// A sync stream on which the origin began a snapshot job (`begin`, its first frame).
    Snapshot {
        begin: crate::p2p::wire::SyncFrame,
        reader: ReadHalf<Stream>,
        writer: BufWriter<WriteHalf<Stream>>,
    },
}

/// What a session's inputs carry.
enum Input {
    /// A frame from a resource stream; `generation` tells a replaced stream's leftovers
    /// from the current one. `held`: the bytes of the session's budget this input holds,
    /// given back when the entry is applied or dropped.
    Frame {
        kind: StreamKind,
        generation: u64,
        frame: Result<Option<ResourceFrame>, FrameError>,
        held: Option<OwnedSemaphorePermit>,
    },
    /// Entries pulled by journal sync.
    Synced(Vec<JournalEntry>),
    /// The pull task ended.
    SyncDone(Result<(), String>),
    /// A frame of the origin's snapshot stream.
    Snapshot(SnapshotInput),
}

impl From<SnapshotInput> for Input {
    fn from(i: SnapshotInput) -> Input {
        Input::Snapshot(i)
    }
}

/// Bytes an entry takes in memory, roughly: its JSON text and strings, plus the struct.
fn entry_bytes(entry: &JournalEntry) -> usize {
    entry
        .resource
        .json()
        .len()
        .saturating_add(entry.origin.len())
        .saturating_add(entry.data_type.len())
        .saturating_add(entry.user.len())
        .saturating_add(SMALL_INPUT_BYTES + std::mem::size_of::<JournalEntry>())
}

/// An entry waiting in the reorder buffer, with the budget bytes it holds (none when it
/// was pulled: a sync round is bounded on its own).
struct Waiting {
    entry: JournalEntry,
    _held: Option<OwnedSemaphorePermit>,
}

/// Reads frames from one resource stream into the session's inputs. Each entry takes its
/// bytes from the session's budget before it is handed over, and holds them until it is
/// applied or dropped: when the budget is spent, reading stops (backpressure) and the
/// sender's writes wait on the transport. Frames other than `hello`, `event` and `large`
/// are dropped here (they are not for a receiver).
async fn read_stream<R>(
    mut r: R,
    max: usize,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    tx: mpsc::Sender<Input>,
    kind: StreamKind,
    generation: u64,
) where
    R: futures::AsyncRead + Unpin,
{
    loop {
        let frame = wire::read_frame::<ResourceFrame, _>(&mut r, max).await;
        let (bytes, end) = match &frame {
            Ok(Some(ResourceFrame::Event(entry))) => (Some(entry_bytes(entry)), false),
            Ok(Some(ResourceFrame::Hello { origin, .. })) => {
                (Some(origin.len().saturating_add(SMALL_INPUT_BYTES)), false)
            }
            Ok(Some(ResourceFrame::Large { .. })) => (Some(SMALL_INPUT_BYTES), false),
            Ok(Some(other)) => {
                tracing::debug!(?kind, frame = other.kind(), "frame not for a receiver ignored");
                continue;
            }
            Err(FrameError::Unexpected { kind: frame }) => {
                tracing::debug!(?kind, frame, "frame not for a receiver ignored");
                continue;
            }
            Ok(None) => (None, true),
            Err(e) => (None, !e.is_recoverable()),
        };
        let held = match bytes {
            // An entry larger than the whole budget waits for all of it.
            Some(n) => {
                let n = u32::try_from(n.min(budget_bytes)).unwrap_or(u32::MAX);
                match budget.clone().acquire_many_owned(n).await {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                }
            }
            None => None,
        };
        let input = Input::Frame {
            kind,
            generation,
            frame,
            held,
        };
        if tx.send(input).await.is_err() || end {
            return;
        }
    }
}

/// Starts `peer`'s session task; the sender hands it streams and sync ticks.
pub(super) fn spawn_session(
    env: Arc<InboundEnv>,
    log: Arc<LogThrottle>,
    peer: PeerId,
) -> mpsc::Sender<Attach> {
    let (tx, rx) = mpsc::channel(ATTACH_QUEUE);
    tokio::spawn(async move {
        match Session::start(env, log, peer).await {
            Some(session) => session.run(rx).await,
            None => tracing::debug!(%peer, "inbound session not started: shutting down"),
        }
    });
    tx
}

struct Session {
    env: Arc<InboundEnv>,
    log: Arc<LogThrottle>,
    peer: PeerId,
    origin: String,
    /// Entries above the applied mark, the mark itself, and when to pull.
    reorder: Reorder<Waiting>,
    /// The applied mark, for the pull task.
    applied_tx: watch::Sender<u64>,
    /// Bytes of entries read from the streams and not yet applied or dropped (in the inbox
    /// or in the reorder buffer): `--max-partner-buffer-bytes`.
    budget: Arc<Semaphore>,
    applier: Applier,
    writers: [Option<(u64, BufWriter<WriteHalf<Stream>>)>; 3],
    /// The reader of each resource stream: one stream per kind, a new one replaces it.
    readers: [Option<tokio::task::JoinHandle<()>>; 3],
    generation: u64,
    inputs: mpsc::Sender<Input>,
    inputs_rx: Option<mpsc::Receiver<Input>>,
    /// The origin's open snapshot stream, if any (a new one replaces it).
    snapshot: Option<SnapshotIn>,
}

impl Session {
    async fn start(env: Arc<InboundEnv>, log: Arc<LogThrottle>, peer: PeerId) -> Option<Session> {
        let origin = peer.to_string();
        let applied = retry(&env, "read applied mark", || env.store.applied(&origin)).await?;
        let (inputs, inputs_rx) = mpsc::channel(SESSION_INBOX);
        let budget_bytes = env.tuning.max_partner_buffer_bytes.min(Semaphore::MAX_PERMITS);
        Some(Session {
            applier: Applier::new(env.clone(), log.clone(), peer),
            reorder: Reorder::new(applied, env.tuning.send_window, budget_bytes),
            applied_tx: watch::channel(applied).0,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            env,
            log,
            peer,
            origin,
            writers: Default::default(),
            readers: Default::default(),
            generation: 0,
            inputs,
            inputs_rx: Some(inputs_rx),
            snapshot: None,
        })
    }

    async fn run(mut self, mut attach: mpsc::Receiver<Attach>) {
        let Some(mut rx) = self.inputs_rx.take() else {
            return;
        };
        let mut shutdown = self.env.shutdown.clone();
        let mut gap_check = tokio::time::interval(GAP_GRACE);
        loop {
            tokio::select! {
                a = attach.recv() => match a {
                    Some(Attach::Stream { kind, reader, writer }) => self.attach(kind, reader, writer),
                    Some(Attach::PeriodicSync) => self.want_sync(u64::MAX),
                    Some(Attach::Snapshot { begin, reader, writer }) => {
                        if !self.attach_snapshot(begin, reader, writer).await {
                            break;
                        }
                    }
                    None => break,
                },
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    if !self.on_inputs(input, &mut rx).await {
                        break;
                    }
                }
                _ = gap_check.tick() => {
                    self.check_gap();
                    self.applier.clear_published().await;
                }
                _ = crate::shutdown::signalled(&mut shutdown) => break,
            }
        }
        for r in self.readers.iter().flatten() {
            r.abort();
        }
        self.applier.clear_published().await;
    }

    /// Takes `first` and what else is already there (up to a batch held), then applies it
    /// in batches. Returns false on shutdown.
    async fn on_inputs(&mut self, first: Input, rx: &mut mpsc::Receiver<Input>) -> bool {
        if !self.on_input(first).await {
            return false;
        }
        while self.reorder.len() < self.env.tuning.apply_batch {
            match rx.try_recv() {
                Ok(input) => {
                    if !self.on_input(input).await {
                        return false;
                    }
                }
                Err(_) => break,
            }
        }
        self.apply_ready().await
    }

    /// Takes a new resource stream. One stream per kind: a new one replaces (and resets)
    /// the open one, as a partner that reconnects opens new streams while the old ones may
    /// still look open here. Frames the old one already delivered are still handled.
    fn attach(&mut self, kind: StreamKind, reader: ReadHalf<Stream>, writer: BufWriter<WriteHalf<Stream>>) {
        self.generation = self.generation.saturating_add(1);
        let generation = self.generation;
        if let Some(old) = self.readers[kind as usize].take() {
            if !old.is_finished() {
                old.abort();
                if let Some(count) = self.log.hit(self.peer, "stream_replaced") {
                    tracing::info!(peer = %self.peer, ?kind, count, "a new resource stream replaces the open one of its kind");
                }
            }
        }
        // The budget's size is the reorder buffer's byte bound (both set in `start`).
        self.readers[kind as usize] = Some(tokio::spawn(read_stream(
            reader,
            self.env.tuning.max_frame_bytes,
            self.budget.clone(),
            self.reorder.max_bytes(),
            self.inputs.clone(),
            kind,
            generation,
        )));
        self.writers[kind as usize] = Some((generation, writer));
    }

    /// Takes one input. Returns false on shutdown.
    async fn on_input(&mut self, input: Input) -> bool {
        match input {
            Input::Frame {
                kind,
                generation,
                frame,
                held,
            } => self.on_frame(kind, generation, frame, held).await,
            Input::Synced(entries) => {
                // A round is contiguous from the applied mark: what fills the buffer is
                // applied on the way, so a round larger than the byte bound still goes in.
                for entry in entries {
                    if self.reorder.is_full_for(entry_bytes(&entry)) && !self.apply_ready().await {
                        return false;
                    }
                    self.buffer(entry, None);
                }
            }
            Input::Snapshot(input) => {
                let current = self
                    .snapshot
                    .as_ref()
                    .is_some_and(|s| s.generation == input.generation);
                if !current {
                    return true;
                }
                match input.frame {
                    Ok(Some(frame)) => return self.on_snapshot(frame).await,
                    Ok(None) => self.snapshot = None,
                    Err(e) => {
                        let code = match e {
                            FrameError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                            _ => ErrorCode::InvalidJson,
                        };
                        let refusal = Refusal::new(code, format!("unreadable snapshot frame: {e}"));
                        if let Some(mut s) = self.snapshot.take() {
                            s.refuse(&self.env, &self.log, self.peer, refusal).await;
                        }
                    }
                }
            }
            Input::SyncDone(result) => {
                if let Err(e) = &result {
                    if let Some(count) = self.log.hit(self.peer, "sync_failed") {
                        tracing::warn!(peer = %self.peer, cause = %e, applied = self.reorder.applied(), count, "journal sync failed; retried at the next trigger");
                    }
                }
                if let Some(pull) = self.reorder.sync_done(result.is_ok()) {
                    self.start_pull(pull);
                }
            }
        }
        true
    }

    async fn on_frame(
        &mut self,
        kind: StreamKind,
        generation: u64,
        frame: Result<Option<ResourceFrame>, FrameError>,
        held: Option<OwnedSemaphorePermit>,
    ) {
        match frame {
            Ok(Some(ResourceFrame::Hello { origin, head })) => self.on_hello(kind, origin, head).await,
            Ok(Some(ResourceFrame::Event(entry))) => self.buffer(entry, held),
            Ok(Some(ResourceFrame::Large { seq })) => self.want_sync(seq),
            Ok(Some(other)) => tracing::debug!(peer = %self.peer, ?other, "unexpected frame from sender"),
            Err(e) if e.is_recoverable() => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                    _ => ErrorCode::InvalidJson,
                };
                // The entry it held (if any) leaves a hole that a pull fills.
                self.env.metrics.refused("inbound", code);
                if let Some(count) = self.log.hit(self.peer, code.as_str()) {
                    tracing::warn!(peer = %self.peer, ?kind, code = code.as_str(), count, cause = %e, "unreadable frame skipped");
                }
            }
            Ok(None) | Err(_) => {
                if matches!(&self.writers[kind as usize], Some((g, _)) if *g == generation) {
                    self.writers[kind as usize] = None;
                }
            }
        }
    }

    /// Takes a snapshot stream (replacing an open one) and its first frame. Returns false
    /// on shutdown.
    async fn attach_snapshot(
        &mut self,
        begin: crate::p2p::wire::SyncFrame,
        reader: ReadHalf<Stream>,
        writer: BufWriter<WriteHalf<Stream>>,
    ) -> bool {
        self.generation = self.generation.saturating_add(1);
        let generation = self.generation;
        let task = tokio::spawn(super::snapshot::read_frames(
            reader,
            self.env.tuning.max_frame_bytes,
            self.budget.clone(),
            self.reorder.max_bytes(),
            self.inputs.clone(),
            generation,
            self.env.tuning.sync_timeout,
        ));
        self.snapshot = Some(SnapshotIn::new(generation, writer, task));
        self.on_snapshot(begin).await
    }

    /// One frame of the snapshot stream. Returns false on shutdown.
    async fn on_snapshot(&mut self, frame: crate::p2p::wire::SyncFrame) -> bool {
        let Some(snapshot) = self.snapshot.as_mut() else {
            return true;
        };
        let applied = self.reorder.applied();
        match snapshot
            .on_frame(&self.env, &self.log, self.peer, &mut self.applier, applied, frame)
            .await
        {
            Step::Continue => {}
            Step::Close => self.snapshot = None,
            Step::Applied(position) => {
                // What was buffered is older than the snapshot: the journal follows from P.
                self.reorder.clear();
                self.reorder.mark_applied(position);
                self.applied_tx.send_replace(position);
            }
            Step::Shutdown => return false,
        }
        true
    }

    /// Answers a `hello` with the applied mark (and pulls when its head is far ahead), or
    /// refuses one for another origin.
    async fn on_hello(&mut self, kind: StreamKind, origin: String, head: u64) {
        if origin == self.origin {
            self.write_to(
                kind,
                &[ResourceFrame::Ack {
                    seq: self.reorder.applied(),
                }],
            )
            .await;
            if let Some(pull) = self.reorder.hello(head) {
                self.start_pull(pull);
            }
            return;
        }
        self.env.metrics.refused("inbound", ErrorCode::ForgedOrigin);
        if let Some(count) = self.log.hit(self.peer, "forged_origin") {
            tracing::warn!(peer = %self.peer, claimed = %origin, code = "forged_origin", count, "hello for another origin refused");
        }
        let refusal = Refusal::new(
            ErrorCode::ForgedOrigin,
            format!("you are {}, not {origin}", self.peer),
        );
        self.write_to(kind, &[error_frame(None, &refusal)]).await;
    }

    fn buffer(&mut self, entry: JournalEntry, held: Option<OwnedSemaphorePermit>) {
        let (seq, bytes) = (entry.seq, entry_bytes(&entry));
        let waiting = Waiting { entry, _held: held };
        let applied = self.reorder.applied();
        match self.reorder.offer(seq, waiting, bytes) {
            Buffered::Kept => {}
            // A resend of something handled: only the ack was missing (owed now).
            Buffered::Stale => Metrics::add(&self.env.metrics.events_stale, 1),
            Buffered::BeyondWindow => {
                tracing::debug!(peer = %self.peer, seq, applied, "entry beyond the reorder window dropped; it comes again");
            }
            Buffered::NoRoom => {
                Metrics::add(&self.env.metrics.events_buffer_dropped, 1);
                if let Some(count) = self.log.hit(self.peer, "buffer_full") {
                    tracing::warn!(peer = %self.peer, seq, applied, count, max_bytes = self.env.tuning.max_partner_buffer_bytes, "reorder buffer full: entry dropped, pulled later by journal sync");
                }
            }
        }
    }

    /// A hole (or entries dropped for lack of room) that outlived one check is filled by a
    /// pull.
    fn check_gap(&mut self) {
        if let Some(target) = self.reorder.check_gap() {
            if let Some(count) = self.log.hit(self.peer, "gap") {
                tracing::info!(peer = %self.peer, applied = self.reorder.applied(), up_to = target, count, "filling a gap by journal sync");
            }
            self.want_sync(target);
        }
    }

    fn want_sync(&mut self, target: u64) {
        if let Some(pull) = self.reorder.want_sync(target) {
            self.start_pull(pull);
        }
    }

    /// Pulls rounds of the origin's journal until `pull.target` is applied.
    fn start_pull(&mut self, pull: Pull) {
        let (env, peer) = (self.env.clone(), self.peer);
        let mut applied = self.applied_tx.subscribe();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let result = pull_until(&env, peer, pull, &mut applied, &inputs).await;
            let _ = inputs.send(Input::SyncDone(result)).await;
        });
    }

    /// Applies every contiguous run after the applied mark. Returns false on shutdown.
    async fn apply_ready(&mut self) -> bool {
        loop {
            // The budget bytes an entry held are given back here: the entry is in `run`.
            let run: Vec<JournalEntry> = self
                .reorder
                .next_run(self.env.tuning.apply_batch)
                .into_iter()
                .map(|waiting| waiting.entry)
                .collect();
            let Some(up_to) = run.last().map(|e| e.seq) else {
                if self.reorder.take_ack_owed() {
                    self.send_ack(Vec::new()).await;
                }
                return true;
            };
            match self.applier.apply(up_to, run).await {
                RunOutcome::Applied { up_to, replies } => {
                    self.reorder.mark_applied(up_to);
                    self.applied_tx.send_replace(up_to);
                    self.send_ack(replies).await;
                }
                RunOutcome::NotPartner(refusal) => {
                    // The partnership ended while its streams were open: stop taking its
                    // events.
                    self.send_ack(vec![refusal]).await;
                    self.writers = Default::default();
                    self.reorder.clear();
                }
                RunOutcome::Shutdown => return false,
            }
        }
    }

    /// Sends refusals then the cumulative ack on the first open stream.
    async fn send_ack(&mut self, mut frames: Vec<ResourceFrame>) {
        frames.push(ResourceFrame::Ack {
            seq: self.reorder.applied(),
        });
        if let Some(kind) = StreamKind::ALL
            .into_iter()
            .find(|k| self.writers[*k as usize].is_some())
        {
            self.write_to(kind, &frames).await;
        }
    }

    async fn write_to(&mut self, kind: StreamKind, frames: &[ResourceFrame]) {
        let timeout = self.env.tuning.io_timeout;
        let Some((_, w)) = self.writers[kind as usize].as_mut() else {
            return;
        };
        let mut buf = Vec::new();
        for f in frames {
            wire::encode_frame(f, &mut buf);
        }
        let written = tokio::time::timeout(timeout, wire::write_encoded(w, &buf)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::debug!(peer = %self.peer, ?kind, "stream gone while answering");
            self.writers[kind as usize] = None;
        }
    }
}

/// Pull rounds from `peer` until `pull.target` (or its head, for `u64::MAX`) is applied.
///
/// Pipelined one round deep: round k+1 is fetched while the session applies round k, and
/// handed over once round k is applied, so at most two rounds are held in memory.
async fn pull_until(
    env: &InboundEnv,
    peer: PeerId,
    pull: Pull,
    applied: &mut watch::Receiver<u64>,
    inputs: &mpsc::Sender<Input>,
) -> Result<(), String> {
    let t = &env.tuning;
    if let Some(addr) = env.partners.addr(&peer) {
        env.net
            .dial(peer, addr, t.io_timeout)
            .await
            .map_err(|e| e.to_string())?;
    }
    // The session may have applied more since it asked.
    let mut since = pull.since.max(*applied.borrow_and_update());
    // The round handed to the session and not yet known applied.
    let mut handed: Option<u64> = None;
    while since < pull.target {
        let pulled = sync::pull::pull(&env.net, peer, since, t, &env.metrics)
            .await
            .map_err(|e| e.to_string())?;
        let (until, head, count) = (pulled.until, pulled.head, pulled.entries.len());
        tracing::debug!(%peer, since, until, head, count, "journal sync round");
        if let Some(previous) = handed.take() {
            applied_to(applied, previous, t.sync_timeout).await?;
        }
        if count > 0 {
            inputs
                .send(Input::Synced(pulled.entries))
                .await
                .map_err(|_| "session ended".to_owned())?;
            handed = Some(until);
        }
        if until >= head || count == 0 {
            break;
        }
        since = until;
    }
    match handed {
        Some(last) => applied_to(applied, last, t.sync_timeout).await,
        None => Ok(()),
    }
}

/// Waits until the session applied up to `until`.
async fn applied_to(applied: &mut watch::Receiver<u64>, until: u64, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, applied.wait_for(|a| *a >= until)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!("round up to {until} not applied within {timeout:?}")),
    }
}
