//! Inbound apply: receives partners' journals, applies them to the store by version,
//! publishes them on the local NATS, and only then acknowledges. Also answers partners'
//! heartbeats and serves this node's journal to partners that pull it (journal sync).
//!
//! The [`InboundApply`] actor (this file) routes each accepted stream to its peer's session
//! task (`session.rs`). A session merges the three resource streams of one origin back into
//! seq order with a reorder buffer ([`reorder::Reorder`], pure bookkeeping, bounded by the
//! sender's window), so entries are applied exactly in the order the origin journaled them.
//! For each contiguous run (`apply.rs`):
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
//! enters the inbox, given back when it is applied or dropped; the reorder buffer is
//! bounded by the same number of bytes), one stream per resource protocol (a new one
//! replaces the open one), one heartbeat stream per partner, per-peer shares of the sync,
//! refusal and forward pools (`guard::PeerPool`), and refusals logged once per interval per
//! peer and code (`guard::LogThrottle`) while every one is counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::io::BufWriter;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, watch};

use crate::commands::forwarder::Forwarder;
use crate::commands::{PROTOCOL_CONSIDERS, PROTOCOL_PLANNER};
use crate::config::Tuning;
use crate::contract::ErrorCode;
use crate::guard::{LogThrottle, PeerPool, PoolFull};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, ErrorOnly, HeartbeatFrame};
use crate::p2p::{self, StreamKind, PROTOCOL_HEARTBEAT};
use crate::peers::partners::Partners;
use crate::store::Store;
use crate::sync::{self, PROTOCOL_SYNC};

use session::{spawn_session, Attach};

mod apply;
pub mod reorder;
mod session;
mod snapshot;

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
/// A repeated refusal from one peer is logged once per this interval, with its count.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct InboundEnv {
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
    /// Told of every apply commit (the live feed).
    pub feed: Arc<crate::feed::Feed>,
}

pub(crate) struct InboundApply {
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
    pub(crate) fn new(env: InboundEnv) -> Self {
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
            let frame = ErrorOnly::Error(ErrorFrame::new(None, code, message));
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
pub(crate) struct IncomingStream {
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
            // Hand each stream over at once: libp2p-stream holds no spare stream of a
            // protocol and resets one that arrives while the one before it is not yet taken
            // from it. `try_send` queues it in the mailbox without waiting for the handler,
            // so the forwarder is back at the door at once; only a full mailbox makes it
            // wait (`send`) before it takes the next stream.
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    let msg = IncomingStream {
                        peer,
                        protocol: protocol.clone(),
                        stream,
                    };
                    let handed = match me.try_send(msg) {
                        Ok(()) => true,
                        Err(SendError::Full(msg)) => me.send(msg).await.is_ok(),
                        Err(SendError::Closed(_)) => false,
                    };
                    if !handed {
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
            let session = self.session(peer).clone();
            tokio::spawn(async move {
                let t = &env.tuning;
                let mut stream = stream;
                let served = match sync::serve::first_frame(&mut stream, t).await {
                    // An origin's snapshot job: its session applies it, in order with the
                    // rest of what comes from it.
                    Ok(Some(begin @ wire::SyncFrame::SnapshotBegin { .. })) => {
                        // The permit is held until the session took the stream: a peer
                        // opening snapshot streams faster than its session takes them gets
                        // `busy` beyond its share.
                        let (reader, writer) = stream.split();
                        let attach = Attach::Snapshot {
                            begin,
                            reader,
                            writer: BufWriter::with_capacity(16 * 1024, writer),
                        };
                        let taken = tokio::time::timeout(t.sync_timeout, session.send(attach)).await;
                        if !matches!(taken, Ok(Ok(()))) {
                            tracing::debug!(%peer, "session busy or gone: snapshot stream dropped");
                        }
                        drop(permit);
                        return;
                    }
                    // A snapshot frame with no job begun on the stream.
                    Ok(Some(other)) if wire::Frame::kind(&other).starts_with("snapshot_") => {
                        let refusal = crate::contract::Refusal::new(
                            ErrorCode::InvalidField,
                            format!(
                                "{} without a snapshot_begin on this stream",
                                wire::Frame::kind(&other)
                            ),
                        );
                        env.metrics.refused("snapshot", refusal.code);
                        if let Some(count) = sync::REFUSAL_LOG.hit(peer, "snapshot_without_job") {
                            tracing::warn!(%peer, code = refusal.code.as_str(), count, reason = %refusal.message, "snapshot frame refused");
                        }
                        let frame =
                            wire::SyncFrame::Error(ErrorFrame::new(None, refusal.code, refusal.message));
                        let _ = tokio::time::timeout(t.io_timeout, async {
                            wire::write_frame(&mut stream, &frame).await?;
                            AsyncWriteExt::close(&mut stream).await
                        })
                        .await;
                        Ok(())
                    }
                    Ok(first) => {
                        sync::serve::serve(
                            env.store.as_ref(),
                            &env.own_id,
                            peer,
                            stream,
                            first,
                            t,
                            &env.metrics,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
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
        match tokio::time::timeout(idle, wire::read_frame::<HeartbeatFrame, _>(&mut stream, max)).await {
            Ok(Ok(Some(HeartbeatFrame::Ping { nonce }))) => {
                let pong = HeartbeatFrame::Pong { nonce };
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
