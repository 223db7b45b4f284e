//! The responder's checks of an `all` query from the gossip topic, and its answer. A query
//! is answered (and forwarded by gossipsub) only once its signature verifies against the
//! searcher's peer record; queries of searchers whose record this node does not hold are
//! rate-limited before the DHT is asked for it. Only responders with matches open the
//! search stream back to the searcher.

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::PeerId;

use super::gossip_query::{decode_gossip_query, GossipQuery};
use super::query::MAX_TIMEOUT;
use super::responder::Responder;
use super::results::{frame_cap, send_matches};
use super::PROTOCOL_SEARCH;
use crate::contract::now_ms;
use crate::metrics::Metrics;
use crate::p2p::{GossipMessage, GossipVerdict};
use crate::store::Relation;

impl Responder {
    /// Checks one gossip query, reports the verdict, and answers a valid one.
    pub(super) async fn on_gossip(&self, msg: GossipMessage) {
        let shared = &self.shared;
        let net = &shared.env.net;
        match self.check_gossip_query(&msg).await {
            Ok(q) => {
                net.report_gossip(msg.message_id, msg.propagation_source, GossipVerdict::Accept)
                    .await;
                let query_id = q.query_id.clone();
                let searcher = q.searcher.clone();
                match self.answer_gossip(q).await {
                    Ok(()) => tracing::debug!(query_id, searcher, "gossip search answered"),
                    Err(e) => tracing::info!(query_id, searcher, cause = %e, "gossip search not answered"),
                }
            }
            Err((verdict, reason)) => {
                if reason != "own" {
                    shared.env.metrics.discovery.query_rejected(reason);
                    let relay = msg.propagation_source;
                    if let Some(count) = shared.throttle.hit(relay, reason) {
                        tracing::warn!(peer = %relay, author = ?msg.author, code = reason, count, "gossip search query refused");
                    }
                }
                net.report_gossip(msg.message_id, msg.propagation_source, verdict)
                    .await;
            }
        }
    }

    /// An `all` query from the gossip topic, verified; else the verdict to report and why.
    async fn check_gossip_query(
        &self,
        msg: &GossipMessage,
    ) -> Result<GossipQuery, (GossipVerdict, &'static str)> {
        let env = &self.shared.env;
        let (q, searcher) =
            decode_gossip_query(&msg.data).map_err(|reason| (GossipVerdict::Reject, reason))?;
        if msg.author != Some(searcher) {
            return Err((GossipVerdict::Reject, "author_mismatch"));
        }
        if searcher == self.shared.own {
            return Err((GossipVerdict::Ignore, "own"));
        }
        if q.expires_at <= now_ms() {
            return Err((GossipVerdict::Ignore, "expired"));
        }
        if matches!(
            env.store.peer(&q.searcher).await,
            Ok(Some(row)) if row.relation == Relation::Blacklist
        ) {
            // Relayed by others: the gater keeps the peer itself away.
            return Err((GossipVerdict::Ignore, "blacklisted"));
        }
        // Anyone can make keys: a searcher whose record this node does not hold costs a
        // DHT lookup, so such queries are rate-limited, per key and all together.
        if !self.holds_record_of(searcher).await && !self.unknown_query_allowed(searcher) {
            return Err((GossipVerdict::Ignore, "rate_limited"));
        }
        let Some(record) = env.directory.record_of(searcher, env.tuning.io_timeout).await else {
            return Err((GossipVerdict::Ignore, "no_peer_record"));
        };
        if !q.verify(&record.public_key) {
            return Err((GossipVerdict::Reject, "bad_signature"));
        }
        Ok(q)
    }

    /// A token of the searcher's own bucket, then of the one all unknown searchers share
    /// (a key over its rate takes nothing from the others).
    fn unknown_query_allowed(&self, searcher: PeerId) -> bool {
        self.unknown_keys.try_take(&searcher) && self.unknown_all.try_take(&())
    }

    /// Whether `peer` is a partner or its row in the peers table holds a record (a peer
    /// met through the DHT or a search).
    async fn holds_record_of(&self, peer: PeerId) -> bool {
        let env = &self.shared.env;
        env.partners.contains(&peer)
            || matches!(env.store.peer(&peer.to_string()).await, Ok(Some(row)) if row.record.is_some())
    }

    async fn answer_gossip(&self, q: GossipQuery) -> Result<(), String> {
        let env = &self.shared.env;
        let searcher: PeerId = q.searcher.parse().map_err(|_| "bad searcher".to_owned())?;
        let t = env.tuning.io_timeout;
        // The searcher's deadline, never beyond the longest a search may last.
        let left = Duration::from_millis(q.expires_at.saturating_sub(now_ms())).min(MAX_TIMEOUT);
        let send = async {
            let mut matches = self.matches(searcher, &q.data_type, &q.search, q.limit).await;
            let first = matches.next().await.map_err(|e| format!("store: {e}"))?;
            Metrics::add(&env.metrics.discovery.queries_answered, 1);
            // Only responders with matches answer an `all` search.
            let Some(first) = first else { return Ok(()) };
            env.directory.reach(searcher, t).await?;
            let mut stream = env
                .net
                .open_stream(searcher, PROTOCOL_SEARCH, t)
                .await
                .map_err(|e| e.to_string())?;
            let cap = frame_cap(env.tuning.max_frame_bytes, Some(q.max_frame_bytes));
            let sent = send_matches(
                &mut stream,
                &q.query_id,
                &q.data_type,
                Some(first),
                &mut matches,
                cap,
                t,
            )
            .await;
            let _ = stream.close().await;
            sent.map(|_| ()).map_err(String::from)
        };
        tokio::time::timeout(left, send)
            .await
            .unwrap_or_else(|_| Err("the search's deadline passed".to_owned()))
    }
}
