//! One durable journal entry, as the journal, the partner streams and journal sync carry it.

use serde::{Deserialize, Serialize};

use super::{Action, Resource};

/// One durable journal entry: an accepted change with its origin and sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub origin: String,
    pub seq: u64,
    pub action: Action,
    pub data_type: String,
    #[serde(default)]
    pub user: String,
    pub resource: Resource,
    /// Milliseconds since the Unix epoch at which the origin accepted the event.
    pub time_ms: u64,
}

impl JournalEntry {
    pub(crate) fn resource_id(&self) -> Option<&str> {
        self.resource.id()
    }

    pub(crate) fn creator_id(&self) -> Option<&str> {
        self.resource.creator_id()
    }

    /// `<origin>:<seq>`: the `Nats-Msg-Id` of every publish this entry causes.
    pub(crate) fn msg_id(&self) -> String {
        use std::fmt::Write;
        // Sized once: `format!` started from the size of its literal parts (one byte here)
        // and grew the string for the peer id, ≈ 2 % of a receiving node (docs/PERFORMANCE.md).
        let mut id = String::with_capacity(self.origin.len() + 21);
        id.push_str(&self.origin);
        id.push(':');
        // Writing to a String cannot fail.
        let _ = write!(id, "{}", self.seq);
        id
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
