//! Journal sync (`/opencloud/journal/sync/1.0`): a node pulls a range of another node's
//! journal, in parts that each fit in a frame.
//!
//! The cursor is the puller's integer "applied up to" mark for that origin, never a time.
//! The owner answers `since < seq <= until` as the JSON lines of the entries, cut into
//! `total` numbered parts of at most `part_bytes` each, so an entry larger than a frame is
//! split across parts, never dropped. The answer is a pure function of the immutable
//! journal and `(since, until, part_bytes, max_bytes)`, so the owner keeps no state: a
//! puller that misses parts, or whose `--sync-timeout` expires, keeps the parts it has and
//! asks again for the others only.
//!
//! Both sides trust nothing the other sends. A round is capped in entries
//! (`Tuning::sync_max_entries`) and bytes (`--sync-max-bytes`) by the owner whatever `until`
//! says, and its `parts` list is deduplicated and bounded by `total`. The puller checks the
//! header against what it asked for ([`plan::Ask::check`]) before it keeps anything, and every
//! part's size before it stores it ([`plan::Assembly::add`]): what it holds never passes the
//! header's `bytes`, which never passes its own cap.
//!
//! - [`plan`]: the rules, plain functions and types of their inputs (round caps, the parts
//!   to send, the puller's checks and assembly), tested (and fuzzed) apart from the streams;
//! - [`serve`]: the owner's side, stateless: reads the range from the journal and sends it;
//! - [`pull`]: the puller's side: one round, re-requesting missing parts.

use std::sync::LazyLock;
use std::time::Duration;

use libp2p::StreamProtocol;

use crate::guard::LogThrottle;
use crate::p2p::wire::FrameError;
use crate::p2p::{self};

pub mod plan;
pub mod pull;
pub mod serve;
pub mod snapshot;

pub const PROTOCOL_SYNC: StreamProtocol = StreamProtocol::new("/opencloud/journal/sync/1.0");

/// A repeated refusal is logged once per this interval per peer and code.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Refusals logged by this module (both sides), throttled per peer and code.
pub(crate) static REFUSAL_LOG: LazyLock<LogThrottle> = LazyLock::new(|| LogThrottle::new(LOG_EVERY));

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Boxed: the network error is large, and every rule of this module returns this type.
    #[error(transparent)]
    Net(Box<p2p::NetError>),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("refused by the owner: {code}: {message}")]
    Refused { code: String, message: String },
    /// The answer (or request) breaks the protocol's rules or the limits; nothing of it is
    /// kept. Not retried within the pull.
    #[error("answer does not hold together: {0}")]
    Invalid(String),
    #[error("incomplete after {attempts} requests: {missing} of {total} parts missing")]
    Incomplete {
        attempts: usize,
        missing: usize,
        total: u32,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<p2p::NetError> for SyncError {
    fn from(e: p2p::NetError) -> SyncError {
        SyncError::Net(Box::new(e))
    }
}

pub(crate) fn invalid(why: impl Into<String>) -> SyncError {
    SyncError::Invalid(why.into())
}
