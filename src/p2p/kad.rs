//! The event loop's side of the DHT: the commands of the [`super::Client`] (put, put to one
//! peer, get, bootstrap), Kademlia's events (query progress, records put here), the check of
//! every record a peer puts here before the bounded [`super::record_store`] takes it, the
//! periodic purge of expired records and the DHT gauges of `/metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::DialError;
use libp2p::{identify, kad, Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::event_loop::{EventLoop, GetReply};
use super::{record_store, records, NetError, KAD_PROTOCOL};

/// Period of the purge of expired DHT records.
pub const DHT_PURGE_EVERY: Duration = Duration::from_secs(30);

/// What the loop reports about peer records put into this node's share of the DHT. The
/// records were verified by the loop before it stored them (`records::check`).
#[derive(Debug, Clone)]
pub enum RecordEvent {
    /// A valid record its owner put here, newer than the one stored (relayed records are
    /// stored in the DHT but not reported).
    Met(records::PeerRecord),
    /// A record refused at put time: `reason` is [`records::RecordError::reason`] or
    /// [`record_store::Refusal::reason`].
    Rejected { from: PeerId, reason: &'static str },
}

impl EventLoop {
    pub(super) fn put_record(&mut self, record: kad::Record, reply: oneshot::Sender<Result<(), NetError>>) {
        match self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, kad::Quorum::One)
        {
            Ok(id) => {
                self.pending_put.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(NetError::Dht(format!("not stored locally: {e}"))));
            }
        }
    }

    pub(super) fn put_record_to(
        &mut self,
        record: kad::Record,
        peer: PeerId,
        reply: oneshot::Sender<Result<(), NetError>>,
    ) {
        let id =
            self.swarm
                .behaviour_mut()
                .kad
                .put_record_to(record, std::iter::once(peer), kad::Quorum::One);
        self.pending_put.insert(id, reply);
    }

    pub(super) fn get_record(&mut self, key: Vec<u8>, reply: GetReply) {
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_record(kad::RecordKey::new(&key));
        self.pending_get.insert(id, (Vec::new(), reply));
    }

    pub(super) fn add_bootstrap(&mut self, addr: Multiaddr) {
        let peer = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
            _ => None,
        };
        let opts = match peer {
            Some(peer) => {
                let bare = records::strip_peer_id(&addr);
                self.swarm.behaviour_mut().kad.add_address(&peer, bare);
                DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build()
            }
            // Without a peer id the routing table learns the peer from identify.
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        if let Err(e) = self.swarm.dial(opts) {
            if !matches!(e, DialError::DialPeerConditionFalse(_)) {
                tracing::warn!(%addr, cause = %e, "cannot dial bootstrap peer");
            }
        }
        if peer.is_some() {
            // Fails only with an empty routing table; automatic bootstrap covers that.
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    pub(super) fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => self.on_record_put(source, record),
            kad::Event::OutboundQueryProgressed { id, result, step, .. } => match result {
                kad::QueryResult::PutRecord(result) => {
                    if let Some(reply) = self.pending_put.remove(&id) {
                        let result = match result {
                            Ok(_) => Ok(()),
                            Err(kad::PutRecordError::QuorumFailed { success, .. })
                            | Err(kad::PutRecordError::Timeout { success, .. })
                                if !success.is_empty() =>
                            {
                                Ok(())
                            }
                            Err(e) => Err(NetError::Dht(e.to_string())),
                        };
                        let _ = reply.send(result);
                    }
                }
                kad::QueryResult::GetRecord(result) => {
                    if let (Ok(kad::GetRecordOk::FoundRecord(found)), Some((values, _))) =
                        (&result, self.pending_get.get_mut(&id))
                    {
                        if !values.contains(&found.record.value) {
                            values.push(found.record.value.clone());
                        }
                    }
                    if step.last {
                        if let Some((values, reply)) = self.pending_get.remove(&id) {
                            let _ = reply.send(Ok(values));
                        }
                    }
                }
                other => tracing::trace!(result = ?other, "DHT query progressed"),
            },
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } if is_new_peer => {
                tracing::debug!(%peer, "DHT routing table: peer added");
            }
            other => tracing::trace!(event = ?other, "DHT event"),
        }
    }

    /// Removes the expired DHT records (every [`DHT_PURGE_EVERY`]).
    pub(super) fn purge_records(&mut self) {
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let purged = store.purge_expired(std::time::Instant::now());
        if purged > 0 {
            tracing::debug!(purged, "expired DHT records purged");
        }
        self.update_dht_stats();
    }

    fn update_dht_stats(&mut self) {
        let counts = self.swarm.behaviour_mut().kad.store_mut().counts();
        let stats = &self.state.stats;
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        stats.dht_records.set(gauge(counts.records));
        stats.dht_bytes.set(gauge(counts.bytes));
        // The store keeps these totals itself: copied, not added.
        stats.dht_expired.inner().store(counts.expired, Ordering::Relaxed);
        stats.dht_evicted.inner().store(counts.evicted, Ordering::Relaxed);
    }

    /// A peer put a record here: stored only if it verifies (signature, identity, expiry,
    /// and the key names it), with its own expiry as the store's, and only if it is newer
    /// than the record stored under its key (`record_store`). Records that change nothing
    /// (the same record again) are not reported.
    fn on_record_put(&mut self, source: PeerId, mut record: kad::Record) {
        let now = crate::contract::now_ms();
        let verified = match records::check(record.key.as_ref(), &record.value, now) {
            Ok(verified) => verified,
            Err(e) => return self.refuse_record(source, e.reason(), &e),
        };
        let left = Duration::from_millis(verified.record.expires_at.saturating_sub(now));
        let instant = std::time::Instant::now();
        let expires = instant.checked_add(left).unwrap_or(instant);
        let expires = record.expires.map_or(expires, |e| e.min(expires));
        record.expires = Some(expires);
        record.publisher = Some(source);
        // The owners of this network put their own records; anything else was relayed.
        let usefulness = if source == verified.peer {
            record_store::Usefulness::Direct
        } else {
            record_store::Usefulness::Relayed
        };
        let offer = record_store::Offer {
            record,
            version: verified.record.version(),
            expires,
            usefulness,
        };
        let outcome = self.swarm.behaviour_mut().kad.store_mut().offer(offer, instant);
        self.update_dht_stats();
        match outcome {
            Ok(done) => {
                if done.evicted > 0 || done.expired > 0 {
                    tracing::debug!(%source, evicted = done.evicted, expired = done.expired, "DHT store full: records dropped to make room");
                }
                // Only a record its owner put here is "met" (written to the peers table):
                // relayed records stay in the DHT store, so a flood of records from fresh
                // keys through one peer costs no disk.
                if usefulness == record_store::Usefulness::Direct {
                    self.report_record(RecordEvent::Met(verified.record));
                }
            }
            Err(record_store::Refusal::Unchanged) => {}
            Err(e) => self.refuse_record(source, e.reason(), &e),
        }
    }

    fn refuse_record(&mut self, source: PeerId, reason: &'static str, cause: &dyn std::fmt::Display) {
        if let Some(count) = self.refusals.hit(source, reason) {
            tracing::warn!(%source, code = reason, count, cause = %cause, "peer record refused");
        }
        self.report_record(RecordEvent::Rejected { from: source, reason });
    }

    fn report_record(&mut self, event: RecordEvent) {
        if let Some(tx) = &self.record_events {
            // Best effort: the record stays in the DHT; a full queue only delays the
            // store's copy until the peer republishes.
            if tx.try_send(event).is_err() {
                tracing::debug!("record events queue full; event dropped");
            }
        }
    }

    /// What identify tells of a peer that speaks the DHT: its listen addresses.
    pub(super) fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        // The DHT needs dialable addresses; identify is where a listener learns them.
        if info.protocols.contains(&KAD_PROTOCOL) {
            for addr in info.listen_addrs {
                if !addr.is_empty() {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
        }
    }
}
