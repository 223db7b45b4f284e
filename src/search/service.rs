//! The `SearchService` actor: it owns the searches of the local application in flight and
//! admits, registers and forgets them one message at a time.
//!
//! Why an actor: the set of searches in flight changes when a `PB_SEARCH` is admitted (at
//! most [`MAX_ACTIVE`], then `busy`), when a search task ends, and is read by every answer
//! stream of an `all` search looking for its route ([`FindSearch`]). The actor owns that set
//! ([`InFlight`]), so these changes are serialised without a lock and the cap and the
//! routes cannot disagree. Its handlers never await: the searches and the responders run in
//! tasks it spawns, and a search task's end comes back to the actor as the completion of a
//! future spawned in its context. The responders' per-peer shares stay in a `guard::PeerPool`
//! shared by their tasks: a stream must be taken the moment it arrives.

use std::sync::Arc;

use actix::prelude::*;
use async_nats::Subject;
use tokio::sync::mpsc;

use super::env::{SearchEnv, Shared};
use super::in_flight::InFlight;
use super::query::{self, Parsed, Scope};
use super::responder::Responder;
use super::routes::{FindSearch, Inbox, Route};
use super::searcher::{self, Admitted, Search};
use crate::answers::Refused;
use crate::commands::router::SearchRequest;
use crate::contract::{self, AppCommand, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::p2p::GossipMessage;

/// Searches of the local application in flight; beyond, `busy`.
pub(crate) const MAX_ACTIVE: usize = 64;
/// Gossip queries buffered between the network loop and the service.
pub const GOSSIP_QUEUE: usize = 256;

pub struct SearchService {
    shared: Arc<Shared>,
    /// The searches in flight, with the route of their answers for `all` ones.
    in_flight: InFlight,
    /// The network loop's gossip queries, until the responder takes them at start.
    gossip: Option<mpsc::Receiver<GossipMessage>>,
}

impl SearchService {
    /// `gossip` is the receiving end of the network loop's gossip subscription.
    pub(crate) fn new(env: SearchEnv, gossip: mpsc::Receiver<GossipMessage>) -> Self {
        SearchService {
            shared: Arc::new(Shared::new(env)),
            in_flight: InFlight::new(MAX_ACTIVE),
            gossip: Some(gossip),
        }
    }

    /// Reports a refused `PB_SEARCH` (log, metric, error event, reply) from a task.
    fn refuse(&self, command: AppCommand, reply: Option<Subject>, refusal: Refusal) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let body = command.payload.to_string();
            let what = Refused {
                subject: contract::SUBJECT_PROPAGATION,
                action: Some("PB_SEARCH"),
                body: body.as_bytes(),
                reply,
            };
            shared.answers.refuse(what, &refusal).await;
        });
    }
}

impl Actor for SearchService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let responder = Arc::new(Responder::new(self.shared.clone(), ctx.address().recipient()));
        responder.spawn_streams();
        if let Some(gossip) = self.gossip.take() {
            responder.spawn_gossip(gossip);
        }
    }
}

impl Handler<SearchRequest> for SearchService {
    type Result = ();

    fn handle(&mut self, msg: SearchRequest, ctx: &mut Self::Context) {
        let SearchRequest { command, reply } = msg;
        Metrics::add(&self.shared.env.metrics.discovery.searches, 1);
        let parsed = match query::parse(&command) {
            Ok(p) => p,
            Err(refusal) => return self.refuse(command, reply, refusal),
        };
        if !self.in_flight.has_room() {
            let refusal = Refusal::new(
                ErrorCode::Busy,
                format!("{MAX_ACTIVE} searches already running; retry"),
            );
            return self.refuse(command, reply, refusal);
        }
        // Only an `all` search is answered on streams the responders open: its route is
        // found by query id. The others read the answers on the streams they open.
        let (search, route) = match parsed {
            Parsed::Peer { search, timeout } => (Search::Peer { search, timeout }, None),
            Parsed::Resources(query) => {
                let inbox = Inbox::new(query.timeout);
                let route = (query.scope == Scope::All).then(|| inbox.route.clone());
                (Search::Resources { query, inbox }, route)
            }
        };
        let query_id = self.in_flight.admit(route);
        let admitted = Admitted {
            query_id: query_id.clone(),
            search,
            reply,
        };
        let task = tokio::spawn(searcher::run(self.shared.clone(), admitted));
        ctx.spawn(fut::wrap_future(task).map(move |_, act: &mut Self, _| {
            act.in_flight.forget(&query_id);
        }));
    }
}

impl Handler<FindSearch> for SearchService {
    type Result = Option<Route>;

    fn handle(&mut self, msg: FindSearch, _: &mut Self::Context) -> Option<Route> {
        self.in_flight.route(&msg.query_id)
    }
}
