//! The origin's side of a snapshot job towards one partner (`protocols/journal-sync.md`,
//! "Snapshot"): run by the partner link when the partner's cursor is behind the journal's
//! compaction floor, when a job is persisted unfinished, or on an operator's request.
//!
//! One job at a time per partner (the link runs it inside its session). Progress is
//! persisted after each part the receiver confirms, and the receiver's own report at
//! `snapshot_begin` is where the job resumes, so neither side's restart starts it from
//! zero. Each wait has a timeout (`--sync-timeout`); any failure ends the session, which
//! the link retries with backoff.

use std::sync::Arc;

use futures::io::{ReadHalf, WriteHalf};
use futures::AsyncReadExt;
use libp2p::{PeerId, Stream};

use super::status::LinkStatus;
use super::LinkEnv;
use crate::contract::now_ms;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, FrameError, SyncFrame};
use crate::store::{Store, StoreError};
use crate::sync::snapshot::{
    cut, page_bytes, sender_key, SenderJob, PAGE_RESOURCES, STATE_DONE, STATE_IDLE, STATE_RUNNING,
};
use crate::sync::PROTOCOL_SYNC;

#[derive(Debug, thiserror::Error)]
pub(super) enum SnapshotError {
    #[error(transparent)]
    Net(#[from] crate::p2p::NetError),
    #[error("snapshot stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot stream: {0}")]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("snapshot refused by the partner: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("snapshot: {0}")]
    Protocol(String),
    #[error("snapshot: no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// Loads the persisted job towards `peer` into its status (state 0 when none).
pub(super) async fn load(store: &dyn Store, peer: &PeerId, status: &LinkStatus) -> SenderJob {
    let job = match store.meta(&sender_key(&peer.to_string())).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(%peer, cause = %e, "unreadable snapshot job dropped");
            SenderJob::default()
        }),
        Ok(None) => SenderJob::default(),
        Err(e) => {
            tracing::warn!(%peer, cause = %e, "cannot read the snapshot job");
            SenderJob::default()
        }
    };
    status.set_snapshot_job(&job);
    job
}

async fn persist(
    store: &dyn Store,
    peer: &PeerId,
    status: &LinkStatus,
    job: &SenderJob,
) -> Result<(), StoreError> {
    let key = sender_key(&peer.to_string());
    let value = if job.state == STATE_IDLE {
        None
    } else {
        // A struct of numbers and strings always serializes.
        Some(serde_json::to_vec(job).unwrap_or_default())
    };
    store.set_meta(&key, value).await?;
    status.set_snapshot_job(job);
    Ok(())
}

struct Channel {
    reader: ReadHalf<Stream>,
    writer: WriteHalf<Stream>,
    max_frame: usize,
    timeout: std::time::Duration,
}

impl Channel {
    async fn send(&mut self, frame: &SyncFrame) -> Result<(), SnapshotError> {
        tokio::time::timeout(self.timeout, wire::write_frame(&mut self.writer, frame))
            .await
            .map_err(|_| SnapshotError::Timeout(self.timeout))??;
        Ok(())
    }

    async fn recv(&mut self) -> Result<SyncFrame, SnapshotError> {
        let read = tokio::time::timeout(
            self.timeout,
            wire::read_frame::<SyncFrame, _>(&mut self.reader, self.max_frame),
        )
        .await
        .map_err(|_| SnapshotError::Timeout(self.timeout))??;
        match read {
            Some(SyncFrame::Error(ErrorFrame { code, message, .. })) => {
                Err(SnapshotError::Refused { code, message })
            }
            Some(frame) => Ok(frame),
            None => Err(SnapshotError::Protocol("stream closed by the partner".into())),
        }
    }
}

/// Runs (or resumes) the job towards `peer` to its end. Returns the position P: the
/// partner's applied mark, from which the journal follows.
pub(super) async fn run(env: &Arc<LinkEnv>, peer: PeerId, status: &LinkStatus) -> Result<u64, SnapshotError> {
    let store = env.store.as_ref();
    let t = &env.tuning;
    let mut job = load(store, &peer, status).await;
    if job.state == STATE_IDLE {
        job = SenderJob {
            // Unique per node and growing: a receiver tells a new job from an old one.
            job: now_ms().max(1),
            state: STATE_RUNNING,
            position: store.journal_head(&env.own_id).await?,
            total: store.own_count(&env.own_id).await?,
            ..SenderJob::default()
        };
        persist(store, &peer, status, &job).await?;
        tracing::info!(%peer, job = job.job, position = job.position, total = job.total, "snapshot job started");
    }
    status.resync_taken();
    let stream = env.net.open_stream(peer, PROTOCOL_SYNC, t.io_timeout).await?;
    let (reader, writer) = stream.split();
    let mut ch = Channel {
        reader,
        writer,
        max_frame: t.max_frame_bytes,
        timeout: t.sync_timeout,
    };
    ch.send(&SyncFrame::SnapshotBegin {
        job: job.job,
        position: job.position,
        total: job.total,
    })
    .await?;
    let SyncFrame::SnapshotReady {
        job: ready,
        next_part,
        after,
        resources,
    } = ch.recv().await?
    else {
        return Err(SnapshotError::Protocol("expected snapshot_ready".into()));
    };
    job.resume_from(ready, next_part, after, resources)
        .map_err(SnapshotError::Protocol)?;
    if job.state == STATE_RUNNING {
        tracing::info!(%peer, job = job.job, next_part, sent = job.sent, total = job.total, "snapshot job sending");
        send_parts(env, peer, status, &mut ch, &mut job).await?;
        job.state = STATE_DONE;
    }
    persist(store, &peer, status, &job).await?;
    ch.send(&SyncFrame::SnapshotEnd {
        job: job.job,
        parts: job.next_part,
        resources: job.sent,
    })
    .await?;
    let SyncFrame::SnapshotDone { job: done, position } = ch.recv().await? else {
        return Err(SnapshotError::Protocol("expected snapshot_done".into()));
    };
    if done != job.job || position != job.position {
        return Err(SnapshotError::Protocol(format!(
            "done for job {done} at {position}, not job {} at {}",
            job.job, job.position
        )));
    }
    store.set_cursor(&peer.to_string(), job.position).await?;
    let position = job.position;
    tracing::info!(%peer, job = job.job, position, resources = job.sent, parts = job.next_part, "snapshot job done");
    job = SenderJob::default();
    persist(store, &peer, status, &job).await?;
    Metrics::add(&env.metrics.snapshot_jobs_done, 1);
    Ok(position)
}

/// Sends the pages after `job.after`, one at a time, each part confirmed before the next.
async fn send_parts(
    env: &Arc<LinkEnv>,
    peer: PeerId,
    status: &LinkStatus,
    ch: &mut Channel,
    job: &mut SenderJob,
) -> Result<(), SnapshotError> {
    let store = env.store.as_ref();
    // A page ends with the entry that crosses its byte bound: three quarters of a part
    // leave room for it, so that a page of small resources is one part.
    let max_bytes = page_bytes(env.tuning.max_frame_bytes).saturating_mul(3) / 4;
    loop {
        let page = store
            .snapshot_page(&env.own_id, job.after.clone(), PAGE_RESOURCES, max_bytes)
            .await?;
        let Some(last) = page.entries.last().map(|(k, _)| k.clone()) else {
            return Ok(());
        };
        let count = page.entries.len() as u64;
        let mut lines = Vec::with_capacity(max_bytes);
        for (_, raw) in &page.entries {
            lines.extend_from_slice(&raw.json);
            lines.push(b'\n');
        }
        drop(page.entries);
        for (data, continued) in cut(&lines, env.tuning.max_frame_bytes) {
            let index = job.next_part;
            ch.send(&SyncFrame::SnapshotPart {
                job: job.job,
                index,
                data,
                continued,
            })
            .await?;
            match ch.recv().await? {
                SyncFrame::SnapshotAck { job: j, index: i } if j == job.job && i == index => {}
                other => {
                    return Err(SnapshotError::Protocol(format!(
                        "expected snapshot_ack of part {index}, got {}",
                        wire::Frame::kind(&other)
                    )))
                }
            }
            Metrics::add(&env.metrics.snapshot_parts_sent, 1);
            job.next_part = index.saturating_add(1);
        }
        job.after = Some(last);
        job.sent = job.sent.saturating_add(count);
        persist(store, &peer, status, job).await?;
        if page.next.is_none() {
            return Ok(());
        }
    }
}
