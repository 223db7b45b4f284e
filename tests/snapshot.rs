//! Journal retention and snapshot sync between real nodes (real nats-servers, libp2p, and
//! mongod for the MongoDB cases): a partner added after 100 000 resources exist, with
//! updates and deletes among them and the journal compacted, ends with exactly the
//! origin's current resources; a snapshot interrupted by SIGKILL of either side resumes
//! from its last confirmed part; a lagging partner gets a snapshot, a merely slow one the
//! journal.
//!
//! The history is published through the fastest real path: plain publishes into the
//! origin's JetStream intake stream.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use oc_testkit::{event, init_tracing, MongoServer, Site};
use serde_json::{json, Value};

const DT: &str = "COMPUTE_RESOURCE";
/// Waits for what takes long on a loaded machine (100 000 resources in a debug build).
const LONG: Duration = Duration::from_secs(1200);

async fn within(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn args(site: &mut Site, args: &[&str]) {
    site.node.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
}

fn on_mongodb(site: &mut Site, mongo: &MongoServer, db: &str) {
    args(
        site,
        &[
            "--store",
            "mongodb",
            "--mongo-uri",
            &mongo.uri(),
            "--mongo-db",
            db,
        ],
    );
}

/// Short retention, so that compaction happens within the test.
fn short_retention(site: &mut Site, partner_max_lag: &str) {
    args(
        site,
        &[
            "--journal-retention",
            "1s",
            "--tombstone-retention",
            "1s",
            "--partner-max-lag",
            partner_max_lag,
            "--compact-interval",
            "1s",
        ],
    );
}

async fn head(site: &Site) -> u64 {
    match site.node.get_json("/api/status").await {
        Ok(v) => v["journal_head"].as_u64().unwrap_or(0),
        Err(_) => 0,
    }
}

/// Publishes `ids` with `n` into the site's intake stream, action by action, and waits
/// until the journal head reaches `until`.
async fn publish(site: &Site, action: &str, ids: impl Iterator<Item = usize>, n: u64) {
    let me = site.id();
    for i in ids {
        let body = event(action, &format!("r{i:06}"), &me, json!({"n": n}));
        site.publish(&body).await;
    }
    site.app.flush().await.unwrap();
}

/// `count` creations, every tenth (from 1) updated, every tenth (from 2) deleted: the
/// origin's current resources (id → `n`) once journaled.
async fn history(site: &Site, from: usize, count: usize, round: u64) -> BTreeMap<String, u64> {
    let start = head(site).await;
    let ids = from..from + count;
    publish(site, "PB_CREATE", ids.clone(), round).await;
    publish(site, "PB_UPDATE", ids.clone().filter(|i| i % 10 == 1), round + 1).await;
    publish(site, "PB_DELETE", ids.clone().filter(|i| i % 10 == 2), round).await;
    let events =
        count + ids.clone().filter(|i| i % 10 == 1).count() + ids.clone().filter(|i| i % 10 == 2).count();
    let until = start + events as u64;
    within("the history journaled", LONG, async || head(site).await >= until).await;
    ids.filter(|i| i % 10 != 2)
        .map(|i| (format!("r{i:06}"), if i % 10 == 1 { round + 1 } else { round }))
        .collect()
}

/// The live resources `site` stored from others: id → `n`.
async fn live(site: &Site) -> BTreeMap<String, u64> {
    site.stored(DT)
        .await
        .into_iter()
        .filter(|r| r["deleted"] != true)
        .map(|r| {
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            (id, r["resource"]["n"].as_u64().unwrap_or(u64::MAX))
        })
        .collect()
}

async fn peer_row(site: &Site, peer: &str) -> Value {
    let peers = site.node.get_json("/api/peers").await.unwrap_or(Value::Null);
    peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["peer_id"] == peer).cloned())
        .unwrap_or(Value::Null)
}

async fn metric(site: &Site, name: &str) -> u64 {
    site.node.metric(name).await.unwrap_or(0)
}

async fn compacted_to_head(site: &Site) {
    let h = head(site).await;
    within("the journal compacted up to its head", LONG, async || {
        metric(site, "oc_journal_floor").await + 1 >= h
    })
    .await;
}

/// A partner added after `count` resources exist (with updates and deletes, the journal
/// compacted) gets a snapshot and ends with exactly the origin's current resources.
async fn late_partner(count: usize, mongo: Option<&MongoServer>) {
    init_tracing();
    let (mut a, mut b) = (Site::jetstream().await, Site::new().await);
    short_retention(&mut a, "30d");
    if let Some(m) = mongo {
        on_mongodb(&mut a, m, "snap_late_a");
        on_mongodb(&mut b, m, "snap_late_b");
    }
    b.node.partners.push(a.node.addr());
    a.node.start_healthy().await.unwrap();
    let started = Instant::now();
    let expected = history(&a, 0, count, 1).await;
    eprintln!("{count} resources journaled in {:?}", started.elapsed());
    compacted_to_head(&a).await;
    // Creations superseded by their updates as these came go with the updates' commits
    // (below the floor only the latest stays); the rest goes by the compaction runs.
    assert!(
        metric(&a, "oc_journal_compacted_total").await > 0,
        "compaction ran"
    );

    b.node.start_healthy().await.unwrap();
    let (status, body) = a
        .node
        .request(
            "POST",
            "/api/partners",
            Some(&json!({"addr": b.node.addr()}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let rss_a = oc_testkit::RssPeak::watch(a.node.pid().unwrap());
    let rss_b = oc_testkit::RssPeak::watch(b.node.pid().unwrap());
    let (b_id, h) = (b.id(), head(&a).await);
    within("the snapshot done and confirmed", LONG, async || {
        let row = peer_row(&a, &b_id).await;
        row["snapshot"]["state"] == 0 && row["acked_seq"].as_u64() == Some(h)
    })
    .await;
    eprintln!(
        "snapshot of {} resources in {:?}; peak RSS: sender {} MiB, receiver {} MiB",
        expected.len(),
        started.elapsed(),
        rss_a.peak() >> 20,
        rss_b.peak() >> 20
    );
    assert_eq!(metric(&a, "oc_snapshot_jobs_done_total").await, 1);
    let got = live(&b).await;
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "B holds exactly A's current resources");
    // And the journal follows from the snapshot's position.
    let me = a.id();
    a.publish(&event("PB_CREATE", "after", &me, json!({"n": 9})))
        .await;
    within("the next event by the journal", LONG, async || {
        live(&b).await.get("after") == Some(&9)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_added_after_100_000_resources_gets_exactly_the_current_ones() {
    late_partner(100_000, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_added_after_100_000_resources_gets_exactly_the_current_ones_on_mongodb() {
    let mongo = MongoServer::start().await.unwrap();
    late_partner(100_000, Some(&mongo)).await;
}

/// docs/PERFORMANCE.md's figure: a snapshot of 1 000 000 resources, time and peak RSS of
/// both sides (`cargo test --release --test snapshot -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: 1 000 000 resources, run it with --release"]
async fn a_partner_added_after_1_000_000_resources() {
    late_partner(1_000_000, None).await;
}

/// Which side a test kills in the middle of a snapshot.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Sender,
    Receiver,
}

/// A snapshot interrupted by SIGKILL of `victim` resumes from the last part the receiver
/// confirmed and completes.
async fn interrupted(victim: Victim, mongo: Option<&MongoServer>) {
    init_tracing();
    let (mut a, mut b) = (Site::jetstream().await, Site::new().await);
    short_retention(&mut a, "30d");
    // Small frames: many parts, so the kill lands in the middle.
    args(&mut a, &["--max-frame-bytes", "4096"]);
    if let Some(m) = mongo {
        on_mongodb(&mut a, m, &format!("snap_kill_{victim:?}_a"));
        on_mongodb(&mut b, m, &format!("snap_kill_{victim:?}_b"));
    }
    b.node.partners.push(a.node.addr());
    a.node.start_healthy().await.unwrap();
    let expected = history(&a, 0, 10_000, 1).await;
    compacted_to_head(&a).await;
    b.node.start_healthy().await.unwrap();
    let (status, body) = a
        .node
        .request(
            "POST",
            "/api/partners",
            Some(&json!({"addr": b.node.addr()}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let b_id = b.id();
    let total = expected.len() as u64;
    // A third through: kill.
    within("the snapshot a third through", LONG, async || {
        let row = peer_row(&a, &b_id).await;
        row["snapshot"]["state"] == 1 && row["snapshot"]["sent"].as_u64().unwrap_or(0) >= total / 3
    })
    .await;
    let sent_before = peer_row(&a, &b_id).await["snapshot"]["sent"]
        .as_u64()
        .unwrap_or(0);
    let applied_before = metric(&b, "oc_snapshot_parts_applied_total").await;
    assert!(sent_before < total, "killed before the end");
    match victim {
        Victim::Sender => {
            a.node.kill();
            a.node.start_healthy().await.unwrap();
            // The job is back as persisted, not at zero.
            let row = peer_row(&a, &b_id).await;
            assert_eq!(row["snapshot"]["state"], 1, "{row}");
            assert!(
                row["snapshot"]["sent"].as_u64().unwrap_or(0) >= sent_before,
                "{row}"
            );
        }
        Victim::Receiver => {
            b.node.kill();
            b.node.start_healthy().await.unwrap();
        }
    }
    // Until the end, the job's progress never goes back below what was confirmed before
    // the kill (a page may be sent again, never the job from zero).
    let h = head(&a).await;
    let mut lowest = u64::MAX;
    within("the snapshot done and confirmed", LONG, async || {
        let row = peer_row(&a, &b_id).await;
        if row["snapshot"]["state"] == 1 {
            lowest = lowest.min(row["snapshot"]["sent"].as_u64().unwrap_or(0));
        }
        row["snapshot"]["state"] == 0 && row["acked_seq"].as_u64() == Some(h)
    })
    .await;
    let page = 50;
    assert!(
        lowest == u64::MAX || lowest + page >= sent_before,
        "progress fell to {lowest} after {sent_before} were confirmed"
    );
    // The session after the kill resumed the job past part 0.
    let resumed = a
        .node
        .log()
        .lines()
        .filter(|l| l.contains("snapshot job sending"))
        .any(|l| !l.contains("next_part=0"));
    assert!(resumed, "a session resumed the job past part 0");
    // Parts applied by B in all: those before the kill, and after it about the rest, not
    // all of them again.
    let parts_sent = metric(&a, "oc_snapshot_parts_sent_total").await;
    let parts_applied = match victim {
        Victim::Sender => metric(&b, "oc_snapshot_parts_applied_total").await,
        Victim::Receiver => applied_before + metric(&b, "oc_snapshot_parts_applied_total").await,
    };
    eprintln!("{victim:?} killed after {applied_before} parts applied; parts sent by A's last run {parts_sent}, applied by B in all {parts_applied}");
    assert!(
        live(&b).await == expected,
        "B holds exactly A's current resources"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_resumes_after_the_sender_is_killed() {
    interrupted(Victim::Sender, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_resumes_after_the_receiver_is_killed() {
    interrupted(Victim::Receiver, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_resumes_after_either_side_is_killed_on_mongodb() {
    let mongo = MongoServer::start().await.unwrap();
    interrupted(Victim::Sender, Some(&mongo)).await;
    interrupted(Victim::Receiver, Some(&mongo)).await;
}

/// A partner absent longer than `--partner-max-lag` is not waited for: the journal is
/// compacted past its cursor and it gets a snapshot, whose sweep removes what was deleted
/// meanwhile (with `REMOVE_RESOURCE` notices); a partner merely behind is waited for and
/// gets the journal.
async fn lagging_and_slow(mongo: Option<&MongoServer>) {
    init_tracing();
    let (mut a, mut b, mut c) = (Site::jetstream().await, Site::new().await, Site::new().await);
    short_retention(&mut a, "8s");
    if let Some(m) = mongo {
        on_mongodb(&mut a, m, "snap_lag_a");
        on_mongodb(&mut b, m, "snap_lag_b");
        on_mongodb(&mut c, m, "snap_lag_c");
    }
    oc_testkit::partner(&mut a, &mut [&mut b, &mut c]);
    let removed_on_b = b.collect(&["REMOVE_RESOURCE"]).await;
    for s in [&mut a, &mut b, &mut c] {
        s.node.start_healthy().await.unwrap();
    }
    let mut expected = history(&a, 0, 200, 1).await;
    for s in [&b, &c] {
        within("round 1 everywhere", LONG, async || live(s).await == expected).await;
    }
    let b_cursor = head(&a).await;

    // B goes away; A deletes some of what B holds, and more.
    b.node.kill();
    let gone: Vec<usize> = (0..200).filter(|i| i % 10 == 3).collect();
    publish(&a, "PB_DELETE", gone.iter().copied(), 1).await;
    for i in &gone {
        expected.remove(&format!("r{i:06}"));
    }
    expected.extend(history(&a, 1000, 200, 1).await);
    within("round 2 on C", LONG, async || live(&c).await == expected).await;
    // Longer than --partner-max-lag: B is no longer waited for.
    tokio::time::sleep(Duration::from_secs(9)).await;
    within("the journal compacted past B's cursor", LONG, async || {
        metric(&a, "oc_journal_floor").await > b_cursor
    })
    .await;

    // C falls behind for a moment: it is waited for, and gets the journal.
    c.node.kill();
    expected.extend(history(&a, 2000, 50, 1).await);
    c.node.start_healthy().await.unwrap();
    within("round 3 on C by the journal", LONG, async || {
        live(&c).await == expected
    })
    .await;
    let c_id = c.id();
    assert_eq!(peer_row(&a, &c_id).await["snapshot"]["state"], 0);
    assert_eq!(
        metric(&a, "oc_snapshot_jobs_done_total").await,
        0,
        "no snapshot for C"
    );
    assert!(
        !a.node
            .log()
            .lines()
            .any(|l| l.contains("partner needs a snapshot") && l.contains(&c_id)),
        "C was never sent a snapshot"
    );

    // B comes back behind the floor: a snapshot, then the journal.
    b.node.start_healthy().await.unwrap();
    let (b_id, h) = (b.id(), head(&a).await);
    within("B's snapshot done and confirmed", LONG, async || {
        let row = peer_row(&a, &b_id).await;
        row["snapshot"]["state"] == 0 && row["acked_seq"].as_u64() == Some(h)
    })
    .await;
    assert_eq!(metric(&a, "oc_snapshot_jobs_done_total").await, 1);
    assert!(
        live(&b).await == expected,
        "B holds exactly A's current resources"
    );
    assert_eq!(metric(&b, "oc_snapshot_removed_total").await, gone.len() as u64);
    let removed: std::collections::BTreeSet<String> = removed_on_b
        .all()
        .into_iter()
        .filter_map(|s| s.body["resource"]["id"].as_str().map(str::to_owned))
        .collect();
    for i in &gone {
        assert!(
            removed.contains(&format!("r{i:06}")),
            "REMOVE_RESOURCE of r{i:06} on B"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_partner_gets_a_snapshot_a_merely_slow_one_the_journal() {
    lagging_and_slow(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_partner_gets_a_snapshot_a_merely_slow_one_the_journal_on_mongodb() {
    let mongo = MongoServer::start().await.unwrap();
    lagging_and_slow(Some(&mongo)).await;
}
