//! A partner link: replicates this node's journal to one partner over the three resource
//! streams, with a window of unacknowledged events, watches the partner's liveness over the
//! heartbeat stream, and resumes after any failure.
//!
//! Session: open the resource streams and the heartbeat stream, say `hello` (with our
//! journal head) on each resource stream; the partner answers each with an `ack` of what it
//! already handled. When the partner is less than a window behind, we send from there;
//! further behind, the partner pulls the gap with the journal sync protocol (in parts) and
//! we send only what comes after our head, once its acks open the window. Entries are read
//! from the journal in chunks and written to the stream of their action, at most
//! `send_window` beyond the last ack; an entry too large for a frame goes as a `large`
//! marker and the partner pulls it. Acks move the cursor, persisted every
//! `cursor_persist_every` and at the end of each session. A ping goes out every
//! `ping_interval`; a partner silent for `pong_discard_timeout` is offline and the session
//! restarts. Any failure ends the session; the link retries with exponential backoff.
//!
//! An `ack` above this node's journal head (`judge_ack`) is refused with an `error` frame
//! `invalid_field` and moves nothing (neither the cursor nor the window); in the answer to
//! `hello` it also ends the session. Seq arithmetic saturates.

// `LinkError` wraps `NetError`, large but only on failure paths.
#![allow(clippy::result_large_err)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId, Stream};
use tokio::sync::{broadcast, mpsc, watch};

use crate::config::Tuning;
use crate::event::{now_ms, ErrorCode};
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self, StreamKind, PROTOCOL_HEARTBEAT};
use crate::store::{Store, StoreError};

/// Frames from the partner buffered between the stream readers and the session.
const INBOX: usize = 1024;
/// A repeated refusal of the partner's frames is logged once per this interval.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// What every link shares.
pub struct LinkEnv {
    pub own_id: String,
    pub store: Arc<dyn Store>,
    pub net: p2p::Client,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not (yet) answering, for less than `pong_discard_timeout`.
    Connecting,
    Online,
    /// No answer for `pong_discard_timeout` or more.
    Offline,
    /// The partner refused us (we are not its partner, or a stream-level error).
    Refused,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Online => "online",
            LinkState::Offline => "offline",
            LinkState::Refused => "refused",
        }
    }
}

/// Live state of a link, read by the admin API without asking the link.
pub struct LinkStatus {
    acked: AtomicU64,
    /// Last heartbeat round trip, microseconds (0: none yet).
    rtt_us: AtomicU64,
    inner: Mutex<StatusInner>,
    pong_discard_timeout: Duration,
}

struct StatusInner {
    state: LinkState,
    /// When `state` last changed (ms since the epoch).
    since_ms: u64,
    /// Last time the partner answered anything.
    last_heard: Option<Instant>,
    created: Instant,
    last_error: Option<String>,
}

pub struct StatusSnapshot {
    pub acked: u64,
    pub state: LinkState,
    pub since_ms: u64,
    pub rtt_ms: Option<f64>,
    pub last_error: Option<String>,
}

impl LinkStatus {
    pub fn new(pong_discard_timeout: Duration) -> Self {
        LinkStatus {
            acked: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
            inner: Mutex::new(StatusInner {
                state: LinkState::Connecting,
                since_ms: now_ms(),
                last_heard: None,
                created: Instant::now(),
                last_error: None,
            }),
            pong_discard_timeout,
        }
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let rtt = self.rtt_us.load(Ordering::Relaxed);
        let acked = self.acked.load(Ordering::Relaxed);
        let Ok(mut g) = self.inner.lock() else {
            return StatusSnapshot {
                acked,
                state: LinkState::Connecting,
                since_ms: 0,
                rtt_ms: None,
                last_error: None,
            };
        };
        // "Connecting" turns "offline" once the partner has been silent too long.
        let silent_for = g.last_heard.unwrap_or(g.created).elapsed();
        if g.state == LinkState::Connecting && silent_for >= self.pong_discard_timeout {
            g.state = LinkState::Offline;
            g.since_ms = now_ms().saturating_sub((silent_for - self.pong_discard_timeout).as_millis() as u64);
        }
        StatusSnapshot {
            acked,
            state: g.state,
            since_ms: g.since_ms,
            rtt_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
            last_error: g.last_error.clone(),
        }
    }

    fn set(&self, state: LinkState, error: Option<String>) {
        if let Ok(mut g) = self.inner.lock() {
            let effective = if state == LinkState::Connecting && g.state == LinkState::Offline {
                LinkState::Offline
            } else {
                state
            };
            if g.state != effective {
                g.state = effective;
                g.since_ms = now_ms();
            }
            if error.is_some() || state == LinkState::Online {
                g.last_error = error;
            }
        }
    }

    fn heard(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.last_heard = Some(Instant::now());
            if g.state != LinkState::Online {
                g.state = LinkState::Online;
                g.since_ms = now_ms();
            }
        }
    }
}

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
}

/// What an `ack` does to the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckOutcome {
    /// The cursor moves to the ack.
    Moved,
    /// At or below the cursor (acks are cumulative): nothing to do.
    Unchanged,
    /// Above `head`, the highest seq this node ever sent or served: refused, and it moves
    /// nothing (neither the cursor nor the window it opens).
    Beyond,
}

/// The ack rule, apart from the I/O: `acked` is the cursor, `head` this node's journal head
/// (nothing above it was ever pushed or served by journal sync).
fn judge_ack(acked: u64, seq: u64, head: u64) -> AckOutcome {
    if seq > head {
        AckOutcome::Beyond
    } else if seq > acked {
        AckOutcome::Moved
    } else {
        AckOutcome::Unchanged
    }
}

/// The last seq the window lets through: `send_window` beyond the cursor.
fn window_end(acked: u64, send_window: u64) -> u64 {
    acked.saturating_add(send_window)
}

/// Where pushing starts after the handshake: right after what the partner has, or, when it
/// is more than a window behind, right after the head announced in `hello` (it pulls the
/// rest by journal sync).
fn push_from(start: u64, head_at_hello: u64, send_window: u64) -> u64 {
    if head_at_hello > window_end(start, send_window) {
        head_at_hello.saturating_add(1)
    } else {
        start.saturating_add(1)
    }
}

/// The highest seq an ack may name: the head as the watch has it, or, if the ack is above
/// it, the store's own head (the watch trails the journal commit by a moment, and the
/// partner may have pulled an entry of that moment).
async fn ack_limit(env: &LinkEnv, head: &watch::Receiver<u64>, seq: u64) -> u64 {
    let watched = *head.borrow();
    if seq <= watched {
        return watched;
    }
    match env.store.journal_head(&env.own_id).await {
        Ok(stored) => stored.max(watched),
        Err(_) => watched,
    }
}

/// Refuses an ack beyond the head: a log line (throttled), a metric, and an `error` frame
/// `invalid_field` for the partner's stream.
fn refuse_ack(env: &LinkEnv, log: &LogThrottle, peer: PeerId, seq: u64, head: u64) -> Frame {
    env.metrics.refused("partner_link", ErrorCode::InvalidField);
    if let Some(count) = log.hit(peer, "ack_beyond_head") {
        tracing::warn!(%peer, seq, head, code = "invalid_field", count, "ack beyond this node's journal head refused; the cursor does not move");
    }
    Frame::error(
        None,
        ErrorCode::InvalidField,
        format!("ack {seq} is beyond this node's journal head {head}"),
    )
}

/// Runs the link until shutdown, persisting the cursor on the way out.
pub async fn run(
    env: Arc<LinkEnv>,
    peer: PeerId,
    addr: Multiaddr,
    status: Arc<LinkStatus>,
    mut head: watch::Receiver<u64>,
) {
    let mut shutdown = env.shutdown.clone();
    let log = LogThrottle::new(REFUSAL_LOG_EVERY);
    let mut cursor = Cursor::load(&env, peer).await;
    status.acked.store(cursor.acked, Ordering::Relaxed);
    let mut backoff = env.tuning.backoff_min;
    let mut arrivals = env.net.state().arrivals();
    loop {
        let before = cursor.acked;
        let outcome = tokio::select! {
            r = session(&env, peer, &addr, &status, &mut cursor, &mut head, &log) => r,
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        cursor.persist(&env, peer).await;
        // A session that moved the cursor was healthy: retry quickly.
        backoff = if cursor.acked > before {
            env.tuning.backoff_min
        } else {
            backoff
        };
        if let Err(e) = outcome {
            let refused = matches!(e, LinkError::Refused { .. });
            tracing::warn!(%peer, cause = %e, retry_in = ?backoff, "partner session ended");
            status.set(
                if refused {
                    LinkState::Refused
                } else {
                    LinkState::Connecting
                },
                Some(e.to_string()),
            );
        }
        // Only a connection made while the link waits cuts the wait short (one the
        // session made itself must not, or a partner that drops us would be retried
        // without backoff).
        arrivals = arrivals.resubscribe();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = arrived(&mut arrivals, peer) => {
                tracing::debug!(%peer, "partner connected: retrying now");
            }
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        }
        backoff = (backoff * 2).min(env.tuning.backoff_max);
    }
    cursor.persist(&env, peer).await;
    tracing::debug!(%peer, acked = cursor.acked, "partner link stopped");
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

/// The partner's acknowledged position and when it was last written down.
struct Cursor {
    acked: u64,
    persisted: u64,
    persisted_at: Instant,
}

impl Cursor {
    async fn load(env: &LinkEnv, peer: PeerId) -> Cursor {
        let acked = env.store.cursor(&peer.to_string()).await.unwrap_or_else(|e| {
            tracing::warn!(%peer, cause = %e, "cannot read cursor, starting from the partner's own report");
            0
        });
        Cursor {
            acked,
            persisted: acked,
            persisted_at: Instant::now(),
        }
    }

    async fn persist(&mut self, env: &LinkEnv, peer: PeerId) {
        if self.acked == self.persisted {
            return;
        }
        // A cursor written late only shows an older position in /api/peers: the partner's
        // own report at the next hello is what sending resumes from.
        match env.store.set_cursor(&peer.to_string(), self.acked).await {
            Ok(()) => {
                self.persisted = self.acked;
                self.persisted_at = Instant::now();
            }
            Err(e) => tracing::warn!(%peer, cause = %e, "cannot persist cursor"),
        }
    }

    async fn persist_if_due(&mut self, env: &LinkEnv, peer: PeerId) {
        if self.persisted_at.elapsed() >= env.tuning.cursor_persist_every {
            self.persist(env, peer).await;
        }
    }
}

type Writer = futures::io::BufWriter<WriteHalf<Stream>>;
/// A frame from one of the session's streams: the resource streams by kind, `None` for
/// the heartbeat stream.
type Inbound = (Option<StreamKind>, Result<Option<Frame>, FrameError>);

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

async fn session(
    env: &LinkEnv,
    peer: PeerId,
    addr: &Multiaddr,
    status: &LinkStatus,
    cursor: &mut Cursor,
    head: &mut watch::Receiver<u64>,
    log: &LogThrottle,
) -> Result<(), LinkError> {
    let t = &env.tuning;
    env.net.dial(peer, addr.clone(), t.io_timeout).await?;
    let (tx, mut rx) = mpsc::channel::<Inbound>(INBOX);
    let mut readers = Readers(Vec::with_capacity(4));
    let mut open = |stream: Stream, kind: Option<StreamKind>| {
        let (r, w) = stream.split();
        let tx = tx.clone();
        readers.0.push(tokio::spawn(wire::forward_frames(
            r,
            t.max_frame_bytes,
            tx,
            move |f| (kind, f),
        )));
        futures::io::BufWriter::with_capacity(64 * 1024, w)
    };
    let head_at_hello = *head.borrow_and_update();
    let mut writers: Vec<Writer> = Vec::with_capacity(3);
    for kind in StreamKind::ALL {
        let stream = env.net.open_stream(peer, kind.protocol(), t.io_timeout).await?;
        let mut w = open(stream, Some(kind));
        let hello = Frame::Hello {
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
    let mut heartbeat = open(stream, None);
    drop(tx);

    // The partner answers each hello with what it already handled.
    let mut answered = [None::<u64>; 3];
    while answered.iter().any(Option::is_none) {
        let (kind, frame) = tokio::time::timeout(t.io_timeout, rx.recv())
            .await
            .map_err(|_| LinkError::Silent(t.io_timeout))?
            .ok_or(LinkError::Closed("all"))?;
        match (kind, frame.map_err(LinkError::Frame)?) {
            (Some(kind), Some(Frame::Ack { seq })) => {
                let limit = ack_limit(env, head, seq).await;
                if judge_ack(cursor.acked, seq, limit) == AckOutcome::Beyond {
                    // The partner claims what this node never journaled: nothing moves,
                    // the session ends and is retried with backoff.
                    let refusal = refuse_ack(env, log, peer, seq, limit);
                    let w = &mut writers[kind as usize];
                    let _ = timed(t.io_timeout, Some(kind), wire::write_frame(w, &refusal)).await;
                    return Err(LinkError::AckBeyondHead { seq, head: limit });
                }
                answered[kind as usize] = Some(seq);
            }
            (_, Some(Frame::Error { code, message, .. })) => {
                return Err(LinkError::Refused { code, message })
            }
            (_, None) => return Err(LinkError::Closed(stream_name(kind))),
            (_, Some(other)) => tracing::debug!(%peer, ?other, "unexpected frame during handshake"),
        }
    }
    let start = answered.iter().flatten().copied().min().unwrap_or(0);
    if start != cursor.acked {
        tracing::info!(%peer, cursor = cursor.acked, partner_has = start, "resuming from the partner's report");
    }
    cursor.acked = start;
    status.acked.store(start, Ordering::Relaxed);
    status.heard();
    status.set(LinkState::Online, None);
    Metrics::add(&env.metrics.sessions_opened, 1);
    // Far behind: the partner pulls up to our head by journal sync; we push what follows.
    let mut next = push_from(start, head_at_hello, t.send_window);
    tracing::info!(%peer, partner_has = start, push_from = next, head = head_at_hello, "partner session open");

    let mut ping = tokio::time::interval(t.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    let mut pings: std::collections::VecDeque<(u64, Instant)> = Default::default();
    loop {
        let head_now = *head.borrow_and_update();
        let window_end = window_end(cursor.acked, t.send_window);
        if next <= head_now && next <= window_end {
            // `next <= head_now.min(window_end)`: no underflow.
            let ahead = (head_now.min(window_end) - next).saturating_add(1);
            let limit = usize::try_from(ahead.min(t.read_chunk as u64)).unwrap_or(t.read_chunk);
            let entries = env.store.read_journal_raw(&env.own_id, next, limit).await?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                // The head was announced before the commit became visible; wait for more.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            let count = entries.len() as u64;
            let mut bufs: [Vec<u8>; 3] = Default::default();
            for entry in entries {
                let kind = StreamKind::for_action(entry.action);
                let buf = &mut bufs[kind as usize];
                let before = buf.len();
                let seq = entry.seq;
                if !wire::encode_event_json(&entry.json, buf) {
                    tracing::error!(%peer, seq, "journal entry is not a JSON object; the partner pulls it");
                    wire::encode_frame(&Frame::Large { seq }, buf);
                } else if buf.len() - before > t.max_frame_bytes {
                    buf.truncate(before);
                    wire::encode_frame(&Frame::Large { seq }, buf);
                }
            }
            for kind in StreamKind::ALL {
                let buf = &bufs[kind as usize];
                if !buf.is_empty() {
                    let w = &mut writers[kind as usize];
                    timed(t.io_timeout, Some(kind), async {
                        w.write_all(buf).await?;
                        w.flush().await
                    })
                    .await?;
                }
            }
            Metrics::add(&env.metrics.events_sent, count);
            next = last.saturating_add(1);
            // Take the acks that arrived meanwhile without waiting.
            while let Ok((kind, frame)) = rx.try_recv() {
                let reply = on_frame(env, peer, status, cursor, &mut pings, head, log, kind, frame).await?;
                answer(t.io_timeout, &mut writers, reply).await?;
                last_heard = Instant::now();
            }
            cursor.persist_if_due(env, peer).await;
            continue;
        }
        let silence = t.pong_discard_timeout.saturating_sub(last_heard.elapsed());
        tokio::select! {
            received = rx.recv() => {
                let (kind, frame) = received.ok_or(LinkError::Closed("all"))?;
                let reply = on_frame(env, peer, status, cursor, &mut pings, head, log, kind, frame).await?;
                answer(t.io_timeout, &mut writers, reply).await?;
                last_heard = Instant::now();
            }
            changed = head.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = ping.tick() => {
                nonce = nonce.wrapping_add(1);
                pings.push_back((nonce, Instant::now()));
                if pings.len() > 16 {
                    pings.pop_front();
                }
                timed(t.io_timeout, None, wire::write_frame(&mut heartbeat, &Frame::Ping { nonce })).await?;
            }
            _ = tokio::time::sleep(silence) => {
                status.set(LinkState::Offline, Some(format!("no answer for {:?}", t.pong_discard_timeout)));
                return Err(LinkError::Silent(t.pong_discard_timeout));
            }
        }
        cursor.persist_if_due(env, peer).await;
    }
}

/// A frame for the partner on one of the resource streams, in answer to one of its own.
type Reply = Option<(StreamKind, Frame)>;

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

#[allow(clippy::too_many_arguments)]
async fn on_frame(
    env: &LinkEnv,
    peer: PeerId,
    status: &LinkStatus,
    cursor: &mut Cursor,
    pings: &mut std::collections::VecDeque<(u64, Instant)>,
    head: &watch::Receiver<u64>,
    log: &LogThrottle,
    kind: Option<StreamKind>,
    frame: Result<Option<Frame>, FrameError>,
) -> Result<Reply, LinkError> {
    status.heard();
    match frame {
        Ok(Some(Frame::Ack { seq })) => {
            let limit = ack_limit(env, head, seq).await;
            match judge_ack(cursor.acked, seq, limit) {
                AckOutcome::Moved => {
                    cursor.acked = seq;
                    status.acked.store(seq, Ordering::Relaxed);
                    Ok(None)
                }
                AckOutcome::Unchanged => Ok(None),
                AckOutcome::Beyond => {
                    let refusal = refuse_ack(env, log, peer, seq, limit);
                    Ok(kind.map(|k| (k, refusal)))
                }
            }
        }
        Ok(Some(Frame::Pong { nonce })) => {
            if let Some(pos) = pings.iter().position(|(n, _)| *n == nonce) {
                let (_, sent) = pings[pos];
                status
                    .rtt_us
                    .store(sent.elapsed().as_micros().max(1) as u64, Ordering::Relaxed);
                pings.drain(..=pos);
            }
            Ok(None)
        }
        Ok(Some(Frame::Error {
            seq: Some(seq),
            code,
            message,
        })) => {
            // The partner refused one entry and moved past it; the journal keeps it.
            let code = ErrorCode::parse(&code).unwrap_or(ErrorCode::InvalidField);
            env.metrics.refused("outbound", code);
            if let Some(count) = log.hit(peer, code.as_str()) {
                tracing::warn!(%peer, seq, code = code.as_str(), %message, count, "partner refused an event");
            }
            Ok(None)
        }
        Ok(Some(Frame::Error {
            seq: None,
            code,
            message,
        })) => Err(LinkError::Refused { code, message }),
        Ok(Some(other)) => {
            tracing::debug!(%peer, stream = stream_name(kind), ?other, "ignoring unexpected frame");
            Ok(None)
        }
        Ok(None) => Err(LinkError::Closed(stream_name(kind))),
        Err(e) if e.is_recoverable() => {
            if let Some(count) = log.hit(peer, "unreadable_frame") {
                tracing::warn!(%peer, stream = stream_name(kind), cause = %e, count, "skipping unreadable frame from partner");
            }
            Ok(None)
        }
        Err(e) => Err(LinkError::Frame(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_moves_the_cursor_only_up_and_never_beyond_the_head() {
        assert_eq!(judge_ack(10, 12, 20), AckOutcome::Moved);
        assert_eq!(judge_ack(10, 20, 20), AckOutcome::Moved, "up to the head itself");
        assert_eq!(judge_ack(10, 10, 20), AckOutcome::Unchanged);
        assert_eq!(judge_ack(10, 3, 20), AckOutcome::Unchanged, "acks are cumulative");
        assert_eq!(judge_ack(10, 21, 20), AckOutcome::Beyond);
        assert_eq!(judge_ack(0, u64::MAX, 20), AckOutcome::Beyond);
        assert_eq!(judge_ack(0, u64::MAX, u64::MAX), AckOutcome::Moved);
    }

    #[test]
    fn window_arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(window_end(10, 8192), 8202);
        assert_eq!(window_end(u64::MAX - 1, 8192), u64::MAX);
        assert_eq!(
            push_from(5, 100, 8192),
            6,
            "less than a window behind: from its report"
        );
        assert_eq!(
            push_from(5, 9000, 8192),
            9001,
            "far behind: after the announced head"
        );
        assert_eq!(push_from(u64::MAX, u64::MAX, 8192), u64::MAX);
        assert_eq!(push_from(0, u64::MAX, 8192), u64::MAX);
    }
}
