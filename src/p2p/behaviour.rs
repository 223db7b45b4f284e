//! The node's `NetworkBehaviour` and its configuration: the connection gater (blacklist),
//! the connection limits (partners exempt), `libp2p-stream` for the node's own protocols,
//! identify, ping, Kademlia with the bounded [`PeerRecordStore`], gossipsub for `all`
//! searches, and NAT traversal: the circuit relay v2 client, the relay server when offered
//! (`--relay-server`, [`super::relay`]), DCUtR hole punching and AutoNAT. Its events are
//! handled by the event loop ([`super::event_loop`], `kad`, `gossip`).

use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad, ping, relay, PeerId,
};
use std::time::Duration;

use super::record_store::{self, PeerRecordStore};
use super::relay::RelayAccess;
use super::{records, NetError, KAD_PROTOCOL, SEARCH_TOPIC};

/// identify's protocol version: peers of another network are easy to spot in logs.
const IDENTIFY_PROTOCOL: &str = "/opencloud/1.0";
/// A DHT query (get or put) not finished by then reports what it has.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Records this node holds for others (`record_store`); peer records are small (< 4 KiB).
pub const DHT_MAX_RECORDS: usize = 16_384;
/// Bytes of records (keys, values, bookkeeping) this node holds for others.
pub const DHT_MAX_BYTES: usize = 16 * 1024 * 1024;
const DHT_MAX_VALUE_BYTES: usize = records::MAX_RECORD_BYTES;
/// Largest gossip message (gossipsub's own default).
const GOSSIP_MAX_BYTES: usize = 64 * 1024;

/// Connection limits (libp2p `connection-limits`). Partners bypass them
/// ([`super::Client::set_partner`]): a flood of other peers never keeps a partner out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetLimits {
    /// Established connections with one peer (`--max-connections-per-peer`).
    pub max_connections_per_peer: u32,
    /// Inbound connections still in their handshake (`--max-pending-incoming`).
    pub max_pending_incoming: u32,
    /// Established connections in total, both directions (`--max-connections`).
    pub max_connections: u32,
}

pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 4;
pub const DEFAULT_MAX_PENDING_INCOMING: u32 = 64;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_pending_incoming: DEFAULT_MAX_PENDING_INCOMING,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Metric label of a connection refused by a limit, from libp2p's `Exceeded` text.
pub(super) fn limit_label(denied: &str) -> &'static str {
    if denied.contains("per peer") {
        "per_peer"
    } else if denied.contains("pending incoming") {
        "pending_incoming"
    } else {
        "total"
    }
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// The connection gater: blacklisted peers are refused and disconnected.
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Connection limits (per peer, pending inbound, total); partners bypass them.
    pub(super) limits: connection_limits::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<PeerRecordStore>,
    pub(super) gossip: gossipsub::Behaviour,
    /// Dials and listens through relays (`/p2p-circuit` addresses).
    pub(super) relay_client: relay::client::Behaviour,
    /// The relay offered to others, with `--relay-server` only.
    pub(super) relay: Toggle<relay::Behaviour>,
    /// Upgrades a relayed connection to a direct one when both sides can (hole punching).
    pub(super) dcutr: dcutr::Behaviour,
    /// Learns whether peers can dial this node back (reachability in `/api/node`).
    pub(super) autonat: autonat::Behaviour,
}

impl Behaviour {
    /// The behaviour of a node with identity `key`: a DHT server, subscribed to the search
    /// gossip topic.
    ///
    /// # Errors
    /// gossipsub refuses its configuration or the subscription.
    /// `relay_server` is the access list of the relay this node offers, if it offers one;
    /// `autonat_private_ips` lets AutoNAT probe and confirm addresses that are not global.
    pub(super) fn new(
        key: &Keypair,
        limits: NetLimits,
        relay_client: relay::client::Behaviour,
        relay_server: Option<RelayAccess>,
        autonat_private_ips: bool,
    ) -> Result<Behaviour, NetError> {
        let transport_err = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
        let local = key.public().to_peer_id();
        let mut behaviour = Behaviour {
            relay_client,
            relay: relay_server
                .map(|access| relay::Behaviour::new(local, super::relay::server_config(access)))
                .into(),
            dcutr: dcutr::Behaviour::new(local),
            autonat: autonat::Behaviour::new(
                local,
                autonat::Config {
                    only_global_ips: !autonat_private_ips,
                    ..autonat::Config::default()
                },
            ),
            stream: libp2p_stream::Behaviour::new(),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_owned(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            kad: build_kad(key.public().to_peer_id()),
            gossip: build_gossip(key).map_err(|e| transport_err(&e))?,
            blocked: Default::default(),
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established_per_peer(Some(limits.max_connections_per_peer))
                    .with_max_pending_incoming(Some(limits.max_pending_incoming))
                    .with_max_established(Some(limits.max_connections)),
            ),
        };
        // Server mode whatever our reachability looks like: every node serves the DHT.
        behaviour.kad.set_mode(Some(kad::Mode::Server));
        behaviour
            .gossip
            .subscribe(&gossipsub::IdentTopic::new(SEARCH_TOPIC))
            .map_err(|e| transport_err(&e))?;
        Ok(behaviour)
    }
}

fn build_kad(local: PeerId) -> kad::Behaviour<PeerRecordStore> {
    let mut config = kad::Config::new(KAD_PROTOCOL);
    config
        .set_query_timeout(KAD_QUERY_TIMEOUT)
        // Every inbound record is verified before it is stored (`kad::on_record_put`).
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        // Records carry their own expiry and their owners republish them; nobody else does.
        .set_replication_interval(None)
        .set_publication_interval(None)
        .set_caching(kad::Caching::Disabled);
    let store = PeerRecordStore::new(
        local,
        record_store::Limits {
            max_records: DHT_MAX_RECORDS,
            max_bytes: DHT_MAX_BYTES,
            max_value_bytes: DHT_MAX_VALUE_BYTES,
        },
    );
    kad::Behaviour::with_config(local, store, config)
}

fn build_gossip(key: &Keypair) -> Result<gossipsub::Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        // Messages are forwarded only once the application verified them.
        .validate_messages()
        .max_transmit_size(GOSSIP_MAX_BYTES)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        config,
    )?)
}
