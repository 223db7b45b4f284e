//! The searcher's side: one task per search of the local application, from the reply that
//! gives the application its query id to the final `SEARCH_EVENT` (`done: true`).
//!
//! - `PEER`: the peer directory (store, then DHT) → one event with the records.
//! - `known` / `partner`: a `search_query` frame to each targeted peer on
//!   `/opencloud/resource/search/1.0` (at most [`FANOUT`] at once); `all`: the query signed
//!   with the node's key on the gossip topic, answered on streams the responders open back
//!   ([`on_answer_stream`]).
//! - Every batch kept by the [`Screen`] becomes a `SEARCH_EVENT` (`done: false`); the search
//!   ends when every targeted peer settled, at the limit, or at the deadline.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use async_nats::Subject;
use futures::{AsyncRead, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::env::Shared;
use super::gossip_query::GossipQuery;
use super::query::{Query, Scope, PEER_DATA_TYPE};
use super::routes::{Answer, FindSearch, Inbox, Route};
use super::screen::{Dropped, Screen};
use super::PROTOCOL_SEARCH;
use crate::contract::now_ms;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, FrameError, SearchFrame};
use crate::store::Relation;

/// NATS subject of search results (node → application).
pub const SUBJECT_SEARCH_EVENT: &str = "SEARCH_EVENT";
/// Peers asked at once by one `known` / `partner` search.
pub(crate) const FANOUT: usize = 32;

/// A search the service admitted, as its task runs it.
pub(super) struct Admitted {
    pub(super) query_id: String,
    pub(super) search: Search,
    /// Where the application waits for the query id, if it asked for an answer.
    pub(super) reply: Option<Subject>,
}

/// What an admitted search looks for.
pub(super) enum Search {
    Peer {
        search: String,
        timeout: Duration,
    },
    /// With the inbox where the peers' answers arrive.
    Resources {
        query: Query,
        inbox: Inbox,
    },
}

/// How a search ended.
#[derive(Debug, Default)]
struct Summary {
    answered: HashSet<PeerId>,
    unreachable: Vec<(PeerId, String)>,
    forwarded: u64,
}

/// Runs one search to its end, flush of its events included.
pub(super) async fn run(shared: Arc<Shared>, admitted: Admitted) {
    let Admitted {
        query_id,
        search,
        reply,
    } = admitted;
    // The reply goes first, so the application knows the id of the events to come.
    shared
        .answers
        .reply(reply, &json!({"ok": true, "query_id": query_id}))
        .await;
    match search {
        Search::Peer { search, timeout } => search_peer(&shared, &query_id, &search, timeout).await,
        Search::Resources { query, inbox } => search_resources(&shared, &query_id, query, inbox).await,
    }
    if let Err(e) = shared.env.nats.flush().await {
        tracing::warn!(query_id, cause = %e, "search events not flushed");
    }
}

async fn publish_event(shared: &Shared, body: &Value) {
    shared
        .answers
        .publish(Subject::from_static(SUBJECT_SEARCH_EVENT), body)
        .await;
}

async fn search_peer(shared: &Shared, query_id: &str, search: &str, timeout: Duration) {
    let directory = &shared.env.directory;
    let records = match search.parse::<PeerId>() {
        Ok(peer) => directory.find_by_id(peer, timeout).await,
        Err(_) => directory.find_by_name(search, timeout).await,
    };
    tracing::info!(query_id, search, found = records.len(), "peer search done");
    Metrics::add(
        &shared.env.metrics.discovery.results_forwarded,
        records.len() as u64,
    );
    let results: Vec<Value> = records.iter().map(|r| r.to_value()).collect();
    let body = json!({"query_id": query_id, "data_type": PEER_DATA_TYPE, "results": results, "done": true});
    publish_event(shared, &body).await;
}

async fn search_resources(shared: &Arc<Shared>, query_id: &str, query: Query, inbox: Inbox) {
    let Inbox { route, rx } = inbox;
    let deadline = route.deadline;
    let mut tasks = JoinSet::new();
    let targeted = match query.scope {
        Scope::Known | Scope::Partner => {
            let targets = targets(shared, query.scope).await;
            let frame = SearchFrame::SearchQuery {
                query_id: query_id.to_owned(),
                data_type: query.data_type.clone(),
                search: query.search.clone(),
                limit: Some(peer_limit(shared, query.limit)),
                max_frame_bytes: Some(shared.env.tuning.max_frame_bytes as u64),
            };
            let fanout = Arc::new(Semaphore::new(FANOUT));
            for peer in &targets {
                let (me, frame, tx, fanout, peer) = (
                    shared.clone(),
                    frame.clone(),
                    route.tx.clone(),
                    fanout.clone(),
                    *peer,
                );
                tasks.spawn(async move {
                    let Ok(_permit) = fanout.acquire_owned().await else {
                        return;
                    };
                    ask_peer(&me, peer, frame, tx, deadline).await;
                });
            }
            Some(targets.len())
        }
        // The service holds this search's route: responders' streams deliver through it.
        Scope::All => match publish_gossip(shared, query_id, &query).await {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(query_id, cause = %e, "search not published on the gossip topic");
                Some(0)
            }
        },
    };
    drop(route);
    tracing::info!(query_id, scope = query.scope.as_str(), data_type = %query.data_type, targeted = ?targeted, "search started");
    let summary = aggregate(shared, query_id, &query, rx, targeted, deadline).await;
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
    publish_event(shared, &body).await;
}

/// The limit a responder is asked for: the search's, within one peer's share.
fn peer_limit(shared: &Shared, limit: u64) -> u64 {
    limit.min(shared.env.tuning.search_peer_max_results)
}

/// The peers a `known` / `partner` search goes to.
async fn targets(shared: &Shared, scope: Scope) -> Vec<PeerId> {
    let env = &shared.env;
    let rows = match env.store.peers().await {
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
        out.retain(|p| !env.partners.contains(p));
    }
    if scope == Scope::Partner {
        out.extend(
            env.partners
                .peers()
                .into_iter()
                .filter(|p| !blacklisted.contains(p.to_string().as_str())),
        );
    }
    out.sort();
    out.dedup();
    out.retain(|p| *p != shared.own);
    out
}

async fn publish_gossip(shared: &Shared, query_id: &str, query: &Query) -> Result<(), String> {
    let env = &shared.env;
    let message = GossipQuery {
        query_id: query_id.to_owned(),
        searcher: shared.own_id.clone(),
        data_type: query.data_type.clone(),
        search: query.search.clone(),
        limit: peer_limit(shared, query.limit),
        max_frame_bytes: env.tuning.max_frame_bytes as u64,
        expires_at: now_ms() + query.timeout.as_millis() as u64,
        signature: String::new(),
    }
    .sign(&env.key)
    .map_err(|e| e.to_string())?;
    let data = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
    env.net
        .publish_gossip(data, env.tuning.io_timeout)
        .await
        .map_err(|e| e.to_string())
}

/// Asks one peer over a search stream; everything it says goes to `tx`.
async fn ask_peer(
    shared: &Shared,
    peer: PeerId,
    frame: SearchFrame,
    tx: mpsc::Sender<Answer>,
    deadline: Instant,
) {
    let env = &shared.env;
    let t = env.tuning.io_timeout;
    let exchange = async {
        env.directory.reach(peer, t).await?;
        let mut stream = env
            .net
            .open_stream(peer, PROTOCOL_SEARCH, t)
            .await
            .map_err(|e| e.to_string())?;
        wire::write_frame(&mut stream, &frame)
            .await
            .map_err(|e| format!("cannot send the query: {e}"))?;
        let SearchFrame::SearchQuery { query_id, .. } = &frame else {
            return Err("not a query".to_owned());
        };
        let cap = env.tuning.search_peer_max_results;
        let outcome = read_answers(&mut stream, peer, query_id, env.tuning.max_frame_bytes, cap, &tx).await;
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
    shared: &Shared,
    query_id: &str,
    query: &Query,
    mut rx: mpsc::Receiver<Answer>,
    targeted: Option<usize>,
    deadline: Instant,
) -> Summary {
    let mut summary = Summary::default();
    let mut settled: HashSet<PeerId> = HashSet::new();
    let tuning = &shared.env.tuning;
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
                count_dropped(shared, query_id, peer, &dropped);
                if fresh.is_empty() {
                    continue;
                }
                summary.forwarded += fresh.len() as u64;
                Metrics::add(
                    &shared.env.metrics.discovery.results_forwarded,
                    fresh.len() as u64,
                );
                let body = json!({
                    "query_id": query_id, "data_type": query.data_type, "from_peer": peer.to_string(),
                    "results": fresh, "done": false,
                });
                publish_event(shared, &body).await;
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
fn count_dropped(shared: &Shared, query_id: &str, peer: PeerId, dropped: &Dropped) {
    for (code, n) in dropped.by_reason() {
        if n == 0 {
            continue;
        }
        shared.env.metrics.discovery.results_dropped(code, n);
        if let Some(count) = shared.throttle.hit(peer, code) {
            tracing::warn!(%peer, code, query_id, dropped = n, count, "search results of a peer dropped");
        }
    }
}

/// A stream a responder opened back to this node to answer one of its `all` searches,
/// whose first frame was `first`: its answers go to the search's route, until the deadline.
pub(super) async fn on_answer_stream(
    shared: &Shared,
    find: &Recipient<FindSearch>,
    peer: PeerId,
    first: SearchFrame,
    mut stream: Stream,
) {
    let max = shared.env.tuning.max_frame_bytes;
    let query_id = match &first {
        SearchFrame::SearchResults { query_id, .. } | SearchFrame::SearchDone { query_id, .. } => {
            query_id.clone()
        }
        other => {
            tracing::debug!(%peer, frame = ?other, "unexpected first frame on a search stream");
            return;
        }
    };
    let found = tokio::time::timeout(
        shared.env.tuning.io_timeout,
        find.send(FindSearch {
            query_id: query_id.clone(),
        }),
    )
    .await;
    let Ok(Ok(Some(route))) = found else {
        tracing::debug!(%peer, query_id, "answer to no search in flight; dropped");
        return;
    };
    match first {
        SearchFrame::SearchResults {
            data_type, results, ..
        } => {
            let first = results.len() as u64;
            let batch = Answer::Batch {
                peer,
                data_type,
                results,
            };
            if route.tx.send(batch).await.is_err() {
                return;
            }
            let cap = shared.env.tuning.search_peer_max_results.saturating_sub(first);
            read_rest(&mut stream, peer, &query_id, max, cap, &route).await;
        }
        _ => {
            let _ = route.tx.send(Answer::Done { peer }).await;
        }
    }
}

/// The rest of an answer stream, up to the search's deadline.
async fn read_rest(stream: &mut Stream, peer: PeerId, query_id: &str, max: usize, cap: u64, route: &Route) {
    let rest = read_answers(stream, peer, query_id, max, cap, &route.tx);
    match tokio::time::timeout_at(route.deadline, rest).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            tracing::debug!(%peer, query_id, cause = %reason, "answer stream ended early")
        }
        Err(_) => tracing::debug!(%peer, query_id, "answer stream still open at the deadline"),
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
        let frame = wire::read_frame::<SearchFrame, _>(r, max).await;
        frames = frames.saturating_add(1);
        if frames > most.saturating_add(1) {
            tracing::debug!(%peer, query_id, cap, "answer stream closed: more frames than the result cap");
            let _ = tx.send(Answer::Done { peer }).await;
            return Ok(());
        }
        match frame {
            Ok(Some(SearchFrame::SearchResults {
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
            Ok(Some(SearchFrame::SearchDone { query_id: q, .. })) if q == query_id => {
                let _ = tx.send(Answer::Done { peer }).await;
                return Ok(());
            }
            Ok(Some(SearchFrame::Error(ErrorFrame { code, message, .. }))) => {
                return Err(format!("{code}: {message}"))
            }
            Ok(Some(other)) => tracing::debug!(%peer, frame = ?other, "unexpected frame on a search stream"),
            Err(FrameError::Unexpected { kind }) => {
                tracing::debug!(%peer, frame = kind, "unexpected frame on a search stream")
            }
            Ok(None) => return Err("stream ended before search_done".to_owned()),
            Err(e) if e.is_recoverable() => {
                tracing::warn!(%peer, query_id, cause = %e, "unreadable search answer skipped")
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
