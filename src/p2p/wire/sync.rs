//! Frames of journal sync `/opencloud/journal/sync/1.0` (`protocols/journal-sync.md`):
//! `sync_request` from the puller, `sync_header`, `sync_part` and `error` from the owner;
//! and the snapshot job on a stream the origin opens: `snapshot_begin`, `snapshot_part`,
//! `snapshot_end` from the origin, `snapshot_ready`, `snapshot_ack`, `snapshot_done` and
//! `error` from the receiver.

use serde::{Deserialize, Serialize};

use super::framing::{ErrorFrame, Frame};

/// One message on a journal sync stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SyncFrame {
    /// Puller → owner: entries `since < seq <= until` of `origin` (until chosen by the owner
    /// when absent; either way at most one round), cut in parts of at most `part_bytes`, the
    /// whole answer at most `max_bytes` (the puller's round byte cap; the owner's own cap
    /// when absent); `parts` asks again for only those parts of an answer already begun.
    SyncRequest {
        origin: String,
        since: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
        part_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parts: Option<Vec<u32>>,
    },
    /// Owner → puller: what the parts that follow hold.
    SyncHeader {
        since: u64,
        until: u64,
        head: u64,
        total: u32,
        bytes: u64,
    },
    /// Owner → puller: part `index` of `total` (base64 of a slice of the JSON lines of the
    /// entries).
    SyncPart { index: u32, total: u32, data: String },
    /// Origin → receiver: snapshot job `job` of the origin's own resources at its journal
    /// position `position`, about `total` resources.
    SnapshotBegin { job: u64, position: u64, total: u64 },
    /// Receiver → origin: where the job resumes: the next part index it expects, the key
    /// of the last resource it applied (`None`: from the start), the resources it applied.
    SnapshotReady {
        job: u64,
        next_part: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<(String, String)>,
        resources: u64,
    },
    /// Origin → receiver: part `index` (base64 of JSON lines of journal entries, the latest
    /// of each resource in key order); `continued`: the lines go on in the next part.
    SnapshotPart {
        job: u64,
        index: u32,
        data: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        continued: bool,
    },
    /// Receiver → origin: part `index` is applied (and, unless continued, persisted).
    SnapshotAck { job: u64, index: u32 },
    /// Origin → receiver: every part was sent: `parts` parts, `resources` resources.
    SnapshotEnd { job: u64, parts: u32, resources: u64 },
    /// Receiver → origin: the snapshot is applied and this node's applied mark is `position`.
    SnapshotDone { job: u64, position: u64 },
    /// Either side: the request, or the snapshot frame, is refused.
    Error(ErrorFrame),
}

impl Frame for SyncFrame {
    fn kind(&self) -> &'static str {
        match self {
            SyncFrame::SyncRequest { .. } => "sync_request",
            SyncFrame::SyncHeader { .. } => "sync_header",
            SyncFrame::SyncPart { .. } => "sync_part",
            SyncFrame::SnapshotBegin { .. } => "snapshot_begin",
            SyncFrame::SnapshotReady { .. } => "snapshot_ready",
            SyncFrame::SnapshotPart { .. } => "snapshot_part",
            SyncFrame::SnapshotAck { .. } => "snapshot_ack",
            SyncFrame::SnapshotEnd { .. } => "snapshot_end",
            SyncFrame::SnapshotDone { .. } => "snapshot_done",
            SyncFrame::Error(_) => "error",
        }
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}
