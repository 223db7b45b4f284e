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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use futures::io::{BufWriter, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::Tuning;
use crate::event::{ErrorCode, JournalEntry, Refusal};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self, StreamKind, PROTOCOL_HEARTBEAT};
use crate::store::{ApplyOutcome, Store};
use crate::sync::{self, PROTOCOL_SYNC};

use super::commands::{Forwarder, PROTOCOL_CONSIDERS, PROTOCOL_PLANNER};

/// Inputs buffered between the stream readers and a session.
const SESSION_INBOX: usize = 4096;
/// Concurrent helper tasks (refusals, heartbeat answers, sync answers) across all peers.
const MAX_HELPERS: usize = 256;
/// Concurrent considers / planner streams across all peers.
const MAX_FORWARDS: usize = 64;
/// A hole in the reorder buffer still there after this is filled by a pull.
const GAP_GRACE: Duration = Duration::from_secs(1);

/// The peers this node accepts events from, with the address to reach each.
#[derive(Default)]
pub struct Partners(RwLock<HashMap<PeerId, Option<Multiaddr>>>);

impl Partners {
    pub fn insert(&self, peer: PeerId, addr: Option<Multiaddr>) {
        if let Ok(mut s) = self.0.write() {
            s.insert(peer, addr);
        }
    }

    pub fn remove(&self, peer: &PeerId) {
        if let Ok(mut s) = self.0.write() {
            s.remove(peer);
        }
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0.read().map(|s| s.contains_key(peer)).unwrap_or(false)
    }

    pub fn addr(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.0.read().ok().and_then(|s| s.get(peer).cloned().flatten())
    }

    pub fn peers(&self) -> Vec<PeerId> {
        self.0
            .read()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }
}

pub struct InboundEnv {
    pub own_id: String,
    pub store: Arc<dyn Store>,
    pub publisher: Arc<crate::nats::Publisher>,
    /// For republishing considers / planner messages.
    pub nats: async_nats::Client,
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
    sessions: HashMap<PeerId, mpsc::UnboundedSender<Attach>>,
    helpers: Arc<Semaphore>,
    /// Considers / planner streams, which any peer may open and keep: their own bound, so
    /// they can never starve partners' heartbeats and syncs.
    forwards: Arc<Semaphore>,
}

impl InboundApply {
    pub fn new(env: InboundEnv) -> Self {
        InboundApply {
            env: Arc::new(env),
            sessions: HashMap::new(),
            helpers: Arc::new(Semaphore::new(MAX_HELPERS)),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        }
    }

    fn session(&mut self, peer: PeerId) -> &mpsc::UnboundedSender<Attach> {
        let alive = self.sessions.get(&peer).is_some_and(|s| !s.is_closed());
        if !alive {
            self.sessions.insert(peer, spawn_session(self.env.clone(), peer));
        }
        // Inserted just above when missing.
        &self.sessions[&peer]
    }

    /// Runs `work` on a helper permit, or drops the stream when too many are running.
    fn helper<F>(&self, peer: PeerId, what: &'static str, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let pool = if what == "forward" {
            &self.forwards
        } else {
            &self.helpers
        };
        match pool.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Err(_) => tracing::warn!(%peer, what, "too many inbound helper tasks; stream dropped"),
        }
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
            let _ = self.session(peer).send(Attach::PeriodicSync);
        }
        ctx.run_interval(self.env.tuning.sync_interval, |act, _| {
            for peer in act.env.partners.peers() {
                let _ = act.session(peer).send(Attach::PeriodicSync);
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
            mut stream,
        } = msg;
        let timeout = self.env.tuning.io_timeout;
        // Considers and planner messages come from any peer of the network (not only
        // partners); a blacklisted peer never gets this far.
        if protocol == PROTOCOL_CONSIDERS || protocol == PROTOCOL_PLANNER {
            // Not on a helper permit: an idle planner stream must hold none (the forwarder
            // bounds its streams itself and closes idle ones to make room).
            self.env.forwarder.accept(peer, &protocol, stream);
            return;
        }
        if !self.env.partners.contains(&peer) {
            tracing::warn!(%peer, %protocol, code = "not_partner", "stream from a peer that is not a partner refused");
            self.env.metrics.refused("inbound", ErrorCode::NotPartner);
            self.helper(peer, "refusal", async move {
                let frame = Frame::Error {
                    seq: None,
                    code: ErrorCode::NotPartner.as_str().to_owned(),
                    message: "this node does not accept events from you: not a partner".to_owned(),
                };
                let _ = tokio::time::timeout(timeout, async {
                    let _ = wire::write_frame(&mut stream, &frame).await;
                    let _ = stream.close().await;
                })
                .await;
            });
            return;
        }
        if protocol == PROTOCOL_HEARTBEAT {
            let idle = self.env.tuning.pong_discard_timeout * 2;
            let max = self.env.tuning.max_frame_bytes;
            self.helper(peer, "heartbeat", answer_heartbeats(stream, idle, timeout, max));
            return;
        }
        if protocol == PROTOCOL_SYNC {
            let env = self.env.clone();
            self.helper(peer, "sync", async move {
                let t = &env.tuning;
                let served =
                    sync::serve(env.store.as_ref(), &env.own_id, peer, stream, t, &env.metrics).await;
                if let Err(e) = served {
                    tracing::debug!(%peer, cause = %e, "sync request not served");
                }
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
        let _ = self.session(peer).send(attach);
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
    /// from the current one.
    Frame {
        kind: StreamKind,
        generation: u64,
        frame: Result<Option<Frame>, FrameError>,
    },
    /// Entries pulled by journal sync.
    Synced(Vec<JournalEntry>),
    /// The pull task ended.
    SyncDone(Result<(), String>),
}

fn spawn_session(env: Arc<InboundEnv>, peer: PeerId) -> mpsc::UnboundedSender<Attach> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        match Session::start(env, peer).await {
            Some(session) => session.run(rx).await,
            None => tracing::debug!(%peer, "inbound session not started: shutting down"),
        }
    });
    tx
}

struct Session {
    env: Arc<InboundEnv>,
    peer: PeerId,
    origin: String,
    applied: u64,
    /// `applied`, for the pull task.
    applied_tx: watch::Sender<u64>,
    /// Entries above `applied`, waiting for the ones before them.
    pending: BTreeMap<u64, JournalEntry>,
    writers: [Option<(u64, BufWriter<WriteHalf<Stream>>)>; 3],
    generation: u64,
    ack_owed: bool,
    /// Pull wanted up to here (`u64::MAX`: up to the origin's head).
    sync_target: u64,
    sync_running: bool,
    /// The target the running (or last) pull was started for.
    sync_pulled_for: u64,
    /// A hole seen at the last check: (applied, first pending seq).
    gap_seen: Option<(u64, u64)>,
    /// Outbox rows published and not yet removed: they go with the next apply commit, or
    /// at the next gap check when no batch comes (a crash before then republishes them,
    /// a duplicate that `Nats-Msg-Id` lets readers drop).
    published: Vec<u64>,
    inputs: mpsc::Sender<Input>,
    inputs_rx: Option<mpsc::Receiver<Input>>,
}

impl Session {
    async fn start(env: Arc<InboundEnv>, peer: PeerId) -> Option<Session> {
        let origin = peer.to_string();
        let applied = retry(&env, "read applied mark", || env.store.applied(&origin)).await?;
        let (inputs, inputs_rx) = mpsc::channel(SESSION_INBOX);
        Some(Session {
            env,
            peer,
            origin,
            applied,
            applied_tx: watch::channel(applied).0,
            pending: BTreeMap::new(),
            writers: Default::default(),
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

    async fn run(mut self, mut attach: mpsc::UnboundedReceiver<Attach>) {
        let Some(mut rx) = self.inputs_rx.take() else {
            return;
        };
        let mut shutdown = self.env.shutdown.clone();
        let mut readers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let mut gap_check = tokio::time::interval(GAP_GRACE);
        loop {
            tokio::select! {
                a = attach.recv() => match a {
                    Some(Attach::Stream { kind, reader, writer }) => {
                        self.generation += 1;
                        let generation = self.generation;
                        readers.retain(|r| !r.is_finished());
                        let wrap = move |frame| Input::Frame { kind, generation, frame };
                        let max = self.env.tuning.max_frame_bytes;
                        readers.push(tokio::spawn(wire::forward_frames(reader, max, self.inputs.clone(), wrap)));
                        self.writers[kind as usize] = Some((generation, writer));
                    }
                    Some(Attach::PeriodicSync) => self.want_sync(u64::MAX),
                    None => break,
                },
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    self.on_input(input).await;
                    // Take what else is already there, then apply it in batches.
                    while self.pending.len() < self.env.tuning.apply_batch {
                        match rx.try_recv() {
                            Ok(input) => self.on_input(input).await,
                            Err(_) => break,
                        }
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
        for r in readers {
            r.abort();
        }
        self.clear_published().await;
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

    async fn on_input(&mut self, input: Input) {
        match input {
            Input::Frame {
                kind,
                generation,
                frame,
            } => self.on_frame(kind, generation, frame).await,
            Input::Synced(entries) => {
                for entry in entries {
                    self.buffer(entry);
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
                        tracing::warn!(peer = %self.peer, cause = %e, applied = self.applied, "journal sync failed; retried at the next trigger");
                        self.sync_target = 0;
                    }
                }
            }
        }
    }

    async fn on_frame(
        &mut self,
        kind: StreamKind,
        generation: u64,
        frame: Result<Option<Frame>, FrameError>,
    ) {
        match frame {
            Ok(Some(Frame::Hello { origin, head })) => {
                if origin == self.origin {
                    self.write_to(kind, &[Frame::Ack { seq: self.applied }]).await;
                    if head > self.applied + self.env.tuning.send_window / 2 {
                        self.want_sync(head);
                    }
                } else {
                    tracing::warn!(peer = %self.peer, claimed = %origin, code = "forged_origin", "hello for another origin refused");
                    self.env.metrics.refused("inbound", ErrorCode::ForgedOrigin);
                    let refusal = Refusal::new(
                        ErrorCode::ForgedOrigin,
                        format!("you are {}, not {origin}", self.peer),
                    );
                    self.write_to(kind, &[error_frame(None, &refusal)]).await;
                }
            }
            Ok(Some(Frame::Event(entry))) => self.buffer(entry),
            Ok(Some(Frame::Large { seq })) => self.want_sync(seq),
            Ok(Some(other)) => tracing::debug!(peer = %self.peer, ?other, "unexpected frame from sender"),
            Err(e) if e.is_recoverable() => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                    _ => ErrorCode::InvalidJson,
                };
                // The entry it held (if any) leaves a hole that a pull fills.
                tracing::warn!(peer = %self.peer, ?kind, code = code.as_str(), cause = %e, "unreadable frame skipped");
                self.env.metrics.refused("inbound", code);
            }
            Ok(None) | Err(_) => {
                if matches!(&self.writers[kind as usize], Some((g, _)) if *g == generation) {
                    self.writers[kind as usize] = None;
                }
            }
        }
    }

    fn buffer(&mut self, entry: JournalEntry) {
        if entry.seq <= self.applied {
            // A resend of something handled: only the ack was missing.
            Metrics::add(&self.env.metrics.events_stale, 1);
            self.ack_owed = true;
        } else if entry.seq <= self.applied + 2 * self.env.tuning.send_window {
            self.pending.insert(entry.seq, entry);
        } else {
            tracing::debug!(peer = %self.peer, seq = entry.seq, applied = self.applied, "entry beyond the reorder window dropped; it comes again");
        }
    }

    /// A hole that outlived one check is filled by a pull.
    fn check_gap(&mut self) {
        let hole = self
            .pending
            .keys()
            .next()
            .copied()
            .filter(|first| *first > self.applied + 1);
        match hole {
            Some(first) if self.gap_seen == Some((self.applied, first)) => {
                tracing::info!(peer = %self.peer, applied = self.applied, next_buffered = first, "filling a gap by journal sync");
                self.want_sync(first - 1);
            }
            Some(first) => self.gap_seen = Some((self.applied, first)),
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
                match self.pending.remove(&(self.applied + 1 + run.len() as u64)) {
                    Some(entry) => run.push(entry),
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
            tracing::warn!(peer = %self.peer, code = "not_partner", "no longer a partner; its streams are closed");
            self.env.metrics.refused("inbound", ErrorCode::NotPartner);
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
                    tracing::warn!(peer = %self.peer, seq = entry.seq, code = refusal.code.as_str(), reason = %refusal.message, "event refused");
                    self.env.metrics.refused("inbound", refusal.code);
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
                    tracing::warn!(peer = %self.peer, seq, code = "conflict", %owner, "event refused");
                    env.metrics.refused("inbound", ErrorCode::Conflict);
                    replies.push(error_frame(Some(*seq), &refusal));
                }
                ApplyOutcome::Rejected { reason } => {
                    let refusal = Refusal::new(
                        ErrorCode::InvalidDocument,
                        format!("this node's store cannot hold the resource: {reason}"),
                    );
                    tracing::warn!(peer = %self.peer, seq, code = "invalid_document", %reason, "event refused by the store");
                    env.metrics.refused("inbound", ErrorCode::InvalidDocument);
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
        let written = tokio::time::timeout(timeout, async {
            w.write_all(&buf).await?;
            w.flush().await
        })
        .await;
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
    Frame::Error {
        seq,
        code: refusal.code.as_str().to_owned(),
        message: refusal.message.clone(),
    }
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
