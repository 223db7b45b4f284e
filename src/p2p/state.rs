//! What the rest of the node sees of the network without asking the event loop: listening,
//! the listen addresses, the peers connected, arrivals, and the counters `/metrics` reads.
//! The event loop writes it; everyone else reads it through [`super::Client::state`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::broadcast;

/// What the rest of the node can see of the network without asking the loop.
pub struct NetState {
    pub(super) listening: AtomicBool,
    pub(super) listen_addrs: Mutex<Vec<Multiaddr>>,
    pub(super) connected: Mutex<HashSet<PeerId>>,
    /// Each peer we had no connection with as it gets its first.
    pub(super) arrivals: broadcast::Sender<PeerId>,
    /// What the DHT record store and the connection limits did (`/metrics`).
    pub stats: NetStats,
}

/// Counters of the network loop, read by `/metrics`.
#[derive(Default)]
pub struct NetStats {
    /// Records in the DHT record store and their bytes (gauges).
    pub dht_records: AtomicU64,
    pub dht_bytes: AtomicU64,
    /// Records purged because they expired, evicted to make room (counters).
    pub dht_expired: AtomicU64,
    pub dht_evicted: AtomicU64,
    /// Connections refused by a limit, by limit (`per_peer`, `pending_incoming`, `total`).
    connections_refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl NetStats {
    pub(super) fn refused(&self, limit: &'static str) {
        if let Ok(mut m) = self.connections_refused.lock() {
            let n = m.entry(limit).or_default();
            *n = n.saturating_add(1);
        }
    }

    /// Connections refused per limit.
    pub(crate) fn connections_refused(&self) -> Vec<(&'static str, u64)> {
        self.connections_refused
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// Appends the Prometheus text of these counters.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, kind, help, v) in [
            (
                "oc_dht_records",
                "gauge",
                "Records in the DHT record store",
                get(&self.dht_records),
            ),
            (
                "oc_dht_record_bytes",
                "gauge",
                "Bytes of the DHT record store",
                get(&self.dht_bytes),
            ),
            (
                "oc_dht_records_expired_total",
                "counter",
                "DHT records purged once expired",
                get(&self.dht_expired),
            ),
            (
                "oc_dht_records_evicted_total",
                "counter",
                "Valid DHT records evicted from a full store",
                get(&self.dht_evicted),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        let _ = writeln!(out, "# HELP oc_connections_refused_total Inbound connections refused by a connection limit\n# TYPE oc_connections_refused_total counter");
        for (limit, n) in self.connections_refused() {
            let _ = writeln!(out, "oc_connections_refused_total{{limit=\"{limit}\"}} {n}");
        }
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

    pub(crate) fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.lock().map(|c| c.contains(peer)).unwrap_or(false)
    }
}
