//! libp2p side: the transport (TCP, optional PSK private network, Noise, Yamux), the
//! behaviour, the event loop that alone owns the `Swarm`, and the cloneable [`Client`]
//! everything else uses.
//!
//! Streams are opened and accepted through `libp2p-stream`'s `Control`, which talks to the
//! behaviour through channels: no other component touches the Swarm.

// `NetError` names the peer (a `PeerId` is 80 bytes): large, but only on failure paths.
#![allow(clippy::result_large_err)]

pub mod record_store;
pub mod records;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::Either;
use futures::StreamExt;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::Transport;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PnetError, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identify, noise, ping, tcp, yamux, Multiaddr, PeerId, Stream,
    StreamProtocol, Swarm,
};
use libp2p::{gossipsub, kad};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub const PROTOCOL_CREATE: StreamProtocol = StreamProtocol::new("/opencloud/resource/create/1.0");
pub const PROTOCOL_UPDATE: StreamProtocol = StreamProtocol::new("/opencloud/resource/update/1.0");
pub const PROTOCOL_DELETE: StreamProtocol = StreamProtocol::new("/opencloud/resource/delete/1.0");
/// Partner liveness: `ping` / `pong` frames (`protocols/heartbeat.md`).
pub const PROTOCOL_HEARTBEAT: StreamProtocol =
    StreamProtocol::new("/opencloud/resource/heartbeat/partner/1.0");
/// The three resource streams, in the index order used by [`StreamKind`].
pub const RESOURCE_PROTOCOLS: [StreamProtocol; 3] = [PROTOCOL_CREATE, PROTOCOL_UPDATE, PROTOCOL_DELETE];

/// identify's protocol version: peers of another network are easy to spot in logs.
const IDENTIFY_PROTOCOL: &str = "/opencloud/1.0";
/// A handshake that has not finished by then is abandoned (a PSK mismatch hangs, it does
/// not fail, so this is what refuses a peer without the key).
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections without open streams are closed after this.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
const COMMAND_QUEUE: usize = 64;

/// Kademlia protocol of the OpenCloud DHT (peer records, `protocols/dht-peer-records.md`).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/opencloud/kad/1.0.0");
/// gossipsub topic of `all` searches (`protocols/search.md`).
pub const SEARCH_TOPIC: &str = "/opencloud/search/1.0";
/// A DHT query (get or put) not finished by then reports what it has.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Records this node holds for others (`record_store`); peer records are small (< 4 KiB).
pub const DHT_MAX_RECORDS: usize = 16_384;
/// Bytes of records (keys, values, bookkeeping) this node holds for others.
pub const DHT_MAX_BYTES: usize = 16 * 1024 * 1024;
const DHT_MAX_VALUE_BYTES: usize = records::MAX_RECORD_BYTES;
/// Period of the purge of expired DHT records.
pub const DHT_PURGE_EVERY: Duration = Duration::from_secs(30);
/// A repeated refusal (record, connection) is logged once per this per peer, with its count.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connection limits (libp2p `connection-limits`). Partners bypass them
/// ([`Client::set_partner`]): a flood of other peers never keeps a partner out.
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
fn limit_label(denied: &str) -> &'static str {
    if denied.contains("per peer") {
        "per_peer"
    } else if denied.contains("pending incoming") {
        "pending_incoming"
    } else {
        "total"
    }
}
/// Largest gossip message (gossipsub's own default).
const GOSSIP_MAX_BYTES: usize = 64 * 1024;

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

/// A search query received on the gossip topic, waiting for validation
/// ([`Client::report_gossip`]) before gossipsub forwards it further.
#[derive(Debug, Clone)]
pub struct GossipMessage {
    pub message_id: gossipsub::MessageId,
    /// The neighbour that handed it over (not necessarily the author).
    pub propagation_source: PeerId,
    /// The author, from gossipsub's own signature.
    pub author: Option<PeerId>,
    pub data: Vec<u8>,
}

/// Verdict on a gossip message: accepted messages are forwarded, rejected ones count
/// against the neighbour, ignored ones are dropped quietly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipVerdict {
    Accept,
    Reject,
    Ignore,
}

/// Where the loop hands discovery events; without a subscriber they are dropped (gossip
/// messages are then ignored).
pub enum Subscription {
    Records(mpsc::Sender<RecordEvent>),
    Gossip(mpsc::Sender<GossipMessage>),
}

/// Which resource stream an event travels on: one per action, as oc-discovery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Create = 0,
    Update = 1,
    Delete = 2,
}

impl StreamKind {
    pub const ALL: [StreamKind; 3] = [StreamKind::Create, StreamKind::Update, StreamKind::Delete];

    pub fn for_action(action: crate::contract::Action) -> Self {
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

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// The connection gater: blacklisted peers are refused and disconnected.
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Connection limits (per peer, pending inbound, total); partners bypass them.
    limits: connection_limits::Behaviour,
    stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<record_store::PeerRecordStore>,
    gossip: gossipsub::Behaviour,
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
    #[error("DHT: {0}")]
    Dht(String),
    #[error("gossip: {0}")]
    Gossip(String),
}

/// What the rest of the node can see of the network without asking the loop.
pub struct NetState {
    listening: AtomicBool,
    listen_addrs: Mutex<Vec<Multiaddr>>,
    connected: Mutex<HashSet<PeerId>>,
    /// Each peer we had no connection with as it gets its first.
    arrivals: broadcast::Sender<PeerId>,
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
    fn refused(&self, limit: &'static str) {
        if let Ok(mut m) = self.connections_refused.lock() {
            let n = m.entry(limit).or_default();
            *n = n.saturating_add(1);
        }
    }

    /// Connections refused per limit.
    pub fn connections_refused(&self) -> Vec<(&'static str, u64)> {
        self.connections_refused
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// Appends the Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
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
    pub fn arrivals(&self) -> broadcast::Receiver<PeerId> {
        self.arrivals.subscribe()
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.lock().map(|c| c.contains(peer)).unwrap_or(false)
    }
}

enum Command {
    /// Connect to a peer at an address unless already connected.
    Dial {
        peer: PeerId,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// Refuse a peer (blacklist) or accept it again.
    Block {
        peer: PeerId,
        blocked: bool,
    },
    /// Exempt a partner from the connection limits, or end the exemption.
    Partner {
        peer: PeerId,
        partner: bool,
    },
    /// Add a DHT bootstrap peer (dialed; with `/p2p/<id>` also put in the routing table).
    Bootstrap {
        addr: Multiaddr,
    },
    /// Store a record locally and at the peers closest to its key.
    PutRecord {
        record: kad::Record,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Store a record at one peer only, not locally (Kademlia's `put_record_to`).
    PutRecordTo {
        record: kad::Record,
        peer: PeerId,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Look a key up in the DHT; answers every distinct value found (unverified).
    GetRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<Vec<u8>>, NetError>>,
    },
    PublishGossip {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    ReportGossip {
        message_id: gossipsub::MessageId,
        source: PeerId,
        verdict: GossipVerdict,
    },
    Subscribe(Subscription),
}

/// Cloneable handle on the network.
#[derive(Clone)]
pub struct Client {
    local: PeerId,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    state: Arc<NetState>,
}

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    pub fn state(&self) -> &NetState {
        &self.state
    }

    /// Connects to `peer` at `addr` (returns at once when already connected).
    ///
    /// # Errors
    /// [`NetError::Dial`] when the dial fails or does not finish within `timeout`.
    pub async fn dial(&self, peer: PeerId, addr: Multiaddr, timeout: Duration) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial { peer, addr, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NetError::Stopped),
            Err(_) => Err(NetError::Dial {
                peer,
                reason: format!("not connected within {timeout:?}"),
            }),
        }
    }

    /// The addresses the swarm listens on (ports resolved).
    ///
    /// # Errors
    /// The network loop has stopped.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::ListenAddrs { reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Opens a stream, dialing the peer if needed, within `timeout`.
    ///
    /// # Errors
    /// [`NetError::Open`] when the peer is unreachable, refuses, or does not answer in time.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        timeout: Duration,
    ) -> Result<Stream, NetError> {
        let mut control = self.control.clone();
        let open = control.open_stream(peer, protocol.clone());
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(NetError::Open {
                peer,
                protocol,
                reason: e.to_string(),
            }),
            Err(_) => Err(NetError::Open {
                peer,
                protocol,
                reason: format!("no answer within {timeout:?}"),
            }),
        }
    }

    /// Blacklists a peer (refused, disconnected) or lifts it.
    ///
    /// # Errors
    /// The network loop has stopped.
    pub async fn set_blocked(&self, peer: PeerId, blocked: bool) -> Result<(), NetError> {
        self.commands
            .send(Command::Block { peer, blocked })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Exempts a partner from the connection limits (`partner`), or ends the exemption.
    ///
    /// # Errors
    /// The network loop has stopped.
    pub async fn set_partner(&self, peer: PeerId, partner: bool) -> Result<(), NetError> {
        self.commands
            .send(Command::Partner { peer, partner })
            .await
            .map_err(|_| NetError::Stopped)
    }

    async fn ask<T>(
        &self,
        command: Command,
        rx: oneshot::Receiver<T>,
        timeout: Duration,
    ) -> Result<T, NetError> {
        self.commands.send(command).await.map_err(|_| NetError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(NetError::Stopped),
            Err(_) => Err(NetError::Dht(format!("no answer within {timeout:?}"))),
        }
    }

    /// Adds a DHT bootstrap peer and dials it (returns once the loop took it).
    ///
    /// # Errors
    /// The network loop has stopped.
    pub async fn bootstrap(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.commands
            .send(Command::Bootstrap { addr })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Puts a record in the DHT: stored locally, then at the peers closest to `key`; done
    /// once at least one peer took it. `expires` bounds its life in every store.
    ///
    /// # Errors
    /// [`NetError::Dht`] when no peer took it (it stays in the local store) or the put did
    /// not finish within `timeout`.
    pub async fn put_record(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        expires: Option<std::time::Instant>,
        timeout: Duration,
    ) -> Result<(), NetError> {
        let mut record = kad::Record::new(key, value);
        record.expires = expires;
        let (reply, rx) = oneshot::channel();
        self.ask(Command::PutRecord { record, reply }, rx, timeout)
            .await?
    }

    /// Puts a record at `peer` only, without storing it locally or looking up the peers
    /// closest to `key` (what a peer relaying records does; the tests' hostile peers too).
    ///
    /// # Errors
    /// [`NetError::Dht`] when `peer` did not take it within `timeout`.
    pub async fn put_record_to(
        &self,
        peer: PeerId,
        key: Vec<u8>,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), NetError> {
        let record = kad::Record::new(key, value);
        let (reply, rx) = oneshot::channel();
        self.ask(Command::PutRecordTo { record, peer, reply }, rx, timeout)
            .await?
    }

    /// Every value stored under `key` that the DHT returns within `timeout` (the local
    /// store included). Values are not verified: callers check them.
    ///
    /// # Errors
    /// The network loop has stopped or did not answer in time.
    pub async fn get_record(&self, key: Vec<u8>, timeout: Duration) -> Result<Vec<Vec<u8>>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Command::GetRecord { key, reply }, rx, timeout).await?
    }

    /// Publishes on the search gossip topic.
    ///
    /// # Errors
    /// [`NetError::Gossip`]: no peer subscribed, message too large.
    pub async fn publish_gossip(&self, data: Vec<u8>, timeout: Duration) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Command::PublishGossip { data, reply }, rx, timeout)
            .await?
    }

    /// Reports the verdict on a received gossip message (see [`GossipVerdict`]).
    pub async fn report_gossip(
        &self,
        message_id: gossipsub::MessageId,
        source: PeerId,
        verdict: GossipVerdict,
    ) {
        // A stopped loop has no message to report on.
        let _ = self
            .commands
            .send(Command::ReportGossip {
                message_id,
                source,
                verdict,
            })
            .await;
    }

    /// Hands discovery events of one kind to `sub` from now on.
    ///
    /// # Errors
    /// The network loop has stopped.
    pub async fn subscribe(&self, sub: Subscription) -> Result<(), NetError> {
        self.commands
            .send(Command::Subscribe(sub))
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Starts accepting inbound streams of a protocol.
    pub fn accept(&self, protocol: StreamProtocol) -> Option<libp2p_stream::IncomingStreams> {
        self.control.clone().accept(protocol).ok()
    }
}

/// Reads a `swarm.key` file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
///
/// # Errors
/// The file is unreadable or not in that format.
pub fn read_psk(path: &std::path::Path) -> Result<PreSharedKey, NetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError::Transport(format!("cannot read PSK file {}: {e}", path.display())))?;
    text.trim()
        .parse::<PreSharedKey>()
        .map_err(|e| NetError::Transport(format!("PSK file {} is not a swarm.key: {e}", path.display())))
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
    build_with(key, psk, listen, NetLimits::default())
}

/// [`build`] with given connection limits.
///
/// # Errors
/// See [`build`].
pub fn build_with(
    key: Keypair,
    psk: Option<PreSharedKey>,
    listen: &[Multiaddr],
    limits: NetLimits,
) -> Result<(Client, EventLoop), NetError> {
    let local = key.public().to_peer_id();
    let transport_err = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            // With a PSK, the pnet handshake wraps the socket before anything else.
            let maybe_private = tcp.and_then(move |socket, _| async move {
                match psk {
                    Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(Either::Left),
                    None => Ok::<_, PnetError>(Either::Right(socket)),
                }
            });
            Ok(maybe_private
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .timeout(TRANSPORT_TIMEOUT))
        })
        .map_err(|e| transport_err(&e))?
        // Partner addresses may name hosts (/dns4/site-b.example/tcp/4001/p2p/...): resolved
        // at each dial with the system's resolver configuration.
        .with_dns()
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(Behaviour {
                stream: libp2p_stream::Behaviour::new(),
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.to_owned(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad: build_kad(key.public().to_peer_id()),
                gossip: build_gossip(key)?,
                blocked: Default::default(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(limits.max_connections_per_peer))
                        .with_max_pending_incoming(Some(limits.max_pending_incoming))
                        .with_max_established(Some(limits.max_connections)),
                ),
            })
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    // Server mode whatever our reachability looks like: every node serves the DHT.
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
    swarm
        .behaviour_mut()
        .gossip
        .subscribe(&gossipsub::IdentTopic::new(SEARCH_TOPIC))
        .map_err(|e| transport_err(&e))?;
    for addr in listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetError::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let state = Arc::new(NetState::default());
    let control = swarm.behaviour().stream.new_control();
    let client = Client {
        local,
        commands: tx,
        control,
        state: state.clone(),
    };
    Ok((
        client,
        EventLoop {
            swarm,
            commands: rx,
            state,
            pending_dial: HashMap::new(),
            pending_put: HashMap::new(),
            pending_get: HashMap::new(),
            record_events: None,
            gossip_events: None,
            refusals: crate::guard::LogThrottle::new(REFUSAL_LOG_EVERY),
        },
    ))
}

fn build_kad(local: PeerId) -> kad::Behaviour<record_store::PeerRecordStore> {
    let mut config = kad::Config::new(KAD_PROTOCOL);
    config
        .set_query_timeout(KAD_QUERY_TIMEOUT)
        // Every inbound record is verified before it is stored (`on_kad_event`).
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        // Records carry their own expiry and their owners republish them; nobody else does.
        .set_replication_interval(None)
        .set_publication_interval(None)
        .set_caching(kad::Caching::Disabled);
    let store = record_store::PeerRecordStore::new(
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

type GetReply = oneshot::Sender<Result<Vec<Vec<u8>>, NetError>>;

/// The one owner of the `Swarm`.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    state: Arc<NetState>,
    /// Callers waiting for a connection to a peer.
    pending_dial: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetError>>>>,
    /// Callers waiting for a DHT put to finish.
    pending_put: HashMap<kad::QueryId, oneshot::Sender<Result<(), NetError>>>,
    /// Callers waiting for a DHT lookup to finish, with the values found so far.
    pending_get: HashMap<kad::QueryId, (Vec<Vec<u8>>, GetReply)>,
    record_events: Option<mpsc::Sender<RecordEvent>>,
    gossip_events: Option<mpsc::Sender<GossipMessage>>,
    /// Repeated refusals of one peer's records or connections, logged once per interval.
    refusals: crate::guard::LogThrottle,
}

impl EventLoop {
    /// Runs until `shutdown` turns true or every client is dropped.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut purge = tokio::time::interval(DHT_PURGE_EVERY);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = purge.tick() => self.purge_records(),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = crate::shutdown::signalled(&mut shutdown) => break,
            }
        }
        tracing::debug!("network loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Dial { peer, addr, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                match self.swarm.dial(opts) {
                    // Already dialing: this caller waits for the dial in flight.
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                        self.pending_dial.entry(peer).or_default().push(reply)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            peer,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::ListenAddrs { reply } => {
                // The asker may have given up; nothing to do then.
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Block { peer, blocked } => {
                let gater = &mut self.swarm.behaviour_mut().blocked;
                if blocked {
                    // Also closes the connections already open.
                    gater.block_peer(peer);
                    tracing::info!(%peer, "peer blacklisted");
                } else {
                    gater.unblock_peer(peer);
                }
            }
            Command::Partner { peer, partner } => {
                let limits = &mut self.swarm.behaviour_mut().limits;
                if partner {
                    limits.bypass_peer_id(&peer);
                } else {
                    limits.remove_peer_id(&peer);
                }
            }
            Command::Bootstrap { addr } => self.add_bootstrap(addr),
            Command::PutRecord { record, reply } => {
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
            Command::PutRecordTo { record, peer, reply } => {
                let id = self.swarm.behaviour_mut().kad.put_record_to(
                    record,
                    std::iter::once(peer),
                    kad::Quorum::One,
                );
                self.pending_put.insert(id, reply);
            }
            Command::GetRecord { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(kad::RecordKey::new(&key));
                self.pending_get.insert(id, (Vec::new(), reply));
            }
            Command::PublishGossip { data, reply } => {
                let topic = gossipsub::IdentTopic::new(SEARCH_TOPIC);
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .publish(topic, data)
                    .map(|_| ())
                    .map_err(|e| NetError::Gossip(e.to_string()));
                let _ = reply.send(result);
            }
            Command::ReportGossip {
                message_id,
                source,
                verdict,
            } => {
                let acceptance = match verdict {
                    GossipVerdict::Accept => gossipsub::MessageAcceptance::Accept,
                    GossipVerdict::Reject => gossipsub::MessageAcceptance::Reject,
                    GossipVerdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                };
                // False when the message left the cache meanwhile: nothing to forward then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .report_message_validation_result(&message_id, &source, acceptance);
            }
            Command::Subscribe(Subscription::Records(tx)) => self.record_events = Some(tx),
            Command::Subscribe(Subscription::Gossip(tx)) => self.gossip_events = Some(tx),
        }
    }

    fn add_bootstrap(&mut self, addr: Multiaddr) {
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

    fn on_kad_event(&mut self, event: kad::Event) {
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
    fn purge_records(&mut self) {
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
        stats.dht_records.store(counts.records as u64, Ordering::Relaxed);
        stats.dht_bytes.store(counts.bytes as u64, Ordering::Relaxed);
        stats.dht_expired.store(counts.expired, Ordering::Relaxed);
        stats.dht_evicted.store(counts.evicted, Ordering::Relaxed);
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

    fn on_gossip_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let msg = GossipMessage {
                    message_id: message_id.clone(),
                    propagation_source,
                    author: message.source,
                    data: message.data,
                };
                let handed = self
                    .gossip_events
                    .as_ref()
                    .is_some_and(|tx| tx.try_send(msg).is_ok());
                if !handed {
                    tracing::debug!(peer = %propagation_source, "gossip message ignored: no room to handle it");
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .gossip
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Ignore,
                        );
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed to gossip topic");
            }
            other => tracing::trace!(event = ?other, "gossip event"),
        }
    }

    fn local_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        // The DHT needs dialable addresses; identify is where a listener learns them.
        if info.protocols.contains(&KAD_PROTOCOL) {
            for addr in info.listen_addrs {
                if !addr.is_empty() {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if let Ok(mut addrs) = self.state.listen_addrs.lock() {
                    addrs.push(address);
                }
                self.state.listening.store(true, Ordering::Release);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Ok(mut addrs) = self.state.listen_addrs.lock() {
                    addrs.retain(|a| a != &address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), num_established, "connected");
                if let Ok(mut c) = self.state.connected.lock() {
                    c.insert(peer_id);
                }
                if num_established.get() == 1 {
                    // No listener is an answer too: nobody waits for this peer.
                    let _ = self.state.arrivals.send(peer_id);
                }
                for reply in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                    // The caller may have timed out already.
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, num_established, cause = ?cause, "connection closed");
                if num_established == 0 {
                    if let Ok(mut c) = self.state.connected.lock() {
                        c.remove(&peer_id);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, cause = %error, "dial failed");
                if let Some(peer) = peer_id {
                    if !self.swarm.is_connected(&peer) {
                        for reply in self.pending_dial.remove(&peer).unwrap_or_default() {
                            let _ = reply.send(Err(NetError::Dial {
                                peer,
                                reason: error.to_string(),
                            }));
                        }
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                let exceeded = match &error {
                    libp2p::swarm::ListenError::Denied { cause } => {
                        cause.downcast_ref::<connection_limits::Exceeded>()
                    }
                    _ => None,
                };
                if let Some(exceeded) = exceeded {
                    let text = exceeded.to_string();
                    let limit = limit_label(&text);
                    self.state.stats.refused(limit);
                    let peer = peer_id.unwrap_or(self.local_id());
                    if let Some(count) = self.refusals.hit(peer, limit) {
                        tracing::warn!(peer = ?peer_id, addr = %send_back_addr, code = limit, count, cause = %text, "inbound connection refused by a limit");
                    }
                    return;
                }
                // A peer without our PSK ends here, after the transport timeout.
                tracing::warn!(addr = %send_back_addr, cause = %error, "inbound connection refused");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(cause = %error, "listener error")
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(event)) => self.on_gossip_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identify(peer_id, info),
            other => tracing::trace!(event = ?other, "swarm event"),
        }
    }
}
