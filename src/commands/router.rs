//! The NATS side of the commands: the `CommandRouter` actor takes each command the intake
//! decoded, fans `PB_CONSIDERS` out to the listed peers, queues `PB_PLANNER` on the peer's
//! planner stream, closes it on `PB_CLOSE_PLANNER`, hands `PB_SEARCH` to the search service,
//! and answers the application (reply, or the one refusal report of [`Answers`]).

use std::collections::HashSet;
use std::sync::Arc;

use actix::prelude::*;
use async_nats::Subject;
use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use serde_json::{json, Value};

use super::planner::{PlannerEnded, Planners};
use super::{encode, forward_frame, Delivery, Encoded, PROTOCOL_CONSIDERS};
use crate::answers::{Answers, Refused};
use crate::config::Tuning;
use crate::contract::{self, AppCommand, CommandAction, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, ForwardFrame};
use crate::p2p::{self};
use crate::peers::directory::Directory;

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
pub(crate) struct SearchRequest {
    pub command: AppCommand,
    pub reply: Option<Subject>,
}

pub(crate) struct CommandEnv {
    pub nats: async_nats::Client,
    pub net: p2p::Client,
    /// Reaches the peers a command names (the directory's `reach`).
    pub directory: Arc<Directory>,
    pub search: Option<Recipient<SearchRequest>>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
}

pub(crate) struct CommandRouter {
    delivery: Arc<Delivery>,
    search: Option<Recipient<SearchRequest>>,
    planners: Planners,
}

impl CommandRouter {
    pub(crate) fn new(env: CommandEnv) -> Self {
        let delivery = Arc::new(Delivery {
            net: env.net,
            directory: env.directory,
            answers: Answers::new(env.nats, env.metrics.clone(), "commands"),
            metrics: env.metrics,
            tuning: env.tuning,
        });
        CommandRouter {
            planners: Planners::new(delivery.clone()),
            delivery,
            search: env.search,
        }
    }

    /// Hands `PB_SEARCH` over; refused when there is no search service or it is saturated.
    fn search(&self, command: AppCommand, reply: Option<Subject>) {
        let Some(search) = &self.search else {
            let refusal = Refusal::new(
                ErrorCode::UnsupportedAction,
                "search is not available on this node",
            );
            return self.refuse_later(command, reply, refusal);
        };
        if let Err(e) = search.try_send(SearchRequest { command, reply }) {
            let SearchRequest { command, reply } = e.into_inner();
            let refusal = Refusal::new(ErrorCode::Busy, "the search service is saturated; retry");
            self.refuse_later(command, reply, refusal);
        }
    }

    /// Reports a refused command without holding the actor up.
    fn refuse_later(&self, command: AppCommand, reply: Option<Subject>, refusal: Refusal) {
        let d = self.delivery.clone();
        actix::spawn(async move { refuse(&d, &command, reply, &refusal).await });
    }
}

impl Actor for CommandRouter {
    type Context = Context<Self>;
}

impl Handler<PlannerEnded> for CommandRouter {
    type Result = ();

    fn handle(&mut self, msg: PlannerEnded, _: &mut Self::Context) {
        self.planners.ended(&msg);
    }
}

impl Handler<Dispatch> for CommandRouter {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, ctx: &mut Self::Context) {
        let Dispatch { command, reply } = msg;
        let d = self.delivery.clone();
        match command.action {
            CommandAction::Search => self.search(command, reply),
            CommandAction::Considers => {
                actix::spawn(async move { considers(&d, command, reply).await });
            }
            CommandAction::Planner => match peer_field(&command.payload) {
                Ok(peer) => {
                    let ended = ctx.address().recipient();
                    match self.planners.queue(peer, &forward_frame(&command), ended) {
                        Ok(()) => {
                            let answer = json!({"ok": true, "peer_id": peer.to_string()});
                            actix::spawn(async move { d.answers.reply(reply, &answer).await });
                        }
                        Err(refusal) => self.refuse_later(command, reply, refusal),
                    }
                }
                Err(refusal) => self.refuse_later(command, reply, refusal),
            },
            CommandAction::ClosePlanner => match peer_field(&command.payload) {
                Ok(peer) => {
                    // Dropping the queue ends the writer task, which closes the stream.
                    let existed = self.planners.close(&peer);
                    tracing::info!(%peer, existed, "planner stream closed");
                    let answer = json!({"ok": true, "peer_id": peer.to_string(), "closed": existed});
                    actix::spawn(async move { d.answers.reply(reply, &answer).await });
                }
                Err(refusal) => self.refuse_later(command, reply, refusal),
            },
        }
    }
}

pub fn peer_field(payload: &Value) -> Result<PeerId, Refusal> {
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

/// The refusal report of a command: log line, metric, error event echoing the payload,
/// and the reply.
async fn refuse(d: &Delivery, command: &AppCommand, reply: Option<Subject>, refusal: &Refusal) {
    let payload = command.payload.to_string();
    let refused = Refused {
        subject: contract::SUBJECT_PROPAGATION,
        action: Some(command.action.as_str()),
        body: payload.as_bytes(),
        reply,
    };
    d.answers.refuse(refused, refusal).await;
}

async fn considers(d: &Delivery, command: AppCommand, reply: Option<Subject>) {
    let Some(list) = command.payload.get("peer_ids").and_then(Value::as_array) else {
        let refusal = Refusal::new(ErrorCode::MissingField, "missing array field payload.peer_ids");
        return refuse(d, &command, reply, &refusal).await;
    };
    if list.len() > contract::MAX_COMMAND_PEERS {
        // Checked when decoded already; kept here so the fan-out is bounded whoever calls.
        let refusal = Refusal::new(
            ErrorCode::InvalidField,
            format!(
                "payload.peer_ids names more than {} peers",
                contract::MAX_COMMAND_PEERS
            ),
        );
        return refuse(d, &command, reply, &refusal).await;
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
                Ok(peer) => send_once(d, peer, PROTOCOL_CONSIDERS, frame).await,
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
        d.answers
            .reply(reply, &json!({"ok": true, "delivered": delivered}))
            .await;
        return;
    }
    let names: Vec<&str> = failed.iter().filter_map(|f| f["peer_id"].as_str()).collect();
    tracing::warn!(unreachable = ?names, "PB_CONSIDERS not delivered to every peer");
    d.metrics.refused("commands", ErrorCode::Unreachable);
    let error = Refusal::new(
        ErrorCode::Unreachable,
        format!("not delivered to {}", names.join(", ")),
    );
    let body = json!({"error": error.to_json(), "subject": contract::SUBJECT_PROPAGATION, "action": "PB_CONSIDERS", "unreachable": failed});
    d.answers
        .publish(Subject::from_static(contract::SUBJECT_ERROR), &body)
        .await;
    d.answers
        .reply(
            reply,
            &json!({"ok": false, "error": error.to_json(), "delivered": delivered, "unreachable": failed}),
        )
        .await;
}

/// Opens a stream, sends one frame, waits for the peer's `ack`.
async fn send_once(
    d: &Delivery,
    peer: PeerId,
    protocol: StreamProtocol,
    frame: Encoded,
) -> Result<(), String> {
    let t = d.tuning.io_timeout;
    let mut stream = d.open(peer, protocol).await?;
    let exchange = async {
        wire::write_encoded(&mut stream, &frame)
            .await
            .map_err(|e| e.to_string())?;
        match wire::read_frame::<ForwardFrame, _>(&mut stream, d.tuning.max_frame_bytes).await {
            Ok(Some(ForwardFrame::Ack { .. })) => Ok(()),
            Ok(Some(ForwardFrame::Error(ErrorFrame { code, message, .. }))) => {
                Err(format!("{code}: {message}"))
            }
            other => Err(format!("no acknowledgement: {other:?}")),
        }
    };
    let result = tokio::time::timeout(t, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {t:?}")));
    let _ = tokio::time::timeout(t, stream.close()).await;
    result
}
