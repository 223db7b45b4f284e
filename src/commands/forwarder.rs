//! The receiving side of the considers and planner protocols: each `forward` frame a peer
//! sends is republished on the local NATS as `PROPALGATION_EVENT` from `oc-discovery`, with
//! the protocol's action and the connection's peer id, then acknowledged. What a peer
//! controls is bounded: a token bucket per peer ([`Forwarder`]), and the streams open at
//! once, in total and per peer, idle ones closed to make room ([`OpenStreams`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use serde_json::json;
use tokio::sync::oneshot;

use super::ForwardKind;
use crate::config::Tuning;
use crate::contract::{self, ErrorCode};
use crate::guard::{LogThrottle, PeerBuckets};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, ForwardFrame, FrameError};

/// Why [`OpenStreams::admit`] refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StreamsFull {
    #[error("this peer has {0} forwarding streams busy")]
    Peer(usize),
    #[error("all {0} forwarding streams are busy")]
    Total(usize),
}

/// The considers / planner streams open on the receiving side, bounded in total and per
/// peer. A stream waiting for its next frame is *idle*: it holds no work permit, and it
/// is closed to make room when a new stream would not fit: the peer's own when the peer is
/// at its share, else one of the peer holding the most streams, the longest idle first. Only streams busy with a frame are never
/// taken away, so idle planner streams of any number of peers cannot lock others out.
///
/// Pure bookkeeping, generic over the handle that closes a stream (unit-tested).
pub(crate) struct OpenStreams<H> {
    total: usize,
    per_peer: usize,
    next_id: u64,
    open: HashMap<u64, OpenSlot<H>>,
}

struct OpenSlot<H> {
    peer: PeerId,
    /// Since when the stream has been waiting for a frame; `None` while one is handled.
    idle_since: Option<Instant>,
    close: H,
}

impl<H> OpenStreams<H> {
    pub(crate) fn new(total: usize, per_peer: usize) -> Self {
        let total = total.max(1);
        OpenStreams {
            total,
            per_peer: per_peer.clamp(1, total),
            next_id: 0,
            open: HashMap::new(),
        }
    }

    /// Admits a stream of `peer` (idle until it reads a frame). Returns its id and the
    /// handle of the idle stream closed to make room, if one was.
    ///
    /// # Errors
    /// [`StreamsFull`] when every stream that would have to go is busy.
    pub(crate) fn admit(
        &mut self,
        peer: PeerId,
        close: H,
        now: Instant,
    ) -> Result<(u64, Option<H>), StreamsFull> {
        let mine = self.open.values().filter(|s| s.peer == peer).count();
        let evicted = if mine >= self.per_peer {
            Some(
                self.oldest_idle(Some(peer))
                    .ok_or(StreamsFull::Peer(self.per_peer))?,
            )
        } else if self.open.len() >= self.total {
            Some(self.oldest_idle(None).ok_or(StreamsFull::Total(self.total))?)
        } else {
            None
        };
        let evicted = evicted.and_then(|id| self.open.remove(&id)).map(|s| s.close);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.open.insert(
            id,
            OpenSlot {
                peer,
                idle_since: Some(now),
                close,
            },
        );
        Ok((id, evicted))
    }

    /// The idle stream to close: of `of` when given, else of the peer holding the most
    /// streams (so a peer with few keeps them), the longest idle first.
    fn oldest_idle(&self, of: Option<PeerId>) -> Option<u64> {
        let mut held: HashMap<PeerId, usize> = HashMap::new();
        for s in self.open.values() {
            let n = held.entry(s.peer).or_default();
            *n = n.saturating_add(1);
        }
        self.open
            .iter()
            .filter(|(_, s)| of.is_none_or(|p| s.peer == p))
            .filter_map(|(id, s)| {
                let count = held.get(&s.peer).copied().unwrap_or(0);
                s.idle_since.map(|t| (std::cmp::Reverse(count), t, *id))
            })
            .min()
            .map(|(_, _, id)| id)
    }

    /// The stream waits for its next frame (it may be closed to make room).
    pub(crate) fn idle(&mut self, id: u64, now: Instant) {
        if let Some(s) = self.open.get_mut(&id) {
            s.idle_since = Some(now);
        }
    }

    /// The stream handles a frame: it is not taken away meanwhile. False when it was
    /// closed to make room already.
    pub(crate) fn busy(&mut self, id: u64) -> bool {
        match self.open.get_mut(&id) {
            Some(s) => {
                s.idle_since = None;
                true
            }
            None => false,
        }
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }
}

/// Considers / planner streams served at once, across all peers.
pub const MAX_FORWARD_STREAMS: usize = 64;
/// Considers / planner streams one peer has open at once.
pub const FORWARD_STREAMS_PER_PEER: usize = 4;
/// Peers whose forwarding token buckets are remembered at once.
const FORWARD_BUCKET_PEERS: usize = 4096;
/// A peer's repeated refusals are logged once per this.
const FORWARD_LOG_EVERY: Duration = Duration::from_secs(10);

/// Receiver side of considers and planner streams: republishes each `forward` frame on the
/// local NATS as `PROPALGATION_EVENT` from `oc-discovery`, then acknowledges it.
///
/// What a peer controls is bounded: the action is the protocol's (`PB_CONSIDERS` or
/// `PB_PLANNER`, whatever the frame says), `from_peer` is the connection's peer id, each
/// peer has a token bucket (`--forward-rate`, `--forward-burst`; over it: `rate_limited`),
/// and streams are bounded by [`OpenStreams`].
pub(crate) struct Forwarder {
    nats: async_nats::Client,
    metrics: Arc<Metrics>,
    tuning: Tuning,
    buckets: PeerBuckets,
    streams: Mutex<OpenStreams<oneshot::Sender<()>>>,
    throttle: LogThrottle,
}

impl Forwarder {
    pub(crate) fn new(nats: async_nats::Client, metrics: Arc<Metrics>, tuning: Tuning) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            nats,
            metrics,
            buckets: PeerBuckets::new(
                tuning.forward_rate,
                f64::from(tuning.forward_burst),
                FORWARD_BUCKET_PEERS,
            ),
            tuning,
            streams: Mutex::new(OpenStreams::new(MAX_FORWARD_STREAMS, FORWARD_STREAMS_PER_PEER)),
            throttle: LogThrottle::new(FORWARD_LOG_EVERY),
        })
    }

    /// Serves a considers / planner stream a peer opened, or resets it when the streams
    /// that would have to make room are all busy.
    pub(crate) fn accept(self: &Arc<Self>, peer: PeerId, protocol: &StreamProtocol, stream: Stream) {
        let Some(kind) = ForwardKind::of(protocol) else {
            return;
        };
        let (close, closed) = oneshot::channel();
        let admitted = match self.streams.lock() {
            Ok(mut streams) => streams.admit(peer, close, Instant::now()),
            Err(_) => Err(StreamsFull::Total(MAX_FORWARD_STREAMS)),
        };
        match admitted {
            Ok((id, evicted)) => {
                if let Some(evicted) = evicted {
                    // The idle stream's task ends at once; its sender reopens when needed.
                    let _ = evicted.send(());
                    tracing::debug!(%peer, "idle forwarding stream closed to make room");
                }
                tokio::spawn(self.clone().serve(stream, peer, kind, id, closed));
            }
            Err(full) => {
                // Dropping the stream resets it: the sender learns at once.
                self.metrics.refused("forward", ErrorCode::Busy);
                if let Some(count) = self.throttle.hit(peer, "busy") {
                    tracing::warn!(%peer, code = "busy", count, cause = %full, "forwarding stream refused");
                }
            }
        }
    }

    fn mark_idle(&self, id: u64) {
        if let Ok(mut s) = self.streams.lock() {
            s.idle(id, Instant::now());
        }
    }

    fn mark_busy(&self, id: u64) -> bool {
        self.streams.lock().map(|mut s| s.busy(id)).unwrap_or(false)
    }

    async fn serve(
        self: Arc<Self>,
        mut stream: Stream,
        peer: PeerId,
        kind: ForwardKind,
        id: u64,
        mut closed: oneshot::Receiver<()>,
    ) {
        let _slot = SlotGuard {
            forwarder: self.clone(),
            id,
        };
        let t = self.tuning.io_timeout;
        let idle = match kind {
            ForwardKind::Considers => t,
            ForwardKind::Planner => self.tuning.planner_idle,
        };
        loop {
            self.mark_idle(id);
            let read = tokio::select! {
                read = tokio::time::timeout(idle, wire::read_frame::<ForwardFrame, _>(&mut stream, self.tuning.max_frame_bytes)) => read,
                _ = &mut closed => {
                    tracing::debug!(%peer, ?kind, "idle forwarding stream closed to make room");
                    break;
                }
            };
            if !self.mark_busy(id) {
                break;
            }
            let answer = match read {
                Ok(Ok(Some(frame))) => self.handle(peer, kind, Some(frame)).await,
                // A frame of another protocol is refused as any frame but `forward` is.
                Ok(Err(FrameError::Unexpected { .. })) => self.handle(peer, kind, None).await,
                Ok(Err(e)) if e.is_recoverable() => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                        _ => ErrorCode::InvalidJson,
                    };
                    self.refused(peer, code, "unreadable forwarded message skipped");
                    error_frame(code, e.to_string())
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => {
                    tracing::debug!(%peer, ?kind, idle = ?idle, "idle forwarding stream closed");
                    break;
                }
            };
            if !matches!(
                tokio::time::timeout(t, wire::write_frame(&mut stream, &answer)).await,
                Ok(Ok(()))
            ) {
                break;
            }
        }
        let _ = tokio::time::timeout(t, stream.close()).await;
    }

    /// The answer to one frame (`None`: a frame of another protocol): `ack` once
    /// republished, `error` otherwise.
    async fn handle(&self, peer: PeerId, kind: ForwardKind, frame: Option<ForwardFrame>) -> ForwardFrame {
        // Every frame costs a token, so junk floods are bounded like valid ones.
        if !self.buckets.try_take(&peer) {
            self.refused(
                peer,
                ErrorCode::RateLimited,
                "forwarded message over the peer's rate refused",
            );
            return error_frame(
                ErrorCode::RateLimited,
                format!(
                    "more than {}/s (burst {}) forwarded messages; retry later",
                    self.tuning.forward_rate, self.tuning.forward_burst
                ),
            );
        }
        let Some(ForwardFrame::Forward {
            action: claimed,
            data_type,
            user,
            payload,
        }) = frame
        else {
            self.refused(
                peer,
                ErrorCode::UnsupportedAction,
                "unexpected frame on a forwarding stream",
            );
            return error_frame(
                ErrorCode::UnsupportedAction,
                "only forward frames are accepted on this protocol",
            );
        };
        if !payload.is_object() {
            self.refused(
                peer,
                ErrorCode::InvalidField,
                "forwarded payload is not an object",
            );
            return error_frame(ErrorCode::InvalidField, "payload must be a JSON object");
        }
        let action = kind.action().as_str();
        if claimed != action {
            // The protocol decides: a peer cannot make this node publish PB_DELETE.
            tracing::debug!(%peer, %claimed, %action, "forwarded action replaced by the protocol's");
        }
        let body = json!({
            "action": action, "data_type": data_type, "user": user, "payload": payload,
            "from_app": contract::OWN_APP, "from_peer": peer.to_string(),
        });
        let published = async {
            self.nats
                .publish(contract::SUBJECT_PROPAGATION, body.to_string().into())
                .await
                .map_err(|e| e.to_string())?;
            self.nats.flush().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.tuning.io_timeout, published).await {
            Ok(Ok(())) => {
                tracing::debug!(%peer, %action, "forwarded message republished");
                ForwardFrame::Ack { seq: 0 }
            }
            other => {
                let reason = match other {
                    Ok(Err(e)) => e,
                    _ => format!("no confirmation within {:?}", self.tuning.io_timeout),
                };
                self.metrics.refused("forward", ErrorCode::NatsUnavailable);
                tracing::warn!(%peer, %action, cause = %reason, "cannot republish forwarded message");
                error_frame(ErrorCode::NatsUnavailable, reason)
            }
        }
    }

    /// Counts every refusal; logs it once per interval per peer and code.
    fn refused(&self, peer: PeerId, code: ErrorCode, what: &'static str) {
        self.metrics.refused("forward", code);
        if let Some(count) = self.throttle.hit(peer, code.as_str()) {
            tracing::warn!(%peer, code = code.as_str(), count, "{what}");
        }
    }
}

/// Gives a stream's place back when its task ends, however it ends.
struct SlotGuard {
    forwarder: Arc<Forwarder>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.forwarder.streams.lock() {
            s.remove(self.id);
        }
    }
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> ForwardFrame {
    ForwardFrame::Error(ErrorFrame::new(None, code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_streams_make_room_and_busy_ones_do_not() {
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        let mut s: OpenStreams<u32> = OpenStreams::new(3, 2);
        let (hostile, good) = (PeerId::random(), PeerId::random());
        let (a, _) = s.admit(hostile, 1, later(0)).unwrap();
        let (b, _) = s.admit(hostile, 2, later(1)).unwrap();
        // At its share: the peer's own oldest idle stream goes.
        let (c, evicted) = s.admit(hostile, 3, later(2)).unwrap();
        assert_eq!(evicted, Some(1));
        assert!(!s.busy(a), "closed to make room");
        assert!(s.busy(b) && s.busy(c));
        assert_eq!(s.admit(hostile, 4, later(3)), Err(StreamsFull::Peer(2)));
        // Pool full of busy streams: a good peer waits; once one is idle, it gets room.
        let (g, none) = s.admit(good, 5, later(4)).unwrap();
        assert_eq!(none, None);
        assert!(s.busy(g));
        assert_eq!(s.len(), 3);
        assert_eq!(s.admit(PeerId::random(), 6, later(5)), Err(StreamsFull::Total(3)));
        s.idle(b, later(6));
        let (_, evicted) = s.admit(PeerId::random(), 7, later(7)).unwrap();
        assert_eq!(evicted, Some(2));
        s.remove(c);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_peer_holding_the_most_streams_makes_room_first() {
        let t0 = Instant::now();
        let mut s: OpenStreams<&str> = OpenStreams::new(4, 3);
        let (good, greedy) = (PeerId::random(), PeerId::random());
        // The good peer's stream is the longest idle, yet the greedy peer's go first.
        s.admit(good, "good", t0).unwrap();
        for (i, name) in ["g1", "g2", "g3"].into_iter().enumerate() {
            s.admit(greedy, name, t0 + Duration::from_millis(1 + i as u64))
                .unwrap();
        }
        let (_, evicted) = s
            .admit(PeerId::random(), "new", t0 + Duration::from_secs(1))
            .unwrap();
        assert_eq!(evicted, Some("g1"));
    }
}
