//! Frames of journal sync `/opencloud/journal/sync/1.0` (`protocols/journal-sync.md`):
//! `sync_request` from the puller, `sync_header`, `sync_part` and `error` from the owner.

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
    /// Owner → puller: the request is refused.
    Error(ErrorFrame),
}

impl Frame for SyncFrame {
    fn kind(&self) -> &'static str {
        match self {
            SyncFrame::SyncRequest { .. } => "sync_request",
            SyncFrame::SyncHeader { .. } => "sync_header",
            SyncFrame::SyncPart { .. } => "sync_part",
            SyncFrame::Error(_) => "error",
        }
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}
