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
//! What arrived meanwhile is the next batch (`batches::ReadyBatches`): the slower the commit, the
//! bigger the group it makes.
//!
//! Files: `source` (JetStream or core NATS), `batches` (group commit), `process` (one
//! batch: decode, journal, answer, acknowledge); this file: the actor and its status.

mod batches;
mod process;
mod source;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_nats::jetstream;
use async_nats::Client;

pub use self::source::CONSUMER_NAME;

use self::batches::ReadyBatches;
use self::source::Incoming;
use crate::answers::Answers;
use crate::commands::router::Dispatch;
use crate::metrics::Metrics;
use crate::outbound::service::JournalAdvanced;
use crate::store::Store;

/// The `place` of the intake's refusals (log lines, `oc_refusals_total`).
pub(crate) const PLACE: &str = "intake";
/// How often journaled stream sequences the server can no longer deliver are forgotten.
const INTAKE_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where events come from; shown on `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum IntakeMode {
    Starting = 0,
    Core = 1,
    JetStream = 2,
    Stopped = 3,
}

impl IntakeMode {
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn mode(&self) -> IntakeMode {
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

pub(crate) struct Intake {
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
    /// Replies and refusal reports, under [`PLACE`].
    pub answers: Answers,
    /// Told of every journal commit (the live feed).
    pub feed: Arc<crate::feed::Feed>,
}

impl Intake {
    /// The intake over `env`, which `POST /api/events` shares ([`IntakeEnv::submit`]).
    pub(crate) fn new(env: Arc<IntakeEnv>) -> Self {
        Intake { env, stopping: false }
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
pub(crate) struct StopIntake;

impl Handler<StopIntake> for Intake {
    type Result = ();

    fn handle(&mut self, _: StopIntake, ctx: &mut Self::Context) {
        tracing::info!("intake stopping");
        self.stopping = true;
        ctx.stop();
    }
}
