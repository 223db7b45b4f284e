//! NATS intake actor: consumes `PROPALGATION_EVENT`, validates, appends accepted events to
//! the journal in batches (one durable commit per batch), then answers each application
//! and tells the StreamService the journal grew.
//!
//! Messages are handled one batch at a time (`ctx.wait`): while a batch is being committed
//! the actor reads nothing else, so a slow disk slows intake instead of growing memory.

use std::sync::Arc;

use actix::prelude::*;
use async_nats::{Client, Message, Subject, Subscriber};
use futures::StreamExt;
use serde_json::json;

use super::stream_service::JournalAdvanced;
use crate::event::{self, Decoded, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::store::Store;

pub struct Intake {
    env: Arc<IntakeEnv>,
    subscriber: Option<Subscriber>,
    batch: usize,
}

/// What processing a batch needs; shared with the batch futures.
pub struct IntakeEnv {
    pub own_id: String,
    pub store: Arc<dyn Store>,
    pub nats: Client,
    pub links: Recipient<JournalAdvanced>,
    pub metrics: Arc<Metrics>,
    pub max_event_bytes: usize,
}

impl Intake {
    pub fn new(env: IntakeEnv, subscriber: Subscriber, batch: usize) -> Self {
        Intake {
            env: Arc::new(env),
            subscriber: Some(subscriber),
            batch,
        }
    }
}

impl Actor for Intake {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(sub) = self.subscriber.take() {
            // ready_chunks: whatever is already buffered forms one batch, never waiting
            // for more, so a lone event is journaled at once.
            ctx.add_stream(sub.ready_chunks(self.batch));
        }
        tracing::info!(subject = event::SUBJECT_PROPAGATION, "intake started");
    }
}

impl StreamHandler<Vec<Message>> for Intake {
    fn handle(&mut self, batch: Vec<Message>, ctx: &mut Self::Context) {
        let env = self.env.clone();
        ctx.wait(async move { env.process(batch).await }.into_actor(self));
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        tracing::warn!("intake subscription ended");
        ctx.stop();
    }
}

impl IntakeEnv {
    async fn process(&self, batch: Vec<Message>) {
        let mut events = Vec::with_capacity(batch.len());
        let mut replies: Vec<Option<Subject>> = Vec::with_capacity(batch.len());
        for msg in &batch {
            match event::decode_intake(&msg.payload, &self.own_id, self.max_event_bytes) {
                Ok(Decoded::Accept(e)) => {
                    events.push(e);
                    replies.push(msg.reply.clone());
                }
                Ok(Decoded::OwnEcho) => Metrics::add(&self.metrics.intake_echoes, 1),
                Err(refusal) => self.refuse(msg, &refusal).await,
            }
        }
        if events.is_empty() {
            return;
        }
        let count = events.len();
        match self.store.append_journal(&self.own_id, events).await {
            Ok(entries) => {
                Metrics::add(&self.metrics.intake_accepted, count as u64);
                for (entry, reply) in entries.iter().zip(replies) {
                    if let Some(reply) = reply {
                        let body = json!({"ok": true, "origin": entry.origin, "seq": entry.seq});
                        self.send(reply, body).await;
                    }
                }
                if let Some(last) = entries.last() {
                    tracing::debug!(count, head = last.seq, "journaled");
                    self.links.do_send(JournalAdvanced { head: last.seq });
                }
            }
            Err(e) => {
                // Core NATS has no redelivery: the application learns it must retry.
                tracing::error!(cause = %e, count, "journal append failed");
                let refusal =
                    Refusal::new(ErrorCode::StoreUnavailable, format!("not journaled: {e}"));
                for reply in replies.into_iter().flatten() {
                    self.metrics.refused("intake", refusal.code);
                    self.send(reply, json!({"ok": false, "error": refusal.to_json()}))
                        .await;
                }
            }
        }
    }

    /// Reply (when asked), error event, log line and metric for one refused message.
    async fn refuse(&self, msg: &Message, refusal: &Refusal) {
        tracing::warn!(
            subject = %msg.subject,
            code = refusal.code.as_str(),
            reason = %refusal.message,
            bytes = msg.payload.len(),
            "event refused"
        );
        self.metrics.refused("intake", refusal.code);
        let error_event = event::error_event(refusal, event::SUBJECT_PROPAGATION, &msg.payload);
        self.send(Subject::from_static(event::SUBJECT_ERROR), error_event)
            .await;
        if let Some(reply) = msg.reply.clone() {
            self.send(reply, json!({"ok": false, "error": refusal.to_json()}))
                .await;
        }
    }

    async fn send(&self, subject: Subject, body: serde_json::Value) {
        let bytes = body.to_string().into_bytes();
        if let Err(e) = self.nats.publish(subject.clone(), bytes.into()).await {
            tracing::warn!(%subject, cause = %e, "cannot publish answer");
        }
    }
}

/// Stop consuming `PROPALGATION_EVENT` (shutdown); the batch in progress completes first.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopIntake;

impl Handler<StopIntake> for Intake {
    type Result = ();

    fn handle(&mut self, _: StopIntake, ctx: &mut Self::Context) {
        tracing::info!("intake stopping");
        ctx.stop();
    }
}
