//! Where intake messages come from: a JetStream durable pull consumer on a bounded stream
//! when the server has JetStream, a core NATS subscription otherwise; opened (and opened
//! again) with backoff until NATS answers.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::pull,
    stream::{DiscardPolicy, RetentionPolicy},
};
use async_nats::Subject;
use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{IntakeEnv, IntakeMode};
use crate::backoff::Backoff;
use crate::contract;

/// Durable consumer name of the node on its intake stream.
pub const CONSUMER_NAME: &str = "oc-discovery";
/// Unacknowledged JetStream intake messages are redelivered after this (a crashed node's).
const JS_ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages asked for by one pull request.
const JS_PULL_BATCH: usize = 2048;
/// Lifetime of one pull request.
const JS_PULL_EXPIRES: Duration = Duration::from_secs(5);
/// First wait before trying NATS again when no source could be opened.
const OPEN_RETRY_MIN: Duration = Duration::from_millis(100);

/// One message from either source.
pub(super) struct Incoming {
    pub(super) subject: Subject,
    pub(super) payload: Bytes,
    /// Where to answer (core NATS requests only: with JetStream the server's PubAck answers).
    pub(super) reply: Option<Subject>,
    /// The JetStream message to acknowledge.
    pub(super) js: Option<JsDelivery>,
}

pub(super) struct JsDelivery {
    pub(super) message: jetstream::Message,
    pub(super) stream_seq: u64,
    /// Delivered before, as the server counts (logged; whatever it says, the stream sequence
    /// is checked against the journaled ones).
    pub(super) redelivered: bool,
}

pub(super) type Source = Pin<Box<dyn Stream<Item = Incoming> + Send>>;

impl IntakeEnv {
    /// Waits for NATS, then picks JetStream when the server has it, core NATS otherwise.
    pub(super) async fn open_source(&self) -> (IntakeMode, Source) {
        let mut backoff = Backoff::new(OPEN_RETRY_MIN, self.backoff_max);
        loop {
            if crate::nats::is_connected(&self.nats) {
                if !self.nats.server_info().jetstream {
                    match self.nats.subscribe(contract::SUBJECT_PROPAGATION).await {
                        Ok(sub) => {
                            // The server must hold the SUB before /healthz says ready, or a
                            // request sent right after gets "no responders" (a flush only
                            // writes it to the socket).
                            if !crate::nats::subscriptions_confirmed(&self.nats, self.io_timeout).await {
                                tracing::warn!("subscription not confirmed by the server in time");
                            }
                            tracing::warn!(
                                subject = contract::SUBJECT_PROPAGATION,
                                "NATS has no JetStream: core subscription, events published while this node is down are lost"
                            );
                            let source = sub.map(|m| Incoming {
                                subject: m.subject,
                                payload: m.payload,
                                reply: m.reply,
                                js: None,
                            });
                            return (IntakeMode::Core, Box::pin(source));
                        }
                        Err(e) => tracing::warn!(cause = %e, "cannot subscribe"),
                    }
                } else {
                    match self.open_jetstream().await {
                        Ok(source) => return (IntakeMode::JetStream, source),
                        Err(e) => {
                            tracing::warn!(cause = %e, stream = %self.stream_name, retry_in = ?backoff.current(), "cannot set up JetStream intake")
                        }
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn open_jetstream(&self) -> Result<Source, Box<dyn std::error::Error + Send + Sync>> {
        let js = jetstream::new(self.nats.clone());
        let max_bytes = i64::try_from(self.stream_max_bytes).unwrap_or(i64::MAX);
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: self.stream_name.clone(),
                subjects: vec![contract::SUBJECT_PROPAGATION.to_owned()],
                // Kept until every consumer (ours, and any an operator adds) acknowledged.
                retention: RetentionPolicy::Interest,
                storage: jetstream::stream::StorageType::File,
                // Full: the server refuses the publish and the application learns it.
                max_bytes,
                max_age: self.stream_max_age,
                discard: DiscardPolicy::New,
                ..Default::default()
            })
            .await?;
        self.bound_existing(&js, stream.cached_info().config.clone(), max_bytes)
            .await;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                CONSUMER_NAME,
                pull::Config {
                    durable_name: Some(CONSUMER_NAME.to_owned()),
                    filter_subject: contract::SUBJECT_PROPAGATION.to_owned(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: JS_ACK_WAIT,
                    max_ack_pending: self.max_ack_pending,
                    ..Default::default()
                },
            )
            .await?;
        // Small, short-lived pull requests: after a crash, what the server had handed to the
        // dead client's request comes back after `JS_ACK_WAIT`, and nothing else is held.
        let messages = consumer
            .stream()
            .max_messages_per_batch(JS_PULL_BATCH)
            .expires(JS_PULL_EXPIRES)
            .messages()
            .await?;
        if let Ok(mut slot) = self.consumer.lock() {
            *slot = Some(consumer);
        }
        tracing::info!(stream = %self.stream_name, consumer = CONSUMER_NAME, "JetStream intake ready");
        let metrics = self.metrics.clone();
        let source = messages.filter_map(move |m| {
            futures::future::ready(match m {
                Ok(message) => {
                    let (stream_seq, redelivered) = message
                        .info()
                        .map(|i| {
                            let pending = i64::try_from(i.pending).unwrap_or(i64::MAX);
                            metrics.intake_pending.set(pending);
                            (i.stream_sequence, i.delivered > 1)
                        })
                        .unwrap_or((0, true));
                    Some(Incoming {
                        subject: message.subject.clone(),
                        payload: message.payload.clone(),
                        reply: None,
                        js: Some(JsDelivery {
                            message,
                            stream_seq,
                            redelivered,
                        }),
                    })
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "JetStream intake error");
                    None
                }
            })
        });
        Ok(Box::pin(source))
    }

    /// A stream made by an earlier version (or an operator) keeps its subjects, retention
    /// and storage, and gets this node's limits; when the server refuses the update, it
    /// is used as it is, and the log says so.
    async fn bound_existing(
        &self,
        js: &jetstream::Context,
        config: jetstream::stream::Config,
        max_bytes: i64,
    ) {
        if config.max_bytes == max_bytes
            && config.max_age == self.stream_max_age
            && config.discard == DiscardPolicy::New
        {
            return;
        }
        let was = (config.max_bytes, config.max_age, config.discard);
        let updated = jetstream::stream::Config {
            max_bytes,
            max_age: self.stream_max_age,
            discard: DiscardPolicy::New,
            ..config
        };
        match js.update_stream(updated).await {
            Ok(_) => tracing::info!(
                stream = %self.stream_name,
                max_bytes,
                max_age = ?self.stream_max_age,
                was = ?was,
                "intake stream limits updated"
            ),
            Err(e) => tracing::warn!(
                stream = %self.stream_name,
                cause = %e,
                was = ?was,
                "cannot update the intake stream's limits; it keeps its own"
            ),
        }
    }
}
