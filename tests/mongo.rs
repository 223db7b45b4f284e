//! Real nodes with B on the MongoDB backend (a real mongod, one-member replica set): what
//! partners send ends up as plain documents in B's MongoDB, exactly once, through
//! MongoDB outages, and a document MongoDB refuses is reported to the sender.

use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{doc, Document};
use oc_testkit::{event, eventually, init_tracing, partner, MongoServer, Site, WAIT};
use serde_json::json;

const DB: &str = "opencloud_test";

/// Puts the site's node on the MongoDB backend, by flags.
fn on_mongodb(site: &mut Site, mongo: &MongoServer) {
    site.node.extra_args.extend([
        "--store".to_owned(),
        "mongodb".to_owned(),
        "--mongo-uri".to_owned(),
        mongo.uri(),
        "--mongo-db".to_owned(),
        DB.to_owned(),
    ]);
}

/// `/healthz` answers 503 and every reason is the store's.
async fn store_is_the_only_reason(site: &Site) -> bool {
    let Ok((503, body)) = site.node.get("/healthz").await else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reasons = v["reasons"].as_array().cloned().unwrap_or_default();
    !reasons.is_empty()
        && reasons
            .iter()
            .all(|r| r.as_str().is_some_and(|r| r.starts_with("store unavailable: ")))
}

async fn count(db: &mongodb::Database, coll: &str, filter: Document) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap_or(0)
}

/// Publishes `ids` as creations on `site` and waits for every reply to be ok.
async fn publish_all(site: &Site, ids: std::ops::Range<usize>, inbox: &str) {
    let me = site.id();
    let mut replies = site.app.subscribe(inbox.to_owned()).await.unwrap();
    let n = ids.len();
    for i in ids {
        let body = event("PB_CREATE", &format!("res-{i}"), &me, json!({"n": i}));
        site.app
            .publish_with_reply("PROPALGATION_EVENT", inbox.to_owned(), body.to_string().into())
            .await
            .unwrap();
    }
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(60), replies.next())
            .await
            .expect("replies within 60 s")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["ok"], true, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_delete_land_in_mongodb_as_plain_documents() {
    init_tracing();
    let mongo = MongoServer::start().await.unwrap();
    let (mut a, mut b, mut c) = (Site::new().await, Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b, &mut c]);
    on_mongodb(&mut b, &mongo);
    let seen_a = a.collect(&["CREATE_RESOURCE"]).await;
    let seen_b = b.collect(&["CREATE_RESOURCE", "REMOVE_RESOURCE"]).await;
    let seen_c = c.collect(&["CREATE_RESOURCE", "REMOVE_RESOURCE"]).await;
    for s in [&mut a, &mut b, &mut c] {
        s.node.start_healthy().await.unwrap();
    }
    let me = a.id();
    a.publish_ok(&event(
        "PB_CREATE",
        "r1",
        &me,
        json!({"name": "gpu-1", "cpus": 8, "spec": {"mem_gb": 64, "tags": ["a", "b"]}}),
    ))
    .await;
    a.publish_ok(&event("PB_CREATE", "r2", &me, json!({"name": "gpu-2"})))
        .await;
    a.publish_ok(&event(
        "PB_UPDATE",
        "r1",
        &me,
        json!({"name": "gpu-1", "cpus": 16, "spec": {"mem_gb": 128, "tags": ["a"]}}),
    ))
    .await;
    a.publish_ok(&event("PB_DELETE", "r2", &me, json!({}))).await;
    for seen in [&seen_b, &seen_c] {
        seen.wait_for("create, create, update, remove", |s| s.len() >= 4)
            .await;
        let removed: Vec<_> = seen
            .all()
            .into_iter()
            .filter(|s| s.subject == "REMOVE_RESOURCE")
            .collect();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].body["resource"]["id"], "r2");
    }

    // B's documents, read the way an application reads them.
    let client = mongo.client().await.unwrap();
    let db = client.database(DB);
    let resources = db.collection::<Document>("compute_resource");
    let r1 = resources
        .find_one(doc! {"_id": "r1"})
        .await
        .unwrap()
        .expect("r1 in compute_resource");
    assert_eq!(r1.get_str("id").unwrap(), "r1");
    assert_eq!(r1.get_str("creator_id").unwrap(), me);
    assert_eq!(r1.get_str("name").unwrap(), "gpu-1");
    assert_eq!(r1.get_i64("cpus").unwrap(), 16);
    let spec = r1.get_document("spec").unwrap();
    assert_eq!(spec.get_i64("mem_gb").unwrap(), 128);
    assert_eq!(spec.get_array("tags").unwrap().len(), 1);
    assert!(
        !r1.keys().any(|k| k.starts_with("oc_") || k == "version"),
        "no bookkeeping in the resource: {r1}"
    );
    assert_eq!(resources.count_documents(doc! {}).await.unwrap(), 1, "r2 removed");
    // The tombstone and versions live in the bookkeeping.
    let versions = db.collection::<Document>("oc_versions");
    let tomb = versions
        .find_one(doc! {"_id": {"coll": "compute_resource", "id": "r2"}})
        .await
        .unwrap()
        .expect("tombstone of r2");
    assert!(tomb.get_bool("deleted").unwrap());
    assert_eq!(tomb.get_i64("version").unwrap(), 4);
    assert_eq!(tomb.get_str("origin").unwrap(), me);
    let v1 = versions
        .find_one(doc! {"_id": {"coll": "compute_resource", "id": "r1"}})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (v1.get_i64("version").unwrap(), v1.get_bool("deleted").unwrap()),
        (3, false)
    );
    let applied = db
        .collection::<Document>("oc_applied")
        .find_one(doc! {"_id": &me})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(applied.get_i64("seq").unwrap(), 4);
    // The admin API reads the same state back.
    let stored = b.stored("COMPUTE_RESOURCE").await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["resource"]["cpus"], 16);
    assert_eq!(stored[1]["deleted"], true);

    // B's own events are journaled in MongoDB and reach A.
    let b_id = b.id();
    let seq = b
        .publish_ok(&event("PB_CREATE", "from-b", &b_id, json!({"site": "b"})))
        .await;
    assert_eq!(seq, 1);
    seen_a
        .wait_for("B's event on A", |s| {
            s.iter().any(|m| m.body["resource"]["id"] == "from-b")
        })
        .await;
    let journaled = db
        .collection::<Document>("oc_journal")
        .find_one(doc! {"origin": &b_id, "seq": 1_i64})
        .await
        .unwrap()
        .expect("B's journal entry in oc_journal");
    assert_eq!(journaled.get_str("_id").unwrap(), format!("{b_id}:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongod_restarted_mid_stream_every_event_exactly_once() {
    init_tracing();
    const N: usize = 3_000;
    let mut mongo = MongoServer::start().await.unwrap();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    on_mongodb(&mut b, &mongo);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let client = mongo.client().await.unwrap();
    let db = client.database(DB);

    publish_all(&a, 0..N / 2, "replies.first").await;
    // Kill mongod while B is still applying the first half.
    eventually("B to store some events", async || {
        count(&db, "compute_resource", doc! {}).await > 0
    })
    .await;
    mongo.kill();
    // The node stays up and says why it is not healthy: the store, and only the store.
    eventually("/healthz to report the store alone", async || {
        store_is_the_only_reason(&b).await
    })
    .await;
    // A keeps accepting; B holds its acks while MongoDB is down, long enough for the
    // driver to give up waiting and the inbound session to retry with backoff.
    publish_all(&a, N / 2..N, "replies.second").await;
    eventually("B to hold its acks", async || {
        b.node.log().contains("holding the ack")
    })
    .await;
    mongo.start_again().await.unwrap();

    eventually("every event in MongoDB", async || {
        count(&db, "compute_resource", doc! {}).await >= N as u64
    })
    .await;
    seen_b.wait_distinct("every event on NATS B", N).await;
    b.node.wait_healthy(WAIT).await.unwrap();
    assert_eq!(
        count(&db, "compute_resource", doc! {}).await,
        N as u64,
        "each event once"
    );
    assert_eq!(count(&db, "oc_versions", doc! {"deleted": false}).await, N as u64);
    for i in [0, N / 2 - 1, N / 2, N - 1] {
        assert_eq!(
            count(
                &db,
                "compute_resource",
                doc! {"_id": format!("res-{i}"), "n": i as i64}
            )
            .await,
            1,
            "res-{i}"
        );
    }
    assert_eq!(
        b.node.metric("oc_events_applied_total").await.unwrap(),
        N as u64,
        "applied exactly once each"
    );
    eventually("A's cursor for B to reach the end", async || {
        let peers = a.node.get_json("/api/peers").await.unwrap();
        peers[0]["acked_seq"] == N as u64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_while_mongodb_is_down_and_catches_up() {
    init_tracing();
    let mut mongo = MongoServer::start().await.unwrap();
    mongo.kill();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    // By environment this time.
    b.node.extra_env = vec![
        ("OC_DISCOVERY_STORE".into(), "mongodb".into()),
        ("OC_DISCOVERY_MONGO_URI".into(), mongo.uri()),
        ("OC_DISCOVERY_MONGO_DB".into(), DB.into()),
    ];
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start().unwrap();
    eventually("B to answer 503 for its store only", async || {
        store_is_the_only_reason(&b).await
    })
    .await;
    let me = a.id();
    for i in 0..10 {
        a.publish_ok(&event("PB_CREATE", &format!("r{i}"), &me, json!({})))
            .await;
    }
    mongo.start_again().await.unwrap();
    b.node.wait_healthy(WAIT).await.unwrap();
    seen_b
        .wait_for("the events sent while MongoDB was down", |s| s.len() >= 10)
        .await;
    let client = mongo.client().await.unwrap();
    assert_eq!(count(&client.database(DB), "compute_resource", doc! {}).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_mongodb_refuses_is_reported_and_the_rest_flows() {
    init_tracing();
    let mongo = MongoServer::start().await.unwrap();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    on_mongodb(&mut b, &mongo);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "before", &me, json!({}))).await;
    // A accepts it (its journal holds any JSON); B's MongoDB cannot.
    a.publish_ok(&event(
        "PB_CREATE",
        "bad",
        &me,
        json!({"spec": {"$where": "sleep(1000)"}}),
    ))
    .await;
    for i in 0..5 {
        a.publish_ok(&event("PB_CREATE", &format!("after-{i}"), &me, json!({})))
            .await;
    }
    seen_b
        .wait_for("the events around the refused one", |s| s.len() >= 6)
        .await;
    let refused = "oc_refusals_total{place=\"outbound\",code=\"invalid_document\"}";
    eventually("A to count B's refusal", async || {
        a.node.metric(refused).await.unwrap_or(0) == 1
    })
    .await;
    assert_eq!(
        b.node
            .metric("oc_refusals_total{place=\"inbound\",code=\"invalid_document\"}")
            .await
            .unwrap(),
        1
    );
    assert!(seen_b.all().iter().all(|m| m.body["resource"]["id"] != "bad"));
    let client = mongo.client().await.unwrap();
    let db = client.database(DB);
    assert_eq!(count(&db, "compute_resource", doc! {}).await, 6);
    assert_eq!(count(&db, "compute_resource", doc! {"_id": "bad"}).await, 0);
    // Passed over, not blocking: A's cursor reaches its head.
    eventually("A's cursor for B to pass the refused event", async || {
        let peers = a.node.get_json("/api/peers").await.unwrap();
        peers[0]["acked_seq"] == 7
    })
    .await;
    assert_eq!(b.node.metric("oc_events_applied_total").await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_partnership_lives_in_mongodb_and_survives_a_restart_during_an_outage() {
    init_tracing();
    let mut mongo = MongoServer::start().await.unwrap();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    // A replicates to B, but B accepts A only once told so at run time.
    a.node.partners.push(b.node.addr());
    on_mongodb(&mut b, &mongo);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let body = json!({"addr": a.node.addr(), "relation": "partner"}).to_string();
    let admin = b.node.admin_url();
    let (status, answer) = tokio::task::spawn_blocking(move || {
        oc_discovery::cli::http_request("POST", &admin, "/api/partners", Some(&body))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let client = mongo.client().await.unwrap();
    let peer = client
        .database(DB)
        .collection::<Document>("oc_peers")
        .find_one(doc! {"_id": a.id()})
        .await
        .unwrap()
        .expect("the partnership in oc_peers");
    assert_eq!(peer.get_str("relation").unwrap(), "partner");
    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "r1", &me, json!({}))).await;
    seen_b.wait_for("r1 on B", |s| !s.is_empty()).await;

    // B restarts while MongoDB is down: it comes up, then restores the partnership once
    // MongoDB is back, and A's next event gets through.
    b.node.stop();
    mongo.kill();
    b.node.start().unwrap();
    eventually("B up, waiting for its store", async || {
        store_is_the_only_reason(&b).await
    })
    .await;
    a.publish_ok(&event("PB_CREATE", "r2", &me, json!({}))).await;
    eventually("B to give up reading its partnerships for now", async || {
        b.node.log().contains("cannot read persisted partnerships yet")
    })
    .await;
    mongo.start_again().await.unwrap();
    b.node.wait_healthy(WAIT).await.unwrap();
    seen_b
        .wait_for("r2 on B after the restart", |s| {
            s.iter().any(|m| m.body["resource"]["id"] == "r2")
        })
        .await;
    assert_eq!(count(&client.database(DB), "compute_resource", doc! {}).await, 2);
    assert!(
        b.node.log().contains("persisted partnerships restored"),
        "restored by the retry"
    );
}
