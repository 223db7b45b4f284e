//! Search service: the application's `PB_SEARCH`, and this node's answers to other nodes'
//! searches (`protocols/search.md`, `protocols/nats-search-event.md`).
//!
//! Searcher side, one task per search, at most [`MAX_ACTIVE`] at once:
//! - data type `PEER`, `{"search": "<peer id or name>"}`: the peer directory (store, then
//!   DHT) → one `SEARCH_EVENT` with the records, `done: true`.
//! - other data types, `{"type": "all|known|partner", "search", "limit", "timeout_ms"}`:
//!   `known` / `partner` open `/opencloud/resource/search/1.0` to each targeted peer (at most
//!   [`FANOUT`] at once) and send a `search_query` frame; `all` publishes the query, signed
//!   with the node's key, on the gossip topic, and responders with matches open the stream
//!   back. Every batch becomes a `SEARCH_EVENT` (`done: false`), duplicates (same peer, same
//!   resource id) dropped and the limit honoured; the final event (`done: true`) goes out
//!   when every targeted peer answered, the limit is reached, or at the deadline.
//!
//! The searcher keeps a result only when its `creator_id` is the peer that answered, its
//! batch says the data type asked, and that peer's share of the search is not used up
//! ([`Screen`]: `--search-peer-max-results`, `--search-peer-max-bytes`); the rest is dropped,
//! counted and logged once per interval per peer.
//!
//! Responder side: inbound search streams and gossip queries are served by helper tasks
//! from one [`PeerPool`] ([`MAX_RESPONDERS`], [`RESPONDERS_PER_PEER`] per peer); beyond it
//! they are dropped (gossip: ignored). Only the node's own resources of the data type are
//! offered, never those with `"access": "private"`, those with `"access": "partners"` only
//! to partners. They are read from the store in pages bounded in count and bytes
//! ([`OwnMatches`]), parsed one at a time and written as they match, so a query's memory
//! does not grow with the number of own resources. A gossip query is answered (and
//! forwarded by gossipsub) only once its signature verifies against the searcher's peer
//! record; queries of searchers whose record this node does not hold are rate-limited
//! before the DHT is asked for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use async_nats::Subject;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{PeerId, Stream, StreamProtocol};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::actors::commands::SearchRequest;
use crate::config::Tuning;
use crate::directory::Directory;
use crate::event::{self, now_ms, AppCommand, ErrorCode, Refusal};
use crate::guard::{LogThrottle, PeerBuckets, PeerPool};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame};
use crate::p2p::{self, GossipMessage, GossipVerdict};
use crate::partners::Partners;
use crate::store::{PageBounds, Relation, Store};

pub const PROTOCOL_SEARCH: StreamProtocol = StreamProtocol::new("/opencloud/resource/search/1.0");
/// NATS subject of search results (node → application).
pub const SUBJECT_SEARCH_EVENT: &str = "SEARCH_EVENT";
/// The data type whose search looks up peer records instead of resources.
pub const PEER_DATA_TYPE: &str = "PEER";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_LIMIT: u64 = 1000;
pub const MAX_LIMIT: u64 = 10_000;
/// Longest search text, in bytes.
pub const MAX_SEARCH_BYTES: usize = 1024;
/// Longest query id accepted from a peer.
const MAX_QUERY_ID: usize = 64;
const MAX_DATA_TYPE: usize = 128;
/// Searches of the local application in flight; beyond, `busy`.
pub const MAX_ACTIVE: usize = 64;
/// Inbound search streams and gossip queries served at once.
pub const MAX_RESPONDERS: usize = 64;
/// Of [`MAX_RESPONDERS`], the most one peer (stream peer, or gossip relay) holds at once.
pub const RESPONDERS_PER_PEER: usize = 4;
/// A responder's store page: at most this many own resources...
pub const PAGE_COUNT: usize = 256;
/// ... and no more added once this many bytes of JSON text are held.
pub const PAGE_BYTES: usize = 1024 * 1024;
/// Gossip queries per second of one searcher without a known peer record, and its burst.
pub const UNKNOWN_KEY_RATE: f64 = 1.0;
pub const UNKNOWN_KEY_BURST: f64 = 2.0;
/// Searchers without a known record whose buckets are remembered; beyond, refused.
pub const UNKNOWN_KEYS: usize = 1024;
/// Refusals of one kind from one peer logged once per this interval, with their count.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Peers asked at once by one `known` / `partner` search.
pub const FANOUT: usize = 32;
/// Batches buffered between the peers' streams and a search's aggregator.
const ANSWERS_QUEUE: usize = 64;
/// Gossip queries buffered between the network loop and the service.
pub const GOSSIP_QUEUE: usize = 256;
/// Smallest frame a searcher may ask for.
const MIN_FRAME: usize = 4096;
/// Largest gossip query decoded (gossipsub's own `max_transmit_size` is the same).
pub const MAX_GOSSIP_QUERY_BYTES: usize = 64 * 1024;
/// First bytes of the byte string a gossip query's signature covers.
pub const QUERY_SIGNING_DOMAIN: &[u8] = b"/opencloud/search-query/1";

/// Who a resource search goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everyone, over the gossip topic.
    All,
    /// Peers with relation `known` in the peers table (configured partners excluded).
    Known,
    /// Partners: relation `partner` in the peers table and configured partners.
    Partner,
}

impl Scope {
    fn parse(s: &str) -> Option<Scope> {
        match s.to_ascii_lowercase().as_str() {
            "all" => Some(Scope::All),
            "known" => Some(Scope::Known),
            "partner" => Some(Scope::Partner),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::Known => "known",
            Scope::Partner => "partner",
        }
    }
}

/// A validated `PB_SEARCH`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Parsed {
    Peer { search: String, timeout: Duration },
    Resources(Query),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Query {
    data_type: String,
    search: String,
    scope: Scope,
    limit: u64,
    timeout: Duration,
}

pub(crate) fn parse(command: &AppCommand) -> Result<Parsed, Refusal> {
    let p = &command.payload;
    let search = match p.get("search") {
        None | Some(Value::Null) => {
            return Err(Refusal::new(
                ErrorCode::MissingField,
                "missing string field payload.search",
            ))
        }
        Some(Value::String(s)) if s.len() <= MAX_SEARCH_BYTES => s.clone(),
        Some(Value::String(_)) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.search is longer than {MAX_SEARCH_BYTES} bytes"),
            ))
        }
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload.search must be a string",
            ))
        }
    };
    let timeout = match optional_u64(p, "timeout_ms")? {
        None => DEFAULT_TIMEOUT,
        Some(ms) if ms >= 1 && ms <= MAX_TIMEOUT.as_millis() as u64 => Duration::from_millis(ms),
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!(
                    "payload.timeout_ms must be between 1 and {}",
                    MAX_TIMEOUT.as_millis()
                ),
            ))
        }
    };
    if command.data_type.eq_ignore_ascii_case(PEER_DATA_TYPE) {
        let search = search.trim().to_owned();
        if search.is_empty() {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload.search must name a peer id or a peer name",
            ));
        }
        return Ok(Parsed::Peer { search, timeout });
    }
    if command.data_type.len() > MAX_DATA_TYPE {
        return Err(Refusal::new(ErrorCode::InvalidField, "data_type is too long"));
    }
    let scope = match p.get("type") {
        None | Some(Value::Null) => {
            return Err(Refusal::new(
                ErrorCode::MissingField,
                "missing string field payload.type (all, known or partner)",
            ))
        }
        Some(Value::String(s)) => Scope::parse(s).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.type {s:?} is not all, known or partner"),
            )
        })?,
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload.type must be a string (all, known or partner)",
            ))
        }
    };
    let limit = match optional_u64(p, "limit")? {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.limit must be between 1 and {MAX_LIMIT}"),
            ))
        }
    };
    Ok(Parsed::Resources(Query {
        data_type: command.data_type.clone(),
        search,
        scope,
        limit,
        timeout,
    }))
}

fn optional_u64(p: &Value, name: &str) -> Result<Option<u64>, Refusal> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.{name} must be a positive integer"),
            )
        }),
    }
}

/// 16 random hex digits.
pub fn new_query_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The message of an `all` search on the gossip topic, signed by the searcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipQuery {
    pub query_id: String,
    /// The searcher's peer id: responders open the search stream back to it.
    pub searcher: String,
    pub data_type: String,
    pub search: String,
    pub limit: u64,
    pub max_frame_bytes: u64,
    /// Milliseconds since the Unix epoch: the searcher's deadline; later, nobody answers.
    pub expires_at: u64,
    /// Base64 of the searcher's signature over [`GossipQuery::signing_bytes`].
    pub signature: String,
}

impl GossipQuery {
    /// `"/opencloud/search-query/1"`, then `query_id`, `searcher`, `data_type`, `search` each
    /// as a 4-byte big-endian length and the UTF-8 bytes, then `limit`, `max_frame_bytes`,
    /// `expires_at` as 8-byte big-endian integers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.search.len());
        out.extend_from_slice(QUERY_SIGNING_DOMAIN);
        for f in [&self.query_id, &self.searcher, &self.data_type, &self.search] {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        for n in [self.limit, self.max_frame_bytes, self.expires_at] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out
    }

    /// Fills `signature` with `key`'s.
    ///
    /// # Errors
    /// The key cannot sign.
    pub fn sign(mut self, key: &Keypair) -> Result<Self, libp2p::identity::SigningError> {
        use base64::Engine;
        let sig = key.sign(&self.signing_bytes())?;
        self.signature = base64::engine::general_purpose::STANDARD.encode(sig);
        Ok(self)
    }

    pub fn verify(&self, key: &PublicKey) -> bool {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .is_ok_and(|sig| key.verify(&self.signing_bytes(), &sig))
    }
}

/// Decodes a gossip query and checks its fields' limits (no signature check: that needs
/// the searcher's record). Never panics, whatever the bytes.
///
/// # Errors
/// The reason, as counted in `oc_search_queries_rejected_total`: `undecodable` (not the
/// JSON of a query, or over [`MAX_GOSSIP_QUERY_BYTES`]), `bad_searcher`, `limits`.
pub fn decode_gossip_query(data: &[u8]) -> Result<(GossipQuery, PeerId), &'static str> {
    if data.len() > MAX_GOSSIP_QUERY_BYTES {
        return Err("undecodable");
    }
    let q: GossipQuery = serde_json::from_slice(data).map_err(|_| "undecodable")?;
    let searcher: PeerId = q.searcher.parse().map_err(|_| "bad_searcher")?;
    if q.query_id.is_empty()
        || q.query_id.len() > MAX_QUERY_ID
        || q.search.len() > MAX_SEARCH_BYTES
        || q.data_type.len() > MAX_DATA_TYPE
    {
        return Err("limits");
    }
    Ok((q, searcher))
}

/// What a search's aggregator receives from the peers' streams.
#[derive(Debug)]
enum Answer {
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

/// `all` searches in flight, by query id: where responders' streams deliver.
#[derive(Clone)]
struct Waiting {
    tx: mpsc::Sender<Answer>,
    deadline: Instant,
}

type Registry = Arc<Mutex<HashMap<String, Waiting>>>;

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

struct Shared {
    env: SearchEnv,
    own: PeerId,
    own_id: String,
    registry: Registry,
    /// Responder helpers (streams and gossip queries), a bounded share per peer.
    responders: Arc<PeerPool>,
    /// Gossip queries of searchers without a known record: per searcher key...
    unknown_keys: PeerBuckets<PeerId>,
    /// ... and all of them together.
    unknown_all: PeerBuckets<()>,
    /// Refusals and dropped results, logged once per [`LOG_EVERY`] per peer and code.
    throttle: LogThrottle,
}

pub struct SearchService {
    shared: Arc<Shared>,
    active: Arc<Semaphore>,
    gossip: Option<mpsc::Receiver<GossipMessage>>,
}

impl SearchService {
    /// `gossip` is the receiving end of the network loop's gossip subscription.
    pub fn new(env: SearchEnv, gossip: mpsc::Receiver<GossipMessage>) -> Self {
        let own = env.key.public().to_peer_id();
        let rate = env.tuning.search_unknown_queries_per_second;
        SearchService {
            shared: Arc::new(Shared {
                own,
                own_id: own.to_string(),
                registry: Arc::new(Mutex::new(HashMap::new())),
                responders: PeerPool::new(MAX_RESPONDERS, RESPONDERS_PER_PEER),
                unknown_keys: PeerBuckets::new(UNKNOWN_KEY_RATE, UNKNOWN_KEY_BURST, UNKNOWN_KEYS),
                unknown_all: PeerBuckets::new(rate, (2.0 * rate).max(1.0), 1),
                throttle: LogThrottle::new(LOG_EVERY),
                env,
            }),
            active: Arc::new(Semaphore::new(MAX_ACTIVE)),
            gossip: Some(gossip),
        }
    }
}

impl Actor for SearchService {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        let shared = self.shared.clone();
        match shared.env.net.accept(PROTOCOL_SEARCH) {
            Some(mut incoming) => {
                let mut shutdown = shared.env.shutdown.clone();
                tokio::spawn(async move {
                    loop {
                        let next = tokio::select! {
                            next = incoming.next() => next,
                            _ = crate::shutdown::signalled(&mut shutdown) => None,
                        };
                        let Some((peer, stream)) = next else { break };
                        // Taken at once: libp2p-stream drops streams we are slow to take.
                        let permit = match shared.responders.try_acquire(peer) {
                            Ok(permit) => permit,
                            Err(full) => {
                                shared.env.metrics.discovery.query_rejected("busy");
                                if let Some(count) = shared.throttle.hit(peer, "busy") {
                                    tracing::warn!(%peer, code = "busy", count, cause = %full, "search stream dropped: no responder free for this peer");
                                }
                                continue;
                            }
                        };
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            serve_stream(&shared, peer, stream).await;
                            drop(permit);
                        });
                    }
                });
            }
            None => tracing::error!(protocol = %PROTOCOL_SEARCH, "protocol already registered"),
        }
        if let Some(mut gossip) = self.gossip.take() {
            let shared = self.shared.clone();
            let mut shutdown = shared.env.shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        msg = gossip.recv() => msg,
                        _ = crate::shutdown::signalled(&mut shutdown) => None,
                    };
                    let Some(msg) = msg else { break };
                    let relay = msg.propagation_source;
                    let Ok(permit) = shared.responders.try_acquire(relay) else {
                        if let Some(count) = shared.throttle.hit(relay, "busy") {
                            tracing::warn!(peer = %relay, code = "busy", count, "gossip search query ignored: no responder free for this peer");
                        }
                        shared.env.metrics.discovery.query_rejected("busy");
                        shared
                            .env
                            .net
                            .report_gossip(msg.message_id, msg.propagation_source, GossipVerdict::Ignore)
                            .await;
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        on_gossip(&shared, msg).await;
                        drop(permit);
                    });
                }
            });
        }
    }
}

impl Handler<SearchRequest> for SearchService {
    type Result = ();

    fn handle(&mut self, msg: SearchRequest, _: &mut Self::Context) {
        let SearchRequest { command, reply } = msg;
        let shared = self.shared.clone();
        Metrics::add(&shared.env.metrics.discovery.searches, 1);
        let parsed = match parse(&command) {
            Ok(p) => p,
            Err(refusal) => {
                tokio::spawn(async move { shared.refuse(&command.payload, reply, &refusal).await });
                return;
            }
        };
        let Ok(permit) = self.active.clone().try_acquire_owned() else {
            let refusal = Refusal::new(
                ErrorCode::Busy,
                format!("{MAX_ACTIVE} searches already running; retry"),
            );
            tokio::spawn(async move { shared.refuse(&command.payload, reply, &refusal).await });
            return;
        };
        let query_id = new_query_id();
        tokio::spawn(async move {
            // The reply goes first, so the application knows the id of the events to come.
            if let Some(reply) = reply {
                shared
                    .publish(reply, &json!({"ok": true, "query_id": query_id}))
                    .await;
            }
            match parsed {
                Parsed::Peer { search, timeout } => shared.search_peer(&query_id, &search, timeout).await,
                Parsed::Resources(query) => shared.search_resources(&query_id, query).await,
            }
            if let Err(e) = shared.env.nats.flush().await {
                tracing::warn!(query_id, cause = %e, "search events not flushed");
            }
            drop(permit);
        });
    }
}

/// Removes an `all` search from the registry whichever way it ends.
struct Unregister<'a> {
    registry: &'a Registry,
    query_id: &'a str,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.registry.lock() {
            r.remove(self.query_id);
        }
    }
}

/// How a search ended.
#[derive(Debug, Default)]
struct Summary {
    answered: HashSet<PeerId>,
    unreachable: Vec<(PeerId, String)>,
    forwarded: u64,
}

impl Shared {
    async fn publish(&self, subject: Subject, body: &Value) {
        if let Err(e) = self
            .env
            .nats
            .publish(subject.clone(), body.to_string().into())
            .await
        {
            tracing::warn!(%subject, cause = %e, "cannot publish");
        }
    }

    async fn refuse(&self, payload: &Value, reply: Option<Subject>, refusal: &Refusal) {
        tracing::warn!(code = refusal.code.as_str(), reason = %refusal.message, "search refused");
        self.env.metrics.refused("commands", refusal.code);
        let body = json!({"error": refusal.to_json(), "subject": event::SUBJECT_PROPAGATION, "action": "PB_SEARCH", "event": payload.to_string()});
        self.publish(Subject::from_static(event::SUBJECT_ERROR), &body)
            .await;
        if let Some(reply) = reply {
            self.publish(reply, &json!({"ok": false, "error": refusal.to_json()}))
                .await;
        }
    }

    async fn search_peer(&self, query_id: &str, search: &str, timeout: Duration) {
        let directory = &self.env.directory;
        let records = match search.parse::<PeerId>() {
            Ok(peer) => directory.find_by_id(peer, timeout).await,
            Err(_) => directory.find_by_name(search, timeout).await,
        };
        tracing::info!(query_id, search, found = records.len(), "peer search done");
        Metrics::add(
            &self.env.metrics.discovery.results_forwarded,
            records.len() as u64,
        );
        let results: Vec<Value> = records.iter().map(|r| r.to_value()).collect();
        let body =
            json!({"query_id": query_id, "data_type": PEER_DATA_TYPE, "results": results, "done": true});
        self.publish(Subject::from_static(SUBJECT_SEARCH_EVENT), &body)
            .await;
    }

    async fn search_resources(self: &Arc<Self>, query_id: &str, query: Query) {
        let deadline = Instant::now() + query.timeout;
        let (tx, rx) = mpsc::channel(ANSWERS_QUEUE);
        let mut tasks = JoinSet::new();
        let mut _unregister = None;
        let targeted = match query.scope {
            Scope::Known | Scope::Partner => {
                let targets = self.targets(query.scope).await;
                let frame = Frame::SearchQuery {
                    query_id: query_id.to_owned(),
                    data_type: query.data_type.clone(),
                    search: query.search.clone(),
                    limit: Some(self.peer_limit(query.limit)),
                    max_frame_bytes: Some(self.env.tuning.max_frame_bytes as u64),
                };
                let fanout = Arc::new(Semaphore::new(FANOUT));
                for peer in &targets {
                    let (me, frame, tx, fanout, peer) =
                        (self.clone(), frame.clone(), tx.clone(), fanout.clone(), *peer);
                    tasks.spawn(async move {
                        let Ok(_permit) = fanout.acquire_owned().await else {
                            return;
                        };
                        me.ask_peer(peer, frame, tx, deadline).await;
                    });
                }
                Some(targets.len())
            }
            Scope::All => {
                if let Ok(mut r) = self.registry.lock() {
                    r.insert(
                        query_id.to_owned(),
                        Waiting {
                            tx: tx.clone(),
                            deadline,
                        },
                    );
                }
                _unregister = Some(Unregister {
                    registry: &self.registry,
                    query_id,
                });
                match self.publish_gossip(query_id, &query).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(query_id, cause = %e, "search not published on the gossip topic");
                        Some(0)
                    }
                }
            }
        };
        drop(tx);
        tracing::info!(query_id, scope = query.scope.as_str(), data_type = %query.data_type, targeted = ?targeted, "search started");
        let summary = self.aggregate(query_id, &query, rx, targeted, deadline).await;
        drop(_unregister);
        tasks.abort_all();
        tracing::info!(
            query_id,
            answered = summary.answered.len(),
            unreachable = summary.unreachable.len(),
            results = summary.forwarded,
            "search done"
        );
        let unreachable: Vec<Value> = summary
            .unreachable
            .iter()
            .map(|(p, reason)| json!({"peer_id": p.to_string(), "reason": reason}))
            .collect();
        let mut body = json!({
            "query_id": query_id, "data_type": query.data_type, "done": true,
            "peers_answered": summary.answered.len(), "results_total": summary.forwarded,
        });
        if let Some(n) = targeted {
            body["peers_targeted"] = json!(n);
        }
        if !unreachable.is_empty() {
            body["unreachable"] = json!(unreachable);
        }
        self.publish(Subject::from_static(SUBJECT_SEARCH_EVENT), &body)
            .await;
    }

    /// The limit a responder is asked for: the search's, within one peer's share.
    fn peer_limit(&self, limit: u64) -> u64 {
        limit.min(self.env.tuning.search_peer_max_results)
    }

    /// The peers a `known` / `partner` search goes to.
    async fn targets(&self, scope: Scope) -> Vec<PeerId> {
        let rows = match self.env.store.peers().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(cause = %e, "peers table unreadable; searching configured partners only");
                Vec::new()
            }
        };
        let blacklisted: HashSet<&str> = rows
            .iter()
            .filter(|r| r.relation == Relation::Blacklist)
            .map(|r| r.peer_id.as_str())
            .collect();
        let wanted = match scope {
            Scope::Known => Relation::Known,
            _ => Relation::Partner,
        };
        let mut out: Vec<PeerId> = rows
            .iter()
            .filter(|r| r.relation == wanted)
            .filter_map(|r| r.peer_id.parse().ok())
            .collect();
        if scope == Scope::Known {
            // A configured partner met through the DHT is a partner, not merely known.
            out.retain(|p| !self.env.partners.contains(p));
        }
        if scope == Scope::Partner {
            out.extend(
                self.env
                    .partners
                    .peers()
                    .into_iter()
                    .filter(|p| !blacklisted.contains(p.to_string().as_str())),
            );
        }
        out.sort();
        out.dedup();
        out.retain(|p| *p != self.own);
        out
    }

    async fn publish_gossip(&self, query_id: &str, query: &Query) -> Result<(), String> {
        let message = GossipQuery {
            query_id: query_id.to_owned(),
            searcher: self.own_id.clone(),
            data_type: query.data_type.clone(),
            search: query.search.clone(),
            limit: self.peer_limit(query.limit),
            max_frame_bytes: self.env.tuning.max_frame_bytes as u64,
            expires_at: now_ms() + query.timeout.as_millis() as u64,
            signature: String::new(),
        }
        .sign(&self.env.key)
        .map_err(|e| e.to_string())?;
        let data = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
        self.env
            .net
            .publish_gossip(data, self.env.tuning.io_timeout)
            .await
            .map_err(|e| e.to_string())
    }

    /// Asks one peer over a search stream; everything it says goes to `tx`.
    async fn ask_peer(&self, peer: PeerId, frame: Frame, tx: mpsc::Sender<Answer>, deadline: Instant) {
        let t = self.env.tuning.io_timeout;
        let exchange = async {
            self.env.directory.reach(peer, t).await?;
            let mut stream = self
                .env
                .net
                .open_stream(peer, PROTOCOL_SEARCH, t)
                .await
                .map_err(|e| e.to_string())?;
            wire::write_frame(&mut stream, &frame)
                .await
                .map_err(|e| format!("cannot send the query: {e}"))?;
            let Frame::SearchQuery { query_id, .. } = &frame else {
                return Err("not a query".to_owned());
            };
            let cap = self.env.tuning.search_peer_max_results;
            let outcome = read_answers(
                &mut stream,
                peer,
                query_id,
                self.env.tuning.max_frame_bytes,
                cap,
                &tx,
            )
            .await;
            let _ = stream.close().await;
            outcome
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::debug!(%peer, cause = %reason, "peer not searched");
                // The aggregator may be gone already (deadline, limit).
                let _ = tx.send(Answer::Failed { peer, reason }).await;
            }
            // Deadline: the aggregator ends by itself.
            Err(_) => tracing::debug!(%peer, "peer silent until the search deadline"),
        }
    }

    /// Forwards answers as `SEARCH_EVENT` batches until every targeted peer settled (when
    /// `targeted` is known), the limit is reached, or the deadline.
    async fn aggregate(
        &self,
        query_id: &str,
        query: &Query,
        mut rx: mpsc::Receiver<Answer>,
        targeted: Option<usize>,
        deadline: Instant,
    ) -> Summary {
        let mut summary = Summary::default();
        let mut settled: HashSet<PeerId> = HashSet::new();
        let tuning = &self.env.tuning;
        let mut screen = Screen::new(
            &query.data_type,
            tuning.search_peer_max_results,
            tuning.search_peer_max_bytes,
        );
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        loop {
            if targeted.is_some_and(|n| settled.len() >= n) || summary.forwarded >= query.limit {
                break;
            }
            let answer = tokio::select! {
                _ = &mut sleep => break,
                a = rx.recv() => a,
            };
            match answer {
                // Every asker ended (known / partner); `all` keeps a sender registered.
                None => break,
                Some(Answer::Batch {
                    peer,
                    data_type,
                    results,
                }) => {
                    let room = query.limit.saturating_sub(summary.forwarded);
                    let (fresh, dropped) = screen.batch(peer, data_type.as_deref(), results, room);
                    self.count_dropped(query_id, peer, &dropped);
                    if fresh.is_empty() {
                        continue;
                    }
                    summary.forwarded += fresh.len() as u64;
                    Metrics::add(&self.env.metrics.discovery.results_forwarded, fresh.len() as u64);
                    let body = json!({
                        "query_id": query_id, "data_type": query.data_type, "from_peer": peer.to_string(),
                        "results": fresh, "done": false,
                    });
                    self.publish(Subject::from_static(SUBJECT_SEARCH_EVENT), &body)
                        .await;
                }
                Some(Answer::Done { peer }) => {
                    summary.answered.insert(peer);
                    settled.insert(peer);
                }
                Some(Answer::Failed { peer, reason }) => {
                    if settled.insert(peer) {
                        summary.unreachable.push((peer, reason));
                    }
                }
            }
        }
        summary
    }

    /// Counts every dropped result; logs once per interval per peer and reason.
    fn count_dropped(&self, query_id: &str, peer: PeerId, dropped: &Dropped) {
        for (code, n) in dropped.by_reason() {
            if n == 0 {
                continue;
            }
            self.env.metrics.discovery.results_dropped(code, n);
            if let Some(count) = self.throttle.hit(peer, code) {
                tracing::warn!(%peer, code, query_id, dropped = n, count, "search results of a peer dropped");
            }
        }
    }

    async fn is_partner(&self, peer: PeerId) -> bool {
        if self.env.partners.contains(&peer) {
            return true;
        }
        matches!(
            self.env.store.peer(&peer.to_string()).await,
            Ok(Some(row)) if row.relation == Relation::Partner
        )
    }

    /// This node's own resources of `data_type` that `searcher` may see and that contain
    /// `search`, at most `limit`, read as they are consumed.
    async fn matches(&self, searcher: PeerId, data_type: &str, search: &str, limit: u64) -> OwnMatches {
        let partner = self.is_partner(searcher).await;
        OwnMatches {
            store: self.env.store.clone(),
            origin: self.own_id.clone(),
            data_type: data_type.to_owned(),
            needle: search.to_lowercase(),
            partner,
            left: limit.min(MAX_LIMIT),
            after: None,
            matched: VecDeque::new(),
            last_page: false,
        }
    }

    /// An `all` query from the gossip topic: verified (and the verdict reported, so
    /// gossipsub forwards only valid queries), then answered when something matches.
    async fn on_gossip_query(
        &self,
        msg: &GossipMessage,
    ) -> Result<GossipQuery, (GossipVerdict, &'static str)> {
        let (q, searcher) =
            decode_gossip_query(&msg.data).map_err(|reason| (GossipVerdict::Reject, reason))?;
        if msg.author != Some(searcher) {
            return Err((GossipVerdict::Reject, "author_mismatch"));
        }
        if searcher == self.own {
            return Err((GossipVerdict::Ignore, "own"));
        }
        if q.expires_at <= now_ms() {
            return Err((GossipVerdict::Ignore, "expired"));
        }
        if matches!(
            self.env.store.peer(&q.searcher).await,
            Ok(Some(row)) if row.relation == Relation::Blacklist
        ) {
            // Relayed by others: the gater keeps the peer itself away.
            return Err((GossipVerdict::Ignore, "blacklisted"));
        }
        // Anyone can make keys: a searcher whose record this node does not hold costs a
        // DHT lookup, so such queries are rate-limited, per key and all together.
        if !self.holds_record_of(searcher).await && !self.unknown_query_allowed(searcher) {
            return Err((GossipVerdict::Ignore, "rate_limited"));
        }
        let Some(record) = self
            .env
            .directory
            .record_of(searcher, self.env.tuning.io_timeout)
            .await
        else {
            return Err((GossipVerdict::Ignore, "no_peer_record"));
        };
        if !q.verify(&record.public_key) {
            return Err((GossipVerdict::Reject, "bad_signature"));
        }
        Ok(q)
    }

    /// A token of the searcher's own bucket, then of the one all unknown searchers share
    /// (a key over its rate takes nothing from the others).
    fn unknown_query_allowed(&self, searcher: PeerId) -> bool {
        self.unknown_keys.try_take(&searcher) && self.unknown_all.try_take(&())
    }

    /// Whether `peer` is a partner or its row in the peers table holds a record (a peer
    /// met through the DHT or a search).
    async fn holds_record_of(&self, peer: PeerId) -> bool {
        self.env.partners.contains(&peer)
            || matches!(self.env.store.peer(&peer.to_string()).await, Ok(Some(row)) if row.record.is_some())
    }

    async fn answer_gossip(&self, q: GossipQuery) -> Result<(), String> {
        let searcher: PeerId = q.searcher.parse().map_err(|_| "bad searcher".to_owned())?;
        let t = self.env.tuning.io_timeout;
        // The searcher's deadline, never beyond the longest a search may last.
        let left = Duration::from_millis(q.expires_at.saturating_sub(now_ms())).min(MAX_TIMEOUT);
        let send = async {
            let mut matches = self.matches(searcher, &q.data_type, &q.search, q.limit).await;
            let first = matches.next().await.map_err(String::from)?;
            Metrics::add(&self.env.metrics.discovery.queries_answered, 1);
            // Only responders with matches answer an `all` search.
            let Some(first) = first else { return Ok(()) };
            self.env.directory.reach(searcher, t).await?;
            let mut stream = self
                .env
                .net
                .open_stream(searcher, PROTOCOL_SEARCH, t)
                .await
                .map_err(|e| e.to_string())?;
            let cap = frame_cap(self.env.tuning.max_frame_bytes, Some(q.max_frame_bytes));
            let sent = send_matches(
                &mut stream,
                &q.query_id,
                &q.data_type,
                Some(first),
                &mut matches,
                cap,
                t,
            )
            .await;
            let _ = stream.close().await;
            sent.map(|_| ()).map_err(String::from)
        };
        tokio::time::timeout(left, send)
            .await
            .unwrap_or_else(|_| Err("the search's deadline passed".to_owned()))
    }
}

async fn on_gossip(shared: &Shared, msg: GossipMessage) {
    let net = &shared.env.net;
    match shared.on_gossip_query(&msg).await {
        Ok(q) => {
            net.report_gossip(msg.message_id, msg.propagation_source, GossipVerdict::Accept)
                .await;
            let query_id = q.query_id.clone();
            let searcher = q.searcher.clone();
            match shared.answer_gossip(q).await {
                Ok(()) => tracing::debug!(query_id, searcher, "gossip search answered"),
                Err(e) => tracing::info!(query_id, searcher, cause = %e, "gossip search not answered"),
            }
        }
        Err((verdict, reason)) => {
            if reason != "own" {
                shared.env.metrics.discovery.query_rejected(reason);
                let relay = msg.propagation_source;
                if let Some(count) = shared.throttle.hit(relay, reason) {
                    tracing::warn!(peer = %relay, author = ?msg.author, code = reason, count, "gossip search query refused");
                }
            }
            net.report_gossip(msg.message_id, msg.propagation_source, verdict)
                .await;
        }
    }
}

/// Serves one inbound search stream: a query (answered on it) or the answer of a
/// responder to one of this node's `all` searches.
async fn serve_stream(shared: &Shared, peer: PeerId, mut stream: Stream) {
    let t = shared.env.tuning.io_timeout;
    let max = shared.env.tuning.max_frame_bytes;
    let first = match tokio::time::timeout(t, wire::read_frame(&mut stream, max)).await {
        Ok(Ok(Some(frame))) => frame,
        other => {
            tracing::debug!(%peer, outcome = ?other.map(|r| r.map(|_| ())), "search stream without a first frame");
            return;
        }
    };
    match first {
        Frame::SearchQuery {
            query_id,
            data_type,
            search,
            limit,
            max_frame_bytes,
        } => {
            if query_id.len() > MAX_QUERY_ID
                || search.len() > MAX_SEARCH_BYTES
                || data_type.len() > MAX_DATA_TYPE
            {
                let refusal = Refusal::new(ErrorCode::InvalidField, "query outside limits");
                let _ = tokio::time::timeout(t, wire::write_frame(&mut stream, &error_frame(&refusal))).await;
                return;
            }
            let limit = limit.unwrap_or(DEFAULT_LIMIT);
            let mut matches = shared.matches(peer, &data_type, &search, limit).await;
            let cap = frame_cap(max, max_frame_bytes);
            let outcome = send_matches(&mut stream, &query_id, &data_type, None, &mut matches, cap, t).await;
            match &outcome {
                Err(SendError::Store(e)) => {
                    let refusal = Refusal::new(ErrorCode::StoreUnavailable, e.clone());
                    let _ =
                        tokio::time::timeout(t, wire::write_frame(&mut stream, &error_frame(&refusal))).await;
                }
                _ => Metrics::add(&shared.env.metrics.discovery.queries_answered, 1),
            }
            match outcome {
                Ok((count, skipped)) => {
                    tracing::debug!(%peer, query_id, data_type, count, skipped, "search query answered")
                }
                Err(e) => tracing::info!(%peer, query_id, cause = %e, "search query not answered"),
            }
            let _ = tokio::time::timeout(t, stream.close()).await;
        }
        Frame::SearchResults {
            query_id,
            data_type,
            results,
        } => {
            let waiting = shared
                .registry
                .lock()
                .ok()
                .and_then(|r| r.get(&query_id).cloned());
            let Some(waiting) = waiting else {
                tracing::debug!(%peer, query_id, "answer to no search in flight; dropped");
                return;
            };
            let first = results.len() as u64;
            let batch = Answer::Batch {
                peer,
                data_type,
                results,
            };
            if waiting.tx.send(batch).await.is_err() {
                return;
            }
            let tx = waiting.tx.clone();
            let cap = shared.env.tuning.search_peer_max_results.saturating_sub(first);
            let rest = read_answers(&mut stream, peer, &query_id, max, cap, &tx);
            match tokio::time::timeout_at(waiting.deadline, rest).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    tracing::debug!(%peer, query_id, cause = %reason, "answer stream ended early")
                }
                Err(_) => tracing::debug!(%peer, query_id, "answer stream still open at the deadline"),
            }
        }
        Frame::SearchDone { query_id, .. } => {
            let waiting = shared
                .registry
                .lock()
                .ok()
                .and_then(|r| r.get(&query_id).cloned());
            if let Some(w) = waiting {
                let _ = w.tx.send(Answer::Done { peer }).await;
            }
        }
        other => tracing::debug!(%peer, frame = ?other, "unexpected first frame on a search stream"),
    }
}

/// Reads `search_results` frames of `query_id` into `tx` until `search_done`, or until
/// the stream carried more than twice `cap` results or frames (an honest responder sends
/// at most `cap` results, the limit it was asked for, in at most as many frames): then the
/// peer counts as done and the rest is not read. Results are screened by the aggregator
/// ([`Screen`]), not here.
///
/// # Errors
/// The stream ended or failed before `search_done`, the peer refused, or the search ended.
async fn read_answers<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: PeerId,
    query_id: &str,
    max: usize,
    cap: u64,
    tx: &mpsc::Sender<Answer>,
) -> Result<(), String> {
    let (mut results_read, mut frames) = (0u64, 0u64);
    let most = cap.saturating_mul(2);
    loop {
        let frame = wire::read_frame(r, max).await;
        frames = frames.saturating_add(1);
        if frames > most.saturating_add(1) {
            tracing::debug!(%peer, query_id, cap, "answer stream closed: more frames than the result cap");
            let _ = tx.send(Answer::Done { peer }).await;
            return Ok(());
        }
        match frame {
            Ok(Some(Frame::SearchResults {
                query_id: q,
                data_type,
                results,
            })) if q == query_id => {
                results_read = results_read.saturating_add(results.len() as u64);
                tx.send(Answer::Batch {
                    peer,
                    data_type,
                    results,
                })
                .await
                .map_err(|_| "search ended".to_owned())?;
                if results_read > most {
                    tracing::debug!(%peer, query_id, cap, "answer stream closed: more results than the cap");
                    let _ = tx.send(Answer::Done { peer }).await;
                    return Ok(());
                }
            }
            Ok(Some(Frame::SearchDone { query_id: q, .. })) if q == query_id => {
                let _ = tx.send(Answer::Done { peer }).await;
                return Ok(());
            }
            Ok(Some(Frame::Error { code, message, .. })) => return Err(format!("{code}: {message}")),
            Ok(Some(other)) => tracing::debug!(%peer, frame = ?other, "unexpected frame on a search stream"),
            Ok(None) => return Err("stream ended before search_done".to_owned()),
            Err(e) if e.is_recoverable() => {
                tracing::warn!(%peer, query_id, cause = %e, "unreadable search answer skipped")
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The frame size a responder writes: its own cap, lowered to the searcher's.
fn frame_cap(own: usize, searcher: Option<u64>) -> usize {
    let asked = searcher.map_or(own, |s| usize::try_from(s).unwrap_or(usize::MAX));
    own.min(asked).max(MIN_FRAME)
}

/// This node's own resources matching one query, read from the store in pages of at
/// most [`PAGE_COUNT`] resources and [`PAGE_BYTES`] bytes of JSON text, each parsed alone
/// to be matched: a query holds one page and one parsed resource at a time.
struct OwnMatches {
    store: Arc<dyn Store>,
    origin: String,
    data_type: String,
    needle: String,
    partner: bool,
    /// Matches still to give (the limit).
    left: u64,
    /// Where the next page starts.
    after: Option<String>,
    /// Matches of the last page read, not given yet.
    matched: VecDeque<Box<RawValue>>,
    last_page: bool,
}

impl OwnMatches {
    /// The next match, as its JSON text; `None` at the limit or the end.
    ///
    /// # Errors
    /// The store could not be read.
    async fn next(&mut self) -> Result<Option<Box<RawValue>>, SendError> {
        while self.left > 0 {
            if let Some(raw) = self.matched.pop_front() {
                self.left -= 1;
                return Ok(Some(raw));
            }
            if self.last_page {
                return Ok(None);
            }
            let bounds = PageBounds {
                max_count: PAGE_COUNT,
                max_bytes: PAGE_BYTES,
            };
            let page = self
                .store
                .own_resources_page(&self.origin, &self.data_type, self.after.take(), bounds)
                .await
                .map_err(|e| SendError::Store(e.to_string()))?;
            self.last_page = page.next.is_none();
            self.after = page.next;
            // Parsing and matching a page is CPU work: off the runtime's worker threads, so
            // that searches cannot stall the network loop and the partner sessions.
            let (needle, partner, left) = (self.needle.clone(), self.partner, self.left);
            let data_type = self.data_type.clone();
            let items = page.items;
            self.matched =
                tokio::task::spawn_blocking(move || match_page(items, &needle, partner, left, &data_type))
                    .await
                    .map_err(|e| SendError::Store(format!("matching failed: {e}")))?;
        }
        Ok(None)
    }
}

/// The resources of a page that the searcher may see and that contain `needle`, at most
/// `left`, as JSON text; each parsed alone.
fn match_page(
    items: Vec<(String, String)>,
    needle: &str,
    partner: bool,
    left: u64,
    data_type: &str,
) -> VecDeque<Box<RawValue>> {
    let mut out = VecDeque::new();
    for (id, json) in items {
        if out.len() as u64 >= left {
            break;
        }
        let Ok(value) = serde_json::from_str::<Value>(&json) else {
            tracing::warn!(
                id,
                data_type,
                "own resource is not JSON; left out of search answers"
            );
            continue;
        };
        if !(visible(&value, partner) && contains(&value, needle)) {
            continue;
        }
        drop(value);
        if let Ok(raw) = RawValue::from_string(json) {
            out.push_back(raw);
        }
    }
    out
}

/// Why a responder could not finish its answer.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("store: {0}")]
    Store(String),
    #[error("write: {0}")]
    Write(#[from] std::io::Error),
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.to_string()
    }
}

/// A `search_results` frame's body, written from JSON text without building trees.
#[derive(Serialize)]
struct ResultsOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    query_id: &'a str,
    data_type: &'a str,
    results: &'a [Box<RawValue>],
}

/// The length-prefixed `search_results` frame of `results`.
fn encode_results(query_id: &str, data_type: &str, results: &[Box<RawValue>]) -> Vec<u8> {
    let out = ResultsOut {
        kind: "search_results",
        query_id,
        data_type,
        results,
    };
    let mut buf = vec![0u8; 4];
    // JSON text and strings always serialize.
    if serde_json::to_writer(&mut buf, &out).is_err() {
        return Vec::new();
    }
    let len = u32::try_from(buf.len().saturating_sub(4)).unwrap_or(u32::MAX);
    if let Some(prefix) = buf.get_mut(..4) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
    buf
}

/// Cuts results into batches whose frame stays within a cap, apart from I/O.
struct Batcher {
    /// Bytes left for results in a frame once its envelope is written.
    room: usize,
    batch: Vec<Box<RawValue>>,
    size: usize,
    count: u64,
    skipped: u64,
}

impl Batcher {
    fn new(query_id: &str, data_type: &str, cap: usize) -> Batcher {
        let envelope = encode_results(query_id, data_type, &[]).len();
        Batcher {
            room: cap.saturating_sub(envelope),
            batch: Vec::new(),
            size: 0,
            count: 0,
            skipped: 0,
        }
    }

    /// Adds `r`; returns the full batch to write first when `r` does not fit beside it.
    /// A result too large for a frame alone is skipped and counted.
    fn push(&mut self, r: Box<RawValue>) -> Option<Vec<Box<RawValue>>> {
        // Its size in the frame's array, with the separating comma.
        let len = r.get().len().saturating_add(1);
        if len > self.room {
            self.skipped = self.skipped.saturating_add(1);
            return None;
        }
        let full = (self.size.saturating_add(len) > self.room).then(|| self.take());
        self.size = self.size.saturating_add(len);
        self.batch.push(r);
        full.flatten()
    }

    /// The batch so far, if any.
    fn take(&mut self) -> Option<Vec<Box<RawValue>>> {
        if self.batch.is_empty() {
            return None;
        }
        self.size = 0;
        self.count = self.count.saturating_add(self.batch.len() as u64);
        Some(std::mem::take(&mut self.batch))
    }
}

/// Writes `first` and the rest of `matches` as `search_results` frames of at most `cap`
/// bytes each, as they are read, then `search_done`.
///
/// # Errors
/// The store failed (nothing more is written), or a write failed or took longer than
/// `timeout`.
async fn send_matches<W: AsyncWrite + Unpin>(
    w: &mut W,
    query_id: &str,
    data_type: &str,
    first: Option<Box<RawValue>>,
    matches: &mut OwnMatches,
    cap: usize,
    timeout: Duration,
) -> Result<(u64, u64), SendError> {
    let mut batcher = Batcher::new(query_id, data_type, cap);
    let mut next = first;
    loop {
        let r = match next.take() {
            Some(r) => r,
            None => match matches.next().await? {
                Some(r) => r,
                None => break,
            },
        };
        if let Some(full) = batcher.push(r) {
            write_bytes(w, &encode_results(query_id, data_type, &full), timeout).await?;
        }
    }
    if let Some(last) = batcher.take() {
        write_bytes(w, &encode_results(query_id, data_type, &last), timeout).await?;
    }
    let done = Frame::SearchDone {
        query_id: query_id.to_owned(),
        count: batcher.count,
        skipped: batcher.skipped,
    };
    write(w, &done, timeout).await?;
    Ok((batcher.count, batcher.skipped))
}

async fn write_bytes<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let io = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame, timeout: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(timeout, wire::write_frame(w, frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

fn error_frame(refusal: &Refusal) -> Frame {
    Frame::error(None, refusal.code, refusal.message.clone())
}

/// `private` never, `partners` to partners only, anything else to everyone.
fn visible(resource: &Value, searcher_is_partner: bool) -> bool {
    match resource.get("access").and_then(Value::as_str) {
        Some(a) if a.eq_ignore_ascii_case("private") => false,
        Some(a) if a.eq_ignore_ascii_case("partners") => searcher_is_partner,
        _ => true,
    }
}

/// Whether any value in `v` (strings, numbers, booleans, at any depth; keys excluded)
/// contains `needle`, already lower-cased. The empty text matches everything.
fn contains(v: &Value, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    match v {
        Value::String(s) => contains_text(s, needle),
        Value::Number(n) => n.to_string().contains(needle),
        Value::Bool(b) => b.to_string().contains(needle),
        Value::Array(a) => a.iter().any(|x| contains(x, needle)),
        Value::Object(o) => o.values().any(|x| contains(x, needle)),
        Value::Null => false,
    }
}

/// Whether `s`, lower-cased, contains `needle` (lower-cased already); without allocating
/// when both are ASCII.
fn contains_text(s: &str, needle: &str) -> bool {
    if s.is_ascii() && needle.is_ascii() {
        let (s, n) = (s.as_bytes(), needle.as_bytes());
        return n.len() <= s.len() && s.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n));
    }
    s.to_lowercase().contains(needle)
}

/// A result's identity for duplicate detection: its `id`, else its whole JSON.
pub(crate) fn dedupe_key(r: &Value) -> String {
    match r.get("id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => r.to_string(),
    }
}

/// Results of one batch that the searcher dropped, by why.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Dropped {
    /// `creator_id` absent or not the peer that answered.
    not_creator: u64,
    /// The batch did not say the data type asked, or the result says another one.
    wrong_data_type: u64,
    /// Beyond the peer's share of the search, in count or in bytes.
    result_cap: u64,
    /// Seen already from this peer (not a refusal: not counted in the metric).
    duplicate: u64,
}

impl Dropped {
    /// The refusals, with their metric label and log code.
    fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("not_creator", self.not_creator),
            ("wrong_data_type", self.wrong_data_type),
            ("result_cap", self.result_cap),
        ]
    }
}

/// What a peer contributed to one search so far.
#[derive(Debug, Default, Clone, Copy)]
struct Share {
    results: u64,
    bytes: u64,
}

/// The searcher's rules for one search's answers, apart from I/O: a result is kept when
/// its `creator_id` is the peer that answered, its batch is of the data type asked (and the
/// result names no other), it is not a duplicate from that peer, and the peer's share
/// (`max_results` results, `max_bytes` bytes of JSON) is not used up.
///
/// Memory: `seen` and `shares` hold kept results only, so they are bounded by the search's
/// limit (at most [`MAX_LIMIT`] results) whatever peers send.
struct Screen {
    data_type: String,
    max_results: u64,
    max_bytes: u64,
    seen: HashSet<(PeerId, String)>,
    shares: HashMap<PeerId, Share>,
}

impl Screen {
    fn new(data_type: &str, max_results: u64, max_bytes: u64) -> Screen {
        Screen {
            data_type: data_type.to_owned(),
            max_results,
            max_bytes,
            seen: HashSet::new(),
            shares: HashMap::new(),
        }
    }

    /// The results of `peer`'s batch to forward (at most `room`), and what was dropped.
    /// Results beyond `room` (the search's limit) are neither kept nor counted.
    fn batch(
        &mut self,
        peer: PeerId,
        data_type: Option<&str>,
        results: Vec<Value>,
        room: u64,
    ) -> (Vec<Value>, Dropped) {
        let mut dropped = Dropped::default();
        let mut kept = Vec::new();
        if data_type != Some(self.data_type.as_str()) {
            dropped.wrong_data_type = results.len() as u64;
            return (kept, dropped);
        }
        let peer_id = peer.to_string();
        for r in results {
            if kept.len() as u64 >= room {
                break;
            }
            if r.get("creator_id").and_then(Value::as_str) != Some(peer_id.as_str()) {
                dropped.not_creator += 1;
                continue;
            }
            if r.get("data_type")
                .and_then(Value::as_str)
                .is_some_and(|dt| dt != self.data_type)
            {
                dropped.wrong_data_type += 1;
                continue;
            }
            let key = (peer, dedupe_key(&r));
            if self.seen.contains(&key) {
                dropped.duplicate += 1;
                continue;
            }
            let share = self.shares.get(&peer).copied().unwrap_or_default();
            let len = serde_json::to_vec(&r).map_or(u64::MAX, |b| b.len() as u64);
            if share.results >= self.max_results || share.bytes.saturating_add(len) > self.max_bytes {
                dropped.result_cap += 1;
                continue;
            }
            self.shares.insert(
                peer,
                Share {
                    results: share.results.saturating_add(1),
                    bytes: share.bytes.saturating_add(len),
                },
            );
            self.seen.insert(key);
            kept.push(r);
        }
        (kept, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CommandAction;

    fn command(data_type: &str, payload: Value) -> AppCommand {
        AppCommand {
            action: CommandAction::Search,
            data_type: data_type.into(),
            user: "u".into(),
            payload,
        }
    }

    fn code(data_type: &str, payload: Value) -> ErrorCode {
        parse(&command(data_type, payload)).unwrap_err().code
    }

    #[test]
    fn payloads_are_validated() {
        assert_eq!(code("PEER", json!({})), ErrorCode::MissingField);
        assert_eq!(code("PEER", json!({"search": " "})), ErrorCode::InvalidField);
        assert_eq!(code("PEER", json!({"search": 3})), ErrorCode::InvalidField);
        assert_eq!(
            code("DATA_RESOURCE", json!({"search": "x"})),
            ErrorCode::MissingField
        );
        assert_eq!(
            code("DATA_RESOURCE", json!({"search": "x", "type": "friends"})),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code("DATA_RESOURCE", json!({"search": "x", "type": "all", "limit": 0})),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(
                "DATA_RESOURCE",
                json!({"search": "x", "type": "all", "timeout_ms": -5})
            ),
            ErrorCode::InvalidField
        );
        assert_eq!(
            parse(&command("peer", json!({"search": "site-a"}))).unwrap(),
            Parsed::Peer {
                search: "site-a".into(),
                timeout: DEFAULT_TIMEOUT
            }
        );
        let Parsed::Resources(q) = parse(&command(
            "DATA_RESOURCE",
            json!({"search": "gpu", "type": "Known", "limit": 5, "timeout_ms": 700}),
        ))
        .unwrap() else {
            panic!("not a resource search")
        };
        assert_eq!(
            (q.scope, q.limit, q.timeout),
            (Scope::Known, 5, Duration::from_millis(700))
        );
    }

    #[test]
    fn access_and_text_matching() {
        let public = json!({"id": "a", "name": "Big GPU box", "specs": {"cores": 64}});
        let partners = json!({"id": "b", "name": "gpu", "access": "partners"});
        let private = json!({"id": "c", "name": "gpu", "access": "PRIVATE"});
        assert!(visible(&public, false) && visible(&partners, true) && !visible(&partners, false));
        assert!(!visible(&private, true));
        assert!(contains(&public, "gpu"));
        assert!(contains(&public, "64"));
        assert!(!contains(&public, "specs"), "keys do not match");
        assert!(contains(&public, ""));
        assert!(contains(&json!({"n": "Big GPU Box"}), "gpu box"));
        assert!(
            contains(&json!({"n": "ÉCRAN géant"}), "écran"),
            "non-ASCII lower-cased too"
        );
        assert!(!contains(&json!({"n": "gp"}), "gpu"));
    }

    #[test]
    fn gossip_queries_verify_against_the_signer() {
        let key = Keypair::generate_ed25519();
        let q = GossipQuery {
            query_id: new_query_id(),
            searcher: key.public().to_peer_id().to_string(),
            data_type: "DATA_RESOURCE".into(),
            search: "gpu".into(),
            limit: 10,
            max_frame_bytes: 4096,
            expires_at: 1,
            signature: String::new(),
        }
        .sign(&key)
        .unwrap();
        assert_eq!(q.query_id.len(), 16);
        assert!(q.verify(&key.public()));
        assert!(!q.verify(&Keypair::generate_ed25519().public()));
        let mut widened = q.clone();
        widened.limit = 10_000;
        assert!(!widened.verify(&key.public()));
    }

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn results_are_cut_into_frames_under_the_cap() {
        let mut b = Batcher::new("q1", "COMPUTE_RESOURCE", 4096);
        let mut frames = Vec::new();
        for i in 0..100 {
            frames.extend(b.push(raw(json!({"id": format!("r{i}"), "pad": "x".repeat(100)}))));
        }
        assert!(b
            .push(raw(json!({"id": "huge", "pad": "y".repeat(10_000)})))
            .is_none());
        frames.extend(b.take());
        assert_eq!((b.count, b.skipped), (100, 1));
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let mut got = 0;
        for f in &frames {
            let bytes = encode_results("q1", "COMPUTE_RESOURCE", f);
            assert!(bytes.len() <= 4096 + 4, "{} bytes", bytes.len());
            let Frame::SearchResults {
                data_type, results, ..
            } = wire::decode_frame(&bytes[4..]).unwrap()
            else {
                panic!("not results")
            };
            assert_eq!(data_type.as_deref(), Some("COMPUTE_RESOURCE"));
            got += results.len();
        }
        assert_eq!(got, 100);
    }

    #[test]
    fn the_searcher_keeps_only_its_responders_own_results_of_the_type_asked_within_its_share() {
        let (peer, other) = (PeerId::random(), PeerId::random());
        let r = |id: &str, creator: &PeerId| json!({"id": id, "creator_id": creator.to_string(), "pad": "p"});
        let mut screen = Screen::new("DT", 3, 1 << 20);
        let batch = vec![
            r("a", &peer),
            r("foreign", &other),
            json!({"id": "nobody"}),
            json!({"id": "typed", "creator_id": peer.to_string(), "data_type": "OTHER"}),
            r("a", &peer),
            r("b", &peer),
        ];
        let (kept, dropped) = screen.batch(peer, Some("DT"), batch, 100);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            dropped,
            Dropped {
                not_creator: 2,
                wrong_data_type: 1,
                result_cap: 0,
                duplicate: 1
            }
        );
        let (kept, dropped) = screen.batch(peer, Some("OTHER"), vec![r("c", &peer)], 100);
        assert!(kept.is_empty());
        assert_eq!(dropped.wrong_data_type, 1);
        let (kept, _) = screen.batch(peer, None, vec![r("c", &peer)], 100);
        assert!(kept.is_empty(), "a batch must say its data type");
        let (kept, dropped) = screen.batch(
            peer,
            Some("DT"),
            vec![r("c", &peer), r("d", &peer), r("e", &peer)],
            100,
        );
        assert_eq!((kept.len(), dropped.result_cap), (1, 2), "three results per peer");
        let (kept, _) = screen.batch(other, Some("DT"), vec![r("a", &other), r("b", &other)], 1);
        assert_eq!(kept.len(), 1, "the room left by the limit");

        let mut bytes = Screen::new("DT", 100, 120);
        let (kept, dropped) = bytes.batch(
            peer,
            Some("DT"),
            (0..5).map(|i| r(&format!("x{i}"), &peer)).collect(),
            100,
        );
        assert!(kept.len() < 5 && !kept.is_empty(), "{kept:?}");
        assert_eq!(dropped.result_cap as usize, 5 - kept.len());
    }

    #[test]
    fn gossip_queries_decode_within_limits_whatever_the_bytes() {
        let key = Keypair::generate_ed25519();
        let q = GossipQuery {
            query_id: "q".into(),
            searcher: key.public().to_peer_id().to_string(),
            data_type: "DT".into(),
            search: "x".into(),
            limit: u64::MAX,
            max_frame_bytes: u64::MAX,
            expires_at: u64::MAX,
            signature: String::new(),
        };
        let ok = serde_json::to_vec(&q).unwrap();
        assert!(decode_gossip_query(&ok).is_ok());
        assert_eq!(decode_gossip_query(b"\xff{").err(), Some("undecodable"));
        assert_eq!(
            decode_gossip_query(&vec![b' '; MAX_GOSSIP_QUERY_BYTES + 1]).err(),
            Some("undecodable")
        );
        let mut bad = q.clone();
        bad.searcher = "nobody".into();
        assert_eq!(
            decode_gossip_query(&serde_json::to_vec(&bad).unwrap()).err(),
            Some("bad_searcher")
        );
        let mut long = q.clone();
        long.search = "s".repeat(MAX_SEARCH_BYTES + 1);
        assert_eq!(
            decode_gossip_query(&serde_json::to_vec(&long).unwrap()).err(),
            Some("limits")
        );
        let mut empty = q;
        empty.query_id.clear();
        assert_eq!(
            decode_gossip_query(&serde_json::to_vec(&empty).unwrap()).err(),
            Some("limits")
        );
        // Huge numbers stay harmless where they are used.
        assert_eq!(frame_cap(1 << 20, Some(u64::MAX)), 1 << 20);
        assert_eq!(frame_cap(1 << 20, Some(0)), MIN_FRAME);
    }

    #[test]
    fn a_page_stops_at_its_count_or_bytes_and_always_moves_on() {
        use crate::store::OwnPage;
        let items = |n: usize| (0..n).map(|i| Ok::<_, ()>((format!("id{i:03}"), "x".repeat(100))));
        let b = |max_count, max_bytes| PageBounds { max_count, max_bytes };
        let p = OwnPage::fill(items(10), b(4, 1 << 20)).unwrap();
        assert_eq!((p.items.len(), p.next.as_deref()), (4, Some("id003")));
        let p = OwnPage::fill(items(10), b(100, 250)).unwrap();
        assert_eq!(p.items.len(), 3, "stops once 250 bytes are held");
        let p = OwnPage::fill(items(1), b(100, 1)).unwrap();
        assert_eq!(p.items.len(), 1, "one resource at least");
        let p = OwnPage::fill(items(3), b(100, 1 << 20)).unwrap();
        assert_eq!((p.items.len(), p.next), (3, None));
    }
}
