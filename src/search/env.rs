//! What every part of the search domain works with: the node's handles ([`SearchEnv`]) and
//! what the search tasks and the responders share ([`Shared`]): this node's id, the answers
//! on NATS and the throttled log of refusals and dropped results.

use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use tokio::sync::watch;

use crate::answers::Answers;
use crate::config::Tuning;
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p;
use crate::peers::directory::Directory;
use crate::peers::partners::Partners;
use crate::store::Store;

/// Refusals of one kind from one peer logged once per this interval, with their count.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);
/// The `place` of search refusals in logs and `oc_refusals_total`: the command router's,
/// which hands `PB_SEARCH` over.
const PLACE: &str = "commands";

pub struct SearchEnv {
    pub key: Keypair,
    pub nats: async_nats::Client,
    pub net: p2p::Client,
    pub store: Arc<dyn Store>,
    pub directory: Arc<Directory>,
    pub partners: Arc<Partners>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    pub shutdown: watch::Receiver<bool>,
}

pub(super) struct Shared {
    pub(super) env: SearchEnv,
    pub(super) own: PeerId,
    pub(super) own_id: String,
    /// Replies, `SEARCH_EVENT`s and refusal reports on the site's NATS.
    pub(super) answers: Answers,
    /// Refusals and dropped results, logged once per [`LOG_EVERY`] per peer and code.
    pub(super) throttle: LogThrottle,
}

impl Shared {
    pub(super) fn new(env: SearchEnv) -> Shared {
        let own = env.key.public().to_peer_id();
        Shared {
            own,
            own_id: own.to_string(),
            answers: Answers::new(env.nats.clone(), env.metrics.clone(), PLACE),
            throttle: LogThrottle::new(LOG_EVERY),
            env,
        }
    }
}
