//! A partner link: replicates this node's journal to one partner over the three resource
//! streams, with a window of unacknowledged events, and resumes after any failure.
//!
//! Session: open the three streams, say `hello` on each; the partner answers each with an
//! `ack` of what it already handled, and we send from there (so a partner that lost its
//! data gets everything again, and one that is ahead is not sent anything twice). Then
//! entries are read from the journal in chunks, written to the stream of their action,
//! at most `send_window` beyond the last ack. Acks move the cursor, persisted every
//! `cursor_persist_every` and at the end of each session. Any failure ends the session;
//! the link retries with exponential backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId, Stream};
use tokio::sync::{mpsc, watch};

use crate::config::Tuning;
use crate::event::ErrorCode;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self, StreamKind};
use crate::store::{Store, StoreError};

/// A session with unacknowledged events and no frame from the partner for this long is
/// presumed dead and restarted.
const ACK_SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// Frames from the partner buffered between the stream readers and the session.
const INBOX: usize = 1024;

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
    Connecting,
    Online,
    /// The partner refused us (we are not its partner, or a stream-level error).
    Refused,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Online => "online",
            LinkState::Refused => "refused",
        }
    }
}

/// Live state of a link, read by the admin API without asking the link.
pub struct LinkStatus {
    acked: AtomicU64,
    inner: Mutex<(LinkState, Option<String>)>,
}

impl Default for LinkStatus {
    fn default() -> Self {
        LinkStatus {
            acked: AtomicU64::new(0),
            inner: Mutex::new((LinkState::Connecting, None)),
        }
    }
}

pub struct StatusSnapshot {
    pub acked: u64,
    pub state: LinkState,
    pub last_error: Option<String>,
}

impl LinkStatus {
    pub fn snapshot(&self) -> StatusSnapshot {
        let (state, last_error) = self
            .inner
            .lock()
            .map(|g| g.clone())
            .unwrap_or((LinkState::Connecting, None));
        StatusSnapshot {
            acked: self.acked.load(Ordering::Relaxed),
            state,
            last_error,
        }
    }

    fn set(&self, state: LinkState, error: Option<String>) {
        if let Ok(mut g) = self.inner.lock() {
            g.0 = state;
            if error.is_some() || state == LinkState::Online {
                g.1 = error;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Net(#[from] p2p::NetError),
    #[error("stream {kind:?}: {source}")]
    Stream {
        kind: StreamKind,
        source: std::io::Error,
    },
    #[error("stream {0:?} closed by the partner")]
    Closed(StreamKind),
    #[error("partner refused the session: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no answer from the partner within {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unreadable frame from the partner: {0}")]
    Frame(FrameError),
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
    let mut cursor = Cursor::load(&env, peer).await;
    status.acked.store(cursor.acked, Ordering::Relaxed);
    let mut backoff = env.tuning.backoff_min;
    loop {
        status.set(LinkState::Connecting, None);
        let before = cursor.acked;
        let outcome = tokio::select! {
            r = session(&env, peer, &addr, &status, &mut cursor, &mut head) => r,
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        cursor.persist(&env, peer).await;
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
        // A session that moved the cursor was healthy: retry quickly.
        backoff = if cursor.acked > before {
            env.tuning.backoff_min
        } else {
            (backoff * 2).min(env.tuning.backoff_max)
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        }
    }
    cursor.persist(&env, peer).await;
    tracing::debug!(%peer, acked = cursor.acked, "partner link stopped");
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
        // A cursor written late only causes resends, which the partner ignores.
        match env.store.set_cursor(&peer.to_string(), self.acked).await {
            Ok(()) => {
                self.persisted = self.acked;
                self.persisted_at = Instant::now();
            }
            Err(e) => tracing::warn!(%peer, cause = %e, "cannot persist cursor"),
        }
    }
}

type Writer = futures::io::BufWriter<WriteHalf<Stream>>;
type Inbound = (StreamKind, Result<Option<Frame>, FrameError>);

/// Aborts the stream readers when the session ends, whatever the way.
struct Readers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for r in &self.0 {
            r.abort();
        }
    }
}

async fn session(
    env: &LinkEnv,
    peer: PeerId,
    addr: &Multiaddr,
    status: &LinkStatus,
    cursor: &mut Cursor,
    head: &mut watch::Receiver<u64>,
) -> Result<(), LinkError> {
    let t = &env.tuning;
    env.net.dial(peer, addr.clone(), t.io_timeout).await?;
    let (tx, mut rx) = mpsc::channel::<Inbound>(INBOX);
    let mut writers: Vec<Writer> = Vec::with_capacity(3);
    let mut readers = Readers(Vec::with_capacity(3));
    for kind in StreamKind::ALL {
        let stream = env.net.open_stream(peer, kind.protocol(), t.io_timeout).await?;
        let (r, w) = stream.split();
        readers
            .0
            .push(tokio::spawn(read_loop(kind, r, tx.clone(), t.max_frame_bytes)));
        let mut w = futures::io::BufWriter::with_capacity(64 * 1024, w);
        let hello = Frame::Hello {
            origin: env.own_id.clone(),
        };
        timed(t.io_timeout, kind, wire::write_frame(&mut w, &hello)).await?;
        writers.push(w);
    }
    drop(tx);

    // The partner answers each hello with what it already handled.
    let mut answered = [None::<u64>; 3];
    while answered.iter().any(Option::is_none) {
        let (kind, frame) = tokio::time::timeout(t.io_timeout, rx.recv())
            .await
            .map_err(|_| LinkError::Silent(t.io_timeout))?
            .ok_or(LinkError::Closed(StreamKind::Create))?;
        match frame.map_err(LinkError::Frame)? {
            Some(Frame::Ack { seq }) => answered[kind as usize] = Some(seq),
            Some(Frame::Error { code, message, .. }) => return Err(LinkError::Refused { code, message }),
            Some(other) => tracing::debug!(%peer, ?other, "unexpected frame during handshake"),
            None => return Err(LinkError::Closed(kind)),
        }
    }
    let start = answered.iter().flatten().copied().min().unwrap_or(0);
    if start != cursor.acked {
        tracing::info!(%peer, cursor = cursor.acked, partner_has = start, "resuming from the partner's report");
    }
    cursor.acked = start;
    status.acked.store(start, Ordering::Relaxed);
    status.set(LinkState::Online, None);
    Metrics::add(&env.metrics.sessions_opened, 1);
    tracing::info!(%peer, from = start + 1, "partner session open");

    let mut next = start + 1;
    let mut last_heard = Instant::now();
    loop {
        let head_now = *head.borrow_and_update();
        let window_end = cursor.acked + t.send_window;
        if next <= head_now && next <= window_end {
            let limit = (head_now.min(window_end) - next + 1).min(t.read_chunk as u64) as usize;
            let entries = env.store.read_journal(&env.own_id, next, limit).await?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                // The head was announced before the commit became visible; wait for more.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            let count = entries.len() as u64;
            let mut bufs: [Vec<u8>; 3] = Default::default();
            for entry in entries {
                let kind = StreamKind::for_action(entry.action);
                wire::encode_frame(&Frame::Event(entry), &mut bufs[kind as usize]);
            }
            for kind in StreamKind::ALL {
                let buf = &bufs[kind as usize];
                if !buf.is_empty() {
                    let w = &mut writers[kind as usize];
                    timed(t.io_timeout, kind, async {
                        w.write_all(buf).await?;
                        w.flush().await
                    })
                    .await?;
                }
            }
            Metrics::add(&env.metrics.events_sent, count);
            next = last + 1;
            // Take the acks that arrived meanwhile without waiting.
            while let Ok((kind, frame)) = rx.try_recv() {
                on_frame(env, peer, status, cursor, kind, frame)?;
                last_heard = Instant::now();
            }
            if cursor.persisted_at.elapsed() >= t.cursor_persist_every {
                cursor.persist(env, peer).await;
            }
            continue;
        }
        let waiting_for_acks = cursor.acked + 1 < next;
        let silence = ACK_SILENCE_LIMIT.saturating_sub(last_heard.elapsed());
        tokio::select! {
            received = rx.recv() => {
                let (kind, frame) = received.ok_or(LinkError::Closed(StreamKind::Create))?;
                on_frame(env, peer, status, cursor, kind, frame)?;
                last_heard = Instant::now();
            }
            changed = head.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(silence), if waiting_for_acks => {
                return Err(LinkError::Silent(ACK_SILENCE_LIMIT));
            }
        }
        if cursor.persisted_at.elapsed() >= t.cursor_persist_every {
            cursor.persist(env, peer).await;
        }
        if !waiting_for_acks {
            last_heard = Instant::now();
        }
    }
}

fn on_frame(
    env: &LinkEnv,
    peer: PeerId,
    status: &LinkStatus,
    cursor: &mut Cursor,
    kind: StreamKind,
    frame: Result<Option<Frame>, FrameError>,
) -> Result<(), LinkError> {
    match frame {
        Ok(Some(Frame::Ack { seq })) => {
            if seq > cursor.acked {
                cursor.acked = seq;
                status.acked.store(seq, Ordering::Relaxed);
            }
            Ok(())
        }
        Ok(Some(Frame::Error {
            seq: Some(seq),
            code,
            message,
        })) => {
            // The partner refused one entry and moved past it; the journal keeps it.
            tracing::warn!(%peer, seq, %code, %message, "partner refused an event");
            env.metrics.refused(
                "outbound",
                ErrorCode::parse(&code).unwrap_or(ErrorCode::InvalidField),
            );
            Ok(())
        }
        Ok(Some(Frame::Error {
            seq: None,
            code,
            message,
        })) => Err(LinkError::Refused { code, message }),
        Ok(Some(other)) => {
            tracing::debug!(%peer, ?kind, ?other, "ignoring unexpected frame");
            Ok(())
        }
        Ok(None) => Err(LinkError::Closed(kind)),
        Err(e) if e.is_recoverable() => {
            tracing::warn!(%peer, ?kind, cause = %e, "skipping unreadable frame from partner");
            Ok(())
        }
        Err(e) => Err(LinkError::Frame(e)),
    }
}

async fn read_loop(kind: StreamKind, mut r: ReadHalf<Stream>, tx: mpsc::Sender<Inbound>, max: usize) {
    loop {
        let frame = wire::read_frame(&mut r, max).await;
        let end = !matches!(&frame, Ok(Some(_))) && !matches!(&frame, Err(e) if e.is_recoverable());
        if tx.send((kind, frame)).await.is_err() || end {
            return;
        }
    }
}

async fn timed<F>(timeout: Duration, kind: StreamKind, f: F) -> Result<(), LinkError>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(LinkError::Stream { kind, source }),
        Err(_) => Err(LinkError::Silent(timeout)),
    }
}
