//! Command router: the application requests that are not journaled.
//!
//! - `PB_CONSIDERS` `{"peer_ids": [...], ...}`: the event goes to each listed peer on
//!   `/opencloud/resource/considers/1.0`; each answers with an `ack` once it republished the
//!   event on its NATS. Unreachable peers are named in the reply and in an error event.
//! - `PB_PLANNER` `{"peer_id": ..., ...}`: sent on a long-lived
//!   `/opencloud/resource/planner/1.0` stream to that peer, opened on first use.
//! - `PB_CLOSE_PLANNER` `{"peer_id": ...}`: closes and forgets that stream.
//! - `PB_SEARCH`: handed to the search service.
//!
//! Receivers republish what arrives on these protocols as `PROPALGATION_EVENT` with
//! `from_app: "oc-discovery"`, the protocol's action and the sending connection's peer id
//! as `from_peer` ([`Forwarder`]), within a per-peer rate.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::Subject;
use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::Tuning;
use crate::event::{self, AppCommand, CommandAction, ErrorCode, Refusal};
use crate::guard::{LogThrottle, PeerBuckets};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self};

pub const PROTOCOL_CONSIDERS: StreamProtocol = StreamProtocol::new("/opencloud/resource/considers/1.0");
pub const PROTOCOL_PLANNER: StreamProtocol = StreamProtocol::new("/opencloud/resource/planner/1.0");
/// Planner messages queued per peer while its stream is being (re)opened.
const PLANNER_QUEUE: usize = 256;
/// Peers with a planner stream at once; beyond, `PB_PLANNER` to a new peer is `busy`.
pub const MAX_PLANNERS: usize = 256;
/// Bytes of planner messages queued across all peers; beyond, `PB_PLANNER` is `busy`.
pub const PLANNER_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// A frame encoded once (length prefix included), shared by every peer it goes to.
type Encoded = Arc<[u8]>;

fn encode(frame: &Frame) -> Encoded {
    let mut buf = Vec::new();
    wire::encode_frame(frame, &mut buf);
    buf.into()
}

/// A planner message waiting in a queue, with its share of [`PLANNER_QUEUE_BYTES`], given
/// back when it is dropped (sent, refused, or its queue gone).
struct Queued {
    bytes: Encoded,
    _reserved: Reserved,
}

struct Reserved {
    total: Arc<AtomicUsize>,
    n: usize,
}

impl Reserved {
    fn take(total: &Arc<AtomicUsize>, n: usize, max: usize) -> Option<Reserved> {
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|sum| *sum <= max)
            })
            .ok()
            .map(|_| Reserved {
                total: total.clone(),
                n,
            })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.total.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Finds addresses for a peer this node is not connected to (the DHT's peer records).
#[async_trait::async_trait]
pub trait Resolve: Send + Sync {
    async fn addresses(&self, peer: PeerId) -> Vec<Multiaddr>;
}

/// An application command and where to answer it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dispatch {
    pub command: AppCommand,
    pub reply: Option<Subject>,
}

/// A search handed over by the router; the search service answers the application.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SearchRequest {
    pub command: AppCommand,
    pub reply: Option<Subject>,
}

pub struct CommandEnv {
    pub own_id: String,
    pub nats: async_nats::Client,
    pub net: p2p::Client,
    pub partners: Arc<crate::peers::partners::Partners>,
    pub resolver: Option<Arc<dyn Resolve>>,
    pub search: Option<Recipient<SearchRequest>>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
}

pub struct CommandRouter {
    env: Arc<CommandEnv>,
    /// Each peer's planner queue and the generation of the task writing it: a task that
    /// ends (idle, closed, failed) removes its own entry, never a newer one.
    planners: HashMap<PeerId, (u64, mpsc::Sender<Queued>)>,
    generation: u64,
    /// Bytes of planner messages queued, all peers together.
    queued_bytes: Arc<AtomicUsize>,
}

impl CommandRouter {
    pub fn new(env: CommandEnv) -> Self {
        CommandRouter {
            env: Arc::new(env),
            planners: HashMap::new(),
            generation: 0,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Queues `frame` on `peer`'s planner stream, starting its task when it has none.
    fn queue_planner(&mut self, peer: PeerId, frame: &Frame, ctx: &mut Context<Self>) -> Result<(), Refusal> {
        let bytes = encode(frame);
        let Some(reserved) = Reserved::take(&self.queued_bytes, bytes.len(), PLANNER_QUEUE_BYTES) else {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!("{PLANNER_QUEUE_BYTES} bytes of planner messages are queued; retry"),
            ));
        };
        let mut frame = Queued {
            bytes,
            _reserved: reserved,
        };
        // Twice: a task may end (idle) between the lookup and the send.
        for _ in 0..2 {
            let queue = match self.planners.get(&peer).filter(|(_, q)| !q.is_closed()) {
                Some((_, q)) => q.clone(),
                None => {
                    if !self.planners.contains_key(&peer) && self.planners.len() >= MAX_PLANNERS {
                        self.planners.retain(|_, (_, q)| !q.is_closed());
                    }
                    if !self.planners.contains_key(&peer) && self.planners.len() >= MAX_PLANNERS {
                        return Err(Refusal::new(
                            ErrorCode::Busy,
                            format!("{MAX_PLANNERS} planner streams are open; close one first"),
                        ));
                    }
                    let (tx, rx) = mpsc::channel(PLANNER_QUEUE);
                    self.generation = self.generation.wrapping_add(1);
                    let ended = ctx.address().recipient();
                    tokio::spawn(planner_stream(self.env.clone(), peer, rx, ended, self.generation));
                    self.planners.insert(peer, (self.generation, tx.clone()));
                    tx
                }
            };
            match queue.try_send(frame) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!("planner stream to {peer} is saturated"),
                    ))
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.planners.remove(&peer);
                    frame = back;
                }
            }
        }
        Err(Refusal::new(
            ErrorCode::Busy,
            format!("planner stream to {peer} is restarting; retry"),
        ))
    }
}

/// A planner task ended: its entry goes, unless a newer task replaced it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PlannerEnded {
    pub peer: PeerId,
    pub generation: u64,
}

impl Handler<PlannerEnded> for CommandRouter {
    type Result = ();

    fn handle(&mut self, msg: PlannerEnded, _: &mut Self::Context) {
        if self
            .planners
            .get(&msg.peer)
            .is_some_and(|(g, _)| *g == msg.generation)
        {
            self.planners.remove(&msg.peer);
        }
    }
}

impl Actor for CommandRouter {
    type Context = Context<Self>;
}

impl Handler<Dispatch> for CommandRouter {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, ctx: &mut Self::Context) {
        let Dispatch { command, reply } = msg;
        let env = self.env.clone();
        match command.action {
            CommandAction::Search => match &self.env.search {
                Some(search) => {
                    if let Err(e) = search.try_send(SearchRequest { command, reply }) {
                        let SearchRequest { command, reply } = e.into_inner();
                        let refusal = Refusal::new(ErrorCode::Busy, "the search service is saturated; retry");
                        actix::spawn(async move { env.refuse(&command.payload, reply, &refusal).await });
                    }
                }
                None => {
                    let refusal = Refusal::new(
                        ErrorCode::UnsupportedAction,
                        "search is not available on this node",
                    );
                    actix::spawn(async move { env.refuse(&command.payload, reply, &refusal).await });
                }
            },
            CommandAction::Considers => {
                actix::spawn(async move { env.considers(command, reply).await });
            }
            CommandAction::Planner => match peer_field(&command.payload) {
                Ok(peer) => {
                    let queued = self.queue_planner(peer, &forward_frame(&command), ctx);
                    actix::spawn(async move {
                        match queued {
                            Ok(()) => {
                                env.answer(reply, json!({"ok": true, "peer_id": peer.to_string()}))
                                    .await
                            }
                            Err(refusal) => env.refuse(&command.payload, reply, &refusal).await,
                        }
                    });
                }
                Err(refusal) => {
                    actix::spawn(async move { env.refuse(&command.payload, reply, &refusal).await });
                }
            },
            CommandAction::ClosePlanner => match peer_field(&command.payload) {
                Ok(peer) => {
                    // Dropping the queue ends the writer task, which closes the stream.
                    let existed = self.planners.remove(&peer).is_some_and(|(_, q)| !q.is_closed());
                    tracing::info!(%peer, existed, "planner stream closed");
                    actix::spawn(async move {
                        env.answer(
                            reply,
                            json!({"ok": true, "peer_id": peer.to_string(), "closed": existed}),
                        )
                        .await
                    });
                }
                Err(refusal) => {
                    actix::spawn(async move { env.refuse(&command.payload, reply, &refusal).await });
                }
            },
        }
    }
}

fn forward_frame(command: &AppCommand) -> Frame {
    Frame::Forward {
        action: command.action.as_str().to_owned(),
        data_type: command.data_type.clone(),
        user: command.user.clone(),
        payload: command.payload.clone(),
    }
}

pub(crate) fn peer_field(payload: &Value) -> Result<PeerId, Refusal> {
    let raw = payload
        .get("peer_id")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::new(ErrorCode::MissingField, "missing string field payload.peer_id"))?;
    raw.parse().map_err(|_| {
        Refusal::new(
            ErrorCode::InvalidField,
            format!("payload.peer_id {raw:?} is not a peer id"),
        )
    })
}

impl CommandEnv {
    /// Connects to `peer` if needed: already connected, a partner's address, or the DHT.
    async fn reach(&self, peer: PeerId) -> Result<(), String> {
        if self.net.state().is_connected(&peer) {
            return Ok(());
        }
        let mut addrs: Vec<Multiaddr> = self.partners.addr(&peer).into_iter().collect();
        if let Some(resolver) = &self.resolver {
            addrs.extend(resolver.addresses(peer).await);
        }
        if addrs.is_empty() {
            return Err("no known address".into());
        }
        let mut last = String::new();
        for addr in addrs {
            match self.net.dial(peer, addr, self.tuning.io_timeout).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    async fn considers(&self, command: AppCommand, reply: Option<Subject>) {
        let Some(list) = command.payload.get("peer_ids").and_then(Value::as_array) else {
            let refusal = Refusal::new(ErrorCode::MissingField, "missing array field payload.peer_ids");
            return self.refuse(&command.payload, reply, &refusal).await;
        };
        if list.len() > event::MAX_COMMAND_PEERS {
            // Checked when decoded already; kept here so the fan-out is bounded whoever calls.
            let refusal = Refusal::new(
                ErrorCode::InvalidField,
                format!(
                    "payload.peer_ids names more than {} peers",
                    event::MAX_COMMAND_PEERS
                ),
            );
            return self.refuse(&command.payload, reply, &refusal).await;
        }
        // A peer listed twice gets the message once.
        let mut seen = HashSet::with_capacity(list.len());
        let list: Vec<&Value> = list.iter().filter(|raw| seen.insert(raw.to_string())).collect();
        // Encoded once: 256 peers share one copy of the payload.
        let frame = encode(&forward_frame(&command));
        let sends = list.into_iter().map(|raw| {
            let frame = frame.clone();
            async move {
                let name = raw.as_str().unwrap_or_default().to_owned();
                let result = match name.parse::<PeerId>() {
                    Ok(peer) => self.send_once(peer, PROTOCOL_CONSIDERS, frame).await,
                    Err(_) => Err("not a peer id".to_owned()),
                };
                (name, result)
            }
        });
        let results = futures::future::join_all(sends).await;
        let delivered: Vec<&String> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(p, _)| p)
            .collect();
        let failed: Vec<Value> = results
            .iter()
            .filter_map(|(p, r)| r.as_ref().err().map(|e| json!({"peer_id": p, "reason": e})))
            .collect();
        if failed.is_empty() {
            self.answer(reply, json!({"ok": true, "delivered": delivered}))
                .await;
            return;
        }
        let names: Vec<&str> = failed.iter().filter_map(|f| f["peer_id"].as_str()).collect();
        tracing::warn!(unreachable = ?names, "PB_CONSIDERS not delivered to every peer");
        self.metrics.refused("commands", ErrorCode::Unreachable);
        let error = Refusal::new(
            ErrorCode::Unreachable,
            format!("not delivered to {}", names.join(", ")),
        );
        let body = json!({"error": error.to_json(), "subject": event::SUBJECT_PROPAGATION, "action": "PB_CONSIDERS", "unreachable": failed});
        self.publish(Subject::from_static(event::SUBJECT_ERROR), &body)
            .await;
        self.answer(
            reply,
            json!({"ok": false, "error": error.to_json(), "delivered": delivered, "unreachable": failed}),
        )
        .await;
    }

    /// Opens a stream, sends one frame, waits for the peer's `ack`.
    async fn send_once(&self, peer: PeerId, protocol: StreamProtocol, frame: Encoded) -> Result<(), String> {
        let t = self.tuning.io_timeout;
        self.reach(peer).await?;
        let mut stream = self
            .net
            .open_stream(peer, protocol, t)
            .await
            .map_err(|e| e.to_string())?;
        let exchange = async {
            wire::write_encoded(&mut stream, &frame)
                .await
                .map_err(|e| e.to_string())?;
            match wire::read_frame(&mut stream, self.tuning.max_frame_bytes).await {
                Ok(Some(Frame::Ack { .. })) => Ok(()),
                Ok(Some(Frame::Error { code, message, .. })) => Err(format!("{code}: {message}")),
                other => Err(format!("no acknowledgement: {other:?}")),
            }
        };
        let result = tokio::time::timeout(t, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {t:?}")));
        let _ = stream.close().await;
        result
    }

    async fn answer(&self, reply: Option<Subject>, body: Value) {
        if let Some(reply) = reply {
            self.publish(reply, &body).await;
        }
    }

    async fn refuse(&self, payload: &Value, reply: Option<Subject>, refusal: &Refusal) {
        tracing::warn!(code = refusal.code.as_str(), reason = %refusal.message, "command refused");
        self.metrics.refused("commands", refusal.code);
        let body = json!({"error": refusal.to_json(), "subject": event::SUBJECT_PROPAGATION, "event": payload.to_string()});
        self.publish(Subject::from_static(event::SUBJECT_ERROR), &body)
            .await;
        self.answer(reply, json!({"ok": false, "error": refusal.to_json()}))
            .await;
    }

    async fn publish(&self, subject: Subject, body: &Value) {
        if let Err(e) = self.nats.publish(subject.clone(), body.to_string().into()).await {
            tracing::warn!(%subject, cause = %e, "cannot publish answer");
        }
    }
}

/// Writes a peer's planner messages on one long-lived stream, each confirmed by the peer's
/// `ack`; a failed stream is reopened once per message. Ends when the queue is dropped
/// (`PB_CLOSE_PLANNER`) or after `planner_idle` without a message, and then tells the
/// router, which forgets the queue.
async fn planner_stream(
    env: Arc<CommandEnv>,
    peer: PeerId,
    mut queue: mpsc::Receiver<Queued>,
    ended: Recipient<PlannerEnded>,
    generation: u64,
) {
    let t = env.tuning.io_timeout;
    let mut stream: Option<Stream> = None;
    let mut idle = false;
    loop {
        let frame = if idle {
            // Closed for new messages: what was queued before still goes out.
            match queue.try_recv() {
                Ok(frame) => frame,
                Err(_) => break,
            }
        } else {
            match tokio::time::timeout(env.tuning.planner_idle, queue.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(%peer, idle = ?env.tuning.planner_idle, "idle planner stream closed");
                    queue.close();
                    idle = true;
                    continue;
                }
            }
        };
        let mut outcome = Err(Refusal::new(ErrorCode::Unreachable, "not sent"));
        for attempt in 0..2 {
            if stream.is_none() {
                let opened = match env.reach(peer).await {
                    Ok(()) => env
                        .net
                        .open_stream(peer, PROTOCOL_PLANNER, t)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        tracing::warn!(%peer, attempt, cause = %e, "cannot open planner stream");
                        outcome = Err(Refusal::new(ErrorCode::Unreachable, e));
                        continue;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { continue };
            match tokio::time::timeout(t, exchange(s, &frame.bytes, env.tuning.max_frame_bytes)).await {
                Ok(Ok(answer)) => {
                    // The peer answered: its refusal stands, it is not resent.
                    outcome = answer;
                    break;
                }
                Ok(Err(e)) => {
                    outcome = Err(Refusal::new(ErrorCode::Unreachable, e));
                    stream = None;
                }
                Err(_) => {
                    outcome = Err(Refusal::new(
                        ErrorCode::Unreachable,
                        format!("no answer within {t:?}"),
                    ));
                    stream = None;
                }
            }
        }
        if let Err(refusal) = outcome {
            tracing::warn!(%peer, code = refusal.code.as_str(), reason = %refusal.message, "planner message not delivered");
            env.metrics.refused("commands", refusal.code);
            let error = Refusal::new(
                refusal.code,
                format!("planner message not delivered to {peer}: {}", refusal.message),
            );
            let body = json!({"error": error.to_json(), "subject": event::SUBJECT_PROPAGATION, "action": "PB_PLANNER", "unreachable": [peer.to_string()]});
            env.publish(Subject::from_static(event::SUBJECT_ERROR), &body)
                .await;
        }
    }
    if let Some(mut s) = stream {
        let _ = tokio::time::timeout(t, s.close()).await;
    }
    ended.do_send(PlannerEnded { peer, generation });
}

/// Writes one frame and reads the peer's answer: `Ok(Ok)` acked, `Ok(Err)` refused by the
/// peer (its code), `Err` the stream failed.
async fn exchange(stream: &mut Stream, frame: &[u8], max: usize) -> Result<Result<(), Refusal>, String> {
    wire::write_encoded(stream, frame)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match wire::read_frame(stream, max).await {
            Ok(Some(Frame::Ack { .. })) => return Ok(Ok(())),
            Ok(Some(Frame::Error { code, message, .. })) => {
                let code = ErrorCode::parse(&code).unwrap_or(ErrorCode::Unreachable);
                return Ok(Err(Refusal::new(code, message)));
            }
            Ok(Some(_)) => continue,
            Ok(None) => return Err("stream closed by the peer".to_owned()),
            Err(e) if e.is_recoverable() => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Which forwarding protocol a stream speaks: it, not the frame, decides the action
/// republished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardKind {
    Considers,
    Planner,
}

impl ForwardKind {
    pub fn of(protocol: &StreamProtocol) -> Option<ForwardKind> {
        if *protocol == PROTOCOL_CONSIDERS {
            Some(ForwardKind::Considers)
        } else if *protocol == PROTOCOL_PLANNER {
            Some(ForwardKind::Planner)
        } else {
            None
        }
    }

    /// The only action a stream of this kind republishes.
    pub fn action(self) -> CommandAction {
        match self {
            ForwardKind::Considers => CommandAction::Considers,
            ForwardKind::Planner => CommandAction::Planner,
        }
    }
}

/// Why [`OpenStreams::admit`] refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamsFull {
    #[error("this peer has {0} forwarding streams busy")]
    Peer(usize),
    #[error("all {0} forwarding streams are busy")]
    Total(usize),
}

/// The considers / planner streams open on the receiving side, bounded in total and per
/// peer. A stream waiting for its next frame is *idle*: it holds no work permit, and it
/// is closed to make room when a new stream would not fit: the peer's own when the peer is
/// at its share, else one of the peer holding the most streams, the longest idle first. Only streams busy with a frame are never
/// taken away, so idle planner streams of any number of peers cannot lock others out.
///
/// Pure bookkeeping, generic over the handle that closes a stream (unit-tested).
pub struct OpenStreams<H> {
    total: usize,
    per_peer: usize,
    next_id: u64,
    open: HashMap<u64, OpenSlot<H>>,
}

struct OpenSlot<H> {
    peer: PeerId,
    /// Since when the stream has been waiting for a frame; `None` while one is handled.
    idle_since: Option<Instant>,
    close: H,
}

impl<H> OpenStreams<H> {
    pub fn new(total: usize, per_peer: usize) -> Self {
        let total = total.max(1);
        OpenStreams {
            total,
            per_peer: per_peer.clamp(1, total),
            next_id: 0,
            open: HashMap::new(),
        }
    }

    /// Admits a stream of `peer` (idle until it reads a frame). Returns its id and the
    /// handle of the idle stream closed to make room, if one was.
    ///
    /// # Errors
    /// [`StreamsFull`] when every stream that would have to go is busy.
    pub fn admit(&mut self, peer: PeerId, close: H, now: Instant) -> Result<(u64, Option<H>), StreamsFull> {
        let mine = self.open.values().filter(|s| s.peer == peer).count();
        let evicted = if mine >= self.per_peer {
            Some(
                self.oldest_idle(Some(peer))
                    .ok_or(StreamsFull::Peer(self.per_peer))?,
            )
        } else if self.open.len() >= self.total {
            Some(self.oldest_idle(None).ok_or(StreamsFull::Total(self.total))?)
        } else {
            None
        };
        let evicted = evicted.and_then(|id| self.open.remove(&id)).map(|s| s.close);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.open.insert(
            id,
            OpenSlot {
                peer,
                idle_since: Some(now),
                close,
            },
        );
        Ok((id, evicted))
    }

    /// The idle stream to close: of `of` when given, else of the peer holding the most
    /// streams (so a peer with few keeps them), the longest idle first.
    fn oldest_idle(&self, of: Option<PeerId>) -> Option<u64> {
        let mut held: HashMap<PeerId, usize> = HashMap::new();
        for s in self.open.values() {
            let n = held.entry(s.peer).or_default();
            *n = n.saturating_add(1);
        }
        self.open
            .iter()
            .filter(|(_, s)| of.is_none_or(|p| s.peer == p))
            .filter_map(|(id, s)| {
                let count = held.get(&s.peer).copied().unwrap_or(0);
                s.idle_since.map(|t| (std::cmp::Reverse(count), t, *id))
            })
            .min()
            .map(|(_, _, id)| id)
    }

    /// The stream waits for its next frame (it may be closed to make room).
    pub fn idle(&mut self, id: u64, now: Instant) {
        if let Some(s) = self.open.get_mut(&id) {
            s.idle_since = Some(now);
        }
    }

    /// The stream handles a frame: it is not taken away meanwhile. False when it was
    /// closed to make room already.
    pub fn busy(&mut self, id: u64) -> bool {
        match self.open.get_mut(&id) {
            Some(s) => {
                s.idle_since = None;
                true
            }
            None => false,
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// Considers / planner streams served at once, across all peers.
pub const MAX_FORWARD_STREAMS: usize = 64;
/// Considers / planner streams one peer has open at once.
pub const FORWARD_STREAMS_PER_PEER: usize = 4;
/// Peers whose forwarding token buckets are remembered at once.
const FORWARD_BUCKET_PEERS: usize = 4096;
/// A peer's repeated refusals are logged once per this.
const FORWARD_LOG_EVERY: Duration = Duration::from_secs(10);

/// Receiver side of considers and planner streams: republishes each `forward` frame on the
/// local NATS as `PROPALGATION_EVENT` from `oc-discovery`, then acknowledges it.
///
/// What a peer controls is bounded: the action is the protocol's (`PB_CONSIDERS` or
/// `PB_PLANNER`, whatever the frame says), `from_peer` is the connection's peer id, each
/// peer has a token bucket (`--forward-rate`, `--forward-burst`; over it: `rate_limited`),
/// and streams are bounded by [`OpenStreams`].
pub struct Forwarder {
    nats: async_nats::Client,
    metrics: Arc<Metrics>,
    tuning: Tuning,
    buckets: PeerBuckets,
    streams: Mutex<OpenStreams<oneshot::Sender<()>>>,
    throttle: LogThrottle,
}

impl Forwarder {
    pub fn new(nats: async_nats::Client, metrics: Arc<Metrics>, tuning: Tuning) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            nats,
            metrics,
            buckets: PeerBuckets::new(
                tuning.forward_rate,
                f64::from(tuning.forward_burst),
                FORWARD_BUCKET_PEERS,
            ),
            tuning,
            streams: Mutex::new(OpenStreams::new(MAX_FORWARD_STREAMS, FORWARD_STREAMS_PER_PEER)),
            throttle: LogThrottle::new(FORWARD_LOG_EVERY),
        })
    }

    /// Serves a considers / planner stream a peer opened, or resets it when the streams
    /// that would have to make room are all busy.
    pub fn accept(self: &Arc<Self>, peer: PeerId, protocol: &StreamProtocol, stream: Stream) {
        let Some(kind) = ForwardKind::of(protocol) else {
            return;
        };
        let (close, closed) = oneshot::channel();
        let admitted = match self.streams.lock() {
            Ok(mut streams) => streams.admit(peer, close, Instant::now()),
            Err(_) => Err(StreamsFull::Total(MAX_FORWARD_STREAMS)),
        };
        match admitted {
            Ok((id, evicted)) => {
                if let Some(evicted) = evicted {
                    // The idle stream's task ends at once; its sender reopens when needed.
                    let _ = evicted.send(());
                    tracing::debug!(%peer, "idle forwarding stream closed to make room");
                }
                tokio::spawn(self.clone().serve(stream, peer, kind, id, closed));
            }
            Err(full) => {
                // Dropping the stream resets it: the sender learns at once.
                self.metrics.refused("forward", ErrorCode::Busy);
                if let Some(count) = self.throttle.hit(peer, "busy") {
                    tracing::warn!(%peer, code = "busy", count, cause = %full, "forwarding stream refused");
                }
            }
        }
    }

    fn mark_idle(&self, id: u64) {
        if let Ok(mut s) = self.streams.lock() {
            s.idle(id, Instant::now());
        }
    }

    fn mark_busy(&self, id: u64) -> bool {
        self.streams.lock().map(|mut s| s.busy(id)).unwrap_or(false)
    }

    async fn serve(
        self: Arc<Self>,
        mut stream: Stream,
        peer: PeerId,
        kind: ForwardKind,
        id: u64,
        mut closed: oneshot::Receiver<()>,
    ) {
        let _slot = SlotGuard {
            forwarder: self.clone(),
            id,
        };
        let t = self.tuning.io_timeout;
        let idle = match kind {
            ForwardKind::Considers => t,
            ForwardKind::Planner => self.tuning.planner_idle,
        };
        loop {
            self.mark_idle(id);
            let read = tokio::select! {
                read = tokio::time::timeout(idle, wire::read_frame(&mut stream, self.tuning.max_frame_bytes)) => read,
                _ = &mut closed => {
                    tracing::debug!(%peer, ?kind, "idle forwarding stream closed to make room");
                    break;
                }
            };
            if !self.mark_busy(id) {
                break;
            }
            let answer = match read {
                Ok(Ok(Some(frame))) => self.handle(peer, kind, frame).await,
                Ok(Err(e)) if e.is_recoverable() => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                        _ => ErrorCode::InvalidJson,
                    };
                    self.refused(peer, code, "unreadable forwarded message skipped");
                    error_frame(code, e.to_string())
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => {
                    tracing::debug!(%peer, ?kind, idle = ?idle, "idle forwarding stream closed");
                    break;
                }
            };
            if !matches!(
                tokio::time::timeout(t, wire::write_frame(&mut stream, &answer)).await,
                Ok(Ok(()))
            ) {
                break;
            }
        }
        let _ = tokio::time::timeout(t, stream.close()).await;
    }

    /// The answer to one frame: `ack` once republished, `error` otherwise.
    async fn handle(&self, peer: PeerId, kind: ForwardKind, frame: Frame) -> Frame {
        // Every frame costs a token, so junk floods are bounded like valid ones.
        if !self.buckets.try_take(&peer) {
            self.refused(
                peer,
                ErrorCode::RateLimited,
                "forwarded message over the peer's rate refused",
            );
            return error_frame(
                ErrorCode::RateLimited,
                format!(
                    "more than {}/s (burst {}) forwarded messages; retry later",
                    self.tuning.forward_rate, self.tuning.forward_burst
                ),
            );
        }
        let Frame::Forward {
            action: claimed,
            data_type,
            user,
            payload,
        } = frame
        else {
            self.refused(
                peer,
                ErrorCode::UnsupportedAction,
                "unexpected frame on a forwarding stream",
            );
            return error_frame(
                ErrorCode::UnsupportedAction,
                "only forward frames are accepted on this protocol",
            );
        };
        if !payload.is_object() {
            self.refused(
                peer,
                ErrorCode::InvalidField,
                "forwarded payload is not an object",
            );
            return error_frame(ErrorCode::InvalidField, "payload must be a JSON object");
        }
        let action = kind.action().as_str();
        if claimed != action {
            // The protocol decides: a peer cannot make this node publish PB_DELETE.
            tracing::debug!(%peer, %claimed, %action, "forwarded action replaced by the protocol's");
        }
        let body = json!({
            "action": action, "data_type": data_type, "user": user, "payload": payload,
            "from_app": event::OWN_APP, "from_peer": peer.to_string(),
        });
        let published = async {
            self.nats
                .publish(event::SUBJECT_PROPAGATION, body.to_string().into())
                .await
                .map_err(|e| e.to_string())?;
            self.nats.flush().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.tuning.io_timeout, published).await {
            Ok(Ok(())) => {
                tracing::debug!(%peer, %action, "forwarded message republished");
                Frame::Ack { seq: 0 }
            }
            other => {
                let reason = match other {
                    Ok(Err(e)) => e,
                    _ => format!("no confirmation within {:?}", self.tuning.io_timeout),
                };
                self.metrics.refused("forward", ErrorCode::NatsUnavailable);
                tracing::warn!(%peer, %action, cause = %reason, "cannot republish forwarded message");
                error_frame(ErrorCode::NatsUnavailable, reason)
            }
        }
    }

    /// Counts every refusal; logs it once per interval per peer and code.
    fn refused(&self, peer: PeerId, code: ErrorCode, what: &'static str) {
        self.metrics.refused("forward", code);
        if let Some(count) = self.throttle.hit(peer, code.as_str()) {
            tracing::warn!(%peer, code = code.as_str(), count, "{what}");
        }
    }
}

/// Gives a stream's place back when its task ends, however it ends.
struct SlotGuard {
    forwarder: Arc<Forwarder>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.forwarder.streams.lock() {
            s.remove(self.id);
        }
    }
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::error(None, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_streams_make_room_and_busy_ones_do_not() {
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        let mut s: OpenStreams<u32> = OpenStreams::new(3, 2);
        let (hostile, good) = (PeerId::random(), PeerId::random());
        let (a, _) = s.admit(hostile, 1, later(0)).unwrap();
        let (b, _) = s.admit(hostile, 2, later(1)).unwrap();
        // At its share: the peer's own oldest idle stream goes.
        let (c, evicted) = s.admit(hostile, 3, later(2)).unwrap();
        assert_eq!(evicted, Some(1));
        assert!(!s.busy(a), "closed to make room");
        assert!(s.busy(b) && s.busy(c));
        assert_eq!(s.admit(hostile, 4, later(3)), Err(StreamsFull::Peer(2)));
        // Pool full of busy streams: a good peer waits; once one is idle, it gets room.
        let (g, none) = s.admit(good, 5, later(4)).unwrap();
        assert_eq!(none, None);
        assert!(s.busy(g));
        assert_eq!(s.len(), 3);
        assert_eq!(s.admit(PeerId::random(), 6, later(5)), Err(StreamsFull::Total(3)));
        s.idle(b, later(6));
        let (_, evicted) = s.admit(PeerId::random(), 7, later(7)).unwrap();
        assert_eq!(evicted, Some(2));
        s.remove(c);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_peer_holding_the_most_streams_makes_room_first() {
        let t0 = Instant::now();
        let mut s: OpenStreams<&str> = OpenStreams::new(4, 3);
        let (good, greedy) = (PeerId::random(), PeerId::random());
        // The good peer's stream is the longest idle, yet the greedy peer's go first.
        s.admit(good, "good", t0).unwrap();
        for (i, name) in ["g1", "g2", "g3"].into_iter().enumerate() {
            s.admit(greedy, name, t0 + Duration::from_millis(1 + i as u64))
                .unwrap();
        }
        let (_, evicted) = s
            .admit(PeerId::random(), "new", t0 + Duration::from_secs(1))
            .unwrap();
        assert_eq!(evicted, Some("g1"));
    }

    #[test]
    fn queued_planner_bytes_are_bounded_and_given_back() {
        let total = Arc::new(AtomicUsize::new(0));
        let a = Reserved::take(&total, 60, 100).unwrap();
        assert!(Reserved::take(&total, 41, 100).is_none(), "over the budget");
        let b = Reserved::take(&total, 40, 100).unwrap();
        assert!(Reserved::take(&total, usize::MAX, 100).is_none(), "no overflow");
        drop(a);
        assert_eq!(total.load(Ordering::Acquire), 40);
        drop(b);
        assert_eq!(total.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_protocol_decides_the_action() {
        assert_eq!(
            ForwardKind::of(&PROTOCOL_CONSIDERS).map(ForwardKind::action),
            Some(CommandAction::Considers)
        );
        assert_eq!(
            ForwardKind::of(&PROTOCOL_PLANNER).map(ForwardKind::action),
            Some(CommandAction::Planner)
        );
        assert_eq!(ForwardKind::of(&StreamProtocol::new("/other/1.0")), None);
    }
}
