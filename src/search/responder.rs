//! The responder's side: inbound search streams and gossip queries, each served by a helper
//! task from one [`PeerPool`] ([`MAX_RESPONDERS`], [`RESPONDERS_PER_PEER`] per peer);
//! beyond it a stream is dropped and a gossip query ignored (`busy`). A permit is taken the
//! moment a stream arrives (libp2p-stream drops the streams the application is slow to
//! take), so the pool is shared by the tasks rather than asked through a mailbox.
//!
//! Only the node's own resources of the data type asked are offered ([`OwnMatches`]): never
//! `"access": "private"` ones, `"access": "partners"` ones to partners only. A stream whose
//! first frame is an answer to one of this node's `all` searches goes to the searcher
//! ([`super::searcher::on_answer_stream`]).

use std::sync::Arc;

use actix::Recipient;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::mpsc;

use super::env::Shared;
use super::gossip_query::MAX_QUERY_ID;
use super::matching::OwnMatches;
use super::query::{DEFAULT_LIMIT, MAX_DATA_TYPE, MAX_SEARCH_BYTES};
use super::results::{error_frame, frame_cap, send_matches, SendError};
use super::routes::FindSearch;
use super::searcher;
use super::PROTOCOL_SEARCH;
use crate::contract::{ErrorCode, Refusal};
use crate::guard::{PeerBuckets, PeerPool};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, FrameError, SearchFrame};
use crate::p2p::{GossipMessage, GossipVerdict};
use crate::store::Relation;

/// Inbound search streams and gossip queries served at once.
pub(crate) const MAX_RESPONDERS: usize = 64;
/// Of [`MAX_RESPONDERS`], the most one peer (stream peer, or gossip relay) holds at once.
pub(crate) const RESPONDERS_PER_PEER: usize = 4;
/// Gossip queries per second of one searcher without a known peer record, and its burst.
pub(crate) const UNKNOWN_KEY_RATE: f64 = 1.0;
pub(crate) const UNKNOWN_KEY_BURST: f64 = 2.0;
/// Searchers without a known record whose buckets are remembered; beyond, refused.
pub(crate) const UNKNOWN_KEYS: usize = 1024;

/// What the responder helpers share.
pub(super) struct Responder {
    pub(super) shared: Arc<Shared>,
    /// Where answers to this node's `all` searches are routed.
    find: Recipient<FindSearch>,
    /// Responder helpers (streams and gossip queries), a bounded share per peer.
    pool: Arc<PeerPool>,
    /// Gossip queries of searchers without a known record: per searcher key...
    pub(super) unknown_keys: PeerBuckets<PeerId>,
    /// ... and all of them together.
    pub(super) unknown_all: PeerBuckets<()>,
}

impl Responder {
    pub(super) fn new(shared: Arc<Shared>, find: Recipient<FindSearch>) -> Responder {
        let rate = shared.env.tuning.search_unknown_queries_per_second;
        Responder {
            shared,
            find,
            pool: PeerPool::new(MAX_RESPONDERS, RESPONDERS_PER_PEER),
            unknown_keys: PeerBuckets::new(UNKNOWN_KEY_RATE, UNKNOWN_KEY_BURST, UNKNOWN_KEYS),
            unknown_all: PeerBuckets::new(rate, (2.0 * rate).max(1.0), 1),
        }
    }

    /// Accepts the search streams until shutdown, one helper task per stream within the pool.
    pub(super) fn spawn_streams(self: &Arc<Self>) {
        let me = self.clone();
        let Some(mut incoming) = me.shared.env.net.accept(PROTOCOL_SEARCH) else {
            tracing::error!(protocol = %PROTOCOL_SEARCH, "protocol already registered");
            return;
        };
        let mut shutdown = me.shared.env.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    _ = crate::shutdown::signalled(&mut shutdown) => None,
                };
                let Some((peer, stream)) = next else { break };
                // Taken at once: libp2p-stream drops streams we are slow to take.
                let permit = match me.pool.try_acquire(peer) {
                    Ok(permit) => permit,
                    Err(full) => {
                        me.shared.env.metrics.discovery.query_rejected("busy");
                        if let Some(count) = me.shared.throttle.hit(peer, "busy") {
                            tracing::warn!(%peer, code = "busy", count, cause = %full, "search stream dropped: no responder free for this peer");
                        }
                        continue;
                    }
                };
                let me = me.clone();
                tokio::spawn(async move {
                    me.serve_stream(peer, stream).await;
                    drop(permit);
                });
            }
        });
    }

    /// Handles the gossip queries until shutdown, one helper task per query within the pool
    /// (the relay's share).
    pub(super) fn spawn_gossip(self: &Arc<Self>, mut gossip: mpsc::Receiver<GossipMessage>) {
        let me = self.clone();
        let mut shutdown = me.shared.env.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = gossip.recv() => msg,
                    _ = crate::shutdown::signalled(&mut shutdown) => None,
                };
                let Some(msg) = msg else { break };
                let relay = msg.propagation_source;
                let Ok(permit) = me.pool.try_acquire(relay) else {
                    if let Some(count) = me.shared.throttle.hit(relay, "busy") {
                        tracing::warn!(peer = %relay, code = "busy", count, "gossip search query ignored: no responder free for this peer");
                    }
                    me.shared.env.metrics.discovery.query_rejected("busy");
                    me.shared
                        .env
                        .net
                        .report_gossip(msg.message_id, msg.propagation_source, GossipVerdict::Ignore)
                        .await;
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    me.on_gossip(msg).await;
                    drop(permit);
                });
            }
        });
    }

    /// Serves one inbound search stream: a query (answered on it) or the answer of a
    /// responder to one of this node's `all` searches.
    async fn serve_stream(&self, peer: PeerId, mut stream: Stream) {
        let t = self.shared.env.tuning.io_timeout;
        let max = self.shared.env.tuning.max_frame_bytes;
        let first = match tokio::time::timeout(t, wire::read_frame::<SearchFrame, _>(&mut stream, max)).await
        {
            Ok(Ok(Some(frame))) => frame,
            Ok(Err(FrameError::Unexpected { kind })) => {
                tracing::debug!(%peer, frame = kind, "unexpected first frame on a search stream");
                return;
            }
            other => {
                tracing::debug!(%peer, outcome = ?other.map(|r| r.map(|_| ())), "search stream without a first frame");
                return;
            }
        };
        match first {
            SearchFrame::SearchQuery {
                query_id,
                data_type,
                search,
                limit,
                max_frame_bytes,
            } => {
                let query = StreamQuery {
                    query_id,
                    data_type,
                    search,
                    limit,
                    max_frame_bytes,
                };
                self.answer_stream(peer, query, stream).await
            }
            answer => searcher::on_answer_stream(&self.shared, &self.find, peer, answer, stream).await,
        }
    }

    /// Answers a `search_query` on the stream it came on.
    async fn answer_stream(&self, peer: PeerId, q: StreamQuery, mut stream: Stream) {
        let t = self.shared.env.tuning.io_timeout;
        let max = self.shared.env.tuning.max_frame_bytes;
        if q.query_id.len() > MAX_QUERY_ID
            || q.search.len() > MAX_SEARCH_BYTES
            || q.data_type.len() > MAX_DATA_TYPE
        {
            let refusal = Refusal::new(ErrorCode::InvalidField, "query outside limits");
            let _ = tokio::time::timeout(t, wire::write_frame(&mut stream, &error_frame(&refusal))).await;
            return;
        }
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        let mut matches = self.matches(peer, &q.data_type, &q.search, limit).await;
        let cap = frame_cap(max, q.max_frame_bytes);
        let outcome = send_matches(&mut stream, &q.query_id, &q.data_type, None, &mut matches, cap, t).await;
        match &outcome {
            Err(SendError::Store(e)) => {
                let refusal = Refusal::new(ErrorCode::StoreUnavailable, e.clone());
                let _ = tokio::time::timeout(t, wire::write_frame(&mut stream, &error_frame(&refusal))).await;
            }
            _ => Metrics::add(&self.shared.env.metrics.discovery.queries_answered, 1),
        }
        let query_id = &q.query_id;
        match outcome {
            Ok((count, skipped)) => {
                tracing::debug!(%peer, query_id, data_type = q.data_type.as_str(), count, skipped, "search query answered")
            }
            Err(e) => tracing::info!(%peer, query_id, cause = %e, "search query not answered"),
        }
        let _ = tokio::time::timeout(t, stream.close()).await;
    }

    async fn is_partner(&self, peer: PeerId) -> bool {
        let env = &self.shared.env;
        if env.partners.contains(&peer) {
            return true;
        }
        matches!(
            env.store.peer(&peer.to_string()).await,
            Ok(Some(row)) if row.relation == Relation::Partner
        )
    }

    /// This node's own resources of `data_type` that `searcher` may see and that contain
    /// `search`, at most `limit`, read as they are consumed.
    pub(super) async fn matches(
        &self,
        searcher: PeerId,
        data_type: &str,
        search: &str,
        limit: u64,
    ) -> OwnMatches {
        let partner = self.is_partner(searcher).await;
        OwnMatches::new(
            self.shared.env.store.clone(),
            &self.shared.own_id,
            data_type,
            search,
            partner,
            limit,
        )
    }
}

/// A `search_query` frame received on a stream.
struct StreamQuery {
    query_id: String,
    data_type: String,
    search: String,
    limit: Option<u64>,
    max_frame_bytes: Option<u64>,
}
