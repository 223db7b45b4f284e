//! Inbound apply: receives partners' journals, applies them to the store by version,
//! publishes them on the local NATS, and only then acknowledges. Also answers partners'
//! heartbeats and serves this node's journal to partners that pull it (journal sync).
//!
//! The [`InboundApply`] actor routes each accepted stream to its peer's session task. A
//! session merges the three resource streams of one origin back into seq order (a reorder
//! buffer, bounded by the sender's window), so entries are applied exactly in the order
//! the origin journaled them. For each contiguous run:
//! 1. refuse what is forged (origin or creator is not the sending peer) with an `error`
//!    frame, a log line and a metric — the run goes on;
//! 2. one store commit: resources by version, outbox rows, the origin's applied mark; an
//!    entry the store cannot hold (`Rejected`) gets an `invalid_document` error frame and
//!    is passed over like a conflict;
//! 3. publish the outbox rows on NATS and wait for the server's confirmation;
//! 4. acknowledge the whole run with one cumulative `ack`.
//!
//! A failure at 2 or 3 is retried with backoff while the streams wait (backpressure):
//! nothing is acknowledged that is not both stored and published.
//!
//! Gaps are filled by pulling the origin's journal (`crate::sync`): when the origin's
//! `hello` shows it is far ahead, when it announces an entry too large for a frame, when a
//! hole in the reorder buffer persists, at start-up, and every `sync_interval` as a safety net.
//!
//! Against partners that take more than their share: each session holds at most
//! `--max-partner-buffer-bytes` of its peer's entries (a byte budget taken before an entry
//! enters the inbox, given back when it is applied or dropped; the reorder buffer `Reorder`
//! is bounded by the same number of bytes), one stream per resource protocol (a new one
//! replaces the open one), one heartbeat stream per partner, per-peer shares of the sync,
//! refusal and forward pools (`guard::PeerPool`), and refusals logged once per interval per
//! peer and code (`guard::LogThrottle`) while every one is counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::io::{BufWriter, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::Tuning;
use crate::event::{ErrorCode, JournalEntry, Refusal};
use crate::guard::{LogThrottle, PeerPool, PoolFull};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self, StreamKind, PROTOCOL_HEARTBEAT};
use crate::peers::partners::Partners;
use crate::store::{ApplyOutcome, Store};
use crate::sync::{self, PROTOCOL_SYNC};

use crate::commands::forwarder::Forwarder;
use crate::commands::{PROTOCOL_CONSIDERS, PROTOCOL_PLANNER};

/// Inputs buffered between the stream readers and a session (also bounded in bytes: the
/// entries they carry hold permits of the session's byte budget).
const SESSION_INBOX: usize = 4096;
/// Sync requests served at once, across all peers, and per peer (a third from one peer is
/// answered `busy`).
const MAX_SYNC_SERVES: usize = 64;
const SYNC_SERVES_PER_PEER: usize = 2;
/// Refusals being written at once (`not_partner`, `busy`), across all peers and per peer;
/// beyond, the stream is dropped (reset) without a frame.
const MAX_REFUSALS: usize = 64;
const REFUSALS_PER_PEER: usize = 4;
/// Most heartbeat answerers remembered: one per partner (a new heartbeat stream replaces
/// the peer's previous one), so this only bounds a partner list larger than it.
const MAX_HEARTBEATS: usize = 1024;
/// Inbound streams one peer can hold open at once, whatever the protocols: three resource
/// streams (a new one replaces the open one of its kind), one heartbeat stream (same rule),
/// its sync and refusal shares, and its share of considers / planner streams (bounded by
/// the forwarder, `commands::FORWARD_STREAMS_PER_PEER`).
pub const MAX_STREAMS_PER_PEER: usize =
    3 + 1 + SYNC_SERVES_PER_PEER + REFUSALS_PER_PEER + crate::commands::forwarder::FORWARD_STREAMS_PER_PEER;
/// Streams (and sync ticks) waiting for a session to take them; beyond, a new stream is
/// reset.
const ATTACH_QUEUE: usize = 16;
/// A repeated refusal from one peer is logged once per this interval, with its count.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// A hole in the reorder buffer still there after this is filled by a pull.
const GAP_GRACE: Duration = Duration::from_secs(1);
/// Bytes counted for an input that carries no entry (a `hello`, a `large` marker).
const SMALL_INPUT_BYTES: usize = 64;

pub struct InboundEnv {
    pub own_id: String,
    pub store: Arc<dyn Store>,
    pub publisher: Arc<crate::nats::Publisher>,
    /// Serves considers / planner streams (its own bounds and per-peer rate).
    pub forwarder: Arc<Forwarder>,
    pub net: p2p::Client,
    pub partners: Arc<Partners>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    pub shutdown: watch::Receiver<bool>,
}

pub struct InboundApply {
    env: Arc<InboundEnv>,
    /// Repeated refusals logged once per interval per peer and code, shared with every
    /// session.
    log: Arc<LogThrottle>,
    sessions: HashMap<PeerId, mpsc::Sender<Attach>>,
    /// Sync requests being served: a bounded share per peer.
    syncs: Arc<PeerPool>,
    /// `not_partner` and `busy` answers being written.
    refusals: Arc<PeerPool>,
    /// The heartbeat answerer of each partner: one at a time per peer.
    heartbeats: HashMap<PeerId, tokio::task::AbortHandle>,
}

impl InboundApply {
    pub fn new(env: InboundEnv) -> Self {
        InboundApply {
            env: Arc::new(env),
            log: Arc::new(LogThrottle::new(REFUSAL_LOG_EVERY)),
            sessions: HashMap::new(),
            syncs: PeerPool::new(MAX_SYNC_SERVES, SYNC_SERVES_PER_PEER),
            refusals: PeerPool::new(MAX_REFUSALS, REFUSALS_PER_PEER),
            heartbeats: HashMap::new(),
        }
    }

    fn session(&mut self, peer: PeerId) -> &mpsc::Sender<Attach> {
        let alive = self.sessions.get(&peer).is_some_and(|s| !s.is_closed());
        if !alive {
            let session = spawn_session(self.env.clone(), self.log.clone(), peer);
            self.sessions.insert(peer, session);
        }
        // Inserted just above when missing.
        &self.sessions[&peer]
    }

    /// Runs `work` on a permit of `pool`; when the peer holds its share (or the pool is
    /// empty) the stream inside `work` is dropped (reset), logged (throttled) and counted.
    /// Returns false when refused.
    fn helper<F>(&self, pool: &Arc<PeerPool>, peer: PeerId, what: &'static str, work: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match pool.try_acquire(peer) {
            Ok(permit) => {
                tokio::spawn(async move {
                    work.await;
                    drop(permit);
                });
                true
            }
            Err(full) => {
                self.pool_full(peer, what, full);
                false
            }
        }
    }

    fn pool_full(&self, peer: PeerId, what: &'static str, full: PoolFull) {
        self.env.metrics.refused("inbound", ErrorCode::Busy);
        if let Some(count) = self.log.hit(peer, "busy") {
            tracing::warn!(%peer, what, code = "busy", count, cause = %full, "inbound helper pool full for this peer; stream reset");
        }
    }

    /// Writes an `error` frame on `stream` and closes it, on a refusal permit.
    fn refuse(&self, peer: PeerId, mut stream: Stream, code: ErrorCode, message: &'static str) {
        let timeout = self.env.tuning.io_timeout;
        self.helper(&self.refusals, peer, "refusal", async move {
            let frame = Frame::error(None, code, message);
            let _ = tokio::time::timeout(timeout, async {
                let _ = wire::write_frame(&mut stream, &frame).await;
                let _ = stream.close().await;
            })
            .await;
        });
    }

    /// Starts answering `peer`'s heartbeats on `stream`, replacing (resetting) the stream it
    /// opened before, if any: one heartbeat stream per partner session.
    fn heartbeat(&mut self, peer: PeerId, stream: Stream) {
        let t = &self.env.tuning;
        let (idle, timeout, max) = (t.pong_discard_timeout * 2, t.io_timeout, t.max_frame_bytes);
        if let Some(old) = self.heartbeats.remove(&peer) {
            if !old.is_finished() {
                old.abort();
                if let Some(count) = self.log.hit(peer, "heartbeat_replaced") {
                    tracing::info!(%peer, count, "a new heartbeat stream replaces the open one");
                }
            }
        }
        if self.heartbeats.len() >= MAX_HEARTBEATS {
            self.heartbeats.retain(|_, h| !h.is_finished());
            if self.heartbeats.len() >= MAX_HEARTBEATS {
                self.pool_full(peer, "heartbeat", PoolFull::Total(MAX_HEARTBEATS));
                return;
            }
        }
        let task = tokio::spawn(answer_heartbeats(stream, idle, timeout, max));
        self.heartbeats.insert(peer, task.abort_handle());
    }
}

/// A stream opened by a peer on one of the protocols this actor serves.
#[derive(Message)]
#[rtype(result = "()")]
pub struct IncomingStream {
    pub peer: PeerId,
    pub protocol: StreamProtocol,
    pub stream: Stream,
}

impl Actor for InboundApply {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let protocols = StreamKind::ALL.map(StreamKind::protocol).into_iter().chain([
            PROTOCOL_HEARTBEAT,
            PROTOCOL_SYNC,
            PROTOCOL_CONSIDERS,
            PROTOCOL_PLANNER,
        ]);
        for protocol in protocols {
            let Some(mut incoming) = self.env.net.accept(protocol.clone()) else {
                tracing::error!(%protocol, "protocol already registered");
                continue;
            };
            let me = ctx.address();
            // Hand each stream over at once: libp2p-stream drops streams we are slow to
            // take. `send` waits for room in the mailbox instead of failing.
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    if me
                        .send(IncomingStream {
                            peer,
                            protocol: protocol.clone(),
                            stream,
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        // A node coming back pulls what its partners journaled meanwhile at once, without
        // waiting for their links to reconnect or for the first safety-net tick.
        for peer in self.env.partners.peers() {
            // A full queue already holds work for the session: a tick more adds nothing.
            let _ = self.session(peer).try_send(Attach::PeriodicSync);
        }
        ctx.run_interval(self.env.tuning.sync_interval, |act, _| {
            for peer in act.env.partners.peers() {
                let _ = act.session(peer).try_send(Attach::PeriodicSync);
            }
        });
    }
}

impl Handler<IncomingStream> for InboundApply {
    type Result = ();

    fn handle(&mut self, msg: IncomingStream, _: &mut Self::Context) {
        let IncomingStream {
            peer,
            protocol,
            stream,
        } = msg;
        // Considers and planner messages come from any peer of the network (not only
        // partners); a blacklisted peer never gets this far.
        if protocol == PROTOCOL_CONSIDERS || protocol == PROTOCOL_PLANNER {
            // Not on a helper permit: an idle planner stream must hold none (the forwarder
            // bounds its streams itself and closes idle ones to make room).
            self.env.forwarder.accept(peer, &protocol, stream);
            return;
        }
        if !self.env.partners.contains(&peer) {
            self.env.metrics.refused("inbound", ErrorCode::NotPartner);
            if let Some(count) = self.log.hit(peer, "not_partner") {
                tracing::warn!(%peer, %protocol, code = "not_partner", count, "stream from a peer that is not a partner refused");
            }
            self.refuse(
                peer,
                stream,
                ErrorCode::NotPartner,
                "this node does not accept events from you: not a partner",
            );
            return;
        }
        if protocol == PROTOCOL_HEARTBEAT {
            self.heartbeat(peer, stream);
            return;
        }
        if protocol == PROTOCOL_SYNC {
            let permit = match self.syncs.try_acquire(peer) {
                Ok(permit) => permit,
                Err(full) => {
                    // The peer already has its share of sync answers running: `busy`, so
                    // its pull fails at once and is retried at its next trigger.
                    self.env.metrics.refused("inbound", ErrorCode::Busy);
                    if let Some(count) = self.log.hit(peer, "busy") {
                        tracing::warn!(%peer, what = "sync", code = "busy", count, cause = %full, "sync request answered busy");
                    }
                    self.refuse(
                        peer,
                        stream,
                        ErrorCode::Busy,
                        "too many sync requests from you at once; retry later",
                    );
                    return;
                }
            };
            let env = self.env.clone();
            tokio::spawn(async move {
                let t = &env.tuning;
                let served =
                    sync::serve(env.store.as_ref(), &env.own_id, peer, stream, t, &env.metrics).await;
                if let Err(e) = served {
                    tracing::debug!(%peer, cause = %e, "sync request not served");
                }
                drop(permit);
            });
            return;
        }
        let Some(kind) = StreamKind::ALL.into_iter().find(|k| k.protocol() == protocol) else {
            return;
        };
        let (r, w) = stream.split();
        let attach = Attach::Stream {
            kind,
            reader: r,
            writer: BufWriter::with_capacity(16 * 1024, w),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.session(peer).try_send(attach) {
            // The session is busy (a store retry, a write waiting on the peer) and streams
            // keep coming: this one is reset rather than queued without bound.
            self.env.metrics.refused("inbound", ErrorCode::Busy);
            if let Some(count) = self.log.hit(peer, "busy") {
                tracing::warn!(%peer, what = "resource stream", code = "busy", count, "session queue full; stream reset");
            }
        }
    }
}

/// Answers `ping` with `pong` until the stream ends or stays idle too long.
async fn answer_heartbeats(mut stream: Stream, idle: Duration, timeout: Duration, max: usize) {
    loop {
        match tokio::time::timeout(idle, wire::read_frame(&mut stream, max)).await {
            Ok(Ok(Some(Frame::Ping { nonce }))) => {
                let pong = Frame::Pong { nonce };
                let written = tokio::time::timeout(timeout, wire::write_frame(&mut stream, &pong)).await;
                if !matches!(written, Ok(Ok(()))) {
                    return;
                }
            }
            Ok(Ok(Some(_))) => {}
            Ok(Err(e)) if e.is_recoverable() => {}
            _ => return,
        }
    }
}

/// What the actor hands to a session.
enum Attach {
    Stream {
        kind: StreamKind,
        reader: futures::io::ReadHalf<Stream>,
        writer: BufWriter<WriteHalf<Stream>>,
    },
    /// Time for the safety-net sync.
    PeriodicSync,
}

/// What a session's inputs carry.
enum Input {
    /// A frame from a resource stream; `generation` tells a replaced stream's leftovers
    /// from the current one. `held`: the bytes of the session's budget this input holds,
    /// given back when the entry is applied or dropped.
    Frame {
        kind: StreamKind,
        generation: u64,
        frame: Result<Option<Frame>, FrameError>,
        held: Option<OwnedSemaphorePermit>,
    },
    /// Entries pulled by journal sync.
    Synced(Vec<JournalEntry>),
    /// The pull task ended.
    SyncDone(Result<(), String>),
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

/// What [`Reorder::insert`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buffered {
    /// At or below `applied`: already handled.
    Stale,
    Kept,
    /// Beyond the reorder window (`applied + 2 × send_window`): dropped, it comes again.
    BeyondWindow,
    /// No room in the byte bound for it: dropped, it is pulled later.
    NoRoom,
}

/// The reorder buffer: entries above `applied` waiting for the ones before them, bounded
/// in seqs (a window above `applied`) and in bytes. When a new entry does not fit, the
/// highest seqs make room for a lower one (lower seqs are needed first); what is dropped
/// for lack of room is remembered (`dropped_max`) and pulled by journal sync once the
/// buffer gets there. Pure bookkeeping: no I/O.
struct Reorder<T> {
    entries: BTreeMap<u64, (T, usize)>,
    bytes: usize,
    max_bytes: usize,
    /// The highest seq dropped for lack of room (0: none).
    dropped_max: u64,
}

impl<T> Reorder<T> {
    fn new(max_bytes: usize) -> Reorder<T> {
        Reorder {
            entries: BTreeMap::new(),
            bytes: 0,
            max_bytes,
            dropped_max: 0,
        }
    }

    fn insert(&mut self, applied: u64, window: u64, seq: u64, item: T, bytes: usize) -> Buffered {
        if seq <= applied {
            return Buffered::Stale;
        }
        if seq > applied.saturating_add(window) {
            return Buffered::BeyondWindow;
        }
        if let Some((_, old)) = self.entries.remove(&seq) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        while self.bytes.saturating_add(bytes) > self.max_bytes {
            match self.entries.last_key_value().map(|(k, _)| *k) {
                Some(highest) if highest > seq => {
                    if let Some((_, b)) = self.entries.remove(&highest) {
                        self.bytes = self.bytes.saturating_sub(b);
                    }
                    self.dropped_max = self.dropped_max.max(highest);
                }
                // Every entry kept is lower: this one is pulled later.
                Some(_) => {
                    self.dropped_max = self.dropped_max.max(seq);
                    return Buffered::NoRoom;
                }
                // Alone, an entry is kept whatever its size (a frame or a sync round
                // bounds it), so the lowest missing entry can always be applied.
                None => break,
            }
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.entries.insert(seq, (item, bytes));
        Buffered::Kept
    }

    fn take(&mut self, seq: u64) -> Option<T> {
        let (item, bytes) = self.entries.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(bytes);
        Some(item)
    }

    fn first(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }

    /// Whether an entry of `bytes` would push something out (an entry alone always fits).
    fn is_full_for(&self, bytes: usize) -> bool {
        !self.entries.is_empty() && self.bytes.saturating_add(bytes) > self.max_bytes
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The seq up to which a pull must go to fill what is missing after `applied` (a hole
    /// before the first buffered entry, or entries dropped for lack of room), if anything.
    fn missing_up_to(&self, applied: u64) -> Option<u64> {
        let next = applied.saturating_add(1);
        let hole = self
            .first()
            .filter(|first| *first > next)
            .map(|first| first.saturating_sub(1));
        let dropped =
            (self.dropped_max > applied && !self.entries.contains_key(&next)).then_some(self.dropped_max);
        hole.max(dropped)
    }
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
        let frame = wire::read_frame(&mut r, max).await;
        let (bytes, end) = match &frame {
            Ok(Some(Frame::Event(entry))) => (Some(entry_bytes(entry)), false),
            Ok(Some(Frame::Hello { origin, .. })) => {
                (Some(origin.len().saturating_add(SMALL_INPUT_BYTES)), false)
            }
            Ok(Some(Frame::Large { .. })) => (Some(SMALL_INPUT_BYTES), false),
            Ok(Some(other)) => {
                tracing::debug!(?kind, frame = other.kind(), "frame not for a receiver ignored");
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

fn spawn_session(env: Arc<InboundEnv>, log: Arc<LogThrottle>, peer: PeerId) -> mpsc::Sender<Attach> {
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
    applied: u64,
    /// `applied`, for the pull task.
    applied_tx: watch::Sender<u64>,
    /// Entries above `applied`, waiting for the ones before them.
    pending: Reorder<Waiting>,
    /// Bytes of entries read from the streams and not yet applied or dropped (in the inbox
    /// or in `pending`): `--max-partner-buffer-bytes`.
    budget: Arc<Semaphore>,
    writers: [Option<(u64, BufWriter<WriteHalf<Stream>>)>; 3],
    /// The reader of each resource stream: one stream per kind, a new one replaces it.
    readers: [Option<tokio::task::JoinHandle<()>>; 3],
    generation: u64,
    ack_owed: bool,
    /// Pull wanted up to here (`u64::MAX`: up to the origin's head).
    sync_target: u64,
    sync_running: bool,
    /// The target the running (or last) pull was started for.
    sync_pulled_for: u64,
    /// Something missing seen at the last check: (applied, pull target).
    gap_seen: Option<(u64, u64)>,
    /// Outbox rows published and not yet removed: they go with the next apply commit, or
    /// at the next gap check when no batch comes (a crash before then republishes them,
    /// a duplicate that `Nats-Msg-Id` lets readers drop).
    published: Vec<u64>,
    inputs: mpsc::Sender<Input>,
    inputs_rx: Option<mpsc::Receiver<Input>>,
}

impl Session {
    async fn start(env: Arc<InboundEnv>, log: Arc<LogThrottle>, peer: PeerId) -> Option<Session> {
        let origin = peer.to_string();
        let applied = retry(&env, "read applied mark", || env.store.applied(&origin)).await?;
        let (inputs, inputs_rx) = mpsc::channel(SESSION_INBOX);
        let budget_bytes = env.tuning.max_partner_buffer_bytes.min(Semaphore::MAX_PERMITS);
        Some(Session {
            env,
            log,
            peer,
            origin,
            applied,
            applied_tx: watch::channel(applied).0,
            pending: Reorder::new(budget_bytes),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            writers: Default::default(),
            readers: Default::default(),
            generation: 0,
            ack_owed: false,
            sync_target: 0,
            sync_running: false,
            sync_pulled_for: 0,
            gap_seen: None,
            published: Vec::new(),
            inputs,
            inputs_rx: Some(inputs_rx),
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
                    None => break,
                },
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    if !self.on_input(input).await {
                        break;
                    }
                    // Take what else is already there, then apply it in batches.
                    let mut stopped = false;
                    while self.pending.len() < self.env.tuning.apply_batch {
                        match rx.try_recv() {
                            Ok(input) => {
                                if !self.on_input(input).await {
                                    stopped = true;
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    if stopped {
                        break;
                    }
                    if !self.apply_ready().await {
                        break;
                    }
                }
                _ = gap_check.tick() => {
                    self.check_gap();
                    self.clear_published().await;
                }
                _ = crate::shutdown::signalled(&mut shutdown) => break,
            }
        }
        for r in self.readers.iter().flatten() {
            r.abort();
        }
        self.clear_published().await;
    }

    /// Takes a new resource stream. One stream per kind: a new one replaces (and resets)
    /// the open one, as a partner that reconnects opens new streams while the old ones may
    /// still look open here. Frames the old one already delivered are still handled.
    fn attach(
        &mut self,
        kind: StreamKind,
        reader: futures::io::ReadHalf<Stream>,
        writer: BufWriter<WriteHalf<Stream>>,
    ) {
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
            self.pending.max_bytes,
            self.inputs.clone(),
            kind,
            generation,
        )));
        self.writers[kind as usize] = Some((generation, writer));
    }

    /// Removes the published outbox rows no apply commit took along.
    async fn clear_published(&mut self) {
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
                    if self.pending.is_full_for(entry_bytes(&entry)) && !self.apply_ready().await {
                        return false;
                    }
                    self.buffer(entry, None);
                }
            }
            Input::SyncDone(result) => {
                self.sync_running = false;
                match result {
                    // Raised while the pull ran: another pass. Otherwise the owner had
                    // nothing more (its head is below the target): done, no busy loop.
                    Ok(()) if self.sync_target > self.sync_pulled_for && self.applied < self.sync_target => {
                        self.start_sync()
                    }
                    Ok(()) => self.sync_target = 0,
                    Err(e) => {
                        if let Some(count) = self.log.hit(self.peer, "sync_failed") {
                            tracing::warn!(peer = %self.peer, cause = %e, applied = self.applied, count, "journal sync failed; retried at the next trigger");
                        }
                        self.sync_target = 0;
                    }
                }
            }
        }
        true
    }

    async fn on_frame(
        &mut self,
        kind: StreamKind,
        generation: u64,
        frame: Result<Option<Frame>, FrameError>,
        held: Option<OwnedSemaphorePermit>,
    ) {
        match frame {
            Ok(Some(Frame::Hello { origin, head })) => {
                if origin == self.origin {
                    self.write_to(kind, &[Frame::Ack { seq: self.applied }]).await;
                    if head > self.applied.saturating_add(self.env.tuning.send_window / 2) {
                        self.want_sync(head);
                    }
                } else {
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
            }
            Ok(Some(Frame::Event(entry))) => self.buffer(entry, held),
            Ok(Some(Frame::Large { seq })) => self.want_sync(seq),
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

    fn buffer(&mut self, entry: JournalEntry, held: Option<OwnedSemaphorePermit>) {
        let (seq, bytes) = (entry.seq, entry_bytes(&entry));
        let window = self.env.tuning.send_window.saturating_mul(2);
        let waiting = Waiting { entry, _held: held };
        match self.pending.insert(self.applied, window, seq, waiting, bytes) {
            Buffered::Kept => {}
            Buffered::Stale => {
                // A resend of something handled: only the ack was missing.
                Metrics::add(&self.env.metrics.events_stale, 1);
                self.ack_owed = true;
            }
            Buffered::BeyondWindow => {
                tracing::debug!(peer = %self.peer, seq, applied = self.applied, "entry beyond the reorder window dropped; it comes again");
            }
            Buffered::NoRoom => {
                Metrics::add(&self.env.metrics.events_buffer_dropped, 1);
                if let Some(count) = self.log.hit(self.peer, "buffer_full") {
                    tracing::warn!(peer = %self.peer, seq, applied = self.applied, count, max_bytes = self.env.tuning.max_partner_buffer_bytes, "reorder buffer full: entry dropped, pulled later by journal sync");
                }
            }
        }
    }

    /// A hole (or entries dropped for lack of room) that outlived one check is filled by a
    /// pull.
    fn check_gap(&mut self) {
        match self.pending.missing_up_to(self.applied) {
            Some(target) if self.gap_seen == Some((self.applied, target)) => {
                if let Some(count) = self.log.hit(self.peer, "gap") {
                    tracing::info!(peer = %self.peer, applied = self.applied, up_to = target, count, "filling a gap by journal sync");
                }
                self.want_sync(target);
            }
            Some(target) => self.gap_seen = Some((self.applied, target)),
            None => self.gap_seen = None,
        }
    }

    fn want_sync(&mut self, target: u64) {
        self.sync_target = self.sync_target.max(target);
        if !self.sync_running {
            self.start_sync();
        }
    }

    /// Pulls rounds of the origin's journal until `sync_target` is applied.
    fn start_sync(&mut self) {
        self.sync_running = true;
        self.sync_pulled_for = self.sync_target;
        let (env, peer, target) = (self.env.clone(), self.peer, self.sync_target);
        let mut applied = self.applied_tx.subscribe();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let result = pull_until(&env, peer, target, &mut applied, &inputs).await;
            let _ = inputs.send(Input::SyncDone(result)).await;
        });
    }

    /// Applies every contiguous run after `applied`. Returns false on shutdown.
    async fn apply_ready(&mut self) -> bool {
        loop {
            let mut run = Vec::new();
            while run.len() < self.env.tuning.apply_batch {
                let Some(next) = self
                    .applied
                    .checked_add(1)
                    .and_then(|n| n.checked_add(run.len() as u64))
                else {
                    break;
                };
                match self.pending.take(next) {
                    // The budget bytes it held are given back here: the entry is in `run`.
                    Some(waiting) => run.push(waiting.entry),
                    None => break,
                }
            }
            if run.is_empty() {
                if std::mem::take(&mut self.ack_owed) {
                    self.send_ack(Vec::new()).await;
                }
                return true;
            }
            if !self.apply_run(run).await {
                return false;
            }
        }
    }

    async fn apply_run(&mut self, run: Vec<JournalEntry>) -> bool {
        let Some(up_to) = run.last().map(|e| e.seq) else {
            return true;
        };
        if !self.env.partners.contains(&self.peer) {
            // The partnership ended while its streams were open: stop taking its events.
            self.env.metrics.refused("inbound", ErrorCode::NotPartner);
            if let Some(count) = self.log.hit(self.peer, "not_partner") {
                tracing::warn!(peer = %self.peer, code = "not_partner", count, "no longer a partner; its streams are closed");
            }
            let refusal = Refusal::new(
                ErrorCode::NotPartner,
                "this node no longer accepts events from you",
            );
            self.send_ack(vec![error_frame(None, &refusal)]).await;
            self.writers = Default::default();
            self.pending.clear();
            return true;
        }
        let mut replies = Vec::new();
        let mut valid = Vec::with_capacity(run.len());
        for entry in run {
            match self.check(&entry) {
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
        let seqs: Vec<u64> = valid.iter().map(|e| e.seq).collect();
        let valid: Arc<[JournalEntry]> = valid.into();
        let origin = self.origin.clone();
        let env = self.env.clone();
        let published = std::mem::take(&mut self.published);
        let Some((outcomes, rows)) = retry(&env, "apply", || {
            env.store
                .apply_batch_clearing(&origin, up_to, valid.clone(), published.clone())
        })
        .await
        else {
            return false;
        };
        Metrics::add(&env.metrics.apply_commits, 1);
        for (seq, outcome) in seqs.iter().zip(&outcomes) {
            match outcome {
                ApplyOutcome::Applied => Metrics::add(&env.metrics.events_applied, 1),
                ApplyOutcome::Stale => Metrics::add(&env.metrics.events_stale, 1),
                ApplyOutcome::Conflict { owner } => {
                    let refusal =
                        Refusal::new(ErrorCode::Conflict, format!("the resource belongs to {owner}"));
                    env.metrics.refused("inbound", ErrorCode::Conflict);
                    if let Some(count) = self.log.hit(self.peer, "conflict") {
                        tracing::warn!(peer = %self.peer, seq, code = "conflict", count, %owner, "event refused");
                    }
                    replies.push(error_frame(Some(*seq), &refusal));
                }
                ApplyOutcome::Rejected { reason } => {
                    let refusal = Refusal::new(
                        ErrorCode::InvalidDocument,
                        format!("this node's store cannot hold the resource: {reason}"),
                    );
                    env.metrics.refused("inbound", ErrorCode::InvalidDocument);
                    if let Some(count) = self.log.hit(self.peer, "invalid_document") {
                        tracing::warn!(peer = %self.peer, seq, code = "invalid_document", count, %reason, "event refused by the store");
                    }
                    replies.push(error_frame(Some(*seq), &refusal));
                }
            }
        }
        if !rows.is_empty() {
            let timeout = env.tuning.io_timeout;
            if retry(&env, "publish", || env.publisher.publish_rows(&rows, timeout))
                .await
                .is_none()
            {
                return false;
            }
            Metrics::add(&env.metrics.nats_published, rows.len() as u64);
            // Removed with the next commit: a row left behind is published again at
            // start-up, a duplicate, never a loss.
            self.published.extend(rows.iter().map(|r| r.id));
        }
        self.applied = up_to;
        self.applied_tx.send_replace(up_to);
        self.ack_owed = false;
        self.send_ack(replies).await;
        true
    }

    fn check(&self, entry: &JournalEntry) -> Result<(), Refusal> {
        if entry.origin != self.origin {
            return Err(Refusal::new(
                ErrorCode::ForgedOrigin,
                format!("origin {} is not the sending peer {}", entry.origin, self.peer),
            ));
        }
        match entry.creator_id() {
            Some(c) if c == self.origin => {}
            Some(c) => {
                return Err(Refusal::new(
                    ErrorCode::NotCreator,
                    format!("creator_id {c} is not the sending peer {}", self.peer),
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

    /// Sends refusals then the cumulative ack on the first open stream.
    async fn send_ack(&mut self, mut frames: Vec<Frame>) {
        frames.push(Frame::Ack { seq: self.applied });
        if let Some(kind) = StreamKind::ALL
            .into_iter()
            .find(|k| self.writers[*k as usize].is_some())
        {
            self.write_to(kind, &frames).await;
        }
    }

    async fn write_to(&mut self, kind: StreamKind, frames: &[Frame]) {
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

/// Pull rounds from `peer` until `target` (or its head, for `u64::MAX`) is applied.
///
/// Pipelined one round deep: round k+1 is fetched while the session applies round k, and
/// handed over once round k is applied, so at most two rounds are held in memory.
async fn pull_until(
    env: &InboundEnv,
    peer: PeerId,
    target: u64,
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
    let mut since = *applied.borrow_and_update();
    // The round handed to the session and not yet known applied.
    let mut handed: Option<u64> = None;
    while since < target {
        let pulled = sync::pull(&env.net, peer, since, t, &env.metrics)
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

fn error_frame(seq: Option<u64>, refusal: &Refusal) -> Frame {
    Frame::error(seq, refusal.code, refusal.message.clone())
}

/// Retries `op` with backoff until it succeeds; `None` when shutdown came first.
async fn retry<T, E, F, Fut>(env: &InboundEnv, what: &str, mut op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut shutdown = env.shutdown.clone();
    let mut delay = env.tuning.backoff_min;
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(what, cause = %e, retry_in = ?delay, "inbound step failed; holding the ack")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::shutdown::signalled(&mut shutdown) => return None,
        }
        delay = (delay * 2).min(env.tuning.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 1000;

    #[test]
    fn the_reorder_buffer_keeps_what_fits_and_refuses_stale_and_far_entries() {
        let mut r: Reorder<()> = Reorder::new(100);
        assert_eq!(r.insert(5, W, 5, (), 10), Buffered::Stale);
        assert_eq!(r.insert(5, W, 5 + W + 1, (), 10), Buffered::BeyondWindow);
        assert_eq!(r.insert(5, W, u64::MAX, (), 10), Buffered::BeyondWindow);
        assert_eq!(
            r.insert(u64::MAX - 3, W, u64::MAX, (), 10),
            Buffered::Kept,
            "the window saturates"
        );
        let mut r: Reorder<()> = Reorder::new(100);
        assert_eq!(r.insert(0, W, 2, (), 40), Buffered::Kept);
        assert_eq!(
            r.insert(0, W, 2, (), 40),
            Buffered::Kept,
            "a duplicate replaces, not adds"
        );
        assert_eq!(r.bytes, 40);
        assert_eq!(r.missing_up_to(0), Some(1), "seq 1 is missing");
        assert_eq!(r.take(2), Some(()));
        assert_eq!(r.bytes, 0);
    }

    #[test]
    fn beyond_its_bytes_the_buffer_drops_the_highest_seqs_and_remembers_to_pull_them() {
        let mut r: Reorder<()> = Reorder::new(100);
        for seq in 3..=7 {
            assert_eq!(r.insert(0, W, seq, (), 20), Buffered::Kept);
        }
        assert_eq!(r.bytes, 100);
        // Higher than everything kept and no room: dropped.
        assert_eq!(r.insert(0, W, 8, (), 20), Buffered::NoRoom);
        assert_eq!(r.dropped_max, 8);
        // Lower seqs are needed first: the highest make room.
        assert_eq!(r.insert(0, W, 1, (), 30), Buffered::Kept);
        assert!(r.bytes <= 100);
        assert_eq!(r.first(), Some(1));
        assert!(r.take(7).is_none() && r.take(6).is_none(), "7 and 6 were dropped");
        assert_eq!(r.missing_up_to(0), None, "seq 1 is there");
        assert_eq!(r.take(1), Some(()));
        assert_eq!(
            r.missing_up_to(1),
            Some(8),
            "a hole at 2 and the dropped entries up to 8"
        );
        for seq in 3..=5 {
            assert_eq!(r.take(seq), Some(()));
        }
        assert_eq!(
            r.missing_up_to(5),
            Some(8),
            "nothing buffered, dropped entries to pull"
        );
        assert_eq!(r.missing_up_to(8), None, "all applied");
    }

    #[test]
    fn an_entry_larger_than_the_bound_is_kept_alone_so_progress_is_always_possible() {
        let mut r: Reorder<()> = Reorder::new(100);
        assert_eq!(r.insert(0, W, 1, (), 500), Buffered::Kept);
        assert_eq!(r.insert(0, W, 2, (), 1), Buffered::NoRoom);
        let mut r: Reorder<()> = Reorder::new(100);
        assert_eq!(r.insert(0, W, 5, (), 90), Buffered::Kept);
        assert_eq!(r.insert(0, W, 1, (), 500), Buffered::Kept, "5 makes room for 1");
        assert_eq!(r.len(), 1);
    }
}
