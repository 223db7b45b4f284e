//! Inbound apply: receives partners' journals on the resource streams, applies them to the
//! store by version, publishes them on the local NATS, and only then acknowledges.
//!
//! The [`InboundApply`] actor routes each accepted stream to its peer's session task. A
//! session merges the three streams of one origin back into seq order (a reorder buffer,
//! bounded by the sender's window), so entries are applied exactly in the order the origin
//! journaled them. For each contiguous run:
//! 1. refuse what is forged (origin or creator is not the sending peer) with an `error`
//!    frame, a log line and a metric — the run goes on;
//! 2. one store commit: resources by version, outbox rows, the origin's applied mark;
//! 3. publish the outbox rows on NATS and wait for the server's confirmation;
//! 4. acknowledge the whole run with one cumulative `ack`.
//!
//! A failure at 2 or 3 is retried with backoff while the streams wait (backpressure):
//! nothing is acknowledged that is not both stored and published.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use futures::io::{BufWriter, ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, watch};

use crate::config::Tuning;
use crate::event::{ErrorCode, JournalEntry, Refusal};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self, StreamKind};
use crate::store::{ApplyOutcome, Store};

/// Inputs buffered between the stream readers and a session.
const SESSION_INBOX: usize = 4096;
/// Concurrent refusals being written to peers that are not partners.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// The set of peers this node accepts events from.
#[derive(Default)]
pub struct Partners(RwLock<HashSet<PeerId>>);

impl Partners {
    pub fn insert(&self, peer: PeerId) {
        if let Ok(mut s) = self.0.write() {
            s.insert(peer);
        }
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0.read().map(|s| s.contains(peer)).unwrap_or(false)
    }
}

pub struct InboundEnv {
    pub store: Arc<dyn Store>,
    pub nats: async_nats::Client,
    pub partners: Arc<Partners>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    pub shutdown: watch::Receiver<bool>,
}

pub struct InboundApply {
    env: Arc<InboundEnv>,
    net: p2p::Client,
    sessions: HashMap<PeerId, mpsc::UnboundedSender<Attach>>,
    refusals: Arc<tokio::sync::Semaphore>,
}

impl InboundApply {
    pub fn new(env: InboundEnv, net: p2p::Client) -> Self {
        InboundApply {
            env: Arc::new(env),
            net,
            sessions: HashMap::new(),
            refusals: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
        }
    }
}

/// A resource stream opened by a peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct IncomingStream {
    pub peer: PeerId,
    pub kind: StreamKind,
    pub stream: Stream,
}

impl Actor for InboundApply {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for kind in StreamKind::ALL {
            let Some(mut incoming) = self.net.accept(kind.protocol()) else {
                tracing::error!(protocol = %kind.protocol(), "protocol already registered");
                continue;
            };
            let me = ctx.address();
            // Hand each stream over at once: libp2p-stream drops streams we are slow to take.
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    if me.try_send(IncomingStream { peer, kind, stream }).is_err() {
                        break;
                    }
                }
            });
        }
    }
}

impl Handler<IncomingStream> for InboundApply {
    type Result = ();

    fn handle(&mut self, msg: IncomingStream, _: &mut Self::Context) {
        let IncomingStream { peer, kind, stream } = msg;
        if !self.env.partners.contains(&peer) {
            tracing::warn!(%peer, protocol = %kind.protocol(), code = "not_partner", "stream from a peer that is not a partner refused");
            self.env.metrics.refused("inbound", ErrorCode::NotPartner);
            if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
                let timeout = self.env.tuning.io_timeout;
                tokio::spawn(async move {
                    let mut stream = stream;
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
                    drop(permit);
                });
            }
            return;
        }
        let (r, w) = stream.split();
        let attach = Attach {
            kind,
            reader: r,
            writer: BufWriter::with_capacity(16 * 1024, w),
        };
        let sender = self
            .sessions
            .entry(peer)
            .or_insert_with(|| spawn_session(self.env.clone(), peer));
        if let Err(mpsc::error::SendError(attach)) = sender.send(attach) {
            // The session ended (shutdown in progress, or a crash): start a fresh one.
            let sender = spawn_session(self.env.clone(), peer);
            let _ = sender.send(attach);
            self.sessions.insert(peer, sender);
        }
    }
}

struct Attach {
    kind: StreamKind,
    reader: ReadHalf<Stream>,
    writer: BufWriter<WriteHalf<Stream>>,
}

/// What a stream reader hands to its session; `generation` tells a replaced stream's
/// leftovers from the current one.
struct Input {
    kind: StreamKind,
    generation: u64,
    frame: Result<Option<Frame>, FrameError>,
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
    /// Entries above `applied`, waiting for the ones before them.
    pending: BTreeMap<u64, JournalEntry>,
    writers: [Option<(u64, BufWriter<WriteHalf<Stream>>)>; 3],
    generation: u64,
    ack_owed: bool,
}

impl Session {
    async fn start(env: Arc<InboundEnv>, peer: PeerId) -> Option<Session> {
        let origin = peer.to_string();
        let applied = retry(&env, "read applied mark", || env.store.applied(&origin)).await?;
        Some(Session {
            env,
            peer,
            origin,
            applied,
            pending: BTreeMap::new(),
            writers: Default::default(),
            generation: 0,
            ack_owed: false,
        })
    }

    async fn run(mut self, mut attach: mpsc::UnboundedReceiver<Attach>) {
        let (tx, mut rx) = mpsc::channel::<Input>(SESSION_INBOX);
        let mut shutdown = self.env.shutdown.clone();
        let mut readers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        loop {
            tokio::select! {
                a = attach.recv() => match a {
                    Some(a) => {
                        self.generation += 1;
                        readers.retain(|r| !r.is_finished());
                        readers.push(tokio::spawn(read_loop(a.kind, self.generation, a.reader, tx.clone(), self.env.tuning.max_frame_bytes)));
                        self.writers[a.kind as usize] = Some((self.generation, a.writer));
                    }
                    None => break,
                },
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    self.on_input(input).await;
                    // Take what else is already there, then apply it as one batch.
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
                _ = crate::shutdown::signalled(&mut shutdown) => break,
            }
        }
        for r in readers {
            r.abort();
        }
    }

    async fn on_input(&mut self, input: Input) {
        let Input {
            kind,
            generation,
            frame,
        } = input;
        match frame {
            Ok(Some(Frame::Hello { origin })) => {
                if origin == self.origin {
                    self.write_to(kind, &[Frame::Ack { seq: self.applied }]).await;
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
            Ok(Some(Frame::Event(entry))) => {
                if entry.seq <= self.applied {
                    // A resend of something handled: only the ack was missing.
                    Metrics::add(&self.env.metrics.events_stale, 1);
                    self.ack_owed = true;
                } else if entry.seq <= self.applied + 2 * self.env.tuning.send_window {
                    self.pending.insert(entry.seq, entry);
                } else {
                    tracing::warn!(peer = %self.peer, seq = entry.seq, applied = self.applied, "event beyond the window dropped; it will be resent");
                }
            }
            Ok(Some(other)) => {
                tracing::debug!(peer = %self.peer, ?other, "unexpected frame from sender")
            }
            Err(e) if e.is_recoverable() => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                    _ => ErrorCode::InvalidJson,
                };
                tracing::warn!(peer = %self.peer, ?kind, code = code.as_str(), cause = %e, "unreadable frame skipped");
                self.env.metrics.refused("inbound", code);
                self.write_to(kind, &[error_frame(None, &Refusal::new(code, e.to_string()))])
                    .await;
            }
            Ok(None) | Err(_) => {
                if matches!(&self.writers[kind as usize], Some((g, _)) if *g == generation) {
                    self.writers[kind as usize] = None;
                }
            }
        }
    }

    /// Applies the contiguous run after `applied`. Returns false on shutdown.
    async fn apply_ready(&mut self) -> bool {
        let mut run = Vec::new();
        while run.len() < self.env.tuning.apply_batch {
            match self.pending.remove(&(self.applied + 1 + run.len() as u64)) {
                Some(entry) => run.push(entry),
                None => break,
            }
        }
        let Some(up_to) = run.last().map(|e| e.seq) else {
            if std::mem::take(&mut self.ack_owed) {
                self.send_ack(Vec::new()).await;
            }
            return true;
        };
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
        let origin = self.origin.clone();
        let env = self.env.clone();
        let Some((outcomes, rows)) = retry(&env, "apply", || {
            env.store.apply_batch(&origin, up_to, valid.clone())
        })
        .await
        else {
            return false;
        };
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
            }
        }
        if !rows.is_empty() {
            let timeout = env.tuning.io_timeout;
            if retry(&env, "publish", || async {
                crate::nats::publish_rows(&env.nats, &rows, timeout).await
            })
            .await
            .is_none()
            {
                return false;
            }
            Metrics::add(&env.metrics.nats_published, rows.len() as u64);
            let ids = rows.iter().map(|r| r.id).collect();
            // A row left behind is published again at start-up: a duplicate, never a loss.
            if let Err(e) = env.store.outbox_remove(ids).await {
                tracing::warn!(cause = %e, "cannot clear published outbox rows");
            }
        }
        self.applied = up_to;
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
            other => {
                return Err(Refusal::new(
                    ErrorCode::NotCreator,
                    format!("creator_id {other:?} is not the sending peer {}", self.peer),
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

fn error_frame(seq: Option<u64>, refusal: &Refusal) -> Frame {
    Frame::Error {
        seq,
        code: refusal.code.as_str().to_owned(),
        message: refusal.message.clone(),
    }
}

async fn read_loop(
    kind: StreamKind,
    generation: u64,
    mut r: ReadHalf<Stream>,
    tx: mpsc::Sender<Input>,
    max: usize,
) {
    loop {
        let frame = wire::read_frame(&mut r, max).await;
        let end = !matches!(&frame, Ok(Some(_))) && !matches!(&frame, Err(e) if e.is_recoverable());
        if tx
            .send(Input {
                kind,
                generation,
                frame,
            })
            .await
            .is_err()
            || end
        {
            return;
        }
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
        delay = (delay * 2).min(env.tuning.backoff_max.max(Duration::from_millis(1)));
    }
}
