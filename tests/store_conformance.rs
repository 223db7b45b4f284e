//! One suite of store behaviours, run against every backend: the embedded redb file and a
//! real mongod (one-member replica set). Each case starts from an empty store; the
//! MongoDB cases each get their own database on one shared mongod.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use oc_discovery::contract::{Action, JournalEntry, NewEvent};
use oc_discovery::store::embedded::EmbeddedStore;
use oc_discovery::store::mongo::{MongoSettings, MongoStore};
use oc_discovery::store::{
    AppliedRecord, ApplyOutcome, OutboxRow, Owner, PeerRow, Relation, Store, StoreError, StoredResource,
};
use oc_testkit::{init_tracing, MongoServer};
use serde_json::{json, Value};

const A: &str = "12D3KooWorigin-a";
const B: &str = "12D3KooWorigin-b";
const DT: &str = "COMPUTE_RESOURCE";

/// A backend under test.
#[async_trait]
trait Backend: Send {
    /// A store on a fresh, empty location for the case `name`.
    async fn fresh(&mut self, name: &str) -> Arc<dyn Store>;
    /// Restarts what is behind the store (the server, or nothing for a file) and opens
    /// the same location again. The caller has dropped its store.
    async fn reopen(&mut self) -> Arc<dyn Store>;
}

struct Embedded {
    dir: tempfile::TempDir,
    current: std::path::PathBuf,
}

#[async_trait]
impl Backend for Embedded {
    async fn fresh(&mut self, name: &str) -> Arc<dyn Store> {
        self.current = self.dir.path().join(format!("{name}.redb"));
        Arc::new(EmbeddedStore::open(&self.current).unwrap())
    }

    async fn reopen(&mut self) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(&self.current).unwrap())
    }
}

struct Mongo {
    server: MongoServer,
    db: String,
}

impl Mongo {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(
            MongoStore::connect(&self.server.uri(), &self.db, MongoSettings::default())
                .await
                .unwrap(),
        )
    }
}

#[async_trait]
impl Backend for Mongo {
    async fn fresh(&mut self, name: &str) -> Arc<dyn Store> {
        self.db = format!("conformance_{name}");
        self.store().await
    }

    async fn reopen(&mut self) -> Arc<dyn Store> {
        // SIGKILL: only what was committed durably may come back.
        self.server.kill();
        self.server.start_again().await.unwrap();
        self.store().await
    }
}

fn new_event(action: Action, id: &str, extra: Value) -> NewEvent {
    let mut resource = json!({"id": id, "creator_id": A});
    if let (Some(r), Some(e)) = (resource.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    NewEvent {
        action,
        data_type: DT.to_owned(),
        user: "alice".to_owned(),
        from_app: "test".to_owned(),
        resource: resource.into(),
        resource_id: id.to_owned(),
    }
}

/// An inbound entry from `origin` (its creator is the origin).
fn entry(origin: &str, seq: u64, action: Action, id: &str, extra: Value) -> JournalEntry {
    let mut resource = json!({"id": id, "creator_id": origin});
    if let (Some(r), Some(e)) = (resource.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    JournalEntry {
        origin: origin.to_owned(),
        seq,
        action,
        data_type: DT.to_owned(),
        user: "alice".to_owned(),
        resource: resource.into(),
        time_ms: 1_700_000_000_000 + seq,
    }
}

async fn get(store: &dyn Store, id: &str) -> Option<StoredResource> {
    store.resource(DT, id).await.unwrap()
}

async fn journal(b: &mut dyn Backend) {
    let store = b.fresh("journal").await;
    assert_eq!(store.journal_head(A).await.unwrap(), 0);
    assert!(store.read_journal(A, 1, 10).await.unwrap().is_empty());
    // The journal keeps whatever the intake accepted, even what BSON cannot hold.
    let odd = json!({"nested": {"list": [1, 2.5, null, true]}, "$odd": "kept", "big": u64::MAX});
    let first = store
        .append_journal(
            A,
            vec![
                new_event(Action::Create, "r1", odd.clone()),
                new_event(Action::Update, "r1", json!({"v": 2})),
                new_event(Action::Delete, "r1", json!({})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(first[0].resource.to_value()["$odd"], "kept");
    let other = store
        .append_journal(B, vec![new_event(Action::Create, "x", json!({}))])
        .await
        .unwrap();
    assert_eq!(other[0].seq, 1, "each origin has its own sequence");
    let more = store
        .append_journal(
            A,
            vec![
                new_event(Action::Create, "r2", json!({})),
                new_event(Action::Create, "r3", json!({})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(more.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(store.journal_head(A).await.unwrap(), 5);
    assert_eq!(store.journal_head(B).await.unwrap(), 1);

    let all = store.read_journal(A, 1, 100).await.unwrap();
    assert_eq!(all, [first.clone(), more.clone()].concat());
    let seqs = |v: Vec<JournalEntry>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.read_journal(A, 2, 2).await.unwrap()), vec![2, 3]);
    assert_eq!(seqs(store.read_journal(A, 4, 100).await.unwrap()), vec![4, 5]);
    assert_eq!(seqs(store.read_journal(A, 0, 1).await.unwrap()), vec![1]);
    assert!(store.read_journal(A, 6, 100).await.unwrap().is_empty());
    assert_eq!(store.read_journal(B, 1, 100).await.unwrap(), other);
    // The raw form is the same entries as JSON text, with their seq and action.
    let raw = store.read_journal_raw(A, 2, 3).await.unwrap();
    let decoded: Vec<JournalEntry> = raw
        .iter()
        .map(|r| serde_json::from_slice(&r.json).unwrap())
        .collect();
    assert_eq!(decoded, all[1..4].to_vec());
    // Byte for byte what the entries make as JSON, whichever way the backend builds it.
    for (r, e) in raw.iter().zip(&all[1..4]) {
        assert_eq!(r.json, serde_json::to_vec(e).unwrap());
    }
    assert!(raw
        .iter()
        .zip(&decoded)
        .all(|(r, e)| r.seq == e.seq && r.action == e.action));
}

/// JetStream stream sequences recorded with the journal commit recognise redeliveries.
async fn intake_marks(b: &mut dyn Backend) {
    let store = b.fresh("intake").await;
    assert!(store.intake_seen(vec![1, 2]).await.unwrap().is_empty());
    assert_eq!(store.intake_high().await.unwrap(), 0);
    let entries = store
        .append_journal_marked(
            A,
            vec![
                new_event(Action::Create, "r1", json!({})),
                new_event(Action::Create, "r2", json!({})),
            ],
            vec![10, 11],
        )
        .await
        .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        store.intake_seen(vec![9, 10, 11, 12]).await.unwrap(),
        vec![10, 11]
    );
    assert_eq!(
        store.intake_high().await.unwrap(),
        11,
        "a restarted intake checks up to here"
    );
    store.intake_forget_below(11).await.unwrap();
    assert_eq!(store.intake_seen(vec![10, 11]).await.unwrap(), vec![11]);
    assert_eq!(store.intake_high().await.unwrap(), 11);
    // A plain append records nothing.
    store
        .append_journal(A, vec![new_event(Action::Create, "r3", json!({}))])
        .await
        .unwrap();
    assert_eq!(store.intake_seen(vec![12, 13]).await.unwrap(), Vec::<u64>::new());
}

async fn peers(b: &mut dyn Backend) {
    let store = b.fresh("peers").await;
    assert!(store.peers().await.unwrap().is_empty());
    let partner = PeerRow {
        peer_id: B.to_owned(),
        relation: Relation::Partner,
        addrs: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{B}")],
        name: Some("site-b".to_owned()),
        record: Some(json!({"sig": "abc", "n": 1})),
        updated_ms: 1,
    };
    let blocked = PeerRow {
        peer_id: A.to_owned(),
        relation: Relation::Blacklist,
        addrs: vec![],
        name: None,
        record: None,
        updated_ms: 2,
    };
    store.put_peer(partner.clone()).await.unwrap();
    store.put_peer(blocked.clone()).await.unwrap();
    let mut all = store.peers().await.unwrap();
    all.sort_by(|x, y| x.peer_id.cmp(&y.peer_id));
    assert_eq!(all, vec![blocked.clone(), partner.clone()]);
    // Putting again replaces.
    let known = PeerRow {
        relation: Relation::Known,
        updated_ms: 3,
        ..partner.clone()
    };
    store.put_peer(known.clone()).await.unwrap();
    store.remove_peer(A).await.unwrap();
    store.remove_peer("12D3KooWnobody").await.unwrap();
    assert_eq!(store.peers().await.unwrap(), vec![known]);
}

/// This node's own resources as its journal leaves them (search answers).
async fn own_resources(b: &mut dyn Backend) {
    let store = b.fresh("own").await;
    store
        .append_journal(
            A,
            vec![
                new_event(Action::Create, "r1", json!({"v": 1})),
                new_event(Action::Create, "r2", json!({})),
                new_event(Action::Update, "r1", json!({"v": 2})),
            ],
        )
        .await
        .unwrap();
    store
        .append_journal(A, vec![new_event(Action::Delete, "r2", json!({}))])
        .await
        .unwrap();
    let own = store.own_resources(A, DT).await.unwrap();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0]["id"], "r1");
    assert_eq!(own[0]["v"], 2);
    assert!(store
        .own_resources(A, "STORAGE_RESOURCE")
        .await
        .unwrap()
        .is_empty());
}

/// A peer met later keeps the relation set with the partnership.
async fn meeting_a_peer_keeps_its_relation(b: &mut dyn Backend) {
    let store = b.fresh("meet").await;
    let row = |relation, addr: &str, name: &str| PeerRow {
        peer_id: B.to_owned(),
        relation,
        addrs: vec![addr.to_owned()],
        name: Some(name.to_owned()),
        record: None,
        updated_ms: 1,
    };
    assert_eq!(
        store
            .meet_peer(row(Relation::Known, "/dns4/met", "first"))
            .await
            .unwrap(),
        Relation::Known
    );
    store
        .put_peer(row(Relation::Partner, "/dns4/set", "first"))
        .await
        .unwrap();
    assert_eq!(
        store
            .meet_peer(row(Relation::Known, "/dns4/met-again", "renamed"))
            .await
            .unwrap(),
        Relation::Partner
    );
    let kept = store.peer(B).await.unwrap().unwrap();
    assert_eq!(kept.relation, Relation::Partner);
    assert_eq!(
        kept.addrs,
        vec!["/dns4/set".to_owned()],
        "a partner's address stays"
    );
    assert_eq!(kept.name.as_deref(), Some("renamed"));
    assert!(store.peer("12D3KooWnobody").await.unwrap().is_none());
}

/// Rows of relation `known` beyond the bound go, least recently seen first; partners and
/// blacklisted peers stay whatever their age.
async fn known_peers_are_bounded(b: &mut dyn Backend) {
    let store = b.fresh("known_bound").await;
    let row = |id: String, relation, seen: u64| PeerRow {
        peer_id: id,
        relation,
        addrs: vec![],
        name: None,
        record: None,
        updated_ms: seen,
    };
    store
        .put_peer(row("partner".into(), Relation::Partner, 1))
        .await
        .unwrap();
    store
        .put_peer(row("black".into(), Relation::Blacklist, 2))
        .await
        .unwrap();
    for i in 0..10u64 {
        store
            .meet_peer(row(format!("known-{i}"), Relation::Known, 100 + i))
            .await
            .unwrap();
    }
    // Seen again: now the most recent.
    store
        .meet_peer(row("known-0".into(), Relation::Known, 500))
        .await
        .unwrap();
    assert_eq!(store.trim_known_peers(10).await.unwrap(), 0);
    assert_eq!(store.trim_known_peers(4).await.unwrap(), 6);
    let mut ids: Vec<String> = store
        .peers()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.peer_id)
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["black", "known-0", "known-7", "known-8", "known-9", "partner"]
    );
    // A known row made a partner is no longer counted nor dropped.
    store
        .put_peer(row("known-7".into(), Relation::Partner, 1))
        .await
        .unwrap();
    assert_eq!(store.trim_known_peers(0).await.unwrap(), 3);
    let mut ids: Vec<String> = store
        .peers()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.peer_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["black", "known-7", "partner"]);
}

async fn cursors_and_applied_marks(b: &mut dyn Backend) {
    let store = b.fresh("cursors").await;
    assert_eq!(store.cursor(B).await.unwrap(), 0);
    store.set_cursor(B, 5).await.unwrap();
    store.set_cursor(B, 7).await.unwrap();
    store.set_cursor(A, 1).await.unwrap();
    assert_eq!(store.cursor(B).await.unwrap(), 7);
    assert_eq!(store.cursor(A).await.unwrap(), 1);

    assert_eq!(store.applied(A).await.unwrap(), 0);
    store.apply_batch(A, 4, vec![]).await.unwrap();
    assert_eq!(store.applied(A).await.unwrap(), 4);
    // The mark never goes back.
    store.apply_batch(A, 2, vec![]).await.unwrap();
    assert_eq!(store.applied(A).await.unwrap(), 4);
    assert_eq!(store.applied(B).await.unwrap(), 0);
}

async fn idempotent_apply(b: &mut dyn Backend) {
    let store = b.fresh("idempotent").await;
    let create = entry(A, 1, Action::Create, "r1", json!({"cpus": 8}));
    let (outcomes, rows) = store.apply_batch(A, 1, vec![create.clone()]).await.unwrap();
    assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
    assert_eq!(rows.len(), 1);
    // As the inbound session does: publish, then clear the rows.
    store
        .outbox_remove(rows.iter().map(|r| r.id).collect())
        .await
        .unwrap();
    let (outcomes, rows) = store.apply_batch(A, 1, vec![create.clone()]).await.unwrap();
    assert_eq!(outcomes, vec![ApplyOutcome::Stale], "same entry twice");
    assert!(rows.is_empty());

    let update = entry(A, 3, Action::Update, "r1", json!({"cpus": 16}));
    let (outcomes, _) = store.apply_batch(A, 3, vec![update]).await.unwrap();
    assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
    let older = entry(A, 2, Action::Update, "r1", json!({"cpus": 1}));
    let (outcomes, rows) = store.apply_batch(A, 3, vec![older]).await.unwrap();
    assert_eq!(outcomes, vec![ApplyOutcome::Stale], "older seq");
    assert!(rows.is_empty());
    let r1 = get(&*store, "r1").await.unwrap();
    assert_eq!((r1.version, r1.deleted), (3, false));
    assert_eq!(r1.resource["cpus"], 16);
    assert_eq!(r1.origin, A);
}

/// The applied log: one row per applied entry, in the apply's commit, keyed by a local
/// counter that keeps growing after the outbox is drained; stale entries add nothing.
async fn applied_log(b: &mut dyn Backend) {
    let store = b.fresh("applied_log").await;
    assert!(store.applied_log(u64::MAX, 10).await.unwrap().is_empty());
    let batch = vec![
        entry(A, 1, Action::Create, "r1", json!({})),
        entry(A, 2, Action::Create, "r2", json!({})),
    ];
    let (_, rows) = store.apply_batch(A, 2, batch.clone()).await.unwrap();
    store
        .outbox_remove(rows.iter().map(|r| r.id).collect())
        .await
        .unwrap();
    // Again: stale, not logged.
    store.apply_batch(A, 2, batch).await.unwrap();
    store
        .apply_batch(B, 1, vec![entry(B, 1, Action::Create, "b1", json!({}))])
        .await
        .unwrap();
    let log = store.applied_log(u64::MAX, 10).await.unwrap();
    let seen: Vec<(&str, u64)> = log
        .iter()
        .map(|r| (r.entry.origin.as_str(), r.entry.seq))
        .collect();
    assert_eq!(seen, vec![(B, 1), (A, 2), (A, 1)], "newest first");
    assert!(
        log.windows(2).all(|w| w[0].key > w[1].key),
        "keys grow with each apply"
    );
    assert!(log.iter().all(|r| r.applied_ms > 0));
    assert_eq!(log[1].entry, entry(A, 2, Action::Create, "r2", json!({})));
    // Below a key, and a limit.
    let older = store.applied_log(log[0].key, 1).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].key, log[1].key);
    assert!(store.applied_log(log[2].key, 10).await.unwrap().is_empty());
}

async fn conflict_with_another_origin(b: &mut dyn Backend) {
    let store = b.fresh("conflict").await;
    let (o, _) = store
        .apply_batch(A, 1, vec![entry(A, 1, Action::Create, "r1", json!({"n": 1}))])
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied]);
    let (o, rows) = store
        .apply_batch(B, 9, vec![entry(B, 9, Action::Update, "r1", json!({"n": 2}))])
        .await
        .unwrap();
    assert_eq!(
        o,
        vec![ApplyOutcome::Conflict {
            owner: Owner::Origin(A.to_owned())
        }]
    );
    assert!(rows.is_empty());
    assert_eq!(store.applied(B).await.unwrap(), 9, "passed over, not blocking");
    let r1 = get(&*store, "r1").await.unwrap();
    assert_eq!((r1.origin.as_str(), r1.version), (A, 1));
    assert_eq!(r1.resource["n"], 1);
}

/// One of this node's own resources (its journal holds it) is no partner's to change,
/// whatever the origin claims: `conflict`, nothing stored, no notice, the mark moves on.
async fn own_resources_are_no_partners(b: &mut dyn Backend) {
    let store = b.fresh("own_conflict").await;
    // A is this node: its application published own1 (and own2, then deleted it).
    store
        .append_journal(
            A,
            vec![
                new_event(Action::Create, "own1", json!({"v": 1})),
                new_event(Action::Create, "own2", json!({})),
                new_event(Action::Delete, "own2", json!({})),
            ],
        )
        .await
        .unwrap();
    let this_node = ApplyOutcome::Conflict {
        owner: Owner::ThisNode,
    };
    let (o, rows) = store
        .apply_batch(
            B,
            4,
            vec![
                entry(B, 1, Action::Create, "own1", json!({"v": "B's"})),
                entry(B, 2, Action::Update, "own1", json!({"v": "B's"})),
                entry(B, 3, Action::Delete, "own1", json!({})),
                entry(B, 4, Action::Create, "b1", json!({})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        o,
        vec![
            this_node.clone(),
            this_node.clone(),
            this_node.clone(),
            ApplyOutcome::Applied
        ]
    );
    assert_eq!(
        rows.iter().map(|r| r.msg_id.clone()).collect::<Vec<_>>(),
        vec![format!("{B}:4")],
        "a notice for b1 only"
    );
    assert_eq!(store.applied(B).await.unwrap(), 4, "passed over, not blocking");
    assert!(get(&*store, "own1").await.is_none(), "nothing stored for own1");
    // Even an entry claiming this node's own origin is refused by the store.
    let (o, rows) = store
        .apply_batch(A, 9, vec![entry(A, 9, Action::Delete, "own1", json!({}))])
        .await
        .unwrap();
    assert_eq!((o, rows.len()), (vec![this_node], 0));
    let own = store.own_resources(A, DT).await.unwrap();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(
        (own[0]["id"].clone(), own[0]["v"].clone()),
        (json!("own1"), json!(1))
    );
    assert_eq!(
        store.journal_head(A).await.unwrap(),
        3,
        "the journal is untouched"
    );
    // An id the own application deleted is free again (the journal no longer holds it).
    let (o, _) = store
        .apply_batch(B, 5, vec![entry(B, 5, Action::Create, "own2", json!({}))])
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied]);
}

async fn tombstones(b: &mut dyn Backend) {
    let store = b.fresh("tombstones").await;
    let (o, rows) = store
        .apply_batch(
            A,
            2,
            vec![
                entry(A, 1, Action::Create, "r1", json!({"n": 1})),
                entry(A, 2, Action::Delete, "r1", json!({})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied, ApplyOutcome::Applied]);
    assert_eq!(rows[1].subject, "REMOVE_RESOURCE");
    let r1 = get(&*store, "r1").await.unwrap();
    assert_eq!((r1.version, r1.deleted), (2, true), "delete keeps the version");
    // A stale create (a resend of seq 1) does not resurrect it.
    let (o, rows) = store
        .apply_batch(A, 2, vec![entry(A, 1, Action::Create, "r1", json!({"n": 1}))])
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Stale]);
    assert!(rows.is_empty());
    assert!(get(&*store, "r1").await.unwrap().deleted);
    // Nor can another origin take the id over.
    let (o, _) = store
        .apply_batch(B, 5, vec![entry(B, 5, Action::Create, "r1", json!({}))])
        .await
        .unwrap();
    assert_eq!(
        o,
        vec![ApplyOutcome::Conflict {
            owner: Owner::Origin(A.to_owned())
        }]
    );
    // The creator may create it again with a newer change.
    let (o, _) = store
        .apply_batch(A, 3, vec![entry(A, 3, Action::Create, "r1", json!({"n": 3}))])
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied]);
    let r1 = get(&*store, "r1").await.unwrap();
    assert_eq!((r1.version, r1.deleted), (3, false));
    assert_eq!(r1.resource["n"], 3);
}

async fn one_batch_many_changes(b: &mut dyn Backend) {
    let store = b.fresh("batch").await;
    let batch = vec![
        entry(A, 1, Action::Create, "r1", json!({"v": 1})),
        entry(A, 2, Action::Update, "r1", json!({"v": 2})),
        entry(A, 3, Action::Create, "r2", json!({})),
        entry(A, 4, Action::Delete, "r2", json!({})),
        entry(A, 5, Action::Create, "r3", json!({"v": 5})),
    ];
    let (o, rows) = store.apply_batch(A, 5, batch).await.unwrap();
    assert!(o.iter().all(|o| *o == ApplyOutcome::Applied), "{o:?}");
    assert_eq!(
        rows.iter().map(|r| r.msg_id.clone()).collect::<Vec<_>>(),
        (1..=5).map(|s| format!("{A}:{s}")).collect::<Vec<_>>()
    );
    let r1 = get(&*store, "r1").await.unwrap();
    assert_eq!((r1.version, r1.resource["v"].clone()), (2, json!(2)));
    let r2 = get(&*store, "r2").await.unwrap();
    assert_eq!((r2.version, r2.deleted), (4, true));
    assert_eq!(get(&*store, "r3").await.unwrap().version, 5);
    assert_eq!(store.applied(A).await.unwrap(), 5);
}

async fn outbox_rows(b: &mut dyn Backend) {
    let store = b.fresh("outbox").await;
    assert!(store.outbox(10).await.unwrap().is_empty());
    let (_, rows) = store
        .apply_batch(
            A,
            3,
            vec![
                entry(A, 1, Action::Create, "r1", json!({})),
                entry(A, 2, Action::Create, "r2", json!({})),
                entry(A, 3, Action::Delete, "r1", json!({})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "ids ascend");
    assert_eq!(rows[0].subject, "CREATE_RESOURCE");
    assert_eq!(rows[2].subject, "REMOVE_RESOURCE");
    let body: Value = serde_json::from_slice(&rows[0].payload).unwrap();
    assert_eq!(body["resource"]["id"], "r1");
    assert_eq!(body["origin_seq"], 1);
    assert_eq!(body["from_peer"], A);
    assert_eq!(store.outbox(10).await.unwrap(), rows);
    assert_eq!(store.outbox(2).await.unwrap(), rows[..2].to_vec());
    store.outbox_remove(vec![rows[0].id, rows[1].id]).await.unwrap();
    assert_eq!(store.outbox(10).await.unwrap(), rows[2..].to_vec());
    // Removing twice is harmless.
    store.outbox_remove(vec![rows[0].id]).await.unwrap();
    store.outbox_remove(vec![]).await.unwrap();
    // Later rows get higher ids.
    let (_, later) = store
        .apply_batch(A, 4, vec![entry(A, 4, Action::Create, "r4", json!({}))])
        .await
        .unwrap();
    assert!(later[0].id > rows[2].id);
}

async fn listing_and_fields(b: &mut dyn Backend) {
    let store = b.fresh("listing").await;
    let fields = json!({"name": "gpu", "cpus": 8, "ratio": 0.75, "ok": true, "none": null,
        "tags": ["a", "b"], "spec": {"mem": {"gb": 64}, "list": [{"x": -1}]}});
    let mut batch = Vec::new();
    for (i, id) in ["c", "a", "e", "b", "d"].iter().enumerate() {
        batch.push(entry(A, i as u64 + 1, Action::Create, id, fields.clone()));
    }
    batch.push(entry(A, 6, Action::Delete, "b", json!({})));
    let mut other = entry(A, 7, Action::Create, "z", json!({}));
    other.data_type = "STORAGE_RESOURCE".to_owned();
    batch.push(other);
    store.apply_batch(A, 7, batch).await.unwrap();

    let a = get(&*store, "a").await.unwrap();
    let mut expected = fields.clone();
    expected["id"] = json!("a");
    expected["creator_id"] = json!(A);
    assert_eq!(a.resource, expected, "fields come back as sent");
    assert_eq!(a.data_type, DT);

    let ids = |v: Vec<StoredResource>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.resources(DT, None, 100).await.unwrap()),
        vec!["a", "b", "c", "d", "e"],
        "ordered by id, tombstones included"
    );
    assert_eq!(ids(store.resources(DT, None, 2).await.unwrap()), vec!["a", "b"]);
    assert_eq!(
        ids(store.resources(DT, Some("b".into()), 2).await.unwrap()),
        vec!["c", "d"]
    );
    let listed = store.resources(DT, None, 100).await.unwrap();
    assert!(listed[1].deleted && !listed[0].deleted);
    assert_eq!(listed[2].resource["spec"]["mem"]["gb"], 64);
    assert_eq!(
        ids(store.resources("STORAGE_RESOURCE", None, 100).await.unwrap()),
        vec!["z"]
    );
    assert!(store.resource(DT, "nope").await.unwrap().is_none());
    assert!(store
        .resources("NO_SUCH_TYPE", None, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn restart_durability(b: &mut dyn Backend) {
    let store = b.fresh("durability").await;
    let journaled = store
        .append_journal_marked(
            A,
            vec![
                new_event(Action::Create, "own1", json!({"x": 1})),
                new_event(Action::Create, "own2", json!({})),
            ],
            vec![7, 8],
        )
        .await
        .unwrap();
    store.set_cursor(B, 2).await.unwrap();
    let (_, rows) = store
        .apply_batch(
            B,
            2,
            vec![
                entry(B, 1, Action::Create, "r1", json!({"n": 1})),
                entry(B, 2, Action::Delete, "r1", json!({})),
            ],
        )
        .await
        .unwrap();
    let before = get(&*store, "r1").await.unwrap();
    drop(store);

    let store = b.reopen().await;
    assert_eq!(store.journal_head(A).await.unwrap(), 2);
    assert_eq!(store.read_journal(A, 1, 10).await.unwrap(), journaled);
    assert_eq!(store.cursor(B).await.unwrap(), 2);
    assert_eq!(store.applied(B).await.unwrap(), 2);
    assert_eq!(get(&*store, "r1").await.unwrap(), before);
    assert_eq!(store.outbox(10).await.unwrap(), rows, "unpublished rows survive");
    assert_eq!(store.intake_seen(vec![6, 7, 8]).await.unwrap(), vec![7, 8]);
    // Appending goes on after the head.
    let next = store
        .append_journal(A, vec![new_event(Action::Create, "own3", json!({}))])
        .await
        .unwrap();
    assert_eq!(next[0].seq, 3);
}

/// Retention trims the applied log from its old end only: by count, then by age.
async fn applied_log_trim(b: &mut dyn Backend) {
    let store = b.fresh("applied_log_trim").await;
    assert_eq!(
        store.trim_applied_log(u64::MAX, 1, 100).await.unwrap(),
        0,
        "empty log"
    );
    let batch: Vec<JournalEntry> = (1..=6)
        .map(|seq| entry(A, seq, Action::Create, &format!("t{seq}"), json!({})))
        .collect();
    let (_, rows) = store.apply_batch(A, 6, batch).await.unwrap();
    // Published: the outbox owes nothing (what it owes stays, `trim_keeps_what_is_owed`).
    store
        .outbox_remove(rows.iter().map(|r| r.id).collect())
        .await
        .unwrap();
    outbox_emptied(&*store).await;
    let keys = |log: Vec<AppliedRecord>| log.iter().map(|r| r.entry.seq).collect::<Vec<u64>>();
    // Young rows, more than the count keeps: the oldest go, two at most per call.
    assert_eq!(store.trim_applied_log(0, 3, 2).await.unwrap(), 2);
    assert_eq!(store.trim_applied_log(0, 3, 100).await.unwrap(), 1);
    assert_eq!(
        keys(store.applied_log(u64::MAX, 10).await.unwrap()),
        vec![6, 5, 4]
    );
    assert_eq!(
        store.trim_applied_log(0, 3, 100).await.unwrap(),
        0,
        "nothing older, count kept"
    );
    // Older than the cut-off: all go but the newest, which holds the key counter.
    let newest = store.applied_log(u64::MAX, 1).await.unwrap()[0].key;
    assert_eq!(store.trim_applied_log(u64::MAX, 1000, 100).await.unwrap(), 2);
    assert_eq!(keys(store.applied_log(u64::MAX, 10).await.unwrap()), vec![6]);
    assert_eq!(
        store.trim_applied_log(u64::MAX, 1, 100).await.unwrap(),
        0,
        "the newest stays"
    );
    // Keys keep growing after a trim.
    store
        .apply_batch(A, 7, vec![entry(A, 7, Action::Create, "t7", json!({}))])
        .await
        .unwrap();
    let log = store.applied_log(u64::MAX, 10).await.unwrap();
    assert_eq!(keys(log.clone()), vec![7, 6]);
    assert!(log[0].key > newest, "a key is never reused");
}

/// Waits until the outbox reads empty: removals need not be visible at once to every read
/// (a MongoDB store writes them without waiting for the majority, docs/MONGODB.md).
async fn outbox_emptied(store: &dyn Store) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store.outbox(10).await.unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the removals never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Trimming the applied log never takes what the outbox still owes: rows not yet published
/// read back whole (a store may make their notices from the log).
async fn trim_keeps_what_is_owed(b: &mut dyn Backend) {
    let store = b.fresh("trim_owed").await;
    let batch: Vec<JournalEntry> = (1..=4)
        .map(|seq| entry(A, seq, Action::Create, &format!("w{seq}"), json!({"n": seq})))
        .collect();
    let (_, rows) = store.apply_batch(A, 4, batch).await.unwrap();
    assert_eq!(rows.len(), 4);
    store.trim_applied_log(u64::MAX, 1, 100).await.unwrap();
    assert_eq!(store.outbox(10).await.unwrap(), rows);
    drop(store);
    let store = b.reopen().await;
    assert_eq!(store.outbox(10).await.unwrap(), rows);
    // Published: nothing owed, and the trim goes as far as it would (the newest row stays).
    store
        .outbox_remove(rows.iter().map(|r| r.id).collect())
        .await
        .unwrap();
    outbox_emptied(&*store).await;
    store.trim_applied_log(u64::MAX, 1, 100).await.unwrap();
    assert_eq!(store.applied_log(u64::MAX, 10).await.unwrap().len(), 1);
}

macro_rules! run_cases {
    ($backend:expr, $($case:ident),+ $(,)?) => {
        $(
            eprintln!("case {}", stringify!($case));
            $case($backend).await;
        )+
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend() {
    init_tracing();
    let mut b = Embedded {
        dir: tempfile::tempdir().unwrap(),
        current: Default::default(),
    };
    run_cases!(
        &mut b,
        journal,
        intake_marks,
        peers,
        own_resources,
        meeting_a_peer_keeps_its_relation,
        known_peers_are_bounded,
        cursors_and_applied_marks,
        idempotent_apply,
        applied_log,
        applied_log_trim,
        trim_keeps_what_is_owed,
        conflict_with_another_origin,
        own_resources_are_no_partners,
        tombstones,
        one_batch_many_changes,
        outbox_rows,
        listing_and_fields,
        restart_durability,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_backend() {
    init_tracing();
    let mut b = Mongo {
        server: MongoServer::start().await.unwrap(),
        db: String::new(),
    };
    run_cases!(
        &mut b,
        journal,
        intake_marks,
        peers,
        own_resources,
        meeting_a_peer_keeps_its_relation,
        known_peers_are_bounded,
        cursors_and_applied_marks,
        idempotent_apply,
        applied_log,
        applied_log_trim,
        trim_keeps_what_is_owed,
        conflict_with_another_origin,
        own_resources_are_no_partners,
        tombstones,
        one_batch_many_changes,
        outbox_rows,
        listing_and_fields,
        restart_durability,
        refused_documents,
        site_documents_are_not_overwritten,
        refused_by_the_server,
        lost_commit_answer,
        outbox_rows_of_earlier_versions,
        outbox_groups_of_earlier_versions,
        own_documents_of_earlier_versions,
        applied_log_rows_of_earlier_versions,
        intake_marks_of_earlier_versions,
        health_and_outage,
    );
}

// MongoDB only: what the embedded file cannot meet.

/// Documents MongoDB cannot hold are rejected one by one; the rest of the batch applies.
async fn refused_documents(b: &mut Mongo) {
    let store = b.fresh("refused").await;
    let mut reserved = entry(A, 4, Action::Create, "r4", json!({}));
    reserved.data_type = "OC_JOURNAL".to_owned();
    let batch = vec![
        entry(A, 1, Action::Create, "r1", json!({})),
        entry(A, 2, Action::Create, "r2", json!({"spec": {"$where": "1"}})),
        entry(A, 3, Action::Create, "r3", json!({"n": u64::MAX})),
        reserved,
        entry(A, 5, Action::Create, "r5", json!({})),
    ];
    let (o, rows) = store.apply_batch(A, 5, batch).await.unwrap();
    assert_eq!(o[0], ApplyOutcome::Applied);
    assert!(
        matches!(&o[1], ApplyOutcome::Rejected { reason } if reason.contains("$where")),
        "{o:?}"
    );
    assert!(matches!(o[2], ApplyOutcome::Rejected { .. }), "{o:?}");
    assert!(matches!(o[3], ApplyOutcome::Rejected { .. }), "{o:?}");
    assert_eq!(o[4], ApplyOutcome::Applied);
    assert_eq!(rows.len(), 2);
    assert_eq!(store.applied(A).await.unwrap(), 5);
    assert!(get(&*store, "r2").await.is_none());
}

/// The site's applications write documents straight into MongoDB: a partner's entry never
/// overwrites or removes one the node did not write for that partner.
async fn site_documents_are_not_overwritten(b: &mut Mongo) {
    use mongodb::bson::{doc, Document};
    let store = b.fresh("site_documents").await;
    let client = b.server.client().await.unwrap();
    let coll = client.database(&b.db).collection::<Document>("compute_resource");
    let read = |id: &'static str| {
        let coll = coll.clone();
        async move { coll.find_one(doc! {"_id": id}).await.unwrap() }
    };
    // Written by the site's applications, never by the node: one even names A as creator.
    let app1 = doc! {"_id": "app1", "id": "app1", "creator_id": A, "name": "the site's"};
    let app2 = doc! {"_id": "app2", "id": "app2", "creator_id": "site-app", "n": 7};
    coll.insert_many([app1.clone(), app2.clone()]).await.unwrap();
    let site = ApplyOutcome::Conflict {
        owner: Owner::SiteDocument,
    };
    let (o, rows) = store
        .apply_batch(
            A,
            4,
            vec![
                entry(A, 1, Action::Create, "app1", json!({"name": "A's"})),
                entry(A, 2, Action::Update, "app2", json!({})),
                entry(A, 3, Action::Delete, "app1", json!({})),
                entry(A, 4, Action::Create, "r1", json!({"n": 1})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        o,
        vec![site.clone(), site.clone(), site.clone(), ApplyOutcome::Applied]
    );
    assert_eq!(
        rows.iter().map(|r| r.msg_id.clone()).collect::<Vec<_>>(),
        vec![format!("{A}:4")]
    );
    assert_eq!(read("app1").await, Some(app1.clone()), "unchanged");
    assert_eq!(read("app2").await, Some(app2), "unchanged");
    assert!(get(&*store, "app1").await.is_none(), "no version row for app1");
    assert_eq!(store.applied(A).await.unwrap(), 4, "passed over, not blocking");

    // r1 is A's, written by the node; an application then makes it its own.
    let taken = doc! {"_id": "r1", "id": "r1", "creator_id": "site-app", "n": 100};
    coll.replace_one(doc! {"_id": "r1"}, taken.clone()).await.unwrap();
    let (o, rows) = store
        .apply_batch(A, 5, vec![entry(A, 5, Action::Update, "r1", json!({"n": 5}))])
        .await
        .unwrap();
    assert_eq!(
        o,
        vec![ApplyOutcome::Conflict {
            owner: Owner::OtherCreator
        }]
    );
    assert!(rows.is_empty());
    assert_eq!(read("r1").await, Some(taken), "unchanged");
    let bare = doc! {"_id": "r1", "id": "r1", "n": 101};
    coll.replace_one(doc! {"_id": "r1"}, bare.clone()).await.unwrap();
    let (o, _) = store
        .apply_batch(A, 6, vec![entry(A, 6, Action::Delete, "r1", json!({}))])
        .await
        .unwrap();
    assert_eq!(
        o,
        vec![ApplyOutcome::Conflict {
            owner: Owner::OtherCreator
        }],
        "no creator_id"
    );
    assert_eq!(read("r1").await, Some(bare), "not removed");

    // r2 was A's and A deleted it; an application wrote a document under the id since.
    store
        .apply_batch(
            A,
            8,
            vec![
                entry(A, 7, Action::Create, "r2", json!({})),
                entry(A, 8, Action::Delete, "r2", json!({})),
            ],
        )
        .await
        .unwrap();
    let again = doc! {"_id": "r2", "id": "r2", "creator_id": A, "by": "an application"};
    coll.insert_one(again.clone()).await.unwrap();
    let (o, _) = store
        .apply_batch(A, 9, vec![entry(A, 9, Action::Create, "r2", json!({}))])
        .await
        .unwrap();
    assert_eq!(o, vec![site]);
    assert_eq!(read("r2").await, Some(again), "unchanged");

    // What the node wrote for A stays A's to change, within one batch too.
    let (o, _) = store
        .apply_batch(
            A,
            12,
            vec![
                entry(A, 10, Action::Create, "r3", json!({"n": 10})),
                entry(A, 11, Action::Update, "r3", json!({"n": 11})),
                entry(A, 12, Action::Update, "r3", json!({"n": 12})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied; 3]);
    assert_eq!(read("r3").await.unwrap().get_i64("n").unwrap(), 12);
    assert_eq!(read("app1").await, Some(app1), "still unchanged");
}

/// A document only the server refuses (here: a validator the site put on a collection) is
/// found by applying the batch entry by entry; only that entry is rejected.
async fn refused_by_the_server(b: &mut Mongo) {
    let store = b.fresh("validator").await;
    let client = b.server.client().await.unwrap();
    client
        .database(&b.db)
        .create_collection("compute_resource")
        .validator(mongodb::bson::doc! {"name": {"$type": "string"}})
        .await
        .unwrap();
    let batch = vec![
        entry(A, 1, Action::Create, "r1", json!({"name": "one"})),
        entry(A, 2, Action::Create, "r2", json!({"name": 2})),
        entry(A, 3, Action::Create, "r3", json!({"name": "three"})),
        entry(A, 4, Action::Update, "r1", json!({"name": "one again"})),
    ];
    let (o, rows) = store.apply_batch(A, 4, batch).await.unwrap();
    assert_eq!(o[0], ApplyOutcome::Applied);
    assert!(
        matches!(&o[1], ApplyOutcome::Rejected { reason } if reason.contains("validation")),
        "{o:?}"
    );
    assert_eq!(o[2..], [ApplyOutcome::Applied, ApplyOutcome::Applied]);
    assert_eq!(
        rows.iter().map(|r| r.msg_id.clone()).collect::<Vec<_>>(),
        [1, 3, 4].map(|s| format!("{A}:{s}")).to_vec()
    );
    assert_eq!(store.applied(A).await.unwrap(), 4);
    assert_eq!(get(&*store, "r1").await.unwrap().resource["name"], "one again");
    assert!(get(&*store, "r2").await.is_none());
}

/// A batch applied by an attempt whose answer was lost (so its rows are still in the
/// outbox) is reported applied again with the same rows, and published once.
async fn lost_commit_answer(b: &mut Mongo) {
    let store = b.fresh("lost_answer").await;
    let batch = vec![
        entry(A, 1, Action::Create, "r1", json!({})),
        entry(A, 2, Action::Create, "r2", json!({})),
    ];
    let (_, rows) = store.apply_batch(A, 2, batch.clone()).await.unwrap();
    let (o, again) = store.apply_batch(A, 2, batch.clone()).await.unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied, ApplyOutcome::Applied]);
    assert_eq!(again, rows, "the same rows, not new ones");
    store
        .outbox_remove(rows.iter().map(|r| r.id).collect())
        .await
        .unwrap();
    let (o, none) = store.apply_batch(A, 2, batch).await.unwrap();
    assert_eq!(o, vec![ApplyOutcome::Stale, ApplyOutcome::Stale]);
    assert!(none.is_empty());
}

/// Outbox rows written one document each (before the rows of an apply went into one group)
/// are still read, published, removed and recovered after an upgrade, in id order with the
/// groups written after them; a group from which some rows were published gives the rest.
async fn outbox_rows_of_earlier_versions(b: &mut Mongo) {
    use mongodb::bson::{doc, spec::BinarySubtype, Binary, Document};
    let store = b.fresh("outbox_upgrade").await;
    assert!(store.outbox(10).await.unwrap().is_empty());
    let db = b.server.client().await.unwrap().database(&b.db);
    let old = |id: u64, seq: u64| OutboxRow {
        id,
        subject: "CREATE_RESOURCE".to_owned(),
        msg_id: format!("{A}:{seq}"),
        payload: format!(r#"{{"old":{seq}}}"#).into_bytes(),
    };
    let earlier = vec![old(1, 101), old(2, 102)];
    let raw: Vec<Document> = earlier
        .iter()
        .map(|r| {
            doc! {"_id": r.id as i64, "subject": &r.subject, "msg_id": &r.msg_id,
            "payload": Binary { subtype: BinarySubtype::Generic, bytes: r.payload.clone() }}
        })
        .collect();
    db.collection::<Document>("oc_outbox")
        .insert_many(raw)
        .await
        .unwrap();
    db.collection::<Document>("oc_counters")
        .insert_one(doc! {"_id": "outbox", "last": 2_i64})
        .await
        .unwrap();
    assert_eq!(store.outbox(10).await.unwrap(), earlier);

    let batch = vec![
        entry(A, 3, Action::Create, "r3", json!({})),
        entry(A, 4, Action::Create, "r4", json!({})),
    ];
    let (_, rows) = store.apply_batch(A, 4, batch.clone()).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3, 4]);
    let all: Vec<OutboxRow> = earlier.iter().chain(&rows).cloned().collect();
    assert_eq!(store.outbox(10).await.unwrap(), all);
    assert_eq!(store.outbox(3).await.unwrap(), all[..3].to_vec());

    // One row of each shape published.
    store.outbox_remove(vec![1, 3]).await.unwrap();
    assert_eq!(
        store.outbox(10).await.unwrap(),
        vec![all[1].clone(), all[3].clone()]
    );
    // The batch again, as after a lost answer: the row still owed is recovered from its
    // group, the published one is not owed again.
    let (o, again) = store.apply_batch(A, 4, batch).await.unwrap();
    assert_eq!(o[1], ApplyOutcome::Applied, "{o:?}");
    assert_ne!(o[0], ApplyOutcome::Applied, "{o:?}");
    assert_eq!(again, vec![all[3].clone()]);
    store.outbox_remove(vec![2, 4]).await.unwrap();
    assert!(store.outbox(10).await.unwrap().is_empty());
    let left = db
        .collection::<Document>("oc_outbox")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(left, 0, "no empty group is left behind");
}

/// Outbox groups written before they named their entries' origin and seqs (found then by an
/// index on every row's `msg_id`): a node that meets them keys them, drops that index, and
/// an entry delivered again still gets its row back.
async fn outbox_groups_of_earlier_versions(b: &mut Mongo) {
    use mongodb::bson::{doc, Document};
    use mongodb::IndexModel;
    let store = b.fresh("outbox_groups_upgrade").await;
    let batch: Vec<JournalEntry> = (1..=3)
        .map(|seq| entry(A, seq, Action::Create, &format!("g{seq}"), json!({})))
        .collect();
    let (_, rows) = store.apply_batch(A, 3, batch.clone()).await.unwrap();
    assert_eq!(rows.len(), 3);
    drop(store);
    let outbox = b
        .server
        .client()
        .await
        .unwrap()
        .database(&b.db)
        .collection::<Document>("oc_outbox");
    // The group and the index as the earlier version left them.
    outbox
        .update_many(doc! {}, doc! {"$unset": {"origin": "", "lo": "", "hi": ""}})
        .await
        .unwrap();
    let old_index = IndexModel::builder()
        .keys(doc! {"rows.msg_id": 1})
        .options(
            mongodb::options::IndexOptions::builder()
                .name("rows_msg_id".to_owned())
                .build(),
        )
        .build();
    outbox.create_index(old_index).await.unwrap();

    let store = b.store().await;
    // The whole batch again, as after a lost answer: every row is still owed.
    let (o, again) = store.apply_batch(A, 3, batch).await.unwrap();
    assert!(o.iter().all(|o| *o == ApplyOutcome::Applied), "{o:?}");
    assert_eq!(again, rows);
    let group = outbox.find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(group.get_str("origin"), Ok(A), "{group:?}");
    assert_eq!(group.get_i64("lo"), Ok(1), "{group:?}");
    assert_eq!(group.get_i64("hi"), Ok(3), "{group:?}");
    let names = outbox.list_index_names().await.unwrap();
    assert!(!names.iter().any(|n| n == "rows_msg_id"), "{names:?}");
    assert_eq!(store.outbox(10).await.unwrap(), rows);
}

/// `oc_own` documents that hold their resource's text (written before they pointed at the
/// journal entry instead) answer with that text; one pointing at an entry that is not there
/// is reported, not answered with something else.
async fn own_documents_of_earlier_versions(b: &mut Mongo) {
    use mongodb::bson::{doc, Document};
    let store = b.fresh("own_upgrade").await;
    store
        .append_journal(
            A,
            vec![
                new_event(Action::Create, "o1", json!({"v": 1})),
                new_event(Action::Create, "o2", json!({"v": 2})),
            ],
        )
        .await
        .unwrap();
    let db = b.server.client().await.unwrap().database(&b.db);
    let own = db.collection::<Document>("oc_own");
    let written = own.find_one(doc! {"_id.id": "o1"}).await.unwrap().unwrap();
    assert!(written.get("resource").is_none(), "{written:?}");
    own.update_one(
        doc! {"_id.id": "o1"},
        doc! {"$set": {"resource": r#"{"id":"o1","creator_id":"x","v":"kept"}"#}},
    )
    .await
    .unwrap();
    let got = store.own_resources(A, DT).await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["v"], "kept");
    assert_eq!(got[1]["v"], 2);
    let bounds = oc_discovery::store::PageBounds {
        max_count: 1,
        max_bytes: 1 << 20,
    };
    let page = store.own_resources_page(A, DT, None, bounds).await.unwrap();
    assert_eq!(page.next.as_deref(), Some("o1"));
    let page = store.own_resources_page(A, DT, page.next, bounds).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.items[0].1.contains(r#""v":2"#), "{:?}", page.items);

    db.collection::<Document>("oc_journal")
        .delete_one(doc! {"_id": format!("{A}:2")})
        .await
        .unwrap();
    let err = store.own_resources(A, DT).await.unwrap_err();
    assert!(err.to_string().contains("missing journal seq 2"), "{err}");
}

/// Applied-log rows written one document each (before an apply's rows went into one group)
/// are still read, newest first with the groups after them, and trimmed.
async fn applied_log_rows_of_earlier_versions(b: &mut Mongo) {
    use mongodb::bson::{doc, Document};
    let store = b.fresh("applied_log_upgrade").await;
    let batch: Vec<JournalEntry> = (1..=3)
        .map(|seq| entry(A, seq, Action::Create, &format!("u{seq}"), json!({})))
        .collect();
    store.apply_batch(A, 3, batch).await.unwrap();
    // The batch's group, rewritten as an earlier version wrote its rows.
    let log = b
        .server
        .client()
        .await
        .unwrap()
        .database(&b.db)
        .collection::<Document>("oc_applied_log");
    let group = log.find_one(doc! {}).await.unwrap().unwrap();
    let rows: Vec<Document> = group
        .get_array("rows")
        .unwrap()
        .iter()
        .map(|r| r.as_document().unwrap().clone())
        .collect();
    assert_eq!(rows.len(), 3, "one group for the batch: {group:?}");
    log.delete_many(doc! {}).await.unwrap();
    log.insert_many(rows).await.unwrap();
    store
        .apply_batch(
            A,
            5,
            vec![
                entry(A, 4, Action::Create, "u4", json!({})),
                entry(A, 5, Action::Create, "u5", json!({})),
            ],
        )
        .await
        .unwrap();
    let seqs = |log: Vec<AppliedRecord>| log.iter().map(|r| r.entry.seq).collect::<Vec<u64>>();
    let all = store.applied_log(u64::MAX, 10).await.unwrap();
    assert_eq!(seqs(all.clone()), vec![5, 4, 3, 2, 1]);
    assert_eq!(seqs(store.applied_log(all[1].key, 2).await.unwrap()), vec![3, 2]);
    assert_eq!(seqs(store.applied_log(u64::MAX, 3).await.unwrap()), vec![5, 4, 3]);
    // Published (the log keeps what the outbox owes): the three rows of their own go, then
    // the older row of the group.
    let owed: Vec<u64> = store.outbox(10).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(owed.len(), 5);
    store.outbox_remove(owed).await.unwrap();
    outbox_emptied(&*store).await;
    assert_eq!(store.trim_applied_log(0, 2, 100).await.unwrap(), 3);
    assert_eq!(store.trim_applied_log(u64::MAX, 1000, 100).await.unwrap(), 1);
    assert_eq!(seqs(store.applied_log(u64::MAX, 10).await.unwrap()), vec![5]);
    assert_eq!(log.count_documents(doc! {}).await.unwrap(), 1);
}

/// Intake marks written one document per stream sequence (before the runs) are read as runs
/// of one once the store opens, and pruned like the runs written after them.
async fn intake_marks_of_earlier_versions(b: &mut Mongo) {
    use mongodb::bson::{doc, Document};
    b.db = "conformance_intake_upgrade".to_owned();
    let intake = b
        .server
        .client()
        .await
        .unwrap()
        .database(&b.db)
        .collection::<Document>("oc_intake");
    intake
        .insert_many([
            doc! {"_id": 5_i64, "seq": 1_i64},
            doc! {"_id": 7_i64, "seq": 2_i64},
        ])
        .await
        .unwrap();
    let store = b.store().await;
    assert_eq!(store.intake_seen(vec![4, 5, 6, 7]).await.unwrap(), vec![5, 7]);
    assert_eq!(store.intake_high().await.unwrap(), 7);
    let events = vec![
        new_event(Action::Create, "i1", json!({})),
        new_event(Action::Create, "i2", json!({})),
    ];
    store.append_journal_marked(A, events, vec![9, 8]).await.unwrap();
    assert_eq!(store.intake_seen(vec![10, 9, 8, 7]).await.unwrap(), vec![9, 8, 7]);
    assert_eq!(store.intake_high().await.unwrap(), 9);
    store.intake_forget_below(7).await.unwrap();
    assert_eq!(store.intake_seen(vec![5, 7]).await.unwrap(), vec![7]);
    // Inside a run: the run stays, the sequences below the floor are forgotten.
    store.intake_forget_below(9).await.unwrap();
    assert_eq!(store.intake_seen(vec![7, 8, 9]).await.unwrap(), vec![9]);
    assert_eq!(store.intake_high().await.unwrap(), 9);
    assert_eq!(intake.count_documents(doc! {}).await.unwrap(), 1, "one run left");
}

async fn health_and_outage(b: &mut Mongo) {
    let store = b.fresh("health").await;
    store.health().await.unwrap();
    b.server.kill();
    let err = store.health().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().starts_with("store unavailable: "), "{err}");
    let err = store
        .apply_batch(A, 1, vec![entry(A, 1, Action::Create, "r1", json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    b.server.start_again().await.unwrap();
    // The driver reconnects by itself; the same store works again.
    let (o, _) = store
        .apply_batch(A, 1, vec![entry(A, 1, Action::Create, "r1", json!({}))])
        .await
        .unwrap();
    assert_eq!(o, vec![ApplyOutcome::Applied]);
    store.health().await.unwrap();
}

/// A standalone mongod has no transactions: the store says so instead of failing every
/// commit, and `/healthz` would quote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_mongod_is_reported_not_used() {
    init_tracing();
    let server = MongoServer::start_standalone().await.unwrap();
    let store = MongoStore::connect(&server.uri(), "standalone", MongoSettings::default())
        .await
        .unwrap();
    let err = store.health().await.unwrap_err();
    assert!(err.to_string().contains("replica set"), "{err}");
    let err = store
        .append_journal(A, vec![new_event(Action::Create, "r1", json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
}
