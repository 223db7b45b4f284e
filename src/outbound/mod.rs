//! Outbound: this node's journal replicated to each partner.
//!
//! - [`service`]: the `StreamService` actor, owning one link per partner and the journal head.
//! - [`link`]: one link's I/O loop (dial, streams, handshake, push, heartbeat, reconnect).
//! - [`window`]: the link's rules without I/O (handshake, send window, acks, resume).
//! - [`status`]: a link's live state, read by the admin API.

pub mod link;
pub mod service;
pub mod snapshot;
pub mod status;
pub mod window;

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Tuning;
use crate::metrics::Metrics;
use crate::p2p;
use crate::store::Store;

/// What every link (and its snapshot jobs) shares.
pub(crate) struct LinkEnv {
    pub own_id: String,
    pub store: Arc<dyn Store>,
    pub net: p2p::Client,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    pub shutdown: watch::Receiver<bool>,
}
