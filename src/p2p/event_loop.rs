//! The one task that owns the libp2p `Swarm`: it `select!`s over swarm events, the
//! [`Command`]s of the [`super::Client`] handles and the DHT purge tick, and answers each
//! command through its `oneshot`. Operations in flight wait in `pending_*` maps keyed by
//! peer or query id. Kademlia and gossipsub events are handled in [`super::kad`] and
//! [`super::gossip`]; this file keeps the connection lifecycle (with which side dialled
//! each connection), the listeners through relays (asked again when lost), and the
//! relay, hole punching and AutoNAT events. It never awaits another component: discovery
//! events are handed over with `try_send`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::metrics::Recorder;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{autonat, connection_limits, dcutr, identify, kad, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot, watch};

use super::behaviour::{limit_label, Behaviour, BehaviourEvent};
use super::client::{Command, Subscription};
use super::relay::{Reachability, RelayAccess, RELAY_RELISTEN_EVERY};
use super::{GossipMessage, NetError, NetState, RecordEvent, DHT_PURGE_EVERY};

/// A repeated refusal (record, connection) is logged once per this per peer, with its count.
pub(crate) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) type GetReply = oneshot::Sender<Result<Vec<Vec<u8>>, NetError>>;

/// The one owner of the `Swarm`.
pub struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    pub(super) state: Arc<NetState>,
    /// Callers waiting for a connection to a peer.
    pub(super) pending_dial: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetError>>>>,
    /// Callers waiting for a DHT put to finish.
    pub(super) pending_put: HashMap<kad::QueryId, oneshot::Sender<Result<(), NetError>>>,
    /// Callers waiting for a DHT lookup to finish, with the values found so far.
    pub(super) pending_get: HashMap<kad::QueryId, (Vec<Vec<u8>>, GetReply)>,
    pub(super) record_events: Option<mpsc::Sender<RecordEvent>>,
    pub(super) gossip_events: Option<mpsc::Sender<GossipMessage>>,
    /// Repeated refusals of one peer's records or connections, logged once per interval.
    pub(super) refusals: crate::guard::LogThrottle,
    /// Who may reserve a slot on the relay this node offers (`None`: it offers none).
    pub(super) relay_access: Option<RelayAccess>,
    /// The circuit addresses (`<relay>/p2p-circuit`) this node wants to listen on, and the
    /// listener of each that is open.
    relay_listens: Vec<(Multiaddr, Option<ListenerId>)>,
}

impl EventLoop {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        state: Arc<NetState>,
    ) -> Self {
        EventLoop {
            swarm,
            commands,
            state,
            pending_dial: HashMap::new(),
            pending_put: HashMap::new(),
            pending_get: HashMap::new(),
            record_events: None,
            gossip_events: None,
            refusals: crate::guard::LogThrottle::new(REFUSAL_LOG_EVERY),
            relay_access: None,
            relay_listens: Vec::new(),
        }
    }

    /// Reserves a slot on `relay` and listens through it; asked again every
    /// [`RELAY_RELISTEN_EVERY`] while the reservation is lost.
    pub(super) fn listen_via_relay(&mut self, relay: Multiaddr) {
        let circuit = relay.with(Protocol::P2pCircuit);
        self.relay_listens.push((circuit, None));
        self.relisten();
    }

    fn relisten(&mut self) {
        for (circuit, listener) in &mut self.relay_listens {
            if listener.is_some() {
                continue;
            }
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => *listener = Some(id),
                Err(e) => tracing::warn!(addr = %circuit, cause = %e, "cannot listen through the relay"),
            }
        }
    }

    /// Runs until `shutdown` turns true or every client is dropped.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut purge = tokio::time::interval(DHT_PURGE_EVERY);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut relisten = tokio::time::interval(RELAY_RELISTEN_EVERY);
        relisten.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = purge.tick() => self.purge_records(),
                _ = relisten.tick() => self.relisten(),
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
            Command::Dial { peer, addr, reply } => self.dial(peer, addr, reply),
            Command::ListenAddrs { reply } => {
                // The asker may have given up; nothing to do then.
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Block { peer, blocked } => self.set_blocked(peer, blocked),
            Command::Partner { peer, partner } => self.set_partner(peer, partner),
            Command::Bootstrap { addr } => self.add_bootstrap(addr),
            Command::PutRecord { record, reply } => self.put_record(record, reply),
            Command::PutRecordTo { record, peer, reply } => self.put_record_to(record, peer, reply),
            Command::GetRecord { key, reply } => self.get_record(key, reply),
            Command::PublishGossip { data, reply } => self.publish_gossip(data, reply),
            Command::ReportGossip {
                message_id,
                source,
                verdict,
            } => self.report_gossip(&message_id, &source, verdict),
            Command::Subscribe(Subscription::Records(tx)) => self.record_events = Some(tx),
            Command::Subscribe(Subscription::Gossip(tx)) => self.gossip_events = Some(tx),
        }
    }

    fn dial(&mut self, peer: PeerId, addr: libp2p::Multiaddr, reply: oneshot::Sender<Result<(), NetError>>) {
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

    fn set_blocked(&mut self, peer: PeerId, blocked: bool) {
        let gater = &mut self.swarm.behaviour_mut().blocked;
        if blocked {
            // Also closes the connections already open.
            gater.block_peer(peer);
            tracing::info!(%peer, "peer blacklisted");
        } else {
            gater.unblock_peer(peer);
        }
    }

    fn set_partner(&mut self, peer: PeerId, partner: bool) {
        if let Some(access) = &self.relay_access {
            access.set_partner(peer, partner);
        }
        let limits = &mut self.swarm.behaviour_mut().limits;
        if partner {
            limits.bypass_peer_id(&peer);
        } else {
            limits.remove_peer_id(&peer);
        }
    }

    fn local_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                // libp2p's relay serves only on a node with an external address: a node
                // offering a relay declares that it is reachable where it listens.
                let circuit = address.iter().any(|p| p == Protocol::P2pCircuit);
                if self.relay_access.is_some() && !circuit {
                    self.swarm.add_external_address(address.clone());
                }
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
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let dialed_by = if endpoint.is_dialer() { "us" } else { "them" };
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), dialed_by, relayed = endpoint.is_relayed(), num_established, "connected");
                if let Ok(mut c) = self.state.connected.lock() {
                    c.insert(peer_id);
                }
                if let Ok(mut c) = self.state.connections.lock() {
                    c.entry(peer_id)
                        .or_default()
                        .push((connection_id, endpoint.is_dialer()));
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
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, num_established, cause = ?cause, "connection closed");
                if let Ok(mut c) = self.state.connections.lock() {
                    if let Some(list) = c.get_mut(&peer_id) {
                        list.retain(|(id, _)| *id != connection_id);
                        if list.is_empty() {
                            c.remove(&peer_id);
                        }
                    }
                }
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
                tracing::warn!(addr = %send_back_addr, cause = %with_causes(&error), "inbound connection refused");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(cause = %error, "listener error")
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                for addr in &addresses {
                    if let Ok(mut addrs) = self.state.listen_addrs.lock() {
                        addrs.retain(|a| a != addr);
                    }
                }
                if let Some((circuit, listener)) = self
                    .relay_listens
                    .iter_mut()
                    .find(|(_, l)| *l == Some(listener_id))
                {
                    *listener = None;
                    let cause = reason.err().map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(addr = %circuit, cause, retry_in = ?RELAY_RELISTEN_EVERY, "relay reservation lost or refused");
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                if let Ok(mut r) = self.state.reachability.lock() {
                    if !r.1.contains(&address) {
                        r.1.push(address);
                    }
                }
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                if let Ok(mut r) = self.state.reachability.lock() {
                    r.1.retain(|a| a != &address);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new })) => {
                let reachability = Reachability::of(&new);
                tracing::info!(old = ?old, new = ?new, reachability = reachability.as_str(), "reachability changed");
                if let Ok(mut r) = self.state.reachability.lock() {
                    r.0 = reachability;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => self.on_relay_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                tracing::info!(event = ?event, "relay client")
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punched: direct connection"),
                Err(e) => {
                    tracing::debug!(peer = %remote_peer_id, cause = %e, "hole punching failed; staying relayed")
                }
            },
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

    /// Counts the event in libp2p's metrics (`libp2p_*` on `/metrics`).
    fn record(&self, event: &SwarmEvent<BehaviourEvent>) {
        let m = &self.state.stats.libp2p;
        m.record(event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => m.record(e),
            _ => {}
        }
    }

    /// The relay server's decisions: refusals are logged (throttled per peer) and counted.
    fn on_relay_event(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, renewed } => {
                tracing::info!(peer = %src_peer_id, renewed, "relay reservation accepted")
            }
            relay::Event::ReservationReqDenied { src_peer_id, status } => {
                self.state.stats.relay_refused("reservation");
                if let Some(count) = self.refusals.hit(src_peer_id, "relay_reservation") {
                    tracing::warn!(peer = %src_peer_id, code = "relay_reservation_refused", status = ?status, count, "relay reservation refused (not a partner nor --relay-allow, or over a limit)");
                }
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay circuit opened"),
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                self.state.stats.relay_refused("circuit");
                if let Some(count) = self.refusals.hit(src_peer_id, "relay_circuit") {
                    tracing::warn!(src = %src_peer_id, dst = %dst_peer_id, code = "relay_circuit_refused", status = ?status, count, "relay circuit refused");
                }
            }
            other => tracing::debug!(event = ?other, "relay"),
        }
    }
}

/// An error followed by its causes (`outer: inner: ...`, at most [`MAX_CAUSES`] deep):
/// libp2p's listen errors say little without them.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    for _ in 0..MAX_CAUSES {
        let Some(cause) = source else { break };
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Causes of an error written in a log line.
const MAX_CAUSES: usize = 8;
