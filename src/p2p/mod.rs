//! libp2p side: the transport (TCP, optional PSK private network, Noise, Yamux), the
//! behaviour, the event loop that alone owns the `Swarm`, and the cloneable [`Client`]
//! everything else uses.
//!
//! Streams are opened and accepted through `libp2p-stream`'s `Control`, which talks to the
//! behaviour through channels: no other component touches the Swarm.

pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
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
    allow_block_list, identify, noise, ping, tcp, yamux, Multiaddr, PeerId, Stream, StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot, watch};

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

/// Which resource stream an event travels on: one per action, as oc-discovery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Create = 0,
    Update = 1,
    Delete = 2,
}

impl StreamKind {
    pub const ALL: [StreamKind; 3] = [StreamKind::Create, StreamKind::Update, StreamKind::Delete];

    pub fn for_action(action: crate::event::Action) -> Self {
        match action {
            crate::event::Action::Create => StreamKind::Create,
            crate::event::Action::Update => StreamKind::Update,
            crate::event::Action::Delete => StreamKind::Delete,
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
    stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

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
}

/// What the rest of the node can see of the network without asking the loop.
#[derive(Default)]
pub struct NetState {
    listening: AtomicBool,
    listen_addrs: Mutex<Vec<Multiaddr>>,
    connected: Mutex<HashSet<PeerId>>,
}

impl NetState {
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

/// Builds the swarm and starts listening; returns the client and the loop to run.
///
/// # Errors
/// The transport cannot be built or a listen address is refused.
pub fn build(
    key: Keypair,
    psk: Option<PreSharedKey>,
    listen: &[Multiaddr],
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
        .with_behaviour(|key| Behaviour {
            stream: libp2p_stream::Behaviour::new(),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_owned(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            blocked: Default::default(),
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
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
        },
    ))
}

/// The one owner of the `Swarm`.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    state: Arc<NetState>,
    /// Callers waiting for a connection to a peer.
    pending_dial: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetError>>>>,
}

impl EventLoop {
    /// Runs until `shutdown` turns true or every client is dropped.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
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
                ..
            } => {
                // A peer without our PSK ends here, after the transport timeout.
                tracing::warn!(addr = %send_back_addr, cause = %error, "inbound connection refused");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(cause = %error, "listener error")
            }
            other => tracing::trace!(event = ?other, "swarm event"),
        }
    }
}
