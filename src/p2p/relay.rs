//! NAT traversal settings: the circuit relay v2 server this node offers with
//! `--relay-server` (its limits, and who may reserve a slot), the relays it reserves a slot
//! on with `--relay` (and re-reserves when a reservation is lost), AutoNAT's reachability as
//! `/api/node` shows it. The behaviours themselves are libp2p's (`relay`, `dcutr`,
//! `autonat`), held in [`super::behaviour::Behaviour`].

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use libp2p::{autonat, relay, Multiaddr, PeerId};

/// Reservations the relay holds at once, all peers together.
pub const RELAY_MAX_RESERVATIONS: usize = 128;
/// Reservations one peer may hold at once (a renewal counts until the old one expires).
pub const RELAY_MAX_RESERVATIONS_PER_PEER: usize = 4;
/// A reservation lasts this long; the client renews it before it expires.
pub const RELAY_RESERVATION_DURATION: Duration = Duration::from_secs(60 * 60);
/// Circuits relayed at once, all peers together.
pub const RELAY_MAX_CIRCUITS: usize = 64;
/// Circuits one peer may have relayed at once (as source or destination).
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;
/// A circuit is closed after this; the partner link redials through the relay (and
/// journal sync catches up), so nothing is lost, it is only re-established.
pub const RELAY_MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(60 * 60);
/// Bytes relayed in each direction of one circuit before it is closed (redialled as above).
pub const RELAY_MAX_CIRCUIT_BYTES: u64 = 256 * 1024 * 1024;
/// How often a lost reservation on a `--relay` is asked for again.
pub const RELAY_RELISTEN_EVERY: Duration = Duration::from_secs(5);

/// The peers allowed to reserve a slot on this node's relay: its partners (kept up to date
/// by the event loop) and the `--relay-allow` peers.
#[derive(Debug, Clone, Default)]
pub(crate) struct RelayAccess {
    partners: Arc<RwLock<HashSet<PeerId>>>,
    allowed: Arc<HashSet<PeerId>>,
}

impl RelayAccess {
    pub(crate) fn new(allowed: &[PeerId]) -> Self {
        RelayAccess {
            partners: Arc::default(),
            allowed: Arc::new(allowed.iter().copied().collect()),
        }
    }

    pub(crate) fn set_partner(&self, peer: PeerId, partner: bool) {
        if let Ok(mut p) = self.partners.write() {
            if partner {
                p.insert(peer);
            } else {
                p.remove(&peer);
            }
        }
    }

    pub(crate) fn may_reserve(&self, peer: &PeerId) -> bool {
        self.allowed.contains(peer) || self.partners.read().map(|p| p.contains(peer)).unwrap_or(false)
    }
}

/// The relay server's configuration: the limits above, and reservations only for the
/// peers of `access`.
pub(crate) fn server_config(access: RelayAccess) -> relay::Config {
    let mut config = relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        max_reservations_per_peer: RELAY_MAX_RESERVATIONS_PER_PEER,
        reservation_duration: RELAY_RESERVATION_DURATION,
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_MAX_CIRCUIT_DURATION,
        max_circuit_bytes: RELAY_MAX_CIRCUIT_BYTES,
        // libp2p's rate limits stay: per peer and per IP address, for reservations and
        // circuit sources alike.
        ..relay::Config::default()
    };
    config
        .reservation_rate_limiters
        .push(Box::new(move |peer: PeerId, _: &Multiaddr, _| {
            access.may_reserve(&peer)
        }));
    config
}

/// What AutoNAT learnt of this node's reachability (`/api/node`: `reachability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Peers dialled this node back on an address it announced.
    Public,
    /// Dial-backs failed: this node is behind NAT or a firewall.
    Private,
    /// Not probed yet (or no peer could probe it).
    #[default]
    Unknown,
}

impl Reachability {
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Public => "public",
            Reachability::Private => "private",
            Reachability::Unknown => "unknown",
        }
    }

    pub(crate) fn of(status: &autonat::NatStatus) -> Self {
        match status {
            autonat::NatStatus::Public(_) => Reachability::Public,
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        }
    }
}
