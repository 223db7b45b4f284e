//! A partner link's I/O: replicates this node's journal to one partner over the three
//! resource streams, watches the partner's liveness over the heartbeat stream, and resumes
//! after any failure. What to send, what an ack does and where to resume is decided by the
//! [`Window`] and the [`Handshake`]; this file only moves bytes and keeps the time.
//!
//! Session: dial, open the resource streams and say `hello` (with our journal head) on
//! each, open the heartbeat stream; the partner answers each `hello` with an `ack` of what it
//! already handled. Entries are read from the journal in chunks, as the window allows, and
//! written to the stream of their action; an entry too large for a frame goes as a `large`
//! marker and the partner pulls it. Acks move the cursor, persisted every
//! `cursor_persist_every` and at the end of each session. A ping goes out every
//! `ping_interval`; a partner silent for `pong_discard_timeout` is offline and the session
//! restarts. Any failure ends the session; the link retries with [`Backoff`], at once when
//! the partner connects.
//!
//! An `ack` above this node's journal head is refused with an `error` frame `invalid_field`
//! and moves nothing (neither the cursor nor the window); in the answer to `hello` it also
//! ends the session.

// `LinkError` wraps `NetError`, large but only on failure paths.
#![allow(clippy::result_large_err)]
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId, Stream};
use tokio::sync::{broadcast, mpsc, watch};

use super::status::{LinkState, LinkStatus};
use super::window::{AckBeyondHead, AckOutcome, Handshake, Read, Window};
use crate::backoff::Backoff;
use crate::config::Tuning;
use crate::contract::ErrorCode;
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, Frame, FrameError, HeartbeatFrame, ResourceFrame};
use crate::p2p::{self, StreamKind, PROTOCOL_HEARTBEAT};
use crate::store::{RawEntry, StoreError};

/// Frames from the partner buffered between the stream readers and the session.
const INBOX: usize = 1024;
/// A repeated refusal of the partner's frames is logged once per this interval.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// A partner that reports itself behind the compacted journal again this soon after a
/// snapshot finished gets no new one until then (the report is the partner's word: a
/// partner lying about it would have the whole store read and sent in a loop).
pub(crate) const SNAPSHOT_MIN_INTERVAL: Duration = Duration::from_secs(60);
/// Unanswered pings remembered for their round trip.
const PINGS_REMEMBERED: usize = 16;
/// Write buffer of each stream.
const WRITE_BUFFER: usize = 64 * 1024;

pub(crate) use super::LinkEnv;

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Net(#[from] p2p::NetError),
    #[error("stream {kind}: {source}")]
    Stream {
        kind: &'static str,
        source: std::io::Error,
    },
    #[error("stream {0} closed by the partner")]
    Closed(&'static str),
    #[error("partner refused the session: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no answer from the partner within {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unreadable frame from the partner: {0}")]
    Frame(FrameError),
    #[error("the partner acknowledged seq {seq}, beyond this node's journal head {head}")]
    AckBeyondHead { seq: u64, head: u64 },
    #[error(transparent)]
    Snapshot(#[from] super::snapshot::SnapshotError),
    /// Not a failure: the snapshot job ended, the next session follows the journal from P.
    #[error("snapshot done at {0}: the journal follows")]
    SnapshotDone(u64),
    /// Not a failure: an operator asked for a snapshot; the next session runs it.
    #[error("resync requested")]
    Resync,
    /// The partner reports itself behind the floor again right after a snapshot.
    #[error("the partner reports seq {partner_has}, behind the compacted journal ({floor}), again {since:?} after a snapshot: no new one before {SNAPSHOT_MIN_INTERVAL:?}")]
    SnapshotTooSoon {
        partner_has: u64,
        floor: u64,
        since: Duration,
    },
}

impl From<AckBeyondHead> for LinkError {
    fn from(AckBeyondHead { seq, head }: AckBeyondHead) -> Self {
        LinkError::AckBeyondHead { seq, head }
    }
}

/// Runs the link until shutdown, persisting the cursor on the way out.
pub(crate) async fn run(
    env: Arc<LinkEnv>,
    peer: PeerId,
    addr: Multiaddr,
    status: Arc<LinkStatus>,
    mut head: watch::Receiver<u64>,
) {
    let mut shutdown = env.shutdown.clone();
    let mut link = Link::load(env.clone(), peer, addr, status).await;
    let mut backoff = Backoff::new(env.tuning.backoff_min, env.tuning.backoff_max);
    let mut arrivals = env.net.state().arrivals();
    loop {
        let before = link.window.acked();
        let outcome = tokio::select! {
            r = link.session(&mut head) => r,
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        link.persist().await;
        // A session that moved the cursor was healthy: retry quickly.
        if link.window.acked() > before {
            backoff.reset();
        }
        if let Err(e) = outcome {
            if matches!(e, LinkError::SnapshotDone(_) | LinkError::Resync) {
                tracing::info!(%peer, cause = %e, "partner session restarts");
                backoff.reset();
            } else {
                link.ended(&e, backoff.current());
            }
        }
        // Only a connection made while the link waits cuts the wait short (one the
        // session made itself must not, or a partner that drops us would be retried
        // without backoff).
        arrivals = arrivals.resubscribe();
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = arrived(&mut arrivals, peer) => {
                tracing::debug!(%peer, "partner connected: retrying now");
            }
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        }
    }
    link.persist().await;
    tracing::debug!(%peer, acked = link.window.acked(), "partner link stopped");
}

/// Returns when `peer` connects: a partner that comes back (it dials its own partners as it
/// starts) is caught up at once instead of after the rest of the backoff, which reaches
/// `backoff_max` during a long absence. Never returns when the network is gone.
async fn arrived(arrivals: &mut broadcast::Receiver<PeerId>, peer: PeerId) {
    loop {
        match arrivals.recv().await {
            Ok(p) if p == peer => return,
            Ok(_) => {}
            // Some arrivals were missed: one of them may have been this peer.
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// One partner link: what outlives its sessions.
struct Link {
    env: Arc<LinkEnv>,
    peer: PeerId,
    addr: Multiaddr,
    status: Arc<LinkStatus>,
    log: LogThrottle,
    window: Window,
    /// When the cursor was last written to the store.
    persisted_at: Instant,
    /// When this link's last snapshot job finished.
    snapshot_done_at: Option<Instant>,
}

type Writer = futures::io::BufWriter<WriteHalf<Stream>>;
/// A frame from one of the session's streams, typed by its protocol.
enum Inbound {
    /// From the resource stream of this kind.
    Resource(StreamKind, Result<Option<ResourceFrame>, FrameError>),
    /// From the heartbeat stream.
    Heartbeat(Result<Option<HeartbeatFrame>, FrameError>),
}

impl Inbound {
    /// The resource stream it came on; `None` for the heartbeat stream.
    fn stream(&self) -> Option<StreamKind> {
        match self {
            Inbound::Resource(kind, _) => Some(*kind),
            Inbound::Heartbeat(_) => None,
        }
    }
}

/// A frame for the partner on one of the resource streams, in answer to one of its own.
type Reply = Option<(StreamKind, ResourceFrame)>;

/// One session's streams and heartbeat bookkeeping.
struct Session {
    /// The resource streams, indexed by `StreamKind`.
    writers: Vec<Writer>,
    heartbeat: Writer,
    inbox: mpsc::Receiver<Inbound>,
    /// Aborted with the session, whatever the way it ends.
    _readers: Readers,
    pings: Pings,
    last_heard: Instant,
}

/// Aborts the stream readers when the session ends, whatever the way.
struct Readers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for r in &self.0 {
            r.abort();
        }
    }
}

fn stream_name(kind: Option<StreamKind>) -> &'static str {
    match kind {
        Some(StreamKind::Create) => "create",
        Some(StreamKind::Update) => "update",
        Some(StreamKind::Delete) => "delete",
        None => "heartbeat",
    }
}

impl Link {
    /// The link with its cursor as the store has it.
    async fn load(env: Arc<LinkEnv>, peer: PeerId, addr: Multiaddr, status: Arc<LinkStatus>) -> Link {
        let cursor = env.store.cursor(&peer.to_string()).await.unwrap_or_else(|e| {
            tracing::warn!(%peer, cause = %e, "cannot read cursor, starting from the partner's own report");
            0
        });
        status.set_acked(cursor);
        super::snapshot::load(env.store.as_ref(), &peer, &status).await;
        let window = Window::new(cursor, env.tuning.send_window);
        Link {
            env,
            peer,
            addr,
            status,
            log: LogThrottle::new(REFUSAL_LOG_EVERY),
            window,
            persisted_at: Instant::now(),
            snapshot_done_at: None,
        }
    }

    fn tuning(&self) -> &Tuning {
        &self.env.tuning
    }

    /// Writes the cursor down if it moved. A cursor written late only shows an older
    /// position in /api/peers: the partner's own report at the next hello is what sending
    /// resumes from.
    async fn persist(&mut self) {
        let Some(cursor) = self.window.unpersisted() else {
            return;
        };
        let peer = self.peer;
        match self.env.store.set_cursor(&peer.to_string(), cursor).await {
            Ok(()) => {
                self.window.persisted(cursor);
                self.persisted_at = Instant::now();
            }
            Err(e) => tracing::warn!(%peer, cause = %e, "cannot persist cursor"),
        }
    }

    async fn persist_if_due(&mut self) {
        if self.persisted_at.elapsed() >= self.tuning().cursor_persist_every {
            self.persist().await;
        }
    }

    /// A session ended with `e`; the next one starts in `retry_in`.
    fn ended(&self, e: &LinkError, retry_in: Duration) {
        tracing::warn!(peer = %self.peer, cause = %e, ?retry_in, "partner session ended");
        let state = if matches!(e, LinkError::Refused { .. }) {
            LinkState::Refused
        } else {
            LinkState::Connecting
        };
        self.status.set(state, Some(e.to_string()));
    }

    /// One session, from the dial to its first failure (`Ok` only when the journal head's
    /// sender is gone, i.e. the node stops).
    async fn session(&mut self, head: &mut watch::Receiver<u64>) -> Result<(), LinkError> {
        let (mut session, head_at_hello) = self.open(head).await?;
        let partner_has = self.handshake(&mut session, head).await?;
        if partner_has != self.window.acked() {
            tracing::info!(peer = %self.peer, cursor = self.window.acked(), partner_has, "resuming from the partner's report");
        }
        // Behind the compacted journal (or a job to finish, or asked for): a snapshot, then
        // the journal from its position in the next session.
        let floor = self.env.store.journal_floor(&self.env.own_id).await?;
        let job_open = self.status.snapshot_job().state != crate::sync::snapshot::STATE_IDLE;
        let resync = self.status.resync_requested();
        if partner_has < floor || job_open || resync {
            let since = self.snapshot_done_at.map(|at| at.elapsed());
            if let Some(since) = since.filter(|s| !job_open && !resync && *s < SNAPSHOT_MIN_INTERVAL) {
                return Err(LinkError::SnapshotTooSoon {
                    partner_has,
                    floor,
                    since,
                });
            }
            self.status.heard();
            self.status.set(LinkState::Online, None);
            tracing::info!(peer = %self.peer, partner_has, floor, job_open, "partner needs a snapshot");
            let position = super::snapshot::run(&self.env, self.peer, &self.status).await?;
            self.snapshot_done_at = Some(Instant::now());
            self.window = Window::new(position, self.env.tuning.send_window);
            self.status.set_acked(position);
            drop(session);
            return Err(LinkError::SnapshotDone(position));
        }
        // Far behind: the partner pulls up to our head by journal sync; we push what follows.
        let push_from = self.window.resume(partner_has, head_at_hello);
        self.status.set_acked(partner_has);
        self.status.heard();
        self.status.set(LinkState::Online, None);
        Metrics::add(&self.env.metrics.sessions_opened, 1);
        tracing::info!(peer = %self.peer, partner_has, push_from, head = head_at_hello, "partner session open");
        self.stream(&mut session, head).await
    }

    /// Dials, opens the resource streams with a `hello` on each and the heartbeat stream.
    /// Returns the session and the head the `hello`s announced.
    async fn open(&self, head: &mut watch::Receiver<u64>) -> Result<(Session, u64), LinkError> {
        let (env, peer, t) = (&self.env, self.peer, self.tuning());
        env.net.dial(peer, self.addr.clone(), t.io_timeout).await?;
        let (tx, inbox) = mpsc::channel::<Inbound>(INBOX);
        let mut readers = Readers(Vec::with_capacity(4));
        let mut open = |stream: Stream, kind: Option<StreamKind>| {
            let (r, w) = stream.split();
            let (tx, max) = (tx.clone(), t.max_frame_bytes);
            readers.0.push(match kind {
                Some(kind) => tokio::spawn(wire::forward_frames(r, max, tx, move |f| {
                    Inbound::Resource(kind, f)
                })),
                None => tokio::spawn(wire::forward_frames(r, max, tx, Inbound::Heartbeat)),
            });
            futures::io::BufWriter::with_capacity(WRITE_BUFFER, w)
        };
        let head_at_hello = *head.borrow_and_update();
        let mut writers: Vec<Writer> = Vec::with_capacity(3);
        for kind in StreamKind::ALL {
            let stream = env.net.open_stream(peer, kind.protocol(), t.io_timeout).await?;
            let mut w = open(stream, Some(kind));
            let hello = ResourceFrame::Hello {
                origin: env.own_id.clone(),
                head: head_at_hello,
            };
            timed(t.io_timeout, Some(kind), wire::write_frame(&mut w, &hello)).await?;
            writers.push(w);
        }
        let stream = env
            .net
            .open_stream(peer, PROTOCOL_HEARTBEAT, t.io_timeout)
            .await?;
        let heartbeat = open(stream, None);
        let session = Session {
            writers,
            heartbeat,
            inbox,
            _readers: readers,
            pings: Pings::default(),
            last_heard: Instant::now(),
        };
        Ok((session, head_at_hello))
    }

    /// Waits for the partner's answers to the three `hello`s: what it has on every stream.
    async fn handshake(&self, s: &mut Session, head: &watch::Receiver<u64>) -> Result<u64, LinkError> {
        let timeout = self.tuning().io_timeout;
        let mut handshake = Handshake::new();
        loop {
            if let Some(partner_has) = handshake.partner_has() {
                return Ok(partner_has);
            }
            let received = tokio::time::timeout(timeout, s.inbox.recv())
                .await
                .map_err(|_| LinkError::Silent(timeout))?
                .ok_or(LinkError::Closed("all"))?;
            let stream = received.stream();
            match received {
                Inbound::Resource(kind, Ok(Some(ResourceFrame::Ack { seq }))) => {
                    let limit = self.ack_limit(head, seq).await;
                    if let Err(beyond) = handshake.answer(kind, seq, limit) {
                        // The partner claims what this node never journaled: nothing moves,
                        // the session ends and is retried with backoff.
                        let refusal = self.refuse_ack(seq, limit);
                        let w = &mut s.writers[kind as usize];
                        let _ = timed(timeout, Some(kind), wire::write_frame(w, &refusal)).await;
                        return Err(beyond.into());
                    }
                }
                Inbound::Resource(_, Ok(Some(ResourceFrame::Error(ErrorFrame { code, message, .. }))))
                | Inbound::Heartbeat(Ok(Some(HeartbeatFrame::Error(ErrorFrame { code, message, .. })))) => {
                    return Err(LinkError::Refused { code, message })
                }
                Inbound::Resource(_, Ok(None)) | Inbound::Heartbeat(Ok(None)) => {
                    return Err(LinkError::Closed(stream_name(stream)))
                }
                Inbound::Resource(_, Ok(Some(other))) => self.unexpected_in_handshake(other.kind()),
                Inbound::Heartbeat(Ok(Some(other))) => self.unexpected_in_handshake(other.kind()),
                Inbound::Resource(_, Err(FrameError::Unexpected { kind }))
                | Inbound::Heartbeat(Err(FrameError::Unexpected { kind })) => {
                    self.unexpected_in_handshake(kind)
                }
                Inbound::Resource(_, Err(e)) | Inbound::Heartbeat(Err(e)) => return Err(LinkError::Frame(e)),
            }
        }
    }

    fn unexpected_in_handshake(&self, frame: &'static str) {
        tracing::debug!(peer = %self.peer, frame, "unexpected frame during handshake");
    }

    /// The open session: pushes what the window allows, handles the partner's frames, pings.
    async fn stream(&mut self, s: &mut Session, head: &mut watch::Receiver<u64>) -> Result<(), LinkError> {
        let t = self.tuning().clone();
        let mut ping = tokio::time::interval(t.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The silence limit counts from the end of the handshake.
        s.last_heard = Instant::now();
        loop {
            let head_now = *head.borrow_and_update();
            if let Some(read) = self.window.to_read(head_now, t.read_chunk) {
                self.push(s, head, read).await?;
                self.persist_if_due().await;
                continue;
            }
            let silence = t.pong_discard_timeout.saturating_sub(s.last_heard.elapsed());
            tokio::select! {
                received = s.inbox.recv() => {
                    let received = received.ok_or(LinkError::Closed("all"))?;
                    self.received(s, head, received).await?;
                }
                changed = head.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = ping.tick() => {
                    let nonce = s.pings.ping(Instant::now());
                    timed(t.io_timeout, None, wire::write_frame(&mut s.heartbeat, &HeartbeatFrame::Ping { nonce })).await?;
                }
                _ = tokio::time::sleep(silence) => {
                    self.status.set(LinkState::Offline, Some(format!("no answer for {:?}", t.pong_discard_timeout)));
                    return Err(LinkError::Silent(t.pong_discard_timeout));
                }
                _ = self.status.wake.notified() => {
                    if self.status.resync_requested() {
                        return Err(LinkError::Resync);
                    }
                }
            }
            self.persist_if_due().await;
        }
    }

    /// Reads what `read` allows from the journal and writes it, then takes the frames that
    /// arrived meanwhile without waiting.
    async fn push(
        &mut self,
        s: &mut Session,
        head: &watch::Receiver<u64>,
        read: Read,
    ) -> Result<(), LinkError> {
        let t = self.tuning();
        let (timeout, max_frame_bytes) = (t.io_timeout, t.max_frame_bytes);
        let entries = self
            .env
            .store
            .read_journal_raw(&self.env.own_id, read.from, read.max)
            .await?;
        let Some(last) = entries.last().map(|e| e.seq) else {
            // The head was announced before the commit became visible; wait for more.
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Ok(());
        };
        let count = entries.len() as u64;
        let bufs = encode_entries(entries, max_frame_bytes, self.peer);
        for kind in StreamKind::ALL {
            let buf = &bufs[kind as usize];
            if !buf.is_empty() {
                let w = &mut s.writers[kind as usize];
                timed(timeout, Some(kind), async {
                    w.write_all(buf).await?;
                    w.flush().await
                })
                .await?;
            }
        }
        Metrics::add(&self.env.metrics.events_sent, count);
        self.window.sent(last);
        while let Ok(received) = s.inbox.try_recv() {
            self.received(s, head, received).await?;
        }
        Ok(())
    }

    /// Handles one frame from the partner and writes the answer it calls for.
    async fn received(
        &mut self,
        s: &mut Session,
        head: &watch::Receiver<u64>,
        received: Inbound,
    ) -> Result<(), LinkError> {
        let reply = self.on_frame(&mut s.pings, head, received).await?;
        answer(self.tuning().io_timeout, &mut s.writers, reply).await?;
        s.last_heard = Instant::now();
        Ok(())
    }

    async fn on_frame(
        &mut self,
        pings: &mut Pings,
        head: &watch::Receiver<u64>,
        received: Inbound,
    ) -> Result<Reply, LinkError> {
        let peer = self.peer;
        let stream = received.stream();
        self.status.heard();
        match received {
            Inbound::Resource(kind, Ok(Some(ResourceFrame::Ack { seq }))) => {
                let limit = self.ack_limit(head, seq).await;
                match self.window.ack(seq, limit) {
                    AckOutcome::Moved => {
                        self.status.set_acked(seq);
                        Ok(None)
                    }
                    AckOutcome::Unchanged => Ok(None),
                    AckOutcome::Beyond => Ok(Some((kind, self.refuse_ack(seq, limit)))),
                }
            }
            Inbound::Heartbeat(Ok(Some(HeartbeatFrame::Pong { nonce }))) => {
                if let Some(rtt) = pings.pong(nonce, Instant::now()) {
                    self.status.set_rtt(rtt);
                }
                Ok(None)
            }
            Inbound::Resource(_, Ok(Some(ResourceFrame::Error(error))))
            | Inbound::Heartbeat(Ok(Some(HeartbeatFrame::Error(error)))) => self.on_error(error),
            Inbound::Resource(_, Ok(Some(other))) => Ok(self.unexpected(stream, other.kind())),
            Inbound::Heartbeat(Ok(Some(other))) => Ok(self.unexpected(stream, other.kind())),
            Inbound::Resource(_, Ok(None)) | Inbound::Heartbeat(Ok(None)) => {
                Err(LinkError::Closed(stream_name(stream)))
            }
            Inbound::Resource(_, Err(FrameError::Unexpected { kind }))
            | Inbound::Heartbeat(Err(FrameError::Unexpected { kind })) => Ok(self.unexpected(stream, kind)),
            Inbound::Resource(_, Err(e)) | Inbound::Heartbeat(Err(e)) if e.is_recoverable() => {
                if let Some(count) = self.log.hit(peer, "unreadable_frame") {
                    tracing::warn!(%peer, stream = stream_name(stream), cause = %e, count, "skipping unreadable frame from partner");
                }
                Ok(None)
            }
            Inbound::Resource(_, Err(e)) | Inbound::Heartbeat(Err(e)) => Err(LinkError::Frame(e)),
        }
    }

    /// An `error` frame from the partner: about one entry (counted, logged, the session goes
    /// on), or about the session (it ends).
    fn on_error(&self, error: ErrorFrame) -> Result<Reply, LinkError> {
        let ErrorFrame { seq, code, message } = error;
        let Some(seq) = seq else {
            return Err(LinkError::Refused { code, message });
        };
        // The partner refused one entry and moved past it; the journal keeps it.
        let peer = self.peer;
        let code = ErrorCode::parse(&code).unwrap_or(ErrorCode::InvalidField);
        self.env.metrics.refused("outbound", code);
        if let Some(count) = self.log.hit(peer, code.as_str()) {
            tracing::warn!(%peer, seq, code = code.as_str(), %message, count, "partner refused an event");
        }
        Ok(None)
    }

    /// A frame the link does not expect on that stream: ignored.
    fn unexpected(&self, stream: Option<StreamKind>, frame: &'static str) -> Reply {
        tracing::debug!(peer = %self.peer, stream = stream_name(stream), frame, "ignoring unexpected frame");
        None
    }

    /// The highest seq an ack may name: the head as the watch has it, or, if the ack is
    /// above it, the store's own head (the watch trails the journal commit by a moment, and
    /// the partner may have pulled an entry of that moment).
    async fn ack_limit(&self, head: &watch::Receiver<u64>, seq: u64) -> u64 {
        let watched = *head.borrow();
        if seq <= watched {
            return watched;
        }
        match self.env.store.journal_head(&self.env.own_id).await {
            Ok(stored) => stored.max(watched),
            Err(_) => watched,
        }
    }

    /// Refuses an ack beyond the head: a log line (throttled), a metric, and an `error`
    /// frame `invalid_field` for the partner's stream.
    fn refuse_ack(&self, seq: u64, head: u64) -> ResourceFrame {
        let peer = self.peer;
        // The metric's `place` keeps the name the admin API documents.
        self.env.metrics.refused("partner_link", ErrorCode::InvalidField);
        if let Some(count) = self.log.hit(peer, "ack_beyond_head") {
            tracing::warn!(%peer, seq, head, code = "invalid_field", count, "ack beyond this node's journal head refused; the cursor does not move");
        }
        ResourceFrame::Error(ErrorFrame::new(
            None,
            ErrorCode::InvalidField,
            format!("ack {seq} is beyond this node's journal head {head}"),
        ))
    }
}

/// The frames of `entries`, one buffer per resource stream: each entry as an `event`, or as
/// a `large` marker when it does not fit in a frame (the partner pulls it).
fn encode_entries(entries: Vec<RawEntry>, max_frame_bytes: usize, peer: PeerId) -> [Vec<u8>; 3] {
    // Sized once: growing by doubling copied each batch (megabytes) about twice over.
    let mut sizes = [0usize; 3];
    for entry in &entries {
        let size = &mut sizes[StreamKind::for_action(entry.action) as usize];
        *size = size.saturating_add(wire::event_frame_len(&entry.json));
    }
    let mut bufs: [Vec<u8>; 3] = sizes.map(Vec::with_capacity);
    for entry in entries {
        let buf = &mut bufs[StreamKind::for_action(entry.action) as usize];
        let before = buf.len();
        let seq = entry.seq;
        if !wire::encode_event_json(&entry.json, buf) {
            tracing::error!(%peer, seq, "journal entry is not a JSON object; the partner pulls it");
            wire::encode_frame(&ResourceFrame::Large { seq }, buf);
        } else if buf.len() - before > max_frame_bytes {
            buf.truncate(before);
            wire::encode_frame(&ResourceFrame::Large { seq }, buf);
        }
    }
    bufs
}

/// Writes `reply`, if any.
async fn answer(timeout: Duration, writers: &mut [Writer], reply: Reply) -> Result<(), LinkError> {
    let Some((kind, frame)) = reply else {
        return Ok(());
    };
    match writers.get_mut(kind as usize) {
        Some(w) => timed(timeout, Some(kind), wire::write_frame(w, &frame)).await,
        None => Ok(()),
    }
}

async fn timed<F>(timeout: Duration, kind: Option<StreamKind>, f: F) -> Result<(), LinkError>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(LinkError::Stream {
            kind: stream_name(kind),
            source,
        }),
        Err(_) => Err(LinkError::Silent(timeout)),
    }
}

/// Pings waiting for their pong, oldest first, for the heartbeat round trip.
#[derive(Debug, Default)]
struct Pings {
    nonce: u64,
    waiting: VecDeque<(u64, Instant)>,
}

impl Pings {
    /// A ping goes out at `now`: its nonce. Only the last [`PINGS_REMEMBERED`] are kept.
    fn ping(&mut self, now: Instant) -> u64 {
        self.nonce = self.nonce.wrapping_add(1);
        self.waiting.push_back((self.nonce, now));
        if self.waiting.len() > PINGS_REMEMBERED {
            self.waiting.pop_front();
        }
        self.nonce
    }

    /// A pong for `nonce` came at `now`: the round trip, if that ping is remembered. Older
    /// pings are forgotten (their pongs are late or lost).
    fn pong(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        let pos = self.waiting.iter().position(|(n, _)| *n == nonce)?;
        let (_, sent) = self.waiting[pos];
        self.waiting.drain(..=pos);
        Some(now.saturating_duration_since(sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pong_gives_the_round_trip_of_its_ping_and_forgets_older_ones() {
        let t0 = Instant::now();
        let mut pings = Pings::default();
        let first = pings.ping(t0);
        let second = pings.ping(t0 + Duration::from_millis(5));
        assert_eq!(
            pings.pong(second, t0 + Duration::from_millis(7)),
            Some(Duration::from_millis(2))
        );
        assert_eq!(
            pings.pong(first, t0 + Duration::from_millis(8)),
            None,
            "older, forgotten"
        );
        assert_eq!(pings.pong(999, t0), None, "never sent");
    }

    #[test]
    fn only_the_last_pings_are_remembered() {
        let t0 = Instant::now();
        let mut pings = Pings::default();
        let first = pings.ping(t0);
        for _ in 0..PINGS_REMEMBERED {
            pings.ping(t0);
        }
        assert_eq!(pings.waiting.len(), PINGS_REMEMBERED);
        assert_eq!(pings.pong(first, t0), None);
    }
}
