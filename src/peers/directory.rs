//! Peer directory: this node's signed record in the DHT, the records of the peers it meets,
//! and where to reach a peer (`protocols/dht-peer-records.md`).
//!
//! - Publishing: the record is signed with the node's key and put under `/oc/peer/<id>` and
//!   `/oc/name/<name>`, then re-signed and put again every half TTL (sooner after a failed
//!   put, re-dialing the bootstrap nodes), so it never expires while the node runs.
//! - Meeting: every valid record put here by another node, or found by a lookup, updates
//!   that peer's row in the store (relation `known` unless it already was partner or
//!   blacklist). The network loop verified put records before handing them over; lookups
//!   are verified here. Invalid ones are counted (`oc_peer_records_rejected_total`).
//!   Rows of relation `known` are bounded (`--max-known-peers`): after a new peer is met,
//!   the least recently seen `known` rows beyond the bound are dropped
//!   ([`Store::trim_known_peers`]); partners and blacklisted peers never are.
//! - Finding: by id or by name, the store first (a stored record still valid), then the
//!   DHT.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, watch};

use super::partners::Partners;
use crate::backoff::Backoff;
use crate::config::Tuning;
use crate::contract::now_ms;
use crate::metrics::{Discovery, Metrics};
use crate::p2p::records::{self, PeerRecord, RecordError, Verified};
use crate::p2p::{self, NetError, RecordEvent};
use crate::store::{PeerRow, Relation, Store};

/// Queue of record events from the network loop (it drops events when full).
pub(crate) const RECORD_EVENTS: usize = 1024;
/// Wait before the first publish, so listen addresses and bootstrap dials are in place.
const FIRST_PUBLISH: Duration = Duration::from_millis(500);
/// Wait after a failed publish (no peer took the record), doubled up to half the TTL.
const PUBLISH_RETRY: Duration = Duration::from_secs(1);
/// Peers whose last written record is remembered (to write each record once); beyond, the
/// memory is cleared and records are written again once.
const WRITTEN_MEMORY: usize = 4096;

pub(crate) struct DirectoryEnv {
    /// The node's identity: signs its record.
    pub key: Keypair,
    pub name: String,
    pub ttl: Duration,
    /// DHT bootstrap nodes, dialed again whenever a publish finds nobody.
    pub bootstrap: Vec<Multiaddr>,
    /// Most rows of relation `known` kept in the peers table.
    pub max_known_peers: usize,
    pub net: p2p::Client,
    pub store: Arc<dyn Store>,
    pub partners: Arc<Partners>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
}

pub struct Directory {
    env: DirectoryEnv,
    own: PeerId,
    /// Version of the last record written to the store per peer: the same record arrives
    /// under both keys and from several nodes, and is written once; an older one is not
    /// written over a newer one. At most [`WRITTEN_MEMORY`] peers.
    written: Mutex<HashMap<PeerId, (u64, u64)>>,
}

impl Directory {
    pub(crate) fn new(env: DirectoryEnv) -> Arc<Self> {
        let own = env.key.public().to_peer_id();
        Arc::new(Directory {
            env,
            own,
            written: Mutex::new(HashMap::new()),
        })
    }

    fn counters(&self) -> &Discovery {
        &self.env.metrics.discovery
    }

    /// This node's record, signed now with its current listen addresses.
    ///
    /// # Errors
    /// The key cannot sign.
    pub(crate) fn own_record(&self) -> Result<PeerRecord, RecordError> {
        let addrs: Vec<Multiaddr> = self
            .env
            .net
            .state()
            .listen_addrs()
            .into_iter()
            .filter(is_dialable)
            .collect();
        let expires_at = now_ms() + self.env.ttl.as_millis() as u64;
        PeerRecord::sign(&self.env.key, &self.env.name, &addrs, expires_at)
    }

    /// Signs and puts this node's record under both keys.
    ///
    /// # Errors
    /// No peer took it under its id key (it stays in the local store), or the network
    /// loop has stopped.
    pub(crate) async fn publish(&self) -> Result<(), NetError> {
        let record = self.own_record().map_err(|e| NetError::Dht(e.to_string()))?;
        let value = record.encode();
        let expires = Some(Instant::now() + self.env.ttl);
        let t = self.env.tuning.io_timeout;
        let by_name = self
            .env
            .net
            .put_record(records::name_key(&self.env.name), value.clone(), expires, t);
        let by_id = self
            .env
            .net
            .put_record(records::peer_key(&self.own), value, expires, t);
        let (by_name, by_id) = futures::join!(by_name, by_id);
        if let Err(e) = &by_name {
            tracing::debug!(name = %self.env.name, cause = %e, "peer record not put under its name");
        }
        by_id?;
        Metrics::add(&self.counters().records_published, 1 + u64::from(by_name.is_ok()));
        tracing::debug!(expires_at = record.expires_at, "peer record published");
        Ok(())
    }

    /// Dials the bootstrap nodes, then publishes the record until shutdown and keeps the
    /// store's copies of the records other nodes put here.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut events: mpsc::Receiver<RecordEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.dial_bootstrap().await;
        let refresh = self.env.ttl / 2;
        let mut retry = Backoff::new(PUBLISH_RETRY.min(refresh), refresh);
        let next = tokio::time::sleep(FIRST_PUBLISH);
        tokio::pin!(next);
        loop {
            tokio::select! {
                _ = &mut next => {
                    let wait = match self.publish().await {
                        Ok(_) => {
                            retry.reset();
                            refresh
                        }
                        Err(e) => {
                            let wait = retry.next_delay();
                            tracing::info!(cause = %e, retry_in = ?wait, "peer record not published yet");
                            self.dial_bootstrap().await;
                            wait
                        }
                    };
                    next.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                event = events.recv() => match event {
                    Some(RecordEvent::Met(record)) => self.met(&record).await,
                    Some(RecordEvent::Rejected { reason, .. }) => {
                        self.counters().record_rejected("put", reason);
                    }
                    None => break,
                },
                _ = crate::shutdown::signalled(&mut shutdown) => break,
            }
        }
    }

    async fn dial_bootstrap(&self) {
        let partners = self
            .env
            .partners
            .peers()
            .into_iter()
            .filter_map(|p| self.env.partners.addr(&p));
        for addr in self.env.bootstrap.iter().cloned().chain(partners) {
            if let Err(e) = self.env.net.bootstrap(addr.clone()).await {
                tracing::warn!(%addr, cause = %e, "bootstrap node not added");
            }
        }
    }

    /// Keeps a valid record of another peer in the store.
    pub(crate) async fn met(&self, record: &PeerRecord) {
        let Ok(peer) = record.peer_id.parse::<PeerId>() else {
            return;
        };
        if peer == self.own {
            return;
        }
        {
            let Ok(mut written) = self.written.lock() else {
                return;
            };
            if written.get(&peer).is_some_and(|v| *v >= record.version()) {
                return;
            }
            if written.len() >= WRITTEN_MEMORY && !written.contains_key(&peer) {
                written.clear();
            }
            written.insert(peer, record.version());
        }
        Metrics::add(&self.counters().records_met, 1);
        let row = PeerRow {
            peer_id: record.peer_id.clone(),
            relation: Relation::Known,
            addrs: record.addrs.clone(),
            name: Some(record.name.clone()),
            record: Some(record.to_value()),
            updated_ms: now_ms(),
        };
        match self.env.store.meet_peer(row).await {
            Ok(relation) => {
                tracing::debug!(%peer, name = %record.name, ?relation, "peer met");
                match self.env.store.trim_known_peers(self.env.max_known_peers).await {
                    Ok(0) => {}
                    Ok(dropped) => {
                        Metrics::add(&self.counters().known_peers_dropped, dropped as u64);
                        tracing::debug!(
                            dropped,
                            max_known_peers = self.env.max_known_peers,
                            "least recently seen known peers dropped"
                        );
                    }
                    Err(e) => tracing::warn!(cause = %e, "known peers not trimmed"),
                }
            }
            Err(e) => {
                // Written again when the peer republishes.
                if let Ok(mut written) = self.written.lock() {
                    written.remove(&peer);
                }
                tracing::warn!(%peer, cause = %e, "peer met but not stored");
            }
        }
    }

    /// Every valid record the DHT holds under `key` (each one met).
    pub(crate) async fn lookup(&self, key: Vec<u8>, timeout: Duration) -> Vec<Verified> {
        let values = match self.env.net.get_record(key.clone(), timeout).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(key = %String::from_utf8_lossy(&key), cause = %e, "DHT lookup failed");
                return Vec::new();
            }
        };
        let now = now_ms();
        let mut found: Vec<Verified> = Vec::new();
        for value in values {
            match records::check(&key, &value, now) {
                Ok(v) => {
                    if !found.iter().any(|f| f.record == v.record) {
                        self.met(&v.record).await;
                        found.push(v);
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), reason = e.reason(), cause = %e, "peer record from the DHT ignored");
                    self.counters().record_rejected("get", e.reason());
                }
            }
        }
        // Newest first when a name has several, or a peer's record several versions.
        found.sort_by_key(|v| std::cmp::Reverse(v.record.expires_at));
        found
    }

    /// A stored record of `row` that is still valid.
    fn stored_record(&self, row: &PeerRow) -> Option<Verified> {
        let value = row.record.as_ref()?;
        match PeerRecord::from_value(value).and_then(|r| r.verify(now_ms())) {
            Ok(v) => Some(v),
            Err(RecordError::Expired { .. }) => None,
            Err(e) => {
                self.counters().record_rejected("store", e.reason());
                None
            }
        }
    }

    /// The current record of `peer`: its own when it is this node, the store's while
    /// valid, else the newest from the DHT.
    pub(crate) async fn record_of(&self, peer: PeerId, timeout: Duration) -> Option<Verified> {
        if peer == self.own {
            return self.own_record().ok().and_then(|r| r.verify(now_ms()).ok());
        }
        if let Ok(Some(row)) = self.env.store.peer(&peer.to_string()).await {
            if let Some(v) = self.stored_record(&row) {
                return Some(v);
            }
        }
        self.lookup(records::peer_key(&peer), timeout)
            .await
            .into_iter()
            .find(|v| v.peer == peer)
    }

    /// Records of the peers named `name`: the store's valid ones, else the DHT's.
    pub(crate) async fn find_by_name(&self, name: &str, timeout: Duration) -> Vec<PeerRecord> {
        let mut out = Vec::new();
        if name == self.env.name {
            out.extend(self.own_record().ok());
        }
        match self.env.store.peers().await {
            Ok(rows) => out.extend(
                rows.iter()
                    .filter(|r| r.name.as_deref() == Some(name) && r.relation != Relation::Blacklist)
                    .filter_map(|r| self.stored_record(r))
                    .map(|v| v.record),
            ),
            Err(e) => tracing::warn!(cause = %e, "store unreadable; searching the DHT only"),
        }
        if out.is_empty() {
            out.extend(
                self.lookup(records::name_key(name), timeout)
                    .await
                    .into_iter()
                    .map(|v| v.record),
            );
        }
        out
    }

    /// The record of `peer`, if it can be found.
    pub(crate) async fn find_by_id(&self, peer: PeerId, timeout: Duration) -> Vec<PeerRecord> {
        self.record_of(peer, timeout)
            .await
            .map(|v| v.record)
            .into_iter()
            .collect()
    }

    /// Known addresses of `peer` without asking the network: partner configuration, the
    /// store's row and its record (when still valid).
    pub(crate) async fn known_addresses(&self, peer: PeerId) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self.env.partners.addr(&peer).into_iter().collect();
        if let Ok(Some(row)) = self.env.store.peer(&peer.to_string()).await {
            addrs.extend(row.addrs.iter().filter_map(|a| a.parse().ok()));
            addrs.extend(self.stored_record(&row).into_iter().flat_map(|v| v.addrs));
        }
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(records::strip_peer_id(a)));
        addrs
    }

    /// Connects to `peer` unless connected: known addresses first, then the DHT's record.
    ///
    /// # Errors
    /// No address, or none answered within `timeout` each.
    pub(crate) async fn reach(&self, peer: PeerId, timeout: Duration) -> Result<(), String> {
        if self.env.net.state().is_connected(&peer) {
            return Ok(());
        }
        let mut last = "no known address".to_owned();
        for round in 0..2 {
            let addrs = if round == 0 {
                self.known_addresses(peer).await
            } else {
                self.resolve(peer, timeout).await
            };
            for addr in addrs {
                match self.env.net.dial(peer, addr, timeout).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
        }
        Err(last)
    }

    async fn resolve(&self, peer: PeerId, timeout: Duration) -> Vec<Multiaddr> {
        self.lookup(records::peer_key(&peer), timeout)
            .await
            .into_iter()
            .filter(|v| v.peer == peer)
            .flat_map(|v| v.addrs)
            .collect()
    }
}

/// Addresses worth putting in a record: not `0.0.0.0` / `::`.
fn is_dialable(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
