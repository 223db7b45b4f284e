//! Remote copy of files and directories to a partner (`protocols/copy.md`): a job per copy
//! on the sending node, kept on disk so that it survives a restart, and the receiving side
//! that writes only below `--copy-root`.
//!
//! - [`job`]: the sender: jobs (`queued`, `running`, `done`, `failed`), their files under
//!   `<data-dir>/copies/`, the transfer that resumes from the receiver's offset.
//! - [`receive`]: the receiver: checks the offer, keeps the partial file and its offset in
//!   `<copy-root>/.oc-copy/`, acknowledges each chunk once on disk, checks the SHA-256 and
//!   renames the file (or the unpacked directory) into place.
//! - [`archive`]: the deterministic tar of a directory, and the check of a received one.
//! - [`ledger`]: the offset and acknowledgement rules, pure.
//! - [`remotecopy`]: the NATS `REMOTECOPY` subject.
//!
//! [`CopyService`] is the one handle the admin API, the NATS subject and the stream
//! acceptor share.

pub mod archive;
pub mod job;
pub mod ledger;
pub mod receive;
pub mod remotecopy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{watch, Semaphore};

use crate::config::Tuning;
use crate::contract::{ErrorCode, Refusal};
use crate::guard::{LogThrottle, PeerPool};
use crate::metrics::Metrics;
use crate::p2p;
use crate::peers::partners::Partners;

pub use job::{CopyRequest, Job, JobState};

/// The copy stream protocol.
pub const PROTOCOL_COPY: StreamProtocol = StreamProtocol::new("/opencloud/copy/1.0");
pub use crate::config::{CopySettings, DEFAULT_COPY_MAX_BYTES, DEFAULT_COPY_MAX_PER_PEER};
/// Copies received at once from all partners together.
const MAX_INBOUND_COPIES: usize = 16;
/// Refusals being written at once, in all and per peer; beyond, the stream is reset.
const MAX_REFUSALS: usize = 64;
const REFUSALS_PER_PEER: usize = 4;
/// Copies this node sends at once; the others wait `queued`.
const MAX_RUNNING_COPIES: usize = 4;
/// Jobs `queued` or `running` at once; beyond, a new copy is refused `busy`.
const MAX_ACTIVE_JOBS: usize = 64;
/// Finished jobs kept (listed by `GET /api/copies`); the oldest are forgotten beyond.
const MAX_FINISHED_JOBS: usize = 256;
/// A repeated refusal of one peer is logged once per this interval.
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// The `place` of this module's refusals (`oc_refusals_total`, log lines).
pub(crate) const PLACE: &str = "copy";

/// Why the copy service cannot start as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopySetupError {
    #[error("{flag} {}: {source}", path.display())]
    Root {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the copy service works with.
pub(crate) struct CopyEnv {
    pub data_dir: PathBuf,
    pub settings: CopySettings,
    pub net: p2p::Client,
    pub nats: async_nats::Client,
    pub partners: Arc<Partners>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    pub shutdown: watch::Receiver<bool>,
}

/// The counters of `/metrics` this module adds (docs/METRICS.md).
pub(crate) struct CopyMetrics {
    /// Chunk bytes written to copy streams, resends included.
    pub bytes_sent: Counter,
    /// Chunk bytes received and written to disk.
    pub bytes_received: Counter,
    /// Copies finished by this node as sender, by outcome.
    pub sent_done: Counter,
    pub sent_failed: Counter,
    /// Copies put in place by this node as receiver.
    pub received_done: Counter,
    registry: Registry,
}

impl CopyMetrics {
    fn new() -> CopyMetrics {
        let mut m = CopyMetrics {
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            sent_done: Counter::default(),
            sent_failed: Counter::default(),
            received_done: Counter::default(),
            registry: Registry::default(),
        };
        let mut r = Registry::default();
        r.register(
            "oc_copy_bytes_sent",
            "Copy chunk bytes sent, resends included",
            m.bytes_sent.clone(),
        );
        r.register(
            "oc_copy_bytes_received",
            "Copy chunk bytes received and written",
            m.bytes_received.clone(),
        );
        r.register(
            "oc_copies_sent_done",
            "Copies sent and confirmed by the receiver",
            m.sent_done.clone(),
        );
        r.register(
            "oc_copies_sent_failed",
            "Copies sent that failed",
            m.sent_failed.clone(),
        );
        r.register(
            "oc_copies_received_done",
            "Copies received and put in place",
            m.received_done.clone(),
        );
        m.registry = r;
        m
    }
}

/// The remote copy service: sending jobs and receiving streams.
pub struct CopyService {
    env: CopyEnv,
    pub(crate) metrics: CopyMetrics,
    jobs: Mutex<HashMap<String, Job>>,
    /// Permits of the jobs transferring now (the others are `queued`).
    running: Arc<Semaphore>,
    /// Inbound copy streams: a bounded share per partner.
    inbound: Arc<PeerPool>,
    /// Refusals being written (`not_partner`, `busy`): a bounded share per peer.
    refusals: Arc<PeerPool>,
    /// The stream receiving each (peer, copy id) now, so that a new stream of the same copy
    /// takes over from a stale one instead of writing the same file beside it.
    receiving: Mutex<HashMap<String, Arc<receive::Slot>>>,
    log: LogThrottle,
    /// The node's multi-thread runtime: jobs run there, whoever submits them (the admin
    /// API's handlers run on a worker runtime of their own).
    runtime: tokio::runtime::Handle,
}

impl CopyService {
    /// Prepares `--copy-root` (created if missing) and `--copy-source-root` (must exist),
    /// loads the jobs left by a previous run, resumes the unfinished ones, starts accepting
    /// copy streams and the `REMOTECOPY` subject.
    ///
    /// # Errors
    /// A copy root that cannot be created, or a source root that is not a directory.
    pub(crate) async fn start(mut env: CopyEnv) -> Result<Arc<CopyService>, CopySetupError> {
        if let Some(root) = env.settings.root.take() {
            let prepared = std::fs::create_dir_all(&root).and_then(|()| root.canonicalize());
            env.settings.root = Some(prepared.map_err(|source| CopySetupError::Root {
                flag: "--copy-root",
                path: root.clone(),
                source,
            })?);
        }
        if let Some(root) = env.settings.source_root.take() {
            let checked = root.canonicalize().and_then(|p| {
                if p.is_dir() {
                    Ok(p)
                } else {
                    Err(std::io::Error::other("not a directory"))
                }
            });
            env.settings.source_root = Some(checked.map_err(|source| CopySetupError::Root {
                flag: "--copy-source-root",
                path: root.clone(),
                source,
            })?);
        }
        let per_peer = env.settings.max_per_peer.max(1);
        let service = Arc::new(CopyService {
            metrics: CopyMetrics::new(),
            jobs: Mutex::new(HashMap::new()),
            running: Arc::new(Semaphore::new(MAX_RUNNING_COPIES)),
            inbound: PeerPool::new(MAX_INBOUND_COPIES, per_peer),
            refusals: PeerPool::new(MAX_REFUSALS, REFUSALS_PER_PEER),
            receiving: Mutex::new(HashMap::new()),
            log: LogThrottle::new(REFUSAL_LOG_EVERY),
            runtime: tokio::runtime::Handle::current(),
            env,
        });
        job::resume_all(&service);
        service.clone().accept();
        remotecopy::spawn(service.clone()).await;
        Ok(service)
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.metrics.registry
    }

    fn jobs_dir(&self) -> PathBuf {
        self.env.data_dir.join(job::JOBS_DIR)
    }

    /// A job by id.
    pub fn job(&self, id: &str) -> Option<Job> {
        self.jobs.lock().ok()?.get(id).cloned()
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Vec<Job> {
        let mut all: Vec<Job> = match self.jobs.lock() {
            Ok(jobs) => jobs.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| b.id.cmp(&a.id)));
        all
    }

    /// Checks a copy request and queues its job.
    ///
    /// # Errors
    /// The refusal to answer: no `--copy-source-root`, a source outside it or too large, a
    /// peer that is not a partner, an unsafe destination, too many jobs.
    pub fn submit(self: &Arc<Self>, req: CopyRequest) -> Result<Job, Refusal> {
        job::submit(self, req)
    }

    /// Accepts copy streams: partners only, a bounded share per partner.
    fn accept(self: Arc<Self>) {
        let Some(mut incoming) = self.env.net.accept(PROTOCOL_COPY) else {
            tracing::error!(protocol = %PROTOCOL_COPY, "protocol already registered");
            return;
        };
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                receive::incoming(&self, peer, stream);
            }
        });
    }

    /// A refusal of `peer`: counted, logged once per interval per peer and code.
    pub(crate) fn refused(&self, peer: PeerId, code: ErrorCode, why: &str) {
        self.env.metrics.refused(PLACE, code);
        if let Some(count) = self.log.hit(peer, code.as_str()) {
            tracing::warn!(%peer, code = code.as_str(), count, reason = why, "copy refused");
        }
    }
}

/// `path` canonical, and inside `root` (itself canonical).
fn inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let path = path.canonicalize().ok()?;
    path.starts_with(&root).then_some(path)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The hex SHA-256 of a file (blocking: run it on a blocking thread).
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
