//! Frames of the heartbeat stream `/opencloud/resource/heartbeat/partner/1.0`
//! (`protocols/heartbeat.md`): `ping` and `pong` either way, `error` when the stream is
//! refused.

use serde::{Deserialize, Serialize};

use super::framing::{ErrorFrame, Frame};

/// One message on a heartbeat stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HeartbeatFrame {
    /// Either way: the peer answers `pong` with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The answerer refuses the stream (not a partner, pool full).
    Error(ErrorFrame),
}

impl Frame for HeartbeatFrame {
    fn kind(&self) -> &'static str {
        match self {
            HeartbeatFrame::Ping { .. } => "ping",
            HeartbeatFrame::Pong { .. } => "pong",
            HeartbeatFrame::Error(_) => "error",
        }
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}
