//! Frames of remote copy `/opencloud/copy/1.0` (`protocols/copy.md`): `copy_offer` and
//! `copy_chunk` from the sender, `copy_accept`, `copy_ack`, `copy_done` and `error` from the
//! receiver.

use serde::{Deserialize, Serialize};

use super::framing::{ErrorFrame, Frame};

/// One message on a copy stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CopyFrame {
    /// Sender → receiver, first frame: what is copied. `kind` is `file` or `dir` (a tar
    /// stream); `total` bytes whose SHA-256 is `sha256` (hex) go to `destination`, a path
    /// relative to the receiver's `--copy-root`.
    CopyOffer {
        copy_id: String,
        kind: String,
        destination: String,
        total: u64,
        sha256: String,
    },
    /// Receiver → sender: send from `offset` on (what it already holds of this copy), in
    /// chunks of at most `max_chunk` bytes.
    CopyAccept { offset: u64, max_chunk: u64 },
    /// Sender → receiver: bytes `offset .. offset + len(data)` (base64).
    CopyChunk { offset: u64, data: String },
    /// Receiver → sender: every byte below `offset` is on its disk.
    CopyAck { offset: u64 },
    /// Receiver → sender: the whole arrived, its hash matched, it is in place.
    CopyDone { sha256: String },
    /// Receiver → sender: the copy is refused or failed.
    Error(ErrorFrame),
}

impl Frame for CopyFrame {
    fn kind(&self) -> &'static str {
        match self {
            CopyFrame::CopyOffer { .. } => "copy_offer",
            CopyFrame::CopyAccept { .. } => "copy_accept",
            CopyFrame::CopyChunk { .. } => "copy_chunk",
            CopyFrame::CopyAck { .. } => "copy_ack",
            CopyFrame::CopyDone { .. } => "copy_done",
            CopyFrame::Error(_) => "error",
        }
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}
