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
//! `from_app: "oc-discovery"` and `from_peer` ([`forward_to_nats`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_nats::Subject;
use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::Tuning;
use crate::event::{self, AppCommand, CommandAction, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame};
use crate::p2p::{self};

pub const PROTOCOL_CONSIDERS: StreamProtocol = StreamProtocol::new("/opencloud/resource/considers/1.0");
pub const PROTOCOL_PLANNER: StreamProtocol = StreamProtocol::new("/opencloud/resource/planner/1.0");
/// Planner messages queued per peer while its stream is being (re)opened.
const PLANNER_QUEUE: usize = 256;
/// A planner stream with nothing to carry for this long is closed by the receiver.
pub const PLANNER_IDLE: Duration = Duration::from_secs(3600);

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
    pub partners: Arc<super::inbound::Partners>,
    pub resolver: Option<Arc<dyn Resolve>>,
    pub search: Option<Recipient<SearchRequest>>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
}

pub struct CommandRouter {
    env: Arc<CommandEnv>,
    planners: HashMap<PeerId, mpsc::Sender<Frame>>,
}

impl CommandRouter {
    pub fn new(env: CommandEnv) -> Self {
        CommandRouter {
            env: Arc::new(env),
            planners: HashMap::new(),
        }
    }
}

impl Actor for CommandRouter {
    type Context = Context<Self>;
}

impl Handler<Dispatch> for CommandRouter {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, _: &mut Self::Context) {
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
                    let queue = self.planners.get(&peer).filter(|q| !q.is_closed()).cloned();
                    let queue = queue.unwrap_or_else(|| {
                        let (tx, rx) = mpsc::channel(PLANNER_QUEUE);
                        tokio::spawn(planner_stream(env.clone(), peer, rx));
                        self.planners.insert(peer, tx.clone());
                        tx
                    });
                    let frame = forward_frame(&command);
                    let accepted = queue.try_send(frame).is_ok();
                    actix::spawn(async move {
                        if accepted {
                            env.answer(reply, json!({"ok": true, "peer_id": peer.to_string()}))
                                .await;
                        } else {
                            let refusal = Refusal::new(
                                ErrorCode::Busy,
                                format!("planner stream to {peer} is saturated"),
                            );
                            env.refuse(&command.payload, reply, &refusal).await;
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
                    let existed = self.planners.remove(&peer).is_some();
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

fn peer_field(payload: &Value) -> Result<PeerId, Refusal> {
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
        let frame = forward_frame(&command);
        let sends = list.iter().map(|raw| {
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
    async fn send_once(&self, peer: PeerId, protocol: StreamProtocol, frame: Frame) -> Result<(), String> {
        let t = self.tuning.io_timeout;
        self.reach(peer).await?;
        let mut stream = self
            .net
            .open_stream(peer, protocol, t)
            .await
            .map_err(|e| e.to_string())?;
        let exchange = async {
            wire::write_frame(&mut stream, &frame)
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

/// Writes a peer's planner messages on one long-lived stream, reopened once on failure.
async fn planner_stream(env: Arc<CommandEnv>, peer: PeerId, mut queue: mpsc::Receiver<Frame>) {
    let t = env.tuning.io_timeout;
    let mut stream: Option<Stream> = None;
    while let Some(frame) = queue.recv().await {
        let mut delivered = false;
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
                        continue;
                    }
                }
            }
            if let Some(s) = stream.as_mut() {
                match tokio::time::timeout(t, wire::write_frame(s, &frame)).await {
                    Ok(Ok(())) => {
                        delivered = true;
                        break;
                    }
                    _ => stream = None,
                }
            }
        }
        if !delivered {
            let error = Refusal::new(
                ErrorCode::Unreachable,
                format!("planner message not delivered to {peer}"),
            );
            env.metrics.refused("commands", ErrorCode::Unreachable);
            let body = json!({"error": error.to_json(), "subject": event::SUBJECT_PROPAGATION, "action": "PB_PLANNER", "unreachable": [peer.to_string()]});
            env.publish(Subject::from_static(event::SUBJECT_ERROR), &body)
                .await;
        }
    }
    if let Some(mut s) = stream {
        let _ = tokio::time::timeout(t, s.close()).await;
    }
}

/// Receiver side of considers and planner streams: republishes each `forward` frame on
/// the local NATS as `PROPALGATION_EVENT` from `oc-discovery`, then acknowledges it.
pub async fn forward_to_nats(
    mut stream: Stream,
    peer: PeerId,
    nats: async_nats::Client,
    tuning: Tuning,
    idle: Duration,
) {
    loop {
        let frame =
            match tokio::time::timeout(idle, wire::read_frame(&mut stream, tuning.max_frame_bytes)).await {
                Ok(Ok(Some(frame))) => frame,
                Ok(Err(e)) if e.is_recoverable() => {
                    tracing::warn!(%peer, cause = %e, "unreadable forwarded message skipped");
                    continue;
                }
                _ => return,
            };
        let Frame::Forward {
            action,
            data_type,
            user,
            payload,
        } = frame
        else {
            continue;
        };
        let body = json!({
            "action": action, "data_type": data_type, "user": user, "payload": payload,
            "from_app": event::OWN_APP, "from_peer": peer.to_string(),
        });
        let published = async {
            nats.publish(event::SUBJECT_PROPAGATION, body.to_string().into())
                .await
                .map_err(|e| e.to_string())?;
            nats.flush().await.map_err(|e| e.to_string())
        };
        let answer = match tokio::time::timeout(tuning.io_timeout, published).await {
            Ok(Ok(())) => Frame::Ack { seq: 0 },
            other => {
                let reason = format!("{other:?}");
                tracing::warn!(%peer, %action, cause = %reason, "cannot republish forwarded message");
                Frame::Error {
                    seq: None,
                    code: ErrorCode::NatsUnavailable.as_str().into(),
                    message: reason,
                }
            }
        };
        tracing::debug!(%peer, %action, "forwarded message republished");
        if tokio::time::timeout(tuning.io_timeout, wire::write_frame(&mut stream, &answer))
            .await
            .is_err()
        {
            return;
        }
    }
}
