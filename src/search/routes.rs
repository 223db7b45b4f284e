//! Where the peers' answers to one search go: the channel from the streams that carry them
//! to the search's aggregator, with the search's deadline. The answers of an `all` search
//! arrive on streams the responders open back to this node, so its route is registered with
//! the [`super::SearchService`] and found by query id ([`FindSearch`]).

use actix::Message;
use libp2p::PeerId;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

/// Batches buffered between the peers' streams and a search's aggregator.
pub(crate) const ANSWERS_QUEUE: usize = 64;

/// What a search's aggregator receives from the peers' streams.
#[derive(Debug)]
pub(super) enum Answer {
    Batch {
        peer: PeerId,
        data_type: Option<String>,
        results: Vec<Value>,
    },
    Done {
        peer: PeerId,
    },
    Failed {
        peer: PeerId,
        reason: String,
    },
}

/// Where the answer streams of one search deliver, until when.
#[derive(Clone)]
pub(super) struct Route {
    pub(super) tx: mpsc::Sender<Answer>,
    pub(super) deadline: Instant,
}

/// The aggregator's end of a search's answers, and its route.
pub(super) struct Inbox {
    pub(super) route: Route,
    pub(super) rx: mpsc::Receiver<Answer>,
}

impl Inbox {
    /// The inbox of a search that lasts `timeout` from now.
    pub(super) fn new(timeout: Duration) -> Inbox {
        let (tx, rx) = mpsc::channel(ANSWERS_QUEUE);
        Inbox {
            route: Route {
                tx,
                deadline: Instant::now() + timeout,
            },
            rx,
        }
    }
}

/// Asks the search service where the answers of the `all` search `query_id` go; `None`
/// when no such search is in flight.
#[derive(Message)]
#[rtype(result = "Option<Route>")]
pub(super) struct FindSearch {
    pub(super) query_id: String,
}
