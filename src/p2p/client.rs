//! The cloneable [`Client`] handle on the network and the [`Command`]s it sends to the event
//! loop, each with a `oneshot` for the answer (rust-libp2p's file-sharing example). Streams
//! are opened and accepted through `libp2p-stream`'s `Control`, which talks to the behaviour
//! through channels of its own: nothing here touches the Swarm.

use std::sync::Arc;
use std::time::Duration;

use libp2p::{gossipsub, kad, Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::{GossipMessage, GossipVerdict, NetError, NetState, RecordEvent};

/// Longest wait for room in the event loop's queue, and for its answer to a question that
/// has no timeout of the caller's: the loop takes each command at once unless it is stuck.
const LOOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the loop hands discovery events; without a subscriber they are dropped (gossip
/// messages are then ignored).
pub enum Subscription {
    Records(mpsc::Sender<RecordEvent>),
    Gossip(mpsc::Sender<GossipMessage>),
}

/// What a [`Client`] asks of the event loop.
pub(super) enum Command {
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
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    state: Arc<NetState>,
}

impl Client {
    pub(super) fn new(
        commands: mpsc::Sender<Command>,
        control: libp2p_stream::Control,
        state: Arc<NetState>,
    ) -> Self {
        Client {
            commands,
            control,
            state,
        }
    }

    pub(crate) fn state(&self) -> &NetState {
        &self.state
    }

    /// Connects to `peer` at `addr` (returns at once when already connected).
    ///
    /// # Errors
    /// [`NetError::Dial`] when the dial fails or does not finish within `timeout`;
    /// [`NetError::Stalled`] when the loop took no command within [`LOOP_TIMEOUT`].
    pub async fn dial(&self, peer: PeerId, addr: Multiaddr, timeout: Duration) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        let not_connected = || NetError::Dial {
            peer,
            reason: format!("not connected within {timeout:?}"),
        };
        self.ask_or(Command::Dial { peer, addr, reply }, rx, timeout, not_connected)
            .await?
    }

    /// The addresses the swarm listens on (ports resolved).
    ///
    /// # Errors
    /// The network loop has stopped, or did not take or answer the question within
    /// [`LOOP_TIMEOUT`].
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (reply, rx) = oneshot::channel();
        let stalled = || NetError::Stalled(LOOP_TIMEOUT);
        self.ask_or(Command::ListenAddrs { reply }, rx, LOOP_TIMEOUT, stalled)
            .await
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
    /// The network loop has stopped, or took no command within [`LOOP_TIMEOUT`].
    pub(crate) async fn set_blocked(&self, peer: PeerId, blocked: bool) -> Result<(), NetError> {
        self.send(Command::Block { peer, blocked }).await
    }

    /// Exempts a partner from the connection limits (`partner`), or ends the exemption.
    ///
    /// # Errors
    /// The network loop has stopped, or took no command within [`LOOP_TIMEOUT`].
    pub(crate) async fn set_partner(&self, peer: PeerId, partner: bool) -> Result<(), NetError> {
        self.send(Command::Partner { peer, partner }).await
    }

    /// Hands `command` to the event loop, waiting at most [`LOOP_TIMEOUT`] for room in its
    /// queue.
    async fn send(&self, command: Command) -> Result<(), NetError> {
        match self.commands.send_timeout(command, LOOP_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(NetError::Stopped),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(NetError::Stalled(LOOP_TIMEOUT)),
        }
    }

    /// Hands `command` to the loop and waits at most `timeout` for its answer on `rx`
    /// ([`NetError::Dht`] past it).
    async fn ask<T>(
        &self,
        command: Command,
        rx: oneshot::Receiver<T>,
        timeout: Duration,
    ) -> Result<T, NetError> {
        let no_answer = || NetError::Dht(format!("no answer within {timeout:?}"));
        self.ask_or(command, rx, timeout, no_answer).await
    }

    /// [`Client::ask`] with the error of a late answer given by the caller.
    async fn ask_or<T>(
        &self,
        command: Command,
        rx: oneshot::Receiver<T>,
        timeout: Duration,
        late: impl FnOnce() -> NetError,
    ) -> Result<T, NetError> {
        self.send(command).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(NetError::Stopped),
            Err(_) => Err(late()),
        }
    }

    /// Adds a DHT bootstrap peer and dials it (returns once the loop took it).
    ///
    /// # Errors
    /// The network loop has stopped, or took no command within [`LOOP_TIMEOUT`].
    pub async fn bootstrap(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.send(Command::Bootstrap { addr }).await
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
    /// The network loop has stopped, is stalled, or did not answer in time.
    pub(crate) async fn get_record(&self, key: Vec<u8>, timeout: Duration) -> Result<Vec<Vec<u8>>, NetError> {
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
    pub(crate) async fn report_gossip(
        &self,
        message_id: gossipsub::MessageId,
        source: PeerId,
        verdict: GossipVerdict,
    ) {
        // A stopped or stalled loop has no message to report on.
        let _ = self
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
    /// The network loop has stopped, or took no command within [`LOOP_TIMEOUT`].
    pub(crate) async fn subscribe(&self, sub: Subscription) -> Result<(), NetError> {
        self.send(Command::Subscribe(sub)).await
    }

    /// Starts accepting inbound streams of a protocol.
    pub fn accept(&self, protocol: StreamProtocol) -> Option<libp2p_stream::IncomingStreams> {
        self.control.clone().accept(protocol).ok()
    }
}
