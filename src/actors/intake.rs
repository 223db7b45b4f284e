//! NATS intake actor: consumes `PROPALGATION_EVENT`, validates, appends accepted events to
//! the journal in batches (one durable commit per batch), then answers each application
//! and tells the StreamService the journal grew.
//!
//! Two sources, chosen at start-up:
//! - **JetStream** (when the server has it): a stream captures the subject and a durable
//!   pull consumer feeds the actor. The stream is bounded (`--intake-max-bytes`,
//!   `--intake-max-age`) with `discard: new`: when full, the server refuses a publish (the
//!   application's request gets an error instead of a PubAck) rather than the disk filling;
//!   an existing stream gets these limits at start-up. A message is acknowledged only after
//!   its journal commit (or its error event), so events published while the node is down
//!   wait in the stream.
//!   The stream sequences of journaled messages are committed with the journal, so a
//!   redelivery after a crash (its ack lost) is recognised and not journaled twice.
//! - **Core NATS** otherwise: a plain subscription; the node says so at start-up and on
//!   `/healthz`, since events published while it is down are lost.
//!
//! Messages are handled one batch at a time (`ctx.wait`): while a batch is being committed
//! the actor reads nothing else, so a slow disk slows intake instead of growing memory.
//! What arrived meanwhile is the next batch ([`ReadyBatches`]): the slower the commit, the
//! bigger the group it makes.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_nats::jetstream::{
    self,
    consumer::pull,
    stream::{DiscardPolicy, RetentionPolicy},
    AckKind,
};
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures::{Future, Stream, StreamExt};
use serde_json::json;

use crate::commands::router::Dispatch;
use super::stream_service::JournalAdvanced;
use crate::event::{self, Decoded, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::store::Store;

/// Durable consumer name of the node on its intake stream.
pub const CONSUMER_NAME: &str = "oc-discovery";
/// Unacknowledged JetStream intake messages are redelivered after this (a crashed node's).
const JS_ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages asked for by one pull request.
const JS_PULL_BATCH: usize = 2048;
/// Lifetime of one pull request.
const JS_PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often journaled stream sequences below the consumer's ack floor are forgotten.
const INTAKE_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long core-NATS intake retries a failing journal before answering `store_unavailable`.
const CORE_RETRY_BUDGET: Duration = Duration::from_secs(5);

/// Where events come from; shown on `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IntakeMode {
    Starting = 0,
    Core = 1,
    JetStream = 2,
    Stopped = 3,
}

impl IntakeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IntakeMode::Starting => "starting",
            IntakeMode::Core => "core",
            IntakeMode::JetStream => "jetstream",
            IntakeMode::Stopped => "stopped",
        }
    }
}

/// The intake's mode, readable by the admin API.
#[derive(Default)]
pub struct IntakeStatus(AtomicU8);

impl IntakeStatus {
    pub fn mode(&self) -> IntakeMode {
        match self.0.load(Ordering::Relaxed) {
            1 => IntakeMode::Core,
            2 => IntakeMode::JetStream,
            3 => IntakeMode::Stopped,
            _ => IntakeMode::Starting,
        }
    }

    fn set(&self, mode: IntakeMode) {
        self.0.store(mode as u8, Ordering::Relaxed);
    }
}

/// One message from either source.
struct Incoming {
    subject: Subject,
    payload: Bytes,
    /// Where to answer (core NATS requests only: with JetStream the server's PubAck answers).
    reply: Option<Subject>,
    /// The JetStream message to acknowledge.
    js: Option<JsDelivery>,
}

struct JsDelivery {
    message: jetstream::Message,
    stream_seq: u64,
    /// Delivered before: it may have been journaled by a run that died before acking.
    redelivered: bool,
}

type Source = Pin<Box<dyn Stream<Item = Incoming> + Send>>;

/// Like `ready_chunks`: each item is every message already received, up to `max`, and only
/// waits when there is none. Unlike it, a batch is not cut at tokio's cooperative budget
/// (128 channel reads per poll), which made every journal commit a group of at most 128
/// events however many were waiting: intake topped out near 18 000 events/s while
/// JetStream delivered 95 000/s to a bare consumer (docs/PERFORMANCE.md).
struct ReadyBatches {
    source: Source,
    max: usize,
    /// The source ended (after a last partial batch): it is not polled again.
    ended: bool,
}

impl ReadyBatches {
    fn new(source: Source, max: usize) -> Self {
        ReadyBatches {
            source,
            max: max.max(1),
            ended: false,
        }
    }
}

impl Stream for ReadyBatches {
    type Item = Vec<Incoming>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Vec<Incoming>>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        let mut batch = Vec::new();
        while batch.len() < self.max {
            let next = tokio::task::coop::unconstrained(self.source.next());
            match std::pin::pin!(next).poll(cx) {
                Poll::Ready(Some(m)) => batch.push(m),
                Poll::Ready(None) => {
                    self.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        match (batch.is_empty(), self.ended) {
            (false, _) => Poll::Ready(Some(batch)),
            (true, true) => Poll::Ready(None),
            (true, false) => Poll::Pending,
        }
    }
}

pub struct Intake {
    env: Arc<IntakeEnv>,
    stopping: bool,
}

/// What processing a batch needs; shared with the batch futures.
pub struct IntakeEnv {
    pub own_id: String,
    pub store: Arc<dyn Store>,
    pub nats: Client,
    pub links: Recipient<JournalAdvanced>,
    /// Where searches and messages to chosen peers go.
    pub commands: Recipient<Dispatch>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<IntakeStatus>,
    pub max_event_bytes: usize,
    pub batch: usize,
    /// JetStream stream capturing `PROPALGATION_EVENT`.
    pub stream_name: String,
    /// Its limits: bytes held, age of a message never consumed (`discard: new`).
    pub stream_max_bytes: u64,
    pub stream_max_age: Duration,
    pub max_ack_pending: i64,
    pub backoff_max: Duration,
    pub io_timeout: Duration,
    /// The JetStream consumer, once set up (to read its ack floor).
    pub consumer: std::sync::Mutex<Option<jetstream::consumer::PullConsumer>>,
    /// Highest stream sequence known journaled (`Store::intake_high` when the JetStream
    /// intake opens, then each journaled batch): a message at or below it is checked
    /// against the store whatever its delivery count says.
    pub journaled_high: AtomicU64,
}

impl Intake {
    pub fn new(env: IntakeEnv) -> Self {
        Intake {
            env: Arc::new(env),
            stopping: false,
        }
    }

    fn open_source(&mut self, ctx: &mut Context<Self>) {
        let env = self.env.clone();
        ctx.wait(
            async move { env.open_source().await }
                .into_actor(self)
                .map(|(mode, source), act, ctx| {
                    act.env.status.set(mode);
                    ctx.add_stream(ReadyBatches::new(source, act.env.batch));
                }),
        );
    }
}

impl Actor for Intake {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.open_source(ctx);
        ctx.run_interval(INTAKE_PRUNE_EVERY, |act, _| {
            let env = act.env.clone();
            actix::spawn(async move { env.prune().await });
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.env.status.set(IntakeMode::Stopped);
    }
}

impl StreamHandler<Vec<Incoming>> for Intake {
    fn handle(&mut self, batch: Vec<Incoming>, ctx: &mut Self::Context) {
        let env = self.env.clone();
        ctx.wait(async move { env.process(batch).await }.into_actor(self));
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.stopping {
            return;
        }
        // A JetStream consumer stream ends when the server loses it; set it up again.
        tracing::warn!("intake source ended; reopening");
        self.env.status.set(IntakeMode::Starting);
        self.open_source(ctx);
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
        self.stopping = true;
        ctx.stop();
    }
}

impl IntakeEnv {
    /// Waits for NATS, then picks JetStream when the server has it, core NATS otherwise.
    async fn open_source(&self) -> (IntakeMode, Source) {
        let mut delay = Duration::from_millis(100);
        loop {
            if crate::nats::is_connected(&self.nats) {
                if !self.nats.server_info().jetstream {
                    match self.nats.subscribe(event::SUBJECT_PROPAGATION).await {
                        Ok(sub) => {
                            // The SUB must reach the server before /healthz says ready, or
                            // a request sent right after gets "no responders".
                            if !matches!(
                                tokio::time::timeout(self.io_timeout, self.nats.flush()).await,
                                Ok(Ok(()))
                            ) {
                                tracing::warn!("subscription not confirmed by the server in time");
                            }
                            tracing::warn!(
                                subject = event::SUBJECT_PROPAGATION,
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
                            tracing::warn!(cause = %e, stream = %self.stream_name, retry_in = ?delay, "cannot set up JetStream intake")
                        }
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.backoff_max);
        }
    }

    async fn open_jetstream(&self) -> Result<Source, Box<dyn std::error::Error + Send + Sync>> {
        let js = jetstream::new(self.nats.clone());
        let max_bytes = i64::try_from(self.stream_max_bytes).unwrap_or(i64::MAX);
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: self.stream_name.clone(),
                subjects: vec![event::SUBJECT_PROPAGATION.to_owned()],
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
                    filter_subject: event::SUBJECT_PROPAGATION.to_owned(),
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
        // Unknown: check every message against the store rather than risk a duplicate.
        let high = self.store.intake_high().await.unwrap_or(u64::MAX);
        self.journaled_high.fetch_max(high, Ordering::Relaxed);
        tracing::info!(stream = %self.stream_name, consumer = CONSUMER_NAME, "JetStream intake ready");
        let source = messages.filter_map(|m| async move {
            match m {
                Ok(message) => {
                    let (stream_seq, redelivered) = message
                        .info()
                        .map(|i| (i.stream_sequence, i.delivered > 1))
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
            }
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

    async fn process(&self, batch: Vec<Incoming>) {
        let journaled_before = self.journaled_before(&batch).await;
        // A redelivery can share a batch with its first delivery (one that waited past the
        // ack wait in the client): only the first is journaled.
        let mut in_batch = HashSet::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut replies: Vec<Option<Subject>> = Vec::with_capacity(batch.len());
        let mut stream_seqs = Vec::new();
        // Whether an error event went out, which must reach the server before the acks.
        let mut published = false;
        for msg in &batch {
            if let Some(js) = &msg.js {
                if js.redelivered {
                    tracing::debug!(stream_seq = js.stream_seq, "redelivered");
                }
                if journaled_before.contains(&js.stream_seq) || !in_batch.insert(js.stream_seq) {
                    tracing::debug!(
                        stream_seq = js.stream_seq,
                        "event journaled already (a redelivery, or a second delivery in this batch)"
                    );
                    continue;
                }
            }
            match event::decode_intake(&msg.payload, &self.own_id, self.max_event_bytes) {
                Ok(Decoded::Accept(e)) => {
                    events.push(e);
                    replies.push(msg.reply.clone());
                    stream_seqs.extend(msg.js.as_ref().map(|js| js.stream_seq));
                }
                Ok(Decoded::OwnEcho) => Metrics::add(&self.metrics.intake_echoes, 1),
                Ok(Decoded::Command(command)) => {
                    // Waits for room in the router's mailbox: intake slows, nothing is dropped.
                    let dispatch = Dispatch {
                        command,
                        reply: msg.reply.clone(),
                    };
                    if self.commands.send(dispatch).await.is_err() {
                        tracing::error!("command router stopped; command dropped");
                    }
                }
                Err(refusal) => {
                    self.refuse(msg, &refusal).await;
                    published = true;
                }
            }
        }
        let durable = batch.iter().any(|m| m.js.is_some());
        if !events.is_empty() {
            published |= !self.journal(events, replies, stream_seqs, durable).await;
        }
        if durable && published {
            // Error events must be on the server before their messages are acknowledged.
            if tokio::time::timeout(self.io_timeout, self.nats.flush())
                .await
                .is_err()
            {
                tracing::warn!("NATS flush timed out; intake messages stay unacknowledged and come back");
                return;
            }
        }
        for msg in batch {
            if let Some(js) = msg.js {
                if let Err(e) = js.message.ack_with(AckKind::Ack).await {
                    // Redelivered later, and recognised as journaled.
                    tracing::debug!(cause = %e, "cannot acknowledge intake message");
                }
            }
        }
    }

    /// Stream sequences of messages in `batch` that were journaled already. Checked: every
    /// redelivery, and every message at or below the highest stream sequence journaled
    /// (whatever its delivery count: a message a crashed node journaled must never be
    /// taken again); a first delivery above it cannot have been journaled.
    async fn journaled_before(&self, batch: &[Incoming]) -> Vec<u64> {
        let high = self.journaled_high.load(Ordering::Relaxed);
        let redelivered: Vec<u64> = batch
            .iter()
            .filter_map(|m| m.js.as_ref())
            .filter(|js| js.redelivered || js.stream_seq <= high)
            .map(|js| js.stream_seq)
            .collect();
        if redelivered.is_empty() {
            return Vec::new();
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match self.store.intake_seen(redelivered.clone()).await {
                Ok(seen) => return seen,
                Err(e) => {
                    tracing::error!(cause = %e, retry_in = ?delay, "cannot check redelivered events; intake waits");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.backoff_max);
                }
            }
        }
    }

    /// Forgets journaled stream sequences the server will never redeliver.
    async fn prune(&self) {
        let consumer = self.consumer.lock().ok().and_then(|c| c.clone());
        let Some(mut consumer) = consumer else { return };
        match consumer.info().await {
            Ok(info) => {
                let floor = info.ack_floor.stream_sequence;
                if let Err(e) = self.store.intake_forget_below(floor).await {
                    tracing::debug!(cause = %e, "cannot prune intake records");
                }
            }
            Err(e) => tracing::debug!(cause = %e, "cannot read the intake consumer's ack floor"),
        }
    }

    /// Appends the batch; retries while the store is down (JetStream keeps the messages, so
    /// waiting is lossless), within a budget for core NATS whose messages cannot wait.
    /// Returns false when the events were refused (an error event was published).
    async fn journal(
        &self,
        events: Vec<event::NewEvent>,
        replies: Vec<Option<Subject>>,
        stream_seqs: Vec<u64>,
        durable_source: bool,
    ) -> bool {
        let count = events.len();
        let stream_range = (
            stream_seqs.iter().min().copied(),
            stream_seqs.iter().max().copied(),
        );
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        let entries = loop {
            match self
                .store
                .append_journal_marked(&self.own_id, events.clone(), stream_seqs.clone())
                .await
            {
                Ok(entries) => break Ok(entries),
                Err(e) if durable_source || started.elapsed() < CORE_RETRY_BUDGET => {
                    tracing::error!(cause = %e, count, retry_in = ?delay, "journal append failed; intake waits");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.backoff_max);
                }
                Err(e) => break Err(e),
            }
        };
        match entries {
            Ok(entries) => {
                if let Some(last) = stream_range.1 {
                    self.journaled_high.fetch_max(last, Ordering::Relaxed);
                }
                Metrics::add(&self.metrics.intake_accepted, count as u64);
                Metrics::add(&self.metrics.journal_commits, 1);
                for (entry, reply) in entries.iter().zip(replies) {
                    if let Some(reply) = reply {
                        let body = json!({"ok": true, "origin": entry.origin, "seq": entry.seq});
                        self.send(reply, body).await;
                    }
                }
                if let Some(last) = entries.last() {
                    tracing::debug!(count, head = last.seq, stream_first = ?stream_range.0, stream_last = ?stream_range.1, "journaled");
                    self.links.do_send(JournalAdvanced { head: last.seq });
                }
                true
            }
            Err(e) => {
                // Core NATS has no redelivery: the application learns it must retry.
                tracing::error!(cause = %e, count, "journal append failed; events refused");
                let refusal = Refusal::new(ErrorCode::StoreUnavailable, format!("not journaled: {e}"));
                self.metrics.refused("intake", refusal.code);
                let error_event = json!({"error": refusal.to_json(), "subject": event::SUBJECT_PROPAGATION, "count": count});
                self.send(Subject::from_static(event::SUBJECT_ERROR), error_event)
                    .await;
                for reply in replies.into_iter().flatten() {
                    self.send(reply, json!({"ok": false, "error": refusal.to_json()}))
                        .await;
                }
                false
            }
        }
    }

    /// Reply (when asked), error event, log line and metric for one refused message.
    async fn refuse(&self, msg: &Incoming, refusal: &Refusal) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn incoming(i: usize) -> Incoming {
        Incoming {
            subject: Subject::from_static(event::SUBJECT_PROPAGATION),
            payload: Bytes::from(i.to_string()),
            reply: None,
            js: None,
        }
    }

    /// A source fed by a tokio channel, whose reads count against the cooperative budget.
    fn channel_source(n: usize) -> Source {
        let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
        for i in 0..n {
            tx.try_send(incoming(i)).unwrap();
        }
        drop(tx);
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))
    }

    #[tokio::test]
    async fn a_batch_is_everything_waiting_not_cut_at_the_budget() {
        let mut batches = ReadyBatches::new(channel_source(3000), 2048);
        let sizes: Vec<usize> = std::iter::from_fn(|| batches.next().now_or_never().flatten())
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, vec![2048, 952], "tokio's budget is 128 reads per poll");
        assert!(
            matches!(batches.next().now_or_never(), Some(None)),
            "ended for good"
        );
    }
}
