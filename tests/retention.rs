//! Journal compaction on both backends (a redb file, a real mongod): per resource only its
//! latest entry or its tombstone stays below the floor, tombstones go after their
//! retention, the head entry stays, what partners have not acknowledged stays, and the
//! space goes back to the file system.

use std::sync::Arc;

use oc_discovery::contract::{Action, NewEvent};
use oc_discovery::store::embedded::EmbeddedStore;
use oc_discovery::store::mongo::{MongoSettings, MongoStore};
use oc_discovery::store::{CompactBounds, Store};
use oc_testkit::{init_tracing, MongoServer};
use serde_json::json;

const A: &str = "12D3KooWorigin-a";
const DT: &str = "COMPUTE_RESOURCE";
/// Resources created; each one updated `UPDATES` times; every tenth deleted.
const RESOURCES: usize = 2000;
const UPDATES: usize = 4;

/// Bytes that do not compress (WiredTiger compresses, and skips files under 1 MiB).
fn noise(seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..25)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect()
}

fn ev(action: Action, id: &str, n: usize) -> NewEvent {
    let seed = id
        .bytes()
        .fold(n as u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let resource = json!({"id": id, "creator_id": A, "n": n, "pad": noise(seed)});
    NewEvent {
        action,
        data_type: DT.into(),
        user: "u".into(),
        from_app: "app".into(),
        resource: resource.into(),
        resource_id: id.into(),
    }
}

fn bounds(up_to: u64, tombstones_older_than_ms: u64) -> CompactBounds {
    CompactBounds {
        up_to,
        older_than_ms: u64::MAX,
        tombstones_older_than_ms,
        max_examined: usize::MAX,
    }
}

async fn fill(store: &dyn Store) -> u64 {
    let mut batch = Vec::new();
    for i in 0..RESOURCES {
        batch.push(ev(Action::Create, &format!("r{i:05}"), 0));
    }
    for u in 1..=UPDATES {
        for i in 0..RESOURCES {
            batch.push(ev(Action::Update, &format!("r{i:05}"), u));
        }
    }
    for i in (0..RESOURCES).step_by(10) {
        batch.push(ev(Action::Delete, &format!("r{i:05}"), 99));
    }
    for chunk in batch.chunks(1000) {
        store.append_journal(A, chunk.to_vec()).await.unwrap();
    }
    store.journal_head(A).await.unwrap()
}

async fn count_journal(store: &dyn Store) -> usize {
    let mut n = 0;
    let mut from = 1;
    loop {
        let chunk = store.read_journal(A, from, 4096).await.unwrap();
        let Some(last) = chunk.last() else { return n };
        n += chunk.len();
        from = last.seq + 1;
    }
}

/// Compaction and its disk effect, with `disk()` measuring the backend's bytes on disk.
async fn compaction<F, Fut>(store: Arc<dyn Store>, shrinks: bool, disk: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let head = fill(store.as_ref()).await;
    let total = RESOURCES * (UPDATES + 1) + RESOURCES / 10;
    assert_eq!(head as usize, total);
    store.reclaim_space().await.unwrap();
    let before = disk().await;

    // A partner has acknowledged only half: nothing after it goes.
    let half = head / 2;
    let report = store.compact_journal(A, bounds(half, 0)).await.unwrap();
    assert_eq!(report.floor, half);
    assert_eq!(store.journal_floor(A).await.unwrap(), half);
    let after_half = count_journal(store.as_ref()).await;
    assert!(after_half < total, "something compacted");
    let untouched = store.read_journal(A, half + 1, usize::MAX).await.unwrap();
    assert_eq!(
        untouched.len() as u64,
        head - half,
        "entries after the bound are all there"
    );

    // Everything acknowledged, tombstones kept (retention not reached).
    let report = store.compact_journal(A, bounds(u64::MAX, 0)).await.unwrap();
    assert_eq!(report.floor, head - 1, "the head entry stays whatever it is");
    let live = RESOURCES - RESOURCES / 10;
    let kept = count_journal(store.as_ref()).await;
    assert_eq!(
        kept,
        live + RESOURCES / 10,
        "one entry per live resource, one tombstone per deleted"
    );
    assert_eq!(store.own_count(A).await.unwrap() as usize, live);

    // The snapshot read: every live resource once, its latest entry, in key order.
    let mut after = None;
    let mut seen = Vec::new();
    loop {
        let page = store.snapshot_page(A, after.clone(), 300, 1 << 20).await.unwrap();
        for (key, raw) in &page.entries {
            let e: oc_discovery::contract::JournalEntry = serde_json::from_slice(&raw.json).unwrap();
            assert_eq!(e.resource.to_value()["n"], UPDATES, "{key:?}: its latest state");
            seen.push(key.1.clone());
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), live);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "key order");

    // Tombstones past their retention go, but not the head entry.
    let report = store
        .compact_journal(A, bounds(u64::MAX, u64::MAX))
        .await
        .unwrap();
    assert_eq!(report.tombstones_dropped as usize, RESOURCES / 10 - 1);
    assert_eq!(count_journal(store.as_ref()).await, live + 1);
    // A change to a resource whose latest entry is below the floor removes that entry in
    // its commit: below the floor only the latest stays.
    let kept = count_journal(store.as_ref()).await;
    let next = store
        .append_journal(A, vec![ev(Action::Update, "r00001", 7)])
        .await
        .unwrap();
    assert_eq!(next[0].seq, head + 1, "the next seq follows the head");
    assert_eq!(count_journal(store.as_ref()).await, kept);

    // MongoDB keeps removed documents for its snapshot history (5 s by default) before
    // their pages are free: the space comes back at a later run.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let freed = store.reclaim_space().await.unwrap();
    let after = disk().await;
    eprintln!("journal on disk: {before} -> {after} bytes, {freed} bytes given back");
    assert!(freed > 0, "space given back");
    if shrinks {
        assert!(after < before, "disk use went down: {before} -> {after} bytes");
    }

    // Bookkeeping values persist and can be removed.
    store.set_meta("k", Some(b"v".to_vec())).await.unwrap();
    assert_eq!(store.meta("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    store.set_meta("k", None).await.unwrap();
    assert_eq!(store.meta("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_compaction_keeps_the_latest_and_shrinks_the_file() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
    let p = path.clone();
    compaction(store, true, move || {
        let p = p.clone();
        async move { std::fs::metadata(&p).unwrap().len() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_compaction_keeps_the_latest_and_frees_storage() {
    init_tracing();
    let server = MongoServer::start().await.unwrap();
    let db = "retention_test";
    let store: Arc<dyn Store> = Arc::new(
        MongoStore::connect(&server.uri(), db, MongoSettings::default())
            .await
            .unwrap(),
    );
    let client = server.client().await.unwrap();
    // The collection's storageSize as collStats reports it did not drop right after the
    // command in our runs although `bytesFreed` did: the command's figure is asserted.
    compaction(store, false, move || {
        let client = client.clone();
        async move {
            // storageSize is the file's: take a checkpoint first.
            client
                .database("admin")
                .run_command(mongodb::bson::doc! {"fsync": 1})
                .await
                .unwrap();
            let stats = client
                .database(db)
                .run_command(mongodb::bson::doc! {"collStats": "oc_journal"})
                .await
                .unwrap();
            match stats.get("storageSize") {
                Some(mongodb::bson::Bson::Int32(n)) => *n as u64,
                Some(mongodb::bson::Bson::Int64(n)) => *n as u64,
                Some(mongodb::bson::Bson::Double(f)) => *f as u64,
                other => panic!("storageSize: {other:?}"),
            }
        }
    })
    .await;
}
