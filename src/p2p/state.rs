//! What the rest of the node sees of the network without asking the event loop: listening,
//! the listen addresses, the peers connected (and which side dialled), arrivals, the
//! reachability AutoNAT learnt, and the network's metrics `/metrics` reads.
//! The event loop writes it; everyone else reads it through [`super::Client::state`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

/// What the rest of the node can see of the network without asking the loop.
pub struct NetState {
    pub(super) listening: AtomicBool,
    pub(super) listen_addrs: Mutex<Vec<Multiaddr>>,
    pub(super) connected: Mutex<HashSet<PeerId>>,
    /// The open connections of each connected peer, oldest first, with whether this node
    /// dialled it (`/api/peers`: `dialed_by`).
    pub(super) connections: Mutex<HashMap<PeerId, Vec<(ConnectionId, bool)>>>,
    /// AutoNAT's verdict and the external addresses confirmed (`/api/node`).
    pub(super) reachability: Mutex<(super::relay::Reachability, Vec<Multiaddr>)>,
    /// Each peer we had no connection with as it gets its first.
    pub(super) arrivals: broadcast::Sender<PeerId>,
    /// What the DHT record store and the connection limits did (`/metrics`).
    pub stats: NetStats,
}

/// Counters of the network loop and libp2p's swarm metrics, in their own registry
/// (`/metrics` encodes it after the node's).
pub struct NetStats {
    /// Records in the DHT record store and their bytes.
    pub dht_records: Gauge,
    pub dht_bytes: Gauge,
    /// Records purged because they expired, evicted to make room (the record store's own
    /// running totals, stored as they are).
    pub dht_expired: Counter,
    pub dht_evicted: Counter,
    /// Connections refused by a limit, by limit (`per_peer`, `pending_incoming`, `total`).
    connections_refused: Family<LimitLabels, Counter>,
    /// Requests this node's relay refused, by request (`reservation`, `circuit`).
    relay_refused: Family<RelayLabels, Counter>,
    /// `libp2p-metrics`: swarm (connections, dials, listeners), identify, kad, ping, gossipsub.
    pub(super) libp2p: libp2p::metrics::Metrics,
    registry: Registry,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    request: &'static str,
}

impl Default for NetStats {
    fn default() -> Self {
        let mut registry = Registry::default();
        let (dht_records, dht_bytes) = (Gauge::default(), Gauge::default());
        let (dht_expired, dht_evicted) = (Counter::default(), Counter::default());
        let connections_refused = Family::default();
        let relay_refused = Family::default();
        let r = &mut registry;
        r.register(
            "oc_dht_records",
            "Records in the DHT record store",
            dht_records.clone(),
        );
        r.register(
            "oc_dht_record_bytes",
            "Bytes of the DHT record store",
            dht_bytes.clone(),
        );
        r.register(
            "oc_dht_records_expired",
            "DHT records purged once expired",
            dht_expired.clone(),
        );
        r.register(
            "oc_dht_records_evicted",
            "Valid DHT records evicted from a full store",
            dht_evicted.clone(),
        );
        r.register(
            "oc_connections_refused",
            "Inbound connections refused by a connection limit",
            connections_refused.clone(),
        );
        r.register(
            "oc_relay_refused",
            "Relay reservations and circuits this node's relay refused",
            relay_refused.clone(),
        );
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        NetStats {
            dht_records,
            dht_bytes,
            dht_expired,
            dht_evicted,
            connections_refused,
            relay_refused,
            libp2p,
            registry,
        }
    }
}

impl NetStats {
    pub(super) fn refused(&self, limit: &'static str) {
        self.connections_refused
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub(super) fn relay_refused(&self, request: &'static str) {
        self.relay_refused.get_or_create(&RelayLabels { request }).inc();
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Arrivals a slow listener may fall behind by before it is told it lagged.
const ARRIVALS_QUEUE: usize = 256;

impl Default for NetState {
    fn default() -> Self {
        NetState {
            listening: AtomicBool::new(false),
            listen_addrs: Mutex::default(),
            connected: Mutex::default(),
            connections: Mutex::default(),
            reachability: Mutex::default(),
            arrivals: broadcast::channel(ARRIVALS_QUEUE).0,
            stats: NetStats::default(),
        }
    }
}

impl NetState {
    /// Peers as they connect (a peer already connected is not announced again until it
    /// has been disconnected). A receiver that lagged gets `RecvError::Lagged`.
    pub(crate) fn arrivals(&self) -> broadcast::Receiver<PeerId> {
        self.arrivals.subscribe()
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    pub(crate) fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Which side opened the oldest open connection with `peer`: `us` or `them`; `None`
    /// when not connected.
    pub fn dialed_by(&self, peer: &PeerId) -> Option<&'static str> {
        let connections = self.connections.lock().ok()?;
        let (_, we_dialled) = connections.get(peer)?.first()?;
        Some(if *we_dialled { "us" } else { "them" })
    }

    /// AutoNAT's verdict and the external addresses confirmed so far.
    pub fn reachability(&self) -> (super::relay::Reachability, Vec<Multiaddr>) {
        self.reachability.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub(crate) fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.lock().map(|c| c.contains(peer)).unwrap_or(false)
    }
}
