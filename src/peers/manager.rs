//! Peer manager: partnerships and the blacklist, made at run time.
//!
//! Sources of changes, all applied the same way and persisted in the store's peers table:
//! - an application publishing `CREATE_RESOURCE` with data_type `PEER` on the local NATS:
//!   `relation: "partner"` plus an address makes that peer a partner (connected, replicated
//!   to, accepted from); `relation: "blacklist"` makes the connection gater refuse it and
//!   closes its connections; `REMOVE_RESOURCE` of a `PEER` ends the partnership;
//! - the admin API and `oc-discovery partners add|remove|list`.
//!
//! The `PeerManager` actor is the only writer of relations, and it makes one change at a
//! time: a change (persist, then make the running node follow it) runs inside the actor's
//! context (`AtomicResponse` for messages, `ctx.wait` for NATS notices and the restore at
//! start), so two changes never interleave and the store, the partner registry and the
//! partner links always end on the same, last, relation.
//!
//! The node never reacts to its own publishes (`from_app: "oc-discovery"`), which also
//! covers the PEER resources partners propagate to it. Partners given by `--partner` are
//! partners for the life of the process; they are not persisted.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_nats::Message as NatsMessage;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::partners::Partners;
use crate::answers::{Answers, Refused};
use crate::backoff::Backoff;
use crate::contract::{self, now_ms, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::outbound::service::{AddPartner, RemovePartner};
use crate::p2p;
use crate::store::{PeerRow, Relation, Store, StoreResult};

/// Backoff bounds while the persisted relations cannot be read at start-up.
const RESTORE_RETRY_MIN: Duration = Duration::from_millis(200);
const RESTORE_RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest wait at start for the server to confirm the PEER subscriptions ([`subscribe`]).
const SUBSCRIBE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct PeerEnv {
    pub store: Arc<dyn Store>,
    pub net: p2p::Client,
    pub nats: async_nats::Client,
    pub partners: Arc<Partners>,
    /// The partner links, told to start or stop replicating to a peer.
    pub links: Links,
    pub metrics: Arc<Metrics>,
    /// Partners from `--partner`: never persisted.
    pub configured: Vec<(PeerId, Multiaddr)>,
}

/// Where the partner links are told to follow a relation (the `StreamService`).
pub(crate) struct Links {
    pub add: Recipient<AddPartner>,
    pub remove: Recipient<RemovePartner>,
}

impl Links {
    pub(crate) fn new<A>(links: Addr<A>) -> Self
    where
        A: Actor + Handler<AddPartner> + Handler<RemovePartner>,
        A::Context: actix::dev::ToEnvelope<A, AddPartner> + actix::dev::ToEnvelope<A, RemovePartner>,
    {
        Links {
            add: links.clone().recipient(),
            remove: links.recipient(),
        }
    }
}

/// The one writer of partnerships and the blacklist; see the module comment.
pub struct PeerManager {
    env: Arc<PeerEnv>,
    /// Reports refused PEER notices (`place="peers"`).
    answers: Answers,
    /// Delay before the next attempt to read the persisted relations, while they cannot be.
    restore_retry: Backoff,
}

impl PeerManager {
    pub(crate) fn new(env: PeerEnv) -> Self {
        let answers = Answers::new(env.nats.clone(), env.metrics.clone(), "peers");
        PeerManager {
            env: Arc::new(env),
            answers,
            restore_retry: Backoff::new(RESTORE_RETRY_MIN, RESTORE_RETRY_MAX),
        }
    }

    /// Re-applies the persisted relations, inside the actor's context so that no change
    /// interleaves with it. A store that cannot be read yet (MongoDB down) is tried again
    /// later with backoff; meanwhile the manager serves NATS and commands (nothing can be
    /// persisted until the store is back).
    fn try_restore(&mut self, first: bool, ctx: &mut Context<Self>) {
        let env = self.env.clone();
        ctx.wait(
            async move { env.restore_once().await }
                .into_actor(self)
                .map(move |restored, act, ctx| act.restored(restored, first, ctx)),
        );
    }

    fn restored(&mut self, restored: StoreResult<()>, first: bool, ctx: &mut Context<Self>) {
        match restored {
            Ok(()) if first => {}
            Ok(()) => tracing::info!("persisted partnerships restored"),
            Err(e) => {
                let retry_in = self.restore_retry.next_delay();
                if first {
                    tracing::warn!(cause = %e, ?retry_in, "cannot read persisted partnerships yet; retrying in the background");
                } else {
                    tracing::warn!(cause = %e, ?retry_in, "cannot read persisted partnerships");
                }
                ctx.run_later(retry_in, |act, ctx| act.try_restore(false, ctx));
            }
        }
    }
}

/// Sets a peer's relation (and address, required for a partner).
#[derive(Message)]
#[rtype(result = "Result<PeerRow, Refusal>")]
pub(crate) struct SetRelation {
    pub peer: PeerId,
    pub addr: Option<Multiaddr>,
    pub relation: Relation,
}

/// Ends any relation with a peer: no longer a partner, no longer blacklisted.
#[derive(Message)]
#[rtype(result = "Result<bool, Refusal>")]
pub(crate) struct Forget {
    pub peer: PeerId,
}

/// Partners and blacklisted peers, for the admin API and the CLI.
#[derive(Message)]
#[rtype(result = "Result<Vec<PeerEntry>, Refusal>")]
pub(crate) struct ListPeers;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PeerEntry {
    pub peer_id: String,
    pub relation: Relation,
    pub addrs: Vec<String>,
    /// `config` (from --partner) or `runtime` (NATS, admin API, CLI).
    pub source: String,
}

impl Actor for PeerManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // actix runs the most recent `ctx.wait` first: the subscription is queued first so
        // that the first restore attempt, queued after it, runs before it (as before any
        // message or notice).
        let nats = self.env.nats.clone();
        ctx.wait(
            async move { subscribe(&nats).await }
                .into_actor(self)
                .map(|subscription, _, ctx| {
                    if let Some(s) = subscription {
                        ctx.add_stream(s);
                    }
                }),
        );
        self.try_restore(true, ctx);
    }
}

/// Both PEER resource subjects as one stream; `None` (logged) when the server refuses.
///
/// Returns once the server has both subscriptions
/// ([`crate::nats::subscriptions_confirmed_without_echo`]: the node's manager subscribes on the
/// connection without echo its notices go out on, so it does not receive them back):
/// a notice published after the manager has `started` reaches it. While NATS is down
/// there is nothing to confirm (the client subscribes again on connect) and the manager
/// does not wait.
async fn subscribe(nats: &async_nats::Client) -> Option<impl futures::Stream<Item = NatsMessage>> {
    let create = nats.subscribe(contract::SUBJECT_CREATE).await;
    let remove = nats.subscribe(contract::SUBJECT_REMOVE).await;
    match (create, remove) {
        (Ok(c), Ok(r)) => {
            if crate::nats::is_connected(nats)
                && !crate::nats::subscriptions_confirmed_without_echo(nats, SUBSCRIBE_CONFIRM_TIMEOUT).await
            {
                tracing::warn!(
                    timeout = ?SUBSCRIBE_CONFIRM_TIMEOUT,
                    "PEER resource subscriptions not confirmed by the server in time"
                );
            }
            Some(futures::stream::select(c, r))
        }
        (c, r) => {
            let cause = c.err().map(|e| e.to_string()).or(r.err().map(|e| e.to_string()));
            tracing::error!(cause = ?cause, "cannot subscribe to PEER resources; run-time partnerships off");
            None
        }
    }
}

impl StreamHandler<NatsMessage> for PeerManager {
    fn handle(&mut self, msg: NatsMessage, ctx: &mut Self::Context) {
        let env = self.env.clone();
        let answers = self.answers.clone();
        // One change at a time, in arrival order, never beside an admin change.
        ctx.wait(async move { env.on_notice(msg, &answers).await }.into_actor(self));
    }

    fn finished(&mut self, _: &mut Self::Context) {
        tracing::warn!("PEER resource subscription ended");
    }
}

impl Handler<SetRelation> for PeerManager {
    type Result = AtomicResponse<Self, Result<PeerRow, Refusal>>;

    fn handle(&mut self, msg: SetRelation, _: &mut Self::Context) -> Self::Result {
        let env = self.env.clone();
        AtomicResponse::new(Box::pin(
            async move { env.set_relation(msg.peer, msg.addr, msg.relation).await }.into_actor(self),
        ))
    }
}

impl Handler<Forget> for PeerManager {
    type Result = AtomicResponse<Self, Result<bool, Refusal>>;

    fn handle(&mut self, msg: Forget, _: &mut Self::Context) -> Self::Result {
        let env = self.env.clone();
        AtomicResponse::new(Box::pin(
            async move { env.forget(msg.peer).await }.into_actor(self),
        ))
    }
}

impl Handler<ListPeers> for PeerManager {
    /// A read: it changes nothing, so it may run beside a change.
    type Result = ResponseFuture<Result<Vec<PeerEntry>, Refusal>>;

    fn handle(&mut self, _: ListPeers, _: &mut Self::Context) -> Self::Result {
        let env = self.env.clone();
        Box::pin(async move {
            let mut out: Vec<PeerEntry> = env
                .configured
                .iter()
                .map(|(peer, addr)| PeerEntry {
                    peer_id: peer.to_string(),
                    relation: Relation::Partner,
                    addrs: vec![addr.to_string()],
                    source: "config".into(),
                })
                .collect();
            let rows = env.store.peers().await.map_err(store_refusal)?;
            out.extend(
                rows.into_iter()
                    .filter(|r| r.relation != Relation::Known)
                    .map(|r| PeerEntry {
                        peer_id: r.peer_id,
                        relation: r.relation,
                        addrs: r.addrs,
                        source: "runtime".into(),
                    }),
            );
            Ok(out)
        })
    }
}

fn store_refusal(e: crate::store::StoreError) -> Refusal {
    Refusal::new(ErrorCode::StoreUnavailable, e.to_string())
}

/// `addr` ending in `/p2p/<peer>`; a trailing peer id that is another peer is refused.
fn with_peer_id(addr: Multiaddr, peer: PeerId) -> Result<Multiaddr, Refusal> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => Ok(addr),
        Some(Protocol::P2p(p)) => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("address ends in /p2p/{p}, not the peer {peer}"),
        )),
        _ => Ok(addr.with(Protocol::P2p(peer))),
    }
}

impl PeerEnv {
    async fn restore_once(&self) -> StoreResult<()> {
        // `known` rows are peers met through the DHT (`Store::meet_peer`): no relation to
        // restore, and a configured partner may be one of them.
        let rows = self.store.peers().await?;
        for row in rows.into_iter().filter(|r| r.relation != Relation::Known) {
            let Ok(peer) = row.peer_id.parse::<PeerId>() else {
                continue;
            };
            let addr = row.addrs.first().and_then(|a| a.parse::<Multiaddr>().ok());
            self.enact(peer, addr, row.relation).await;
        }
        Ok(())
    }

    /// Makes the running node follow a relation (no persistence).
    async fn enact(&self, peer: PeerId, addr: Option<Multiaddr>, relation: Relation) {
        match (relation, addr) {
            (Relation::Partner, Some(addr)) => {
                let _ = self.net.set_blocked(peer, false).await;
                // Partners bypass the connection limits: a flood never keeps them out.
                let _ = self.net.set_partner(peer, true).await;
                self.partners.insert(peer, Some(addr.clone()));
                self.links.add.do_send(AddPartner { peer, addr });
            }
            (Relation::Blacklist, _) => {
                self.partners.remove(&peer);
                let _ = self.net.set_partner(peer, false).await;
                self.links.remove.do_send(RemovePartner { peer });
                let _ = self.net.set_blocked(peer, true).await;
            }
            (Relation::Partner, None) | (Relation::Known, _) => {
                self.partners.remove(&peer);
                let _ = self.net.set_partner(peer, false).await;
                self.links.remove.do_send(RemovePartner { peer });
                let _ = self.net.set_blocked(peer, false).await;
            }
        }
    }

    async fn set_relation(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        relation: Relation,
    ) -> Result<PeerRow, Refusal> {
        let addr = addr.map(|a| with_peer_id(a, peer)).transpose()?;
        if relation == Relation::Partner && addr.is_none() {
            return Err(Refusal::new(
                ErrorCode::MissingField,
                "a partner needs an address",
            ));
        }
        let row = PeerRow {
            peer_id: peer.to_string(),
            relation,
            addrs: addr.iter().map(ToString::to_string).collect(),
            name: None,
            record: None,
            updated_ms: now_ms(),
        };
        self.store.put_peer(row.clone()).await.map_err(store_refusal)?;
        self.enact(peer, addr, relation).await;
        tracing::info!(%peer, relation = ?relation, "peer relation set");
        Ok(row)
    }

    async fn forget(&self, peer: PeerId) -> Result<bool, Refusal> {
        let known = self
            .store
            .peer(&peer.to_string())
            .await
            .map_err(store_refusal)?
            .is_some();
        self.store
            .remove_peer(&peer.to_string())
            .await
            .map_err(store_refusal)?;
        self.enact(peer, None, Relation::Known).await;
        tracing::info!(%peer, known, "peer relation ended");
        Ok(known)
    }

    /// A `CREATE_RESOURCE` / `REMOVE_RESOURCE` seen on the local NATS.
    async fn on_notice(&self, msg: NatsMessage, answers: &Answers) {
        // The node's own notices do not come back here (its connection has no echo), but
        // those of applications and of other nodes on this NATS do: the top level alone says
        // whether it is a PEER notice, without building the resource into a tree.
        if !may_be_peer_notice(&msg.payload) {
            return;
        }
        let Ok(Value::Object(raw)) = serde_json::from_slice::<Value>(&msg.payload) else {
            return;
        };
        let fields: Map<String, Value> = raw.into_iter().map(|(k, v)| (notice_key(&k), v)).collect();
        if let Err(refusal) = self.peer_notice(&msg, &fields).await {
            let refused = Refused {
                subject: msg.subject.as_str(),
                action: None,
                body: &msg.payload,
                reply: None,
            };
            answers.refuse(refused, &refusal).await;
        }
    }

    async fn peer_notice(&self, msg: &NatsMessage, fields: &Map<String, Value>) -> Result<(), Refusal> {
        // The peer's fields: under `resource` or `payload`, or at the top level.
        let peer_obj = ["resource", "payload"]
            .iter()
            .find_map(|k| fields.get(*k))
            .and_then(Value::as_object);
        let get = |names: &[&str]| -> Option<Value> {
            names.iter().find_map(|n| {
                peer_obj
                    .and_then(|o| o.get(*n))
                    .or_else(|| fields.get(*n))
                    .cloned()
            })
        };
        let raw_peer = get(&["peer_id", "peerid", "id"])
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| Refusal::new(ErrorCode::MissingField, "missing PEER field peer_id"))?;
        let peer: PeerId = raw_peer
            .parse()
            .map_err(|_| Refusal::new(ErrorCode::InvalidField, format!("{raw_peer:?} is not a peer id")))?;
        if msg.subject.as_str() == contract::SUBJECT_REMOVE {
            self.forget(peer).await?;
            return Ok(());
        }
        let relation_text = get(&["relation"])
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let relation = Relation::parse(&relation_text).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidField,
                format!("relation {relation_text:?}: expected partner, known or blacklist"),
            )
        })?;
        let addr_value = get(&["address", "addr", "stream_address", "addrs"]);
        let addr_text = match &addr_value {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list.iter().find_map(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let addr = addr_text
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| Refusal::new(ErrorCode::InvalidField, format!("address {a:?}: {e}")))
            })
            .transpose()?;
        self.set_relation(peer, addr, relation).await.map(|_| ())
    }
}

/// A notice's top-level key as the manager reads it: `data_type`, `dataType` and `DATATYPE`
/// are one key.
fn notice_key(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "")
}

/// Whether a notice's top level names data type `PEER` and not this node's own app, read the
/// way [`PeerManager::on_notice`] reads the rest (keys by [`notice_key`], string values only,
/// the last of colliding keys winning), without building it into a tree. It is the
/// manager's only filter: a notice it lets through is read whole.
fn may_be_peer_notice(payload: &[u8]) -> bool {
    let Ok(raw) =
        serde_json::from_slice::<std::collections::BTreeMap<String, &serde_json::value::RawValue>>(payload)
    else {
        return false;
    };
    let fields: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
        raw.into_iter().map(|(k, v)| (notice_key(&k), v)).collect();
    let text = |k: &str| {
        fields
            .get(k)
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            .unwrap_or_default()
    };
    text("fromapp") != contract::OWN_APP && text("datatype").eq_ignore_ascii_case("PEER")
}

#[cfg(test)]
mod tests {
    //! The manager against an embedded store (answering peer writes late, every other
    //! one), a real nats-server and a real network loop: admin changes and NATS notices for
    //! one peer, interleaved, end on one relation.

    use std::collections::HashMap;

    use futures::StreamExt;
    use libp2p::identity::Keypair;

    use serde_json::json;

    use super::*;

    #[test]
    fn only_peer_notices_of_other_apps_are_read_whole() {
        let peer = |v: serde_json::Value| may_be_peer_notice(v.to_string().as_bytes());
        assert!(peer(json!({"data_type": "PEER", "resource": {"peer_id": "x"}})));
        assert!(peer(json!({"dataType": "peer", "from_app": "app"})));
        assert!(peer(json!({"DATA_TYPE": "Peer"})));
        assert!(!peer(json!({"data_type": "PEER", "fromApp": contract::OWN_APP})));
        assert!(!peer(
            json!({"data_type": "COMPUTE", "resource": {"data_type": "PEER"}})
        ));
        assert!(!peer(json!({"data_type": ["PEER"]})));
        assert!(!peer(json!(["PEER"])));
        assert!(!may_be_peer_notice(b"{\"data_type\": \"PEER\""));
    }
    use crate::contract::{JournalEntry, NewEvent};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{ApplyOutcome, OutboxRow, OwnPage, PageBounds, StoredResource};
    use oc_testkit::NatsServer;

    const T: Duration = Duration::from_secs(60);

    /// Stands for the partner links: remembers the last word it got for each peer.
    #[derive(Default)]
    struct LinksProbe(HashMap<PeerId, bool>);

    impl Actor for LinksProbe {
        type Context = Context<Self>;
    }

    impl Handler<AddPartner> for LinksProbe {
        type Result = ();
        fn handle(&mut self, msg: AddPartner, _: &mut Self::Context) {
            self.0.insert(msg.peer, true);
        }
    }

    impl Handler<RemovePartner> for LinksProbe {
        type Result = ();
        fn handle(&mut self, msg: RemovePartner, _: &mut Self::Context) {
            self.0.insert(msg.peer, false);
        }
    }

    /// Whether the links were last told to replicate to the peer.
    #[derive(Message)]
    #[rtype(result = "Option<bool>")]
    struct Replicating(PeerId);

    impl Handler<Replicating> for LinksProbe {
        type Result = Option<bool>;
        fn handle(&mut self, msg: Replicating, _: &mut Self::Context) -> Option<bool> {
            self.0.get(&msg.0).copied()
        }
    }

    /// The embedded store whose answers to peer writes come late, every other one: the
    /// write is done, the caller hears of it later (as over a slow link to MongoDB). Two
    /// changes that overlap then finish in the other order than they wrote.
    struct SlowReplies {
        inner: EmbeddedStore,
        writes: std::sync::atomic::AtomicU64,
    }

    impl SlowReplies {
        async fn late(&self) {
            let n = self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(2) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[async_trait::async_trait]
    impl Store for SlowReplies {
        async fn append_journal_marked(
            &self,
            origin: &str,
            events: Vec<NewEvent>,
            intake_seqs: Vec<u64>,
        ) -> StoreResult<Vec<JournalEntry>> {
            self.inner
                .append_journal_marked(origin, events, intake_seqs)
                .await
        }
        async fn read_journal(
            &self,
            origin: &str,
            from: u64,
            limit: usize,
        ) -> StoreResult<Vec<JournalEntry>> {
            self.inner.read_journal(origin, from, limit).await
        }
        async fn journal_head(&self, origin: &str) -> StoreResult<u64> {
            self.inner.journal_head(origin).await
        }
        async fn applied_log(
            &self,
            before: u64,
            limit: usize,
        ) -> StoreResult<Vec<crate::store::AppliedRecord>> {
            self.inner.applied_log(before, limit).await
        }
        async fn cursor(&self, peer: &str) -> StoreResult<u64> {
            self.inner.cursor(peer).await
        }
        async fn set_cursor(&self, peer: &str, seq: u64) -> StoreResult<()> {
            self.inner.set_cursor(peer, seq).await
        }
        async fn applied(&self, origin: &str) -> StoreResult<u64> {
            self.inner.applied(origin).await
        }
        async fn apply_batch(
            &self,
            origin: &str,
            up_to: u64,
            entries: Vec<JournalEntry>,
        ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
            self.inner.apply_batch(origin, up_to, entries).await
        }
        async fn outbox(&self, limit: usize) -> StoreResult<Vec<OutboxRow>> {
            self.inner.outbox(limit).await
        }
        async fn outbox_remove(&self, ids: Vec<u64>) -> StoreResult<()> {
            self.inner.outbox_remove(ids).await
        }
        async fn apply_batch_clearing(
            &self,
            origin: &str,
            up_to: u64,
            entries: Arc<[JournalEntry]>,
            published: Vec<u64>,
        ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
            self.inner
                .apply_batch_clearing(origin, up_to, entries, published)
                .await
        }
        async fn resource(&self, data_type: &str, id: &str) -> StoreResult<Option<StoredResource>> {
            self.inner.resource(data_type, id).await
        }
        async fn resources(
            &self,
            data_type: &str,
            after: Option<String>,
            limit: usize,
        ) -> StoreResult<Vec<StoredResource>> {
            self.inner.resources(data_type, after, limit).await
        }
        async fn own_resources_page(
            &self,
            origin: &str,
            data_type: &str,
            after: Option<String>,
            bounds: PageBounds,
        ) -> StoreResult<OwnPage> {
            self.inner
                .own_resources_page(origin, data_type, after, bounds)
                .await
        }
        async fn peers(&self) -> StoreResult<Vec<PeerRow>> {
            self.inner.peers().await
        }
        async fn put_peer(&self, row: PeerRow) -> StoreResult<()> {
            let done = self.inner.put_peer(row).await;
            self.late().await;
            done
        }
        async fn remove_peer(&self, peer_id: &str) -> StoreResult<()> {
            let done = self.inner.remove_peer(peer_id).await;
            self.late().await;
            done
        }
        async fn trim_known_peers(&self, keep: usize) -> StoreResult<usize> {
            self.inner.trim_known_peers(keep).await
        }
        async fn peer(&self, peer_id: &str) -> StoreResult<Option<PeerRow>> {
            self.inner.peer(peer_id).await
        }
    }

    struct Bench {
        _nats_server: NatsServer,
        _dir: tempfile::TempDir,
        _stop: tokio::sync::watch::Sender<bool>,
        app: async_nats::Client,
        store: Arc<dyn Store>,
        partners: Arc<Partners>,
        links: Addr<LinksProbe>,
        manager: Addr<PeerManager>,
    }

    async fn bench() -> Bench {
        let nats_server = NatsServer::start().expect("nats-server (install: ./scripts/install-deps.sh)");
        let dir = tempfile::tempdir().expect("temporary directory");
        let store: Arc<dyn Store> = Arc::new(SlowReplies {
            inner: EmbeddedStore::open(&dir.path().join("store.redb")).expect("embedded store"),
            writes: Default::default(),
        });
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("address");
        let (net, event_loop) = p2p::build(Keypair::generate_ed25519(), None, &[listen]).expect("network");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(event_loop.run(stop_rx));
        let nats = async_nats::connect(nats_server.url())
            .await
            .expect("node's NATS connection");
        let app = async_nats::connect(nats_server.url())
            .await
            .expect("application's NATS connection");
        let partners = Arc::new(Partners::default());
        let links = LinksProbe::default().start();
        let manager = PeerManager::new(PeerEnv {
            store: store.clone(),
            net,
            nats,
            partners: partners.clone(),
            links: Links::new(links.clone()),
            metrics: Arc::new(Metrics::default()),
            configured: Vec::new(),
        })
        .start();
        // Handled once `started` (restore, subscription) is done.
        manager.send(ListPeers).await.expect("manager").expect("list");
        Bench {
            _nats_server: nats_server,
            _dir: dir,
            _stop: stop,
            app,
            store,
            partners,
            links,
            manager,
        }
    }

    fn notice(peer: &str, relation: &str) -> Value {
        json!({"data_type": "PEER", "resource": {"peer_id": peer, "relation": relation,
               "address": format!("/ip4/127.0.0.1/tcp/4999/p2p/{peer}")}})
    }

    impl Bench {
        async fn publish(&self, subject: &'static str, body: &Value) {
            self.app
                .publish(subject, body.to_string().into())
                .await
                .expect("publish");
        }

        /// Publishes a notice the manager refuses on each subject, then waits for both
        /// error events: every notice published before them has been handled (each subject
        /// keeps its order, the two subjects do not keep theirs between them).
        async fn notices_handled(&self, errors: &mut async_nats::Subscriber, mark: &str) {
            for subject in [contract::SUBJECT_CREATE, contract::SUBJECT_REMOVE] {
                self.publish(subject, &notice(mark, "partner")).await;
            }
            self.app.flush().await.expect("flush");
            let mut pending = vec![contract::SUBJECT_CREATE, contract::SUBJECT_REMOVE];
            tokio::time::timeout(T, async {
                while !pending.is_empty() {
                    let m = errors.next().await.expect("error subscription open");
                    let error: Value = serde_json::from_slice(&m.payload).expect("error event JSON");
                    if error["event"].as_str().is_some_and(|e| e.contains(mark)) {
                        pending.retain(|s| error["subject"] != *s);
                    }
                }
            })
            .await
            .expect("the markers' error events in time");
        }

        /// The relation the store holds for `peer`, after checking that the partner
        /// registry and the links say the same.
        async fn agreed_relation(&self, peer: PeerId) -> Option<Relation> {
            let stored = self
                .store
                .peer(&peer.to_string())
                .await
                .expect("store")
                .map(|row| row.relation);
            let partner = stored == Some(Relation::Partner);
            assert_eq!(
                self.partners.contains(&peer),
                partner,
                "registry vs store {stored:?}"
            );
            let replicating = self.links.send(Replicating(peer)).await.expect("links");
            assert_eq!(replicating.unwrap_or(false), partner, "links vs store {stored:?}");
            stored
        }
    }

    #[actix::test]
    async fn interleaved_admin_changes_and_notices_end_on_one_relation() {
        let b = bench().await;
        let mut errors = b.app.subscribe(contract::SUBJECT_ERROR).await.expect("subscribe");
        b.app.flush().await.expect("flush");
        let peer = PeerId::random();
        let id = peer.to_string();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4999/p2p/{peer}")
            .parse()
            .expect("address");
        for round in 0..20 {
            // Nothing awaited until all are sent: the admin changes and the notices reach
            // the manager in any interleaving.
            let mut admin = Vec::new();
            for i in 0..4 {
                let relation = if (round + i) % 2 == 0 {
                    Relation::Partner
                } else {
                    Relation::Blacklist
                };
                admin.push(b.manager.send(SetRelation {
                    peer,
                    addr: Some(addr.clone()),
                    relation,
                }));
                let body = notice(&id, if i % 2 == 0 { "blacklist" } else { "partner" });
                b.publish(contract::SUBJECT_CREATE, &body).await;
                b.publish(
                    contract::SUBJECT_REMOVE,
                    &json!({"data_type": "PEER", "peer_id": id}),
                )
                .await;
            }
            let forget = b.manager.send(Forget { peer });
            b.publish(contract::SUBJECT_CREATE, &notice(&id, "partner")).await;
            b.notices_handled(&mut errors, &format!("not-a-peer-{round}"))
                .await;
            // More admin changes while the first ones may still be under way.
            for relation in [Relation::Partner, Relation::Blacklist, Relation::Partner] {
                admin.push(b.manager.send(SetRelation {
                    peer,
                    addr: Some(addr.clone()),
                    relation,
                }));
            }
            for answer in futures::future::join_all(admin).await {
                answer.expect("manager").expect("relation set");
            }
            forget.await.expect("manager").expect("forgotten");
            b.agreed_relation(peer).await;
        }
        // The last change applied is the relation, whichever side made it.
        let row = b
            .manager
            .send(SetRelation {
                peer,
                addr: None,
                relation: Relation::Blacklist,
            })
            .await
            .expect("manager")
            .expect("blacklisted");
        assert_eq!(row.relation, Relation::Blacklist);
        assert_eq!(b.agreed_relation(peer).await, Some(Relation::Blacklist));
        b.publish(contract::SUBJECT_CREATE, &notice(&id, "partner")).await;
        b.notices_handled(&mut errors, "not-a-peer-last").await;
        assert_eq!(b.agreed_relation(peer).await, Some(Relation::Partner));
        assert_eq!(b.partners.addr(&peer), Some(addr));
        b.publish(
            contract::SUBJECT_REMOVE,
            &json!({"data_type": "PEER", "peer_id": id}),
        )
        .await;
        b.notices_handled(&mut errors, "not-a-peer-removed").await;
        assert_eq!(b.agreed_relation(peer).await, None);
    }
}
