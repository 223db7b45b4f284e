//! The network layer, one concern per file, as rust-libp2p's file-sharing example: one task
//! owns the `Swarm` ([`EventLoop`]), everything else holds the cloneable [`Client`] and sends
//! it commands with a `oneshot` for the answer; [`NetState`] is what can be read without
//! asking the loop.
//!
//! - `transport`: TCP and WebSocket (`/ws`, `/wss`) with DNS, the optional PSK private
//!   network on every transport, Noise, Yamux, timeouts, the relay client transport.
//! - [`tls`]: the certificates of `/wss`.
//! - `behaviour`: the `NetworkBehaviour` (gater, connection limits, streams, identify, ping,
//!   Kademlia, gossipsub, relay client and server, DCUtR, AutoNAT) and its configuration.
//! - [`relay`]: the relay server's limits and access, reachability.
//! - `client`: the [`Client`] handle and its commands.
//! - `event_loop`: the task owning the Swarm, the connection lifecycle.
//! - `kad`, `gossip`: the loop's handlers of the DHT and of the search topic.
//! - `state`: [`NetState`] and the counters of `/metrics`.
//! - [`wire`]: one typed frame enum per stream protocol over the shared framing; [`records`]: signed peer records; [`record_store`]: the
//!   bounded DHT record store.
//!
//! Streams are opened and accepted through `libp2p-stream`'s `Control`, which talks to the
//! behaviour through channels: no other component touches the Swarm.

// `NetError` names the peer (a `PeerId` is 80 bytes): large, but only on failure paths.
#![allow(clippy::result_large_err)]

mod behaviour;
mod client;
mod event_loop;
mod gossip;
mod kad;
pub mod record_store;
pub mod records;
pub mod relay;
mod state;
pub mod tls;
mod transport;
pub mod wire;

use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::mpsc;

pub use behaviour::{
    NetLimits, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_PEER, DEFAULT_MAX_PENDING_INCOMING,
    DHT_MAX_BYTES, DHT_MAX_RECORDS,
};
pub use client::{Client, Subscription};
pub use event_loop::EventLoop;
pub use gossip::{GossipMessage, GossipVerdict};
pub use kad::{RecordEvent, DHT_PURGE_EVERY};
pub use relay::Reachability;
pub use state::{NetState, NetStats};
pub use tls::{WssTlsError, WssTlsFiles};
pub use transport::read_psk;

pub(crate) const PROTOCOL_CREATE: StreamProtocol = StreamProtocol::new("/opencloud/resource/create/1.0");
pub(crate) const PROTOCOL_UPDATE: StreamProtocol = StreamProtocol::new("/opencloud/resource/update/1.0");
pub(crate) const PROTOCOL_DELETE: StreamProtocol = StreamProtocol::new("/opencloud/resource/delete/1.0");
/// Partner liveness: `ping` / `pong` frames (`protocols/heartbeat.md`).
pub const PROTOCOL_HEARTBEAT: StreamProtocol =
    StreamProtocol::new("/opencloud/resource/heartbeat/partner/1.0");
/// The three resource streams, in the index order used by [`StreamKind`].
pub(crate) const RESOURCE_PROTOCOLS: [StreamProtocol; 3] =
    [PROTOCOL_CREATE, PROTOCOL_UPDATE, PROTOCOL_DELETE];
/// Kademlia protocol of the OpenCloud DHT (peer records, `protocols/dht-peer-records.md`).
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/opencloud/kad/1.0.0");
/// gossipsub topic of `all` searches (`protocols/search.md`).
pub(crate) const SEARCH_TOPIC: &str = "/opencloud/search/1.0";
/// Commands queued between the clients and the event loop.
const COMMAND_QUEUE: usize = 64;

/// Which resource stream an event travels on: one per action, as oc-discovery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Create = 0,
    Update = 1,
    Delete = 2,
}

impl StreamKind {
    pub const ALL: [StreamKind; 3] = [StreamKind::Create, StreamKind::Update, StreamKind::Delete];

    pub(crate) fn for_action(action: crate::contract::Action) -> Self {
        match action {
            crate::contract::Action::Create => StreamKind::Create,
            crate::contract::Action::Update => StreamKind::Update,
            crate::contract::Action::Delete => StreamKind::Delete,
        }
    }

    pub fn protocol(self) -> StreamProtocol {
        RESOURCE_PROTOCOLS[self as usize].clone()
    }
}

/// Network errors name the peer (a `PeerId` is 80 bytes), which makes this type large;
/// it only travels on failure paths, where that size costs nothing measurable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("cannot build the transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot open {protocol} to {peer}: {reason}")]
    Open {
        peer: PeerId,
        protocol: StreamProtocol,
        reason: String,
    },
    #[error("cannot connect to {peer}: {reason}")]
    Dial { peer: PeerId, reason: String },
    #[error("the network loop has stopped")]
    Stopped,
    #[error("the network loop did not take or answer a command within {0:?}")]
    Stalled(std::time::Duration),
    #[error("DHT: {0}")]
    Dht(String),
    #[error("gossip: {0}")]
    Gossip(String),
    #[error(transparent)]
    Tls(#[from] WssTlsError),
}

/// How the node reaches and is reached beyond plain TCP: `/wss` certificates, the relay it
/// offers, the relays it listens on.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    /// `--tls-cert` / `--tls-key`: needed to listen on `/wss`.
    pub wss_tls: Option<WssTlsFiles>,
    /// `--tls-ca`: certificates trusted for `/wss` dials besides the web's roots.
    pub tls_ca: Option<std::path::PathBuf>,
    /// `--relay-server`: offer circuit relay v2 to partners and `relay_allow`.
    pub relay_server: bool,
    /// `--relay-allow`: peers besides partners allowed to reserve a slot on this relay.
    pub relay_allow: Vec<PeerId>,
    /// `--relay`: relays (ending in `/p2p/<relay id>`) this node reserves a slot on and
    /// listens through (`<relay>/p2p-circuit`).
    pub relays: Vec<Multiaddr>,
    /// `--autonat-private-ips`: AutoNAT probes and confirms private and loopback addresses
    /// too (sites that reach each other over a private network or a VPN).
    pub autonat_private_ips: bool,
}

/// Builds the swarm with the default [`NetLimits`] and starts listening; returns the client
/// and the loop to run.
///
/// # Errors
/// The transport cannot be built or a listen address is refused.
pub fn build(
    key: Keypair,
    psk: Option<PreSharedKey>,
    listen: &[Multiaddr],
) -> Result<(Client, EventLoop), NetError> {
    build_with(
        key,
        psk,
        listen,
        NetLimits::default(),
        &TransportOptions::default(),
    )
}

/// [`build`] with given connection limits.
///
/// # Errors
/// See [`build`].
pub(crate) fn build_with(
    key: Keypair,
    psk: Option<PreSharedKey>,
    listen: &[Multiaddr],
    limits: NetLimits,
    options: &TransportOptions,
) -> Result<(Client, EventLoop), NetError> {
    let tls = tls::config(options.wss_tls.as_ref(), options.tls_ca.as_deref())?;
    let access = options
        .relay_server
        .then(|| relay::RelayAccess::new(&options.relay_allow));
    let behaviour_key = key.clone();
    let relay_access = access.clone();
    let private_ips = options.autonat_private_ips;
    let mut swarm = transport::swarm(key, psk, tls, move |relay_client| {
        behaviour::Behaviour::new(&behaviour_key, limits, relay_client, relay_access, private_ips)
    })?;
    for addr in listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetError::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let state = Arc::new(NetState::default());
    let control = swarm.behaviour().stream.new_control();
    if listen.is_empty() && options.relays.is_empty() {
        // Dial-out only, by choice: there is nothing to wait for.
        state.listening.store(true, std::sync::atomic::Ordering::Release);
    }
    let client = Client::new(tx, control, state.clone());
    let mut event_loop = EventLoop::new(swarm, rx, state);
    event_loop.relay_access = access;
    for relay in &options.relays {
        event_loop.listen_via_relay(relay.clone());
    }
    Ok((client, event_loop))
}
