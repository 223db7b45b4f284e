//! Search: the application's `PB_SEARCH`, and this node's answers to other nodes'
//! searches (`protocols/search.md`, `protocols/nats-search-event.md`). One concern per file,
//! in the order a search flows:
//!
//! - `query`: `PB_SEARCH` validated (peer search, or resource search with its scope).
//! - `service`: the [`SearchService`] actor, owner of the searches in flight (admission,
//!   the routes of `all` answers); why an actor is said there; `in_flight`: those searches,
//!   a plain type.
//! - `searcher`: one task per search: the peer directory, or the query to the targeted
//!   peers (streams) or to everyone (signed, on the gossip topic), the answers aggregated
//!   into `SEARCH_EVENT`s; `routes`: where the peers' answers go.
//! - `screen`: the searcher keeps a result only when its `creator_id` is the peer that
//!   answered, its batch says the data type asked, and that peer's share of the search
//!   (`--search-peer-max-results`, `--search-peer-max-bytes`) is not used up; the rest is
//!   dropped, counted and logged once per interval per peer.
//! - `gossip_query`: the signed query of an `all` search, its signature and decoding.
//! - `responder`: inbound search streams and gossip queries served by helper tasks within a
//!   per-peer share; `gossip`: the checks of a gossip query (signature against the
//!   searcher's record, rate of unknown searchers) and its answer.
//! - `matching`: the node's own resources a searcher may see, read in bounded pages;
//!   `results`: the answer cut into frames under the searcher's frame cap.

mod env;
mod gossip;
mod gossip_query;
mod in_flight;
mod matching;
mod query;
mod responder;
mod results;
mod routes;
mod screen;
mod searcher;
mod service;

use libp2p::StreamProtocol;

pub use env::SearchEnv;
pub use gossip_query::GossipQuery;
pub use query::{parse, Parsed, Query};
pub use screen::dedupe_key;
pub use searcher::SUBJECT_SEARCH_EVENT;
pub use service::{SearchService, GOSSIP_QUEUE};

pub const PROTOCOL_SEARCH: StreamProtocol = StreamProtocol::new("/opencloud/resource/search/1.0");
