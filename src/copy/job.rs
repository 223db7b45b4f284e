//! The sending side of a copy: a job per copy, kept in `<data-dir>/copies/<id>.json` (and,
//! for a directory, its tar spooled once in `<id>.tar`, so every attempt sends the same
//! bytes), run by a task that opens `/opencloud/copy/1.0` to the partner, offers the copy,
//! sends from the offset the receiver answers, window by window, and resumes after any
//! failure (a cut, a restart of either side) from the receiver's offset again.
//!
//! States: `queued` (waiting for one of the running permits, or resuming after a restart),
//! `running` (preparing or transferring; `last_error` tells why it waits to retry), `done`,
//! `failed` with its `reason` (a refusal of the receiver, a source that changed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use libp2p::{PeerId, Stream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::ledger::SendLedger;
use super::{archive, CopyService, PROTOCOL_COPY};
use crate::backoff::Backoff;
use crate::contract::{ErrorCode, Refusal};
use crate::p2p::wire::{self, CopyFrame};

/// Directory of the jobs, in the data directory.
pub(crate) const JOBS_DIR: &str = "copies";
/// Largest chunk this node sends (the receiver may ask for smaller ones).
pub const CHUNK_BYTES: u64 = 256 * 1024;
/// Bytes sent and not yet acknowledged, at most (a window of chunks).
pub const WINDOW_BYTES: u64 = 4 * CHUNK_BYTES;
/// A job's file is rewritten at most this often while acknowledgements arrive.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Room for the JSON around a chunk's base64 in its frame.
const FRAME_ROOM: u64 = 1024;
/// The receiver's last answer (hash check, rename, a directory unpacked) may take this many
/// times `io_timeout`.
const FINISH_TIMEOUT_FACTOR: u32 = 30;
/// Longest source path accepted.
const MAX_SOURCE_BYTES: usize = archive::MAX_PATH_BYTES;

/// `POST /api/copies` and `REMOTECOPY`: what to copy where.
#[derive(Debug, Clone, Deserialize)]
pub struct CopyRequest {
    /// A file or directory on this node's disk, below `--copy-source-root`.
    pub source: String,
    /// The partner's peer id.
    pub peer: String,
    /// Where it goes, relative to the partner's `--copy-root`.
    pub destination: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobState {
    fn is_finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

/// One copy as the admin API shows it and its file keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// The source as resolved on this node.
    pub source: String,
    pub peer: String,
    pub destination: String,
    /// `file` or `dir` (sent as a tar).
    pub kind: String,
    pub state: JobState,
    /// Why it failed (`failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the last attempt stopped; the job retries (`running` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Chunk bytes written to the receiver, resends included, over every attempt.
    pub bytes_sent: u64,
    /// Bytes the receiver acknowledged (on its disk).
    pub bytes_acked: u64,
    /// Bytes to send (a directory: its tar), known once the job is prepared.
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub attempts: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The source file's length and modification time when hashed: a file that changes
    /// afterwards fails the job rather than arriving half old, half new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_stamp: Option<(u64, u64)>,
}

/// How an attempt ended, when not with the copy in place.
enum Stop {
    /// Retried after a backoff.
    Retry(String),
    /// The job fails.
    Fatal(String),
}

fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
}

/// Checks a request (see [`CopyService::submit`]) and queues its job.
pub(super) fn submit(service: &Arc<CopyService>, req: CopyRequest) -> Result<Job, Refusal> {
    let settings = &service.env.settings;
    let Some(root) = settings.source_root.as_deref() else {
        return Err(refusal(
            ErrorCode::UnsupportedAction,
            "this node sends no copies: it runs without --copy-source-root",
        ));
    };
    if req.source.is_empty() || req.source.len() > MAX_SOURCE_BYTES || req.source.contains('\0') {
        return Err(refusal(
            ErrorCode::InvalidField,
            "source: an empty, too long or malformed path",
        ));
    }
    let given = Path::new(&req.source);
    let path = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    let Some(source) = super::inside(root, &path) else {
        return Err(refusal(
            ErrorCode::InvalidField,
            "source: no such file or directory below --copy-source-root",
        ));
    };
    let meta =
        std::fs::metadata(&source).map_err(|e| refusal(ErrorCode::InvalidField, format!("source: {e}")))?;
    let kind = if meta.is_file() {
        if meta.len() > settings.max_bytes {
            return Err(refusal(
                ErrorCode::PayloadTooLarge,
                format!(
                    "source: {} bytes, more than --copy-max-bytes {}",
                    meta.len(),
                    settings.max_bytes
                ),
            ));
        }
        "file"
    } else if meta.is_dir() {
        "dir"
    } else {
        return Err(refusal(
            ErrorCode::InvalidField,
            "source: neither a file nor a directory",
        ));
    };
    let peer: PeerId = req
        .peer
        .parse()
        .map_err(|_| refusal(ErrorCode::InvalidField, "peer: not a peer id"))?;
    if !service.env.partners.contains(&peer) {
        return Err(refusal(ErrorCode::NotPartner, "peer: not a partner of this node"));
    }
    let destination = archive::safe_relative(&req.destination).map_err(|_| {
        refusal(
            ErrorCode::InvalidField,
            "destination: give a relative path without `..` (it lands below the partner's --copy-root)",
        )
    })?;
    let now = super::now_ms();
    let job = Job {
        id: new_id(),
        source: source.display().to_string(),
        peer: peer.to_string(),
        destination: destination.display().to_string(),
        kind: kind.to_owned(),
        state: JobState::Queued,
        reason: None,
        last_error: None,
        bytes_sent: 0,
        bytes_acked: 0,
        total: None,
        sha256: None,
        attempts: 0,
        created_ms: now,
        updated_ms: now,
        source_stamp: None,
    };
    {
        let Ok(mut jobs) = service.jobs.lock() else {
            return Err(refusal(ErrorCode::Busy, "the job table is unavailable"));
        };
        let active = jobs.values().filter(|j| !j.state.is_finished()).count();
        if active >= super::MAX_ACTIVE_JOBS {
            return Err(refusal(
                ErrorCode::Busy,
                format!("{active} copies are queued or running; retry later"),
            ));
        }
        jobs.insert(job.id.clone(), job.clone());
        forget_old(&mut jobs, &service.jobs_dir());
    }
    if let Err(e) = save(&service.jobs_dir(), &job) {
        if let Ok(mut jobs) = service.jobs.lock() {
            jobs.remove(&job.id);
        }
        return Err(refusal(
            ErrorCode::StoreUnavailable,
            format!("cannot record the job: {e}"),
        ));
    }
    tracing::info!(copy_id = %job.id, %peer, source = %job.source, destination = %job.destination, kind, "copy queued");
    // On the node's runtime, not on the admin API's worker that may be calling this.
    service.runtime.spawn(run(service.clone(), job.id.clone()));
    Ok(job)
}

/// 16 random hex digits.
fn new_id() -> String {
    super::hex(&rand::random::<[u8; 8]>())
}

/// Drops the oldest finished jobs beyond [`super::MAX_FINISHED_JOBS`] (and their files).
fn forget_old(jobs: &mut std::collections::HashMap<String, Job>, dir: &Path) {
    let mut finished: Vec<(u64, String)> = jobs
        .values()
        .filter(|j| j.state.is_finished())
        .map(|j| (j.updated_ms, j.id.clone()))
        .collect();
    if finished.len() <= super::MAX_FINISHED_JOBS {
        return;
    }
    finished.sort();
    let excess = finished.len() - super::MAX_FINISHED_JOBS;
    for (_, id) in finished.into_iter().take(excess) {
        jobs.remove(&id);
        let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
    }
}

/// Writes a job's file (temp name, fsync, rename).
fn save(dir: &Path, job: &Job) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{}.json.tmp", job.id));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(job).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", job.id)))
}

fn spool_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.tar"))
}

/// Loads the jobs of a previous run and restarts the unfinished ones.
pub(super) fn resume_all(service: &Arc<CopyService>) {
    let dir = service.jobs_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut resumed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let job: Job = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "unreadable copy job left aside");
                continue;
            }
        };
        if !job.state.is_finished() {
            resumed.push(job.id.clone());
        }
        if let Ok(mut jobs) = service.jobs.lock() {
            jobs.insert(job.id.clone(), job);
        }
    }
    for id in resumed {
        tracing::info!(copy_id = %id, "resuming copy");
        service.runtime.spawn(run(service.clone(), id));
    }
}

/// Changes a job in the table and returns the new copy.
fn update(service: &CopyService, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
    let mut jobs = service.jobs.lock().ok()?;
    let job = jobs.get_mut(id)?;
    f(job);
    job.updated_ms = super::now_ms();
    Some(job.clone())
}

fn persist(service: &CopyService, job: &Option<Job>) {
    if let Some(job) = job {
        if let Err(e) = save(&service.jobs_dir(), job) {
            tracing::warn!(copy_id = %job.id, cause = %e, "cannot record the copy's progress");
        }
    }
}

/// Runs a job to its end (or to shutdown, when it stays unfinished for the next run).
async fn run(service: Arc<CopyService>, id: String) {
    let mut stop = service.env.shutdown.clone();
    let permit = tokio::select! {
        p = service.running.clone().acquire_owned() => p,
        _ = crate::shutdown::signalled(&mut stop) => return,
    };
    let Ok(_permit) = permit else {
        return;
    };
    let job = update(&service, &id, |j| j.state = JobState::Running);
    persist(&service, &job);
    let t = &service.env.tuning;
    let mut backoff = Backoff::new(t.backoff_min, t.backoff_max);
    let outcome = loop {
        let Some(job) = service.job(&id) else {
            return;
        };
        let attempt = tokio::select! {
            a = attempt(&service, job) => a,
            _ = crate::shutdown::signalled(&mut stop) => {
                // Unfinished: the next run resumes it from the receiver's offset.
                persist(&service, &service.job(&id));
                return;
            }
        };
        match attempt {
            Ok(()) => break Ok(()),
            Err(Stop::Fatal(reason)) => break Err(reason),
            Err(Stop::Retry(why)) => {
                tracing::info!(copy_id = %id, cause = %why, retry_in = ?backoff.current(), "copy attempt stopped; resuming later");
                let job = update(&service, &id, |j| j.last_error = Some(why));
                persist(&service, &job);
            }
        }
        if !backoff.wait_or(crate::shutdown::signalled(&mut stop)).await {
            return;
        }
    };
    let job = update(&service, &id, |j| match &outcome {
        Ok(()) => {
            j.state = JobState::Done;
            j.last_error = None;
        }
        Err(reason) => {
            j.state = JobState::Failed;
            j.reason = Some(reason.clone());
        }
    });
    persist(&service, &job);
    let _ = tokio::fs::remove_file(spool_path(&service.jobs_dir(), &id)).await;
    match outcome {
        Ok(()) => {
            service.metrics.sent_done.inc();
            tracing::info!(copy_id = %id, "copy done");
        }
        Err(reason) => {
            service.metrics.sent_failed.inc();
            tracing::warn!(copy_id = %id, %reason, "copy failed");
        }
    }
}

/// The source's length and modification time (ms).
fn stamp(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Ok((meta.len(), mtime))
}

/// What an attempt sends: the file (the source, or a directory's tar), its size and hash,
/// and the source file's stamp.
struct Prepared {
    path: PathBuf,
    total: u64,
    sha: String,
    stamp: Option<(u64, u64)>,
}

/// Hashes the source (a directory: builds its tar first); returns (file to send, total, sha).
async fn prepare(service: &CopyService, job: &Job) -> Result<(PathBuf, u64, String), Stop> {
    let dir = service.jobs_dir();
    let spool = spool_path(&dir, &job.id);
    let source = PathBuf::from(&job.source);
    if let (Some(total), Some(sha)) = (job.total, job.sha256.clone()) {
        if job.kind == "dir" {
            // The tar was built once and is sent again as it is.
            return match tokio::fs::metadata(&spool).await {
                Ok(m) if m.len() == total => Ok((spool, total, sha)),
                _ => Err(Stop::Fatal("the directory's tar spool is gone".to_owned())),
            };
        }
        let now = stamp(&source).map_err(|e| Stop::Fatal(format!("source: {e}")))?;
        if Some(now) != job.source_stamp {
            return Err(Stop::Fatal("the source file changed during the copy".to_owned()));
        }
        return Ok((source, total, sha));
    }
    let max = service.env.settings.max_bytes;
    let kind = job.kind.clone();
    let prepared = tokio::task::spawn_blocking(move || -> Result<Prepared, String> {
        if kind == "dir" {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let total = archive::build_tar(&source, &spool, max).map_err(|e| format!("source: {e}"))?;
            let sha = super::sha256_file(&spool).map_err(|e| e.to_string())?;
            Ok(Prepared {
                path: spool,
                total,
                sha,
                stamp: None,
            })
        } else {
            let before = stamp(&source).map_err(|e| format!("source: {e}"))?;
            if before.0 > max {
                return Err(format!("source: more than --copy-max-bytes {max}"));
            }
            let sha = super::sha256_file(&source).map_err(|e| format!("source: {e}"))?;
            let after = stamp(&source).map_err(|e| format!("source: {e}"))?;
            if before != after {
                return Err("the source file changed while it was hashed".to_owned());
            }
            Ok(Prepared {
                path: source,
                total: after.0,
                sha,
                stamp: Some(after),
            })
        }
    })
    .await
    .map_err(|e| Stop::Retry(e.to_string()))?
    .map_err(Stop::Fatal)?;
    let Prepared {
        path,
        total,
        sha,
        stamp,
    } = prepared;
    let job = update(service, &job.id, |j| {
        j.total = Some(total);
        j.sha256 = Some(sha.clone());
        j.source_stamp = stamp;
    });
    persist(service, &job);
    Ok((path, total, sha))
}

/// One attempt: connect, offer, send from the receiver's offset, wait for `copy_done`.
async fn attempt(service: &CopyService, job: Job) -> Result<(), Stop> {
    let (path, total, sha) = prepare(service, &job).await?;
    let id = job.id.clone();
    let env = &service.env;
    let timeout = env.tuning.io_timeout;
    let peer: PeerId = job
        .peer
        .parse()
        .map_err(|_| Stop::Fatal("peer: not a peer id".to_owned()))?;
    let _ = update(service, &id, |j| j.attempts = j.attempts.saturating_add(1));
    if let Some(addr) = env.partners.addr(&peer) {
        // Already connected: returns at once. A failure is told by the opening below.
        let _ = env.net.dial(peer, addr, timeout).await;
    }
    let mut stream = env
        .net
        .open_stream(peer, PROTOCOL_COPY, timeout)
        .await
        .map_err(|e| Stop::Retry(e.to_string()))?;
    let offer = CopyFrame::CopyOffer {
        copy_id: id.clone(),
        kind: job.kind.clone(),
        destination: job.destination.clone(),
        total,
        sha256: sha.clone(),
    };
    write(&mut stream, &offer, timeout).await?;
    let max_frame = env.tuning.max_frame_bytes;
    let (start, max_chunk) = match read(&mut stream, max_frame, timeout).await? {
        CopyFrame::CopyAccept { offset, max_chunk } => (offset, max_chunk),
        // The receiver has it already (an earlier attempt finished): the same content only.
        CopyFrame::CopyDone { sha256 } if sha256 == sha => return Ok(()),
        other => return Err(unexpected(other)),
    };
    // The chunk's base64 (4/3) and its JSON must fit in a frame of ours as well.
    let frame_cap = (max_frame as u64).saturating_sub(FRAME_ROOM) / 4 * 3;
    let chunk = CHUNK_BYTES.min(max_chunk).min(frame_cap).max(1);
    let mut ledger = SendLedger::new(total, start, chunk, WINDOW_BYTES)
        .map_err(|e| Stop::Fatal(format!("the receiver answered an impossible offset: {e}")))?;
    tracing::debug!(copy_id = %id, %peer, offset = start, total, chunk, "copy attempt");
    let _ = update(service, &id, |j| j.bytes_acked = start);
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Stop::Fatal(format!("source: {e}")))?;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| Stop::Fatal(format!("source: {e}")))?;
    let mut buf = Vec::new();
    let mut persisted = Instant::now();
    let finish_timeout = timeout.saturating_mul(FINISH_TIMEOUT_FACTOR);
    loop {
        while let Some((offset, len)) = ledger.next_chunk() {
            let len_usize = usize::try_from(len).map_err(|_| Stop::Fatal("chunk too large".to_owned()))?;
            buf.resize(len_usize, 0);
            file.read_exact(&mut buf)
                .await
                .map_err(|e| Stop::Fatal(format!("source: {e}")))?;
            let data = base64::engine::general_purpose::STANDARD.encode(&buf);
            write(&mut stream, &CopyFrame::CopyChunk { offset, data }, timeout).await?;
            service.metrics.bytes_sent.inc_by(len);
            let _ = update(service, &id, |j| j.bytes_sent = j.bytes_sent.saturating_add(len));
        }
        let wait = if ledger.sent() >= total {
            finish_timeout
        } else {
            timeout
        };
        match read(&mut stream, max_frame, wait).await? {
            CopyFrame::CopyAck { offset } => {
                ledger
                    .on_ack(offset)
                    .map_err(|e| Stop::Retry(format!("the receiver's acknowledgement: {e}")))?;
                let job = update(service, &id, |j| j.bytes_acked = offset);
                if persisted.elapsed() >= PERSIST_EVERY {
                    persist(service, &job);
                    persisted = Instant::now();
                }
            }
            CopyFrame::CopyDone { sha256 } if ledger.is_complete() && sha256 == sha => {
                let _ = tokio::time::timeout(timeout, futures::AsyncWriteExt::close(&mut stream)).await;
                return Ok(());
            }
            other => return Err(unexpected(other)),
        }
    }
}

async fn write(stream: &mut Stream, frame: &CopyFrame, timeout: Duration) -> Result<(), Stop> {
    match tokio::time::timeout(timeout, wire::write_frame(stream, frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Stop::Retry(format!("writing to the partner: {e}"))),
        Err(_) => Err(Stop::Retry(format!("the partner took no data for {timeout:?}"))),
    }
}

async fn read(stream: &mut Stream, max: usize, timeout: Duration) -> Result<CopyFrame, Stop> {
    match tokio::time::timeout(timeout, wire::read_frame::<CopyFrame, _>(stream, max)).await {
        Ok(Ok(Some(frame))) => Ok(frame),
        Ok(Ok(None)) => Err(Stop::Retry("the partner closed the stream".to_owned())),
        Ok(Err(e)) => Err(Stop::Retry(format!("reading from the partner: {e}"))),
        Err(_) => Err(Stop::Retry(format!(
            "no answer from the partner within {timeout:?}"
        ))),
    }
}

/// A frame that ends the attempt: a refusal (retried when `busy`), or a frame out of place.
fn unexpected(frame: CopyFrame) -> Stop {
    match frame {
        CopyFrame::Error(e) if e.code == ErrorCode::Busy.as_str() => {
            Stop::Retry(format!("the partner is busy: {}", e.message))
        }
        CopyFrame::Error(e) => Stop::Fatal(format!("the partner refused ({}): {}", e.code, e.message)),
        other => Stop::Retry(format!(
            "unexpected {} frame from the partner",
            wire::Frame::kind(&other)
        )),
    }
}
