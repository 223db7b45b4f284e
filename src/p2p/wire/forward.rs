//! Frames of the considers and planner streams `/opencloud/resource/considers/1.0` and
//! `/opencloud/resource/planner/1.0` (`protocols/considers-planner.md`): `forward` from the
//! sender, `ack` or `error` in answer to each.

use serde::{Deserialize, Serialize};

use super::framing::{ErrorFrame, Frame};

/// One message on a considers or planner stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ForwardFrame {
    /// An application message for the receiver to republish on its NATS as
    /// `PROPALGATION_EVENT` (answered by `ack`, or `error`).
    Forward {
        action: String,
        data_type: String,
        user: String,
        payload: serde_json::Value,
    },
    /// Receiver → sender: the message was republished (`seq` is 0).
    Ack { seq: u64 },
    /// Receiver → sender: the message was refused.
    Error(ErrorFrame),
}

impl Frame for ForwardFrame {
    fn kind(&self) -> &'static str {
        match self {
            ForwardFrame::Forward { .. } => "forward",
            ForwardFrame::Ack { .. } => "ack",
            ForwardFrame::Error(_) => "error",
        }
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}
