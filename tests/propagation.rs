//! Propagation between real nodes: each with its own nats-server, libp2p over TCP on
//! 127.0.0.1.

use std::collections::HashMap;
use std::time::Duration;

use oc_testkit::{event, init_tracing, partner, Site};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_delete_reach_every_partner_in_order() {
    init_tracing();
    let (mut a, mut b, mut c) = (Site::new().await, Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b, &mut c]);
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
        json!({"name": "gpu-1", "cpus": 8}),
    ))
    .await;
    a.publish_ok(&event("PB_CREATE", "r2", &me, json!({"name": "gpu-2"})))
        .await;
    a.publish_ok(&event(
        "PB_UPDATE",
        "r1",
        &me,
        json!({"name": "gpu-1", "cpus": 16}),
    ))
    .await;
    a.publish_ok(&event("PB_DELETE", "r2", &me, json!({}))).await;

    for (site, seen) in [(&b, &seen_b), (&c, &seen_c)] {
        seen.wait_for("create, create, update, remove", |s| s.len() >= 4)
            .await;
        let all = seen.all();
        let r1: Vec<_> = all.iter().filter(|s| s.body["resource"]["id"] == "r1").collect();
        assert_eq!(r1.len(), 2, "{all:?}");
        assert!(r1.iter().all(|s| s.subject == "CREATE_RESOURCE"));
        assert_eq!(r1[0].body["origin_seq"], 1);
        assert_eq!(r1[1].body["origin_seq"], 3);
        assert_eq!(r1[1].body["resource"]["cpus"], 16);
        assert_eq!(r1[1].body["from_peer"], me.as_str());
        assert_eq!(r1[1].body["data_type"], "COMPUTE_RESOURCE");
        assert_eq!(r1[1].body["user"], "alice");
        assert_eq!(r1[1].msg_id.as_deref(), Some(format!("{me}:3").as_str()));
        let removed: Vec<_> = all.iter().filter(|s| s.subject == "REMOVE_RESOURCE").collect();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].body["resource"]["id"], "r2");
        assert_eq!(removed[0].body["origin_seq"], 4);

        let stored: HashMap<String, serde_json::Value> = site
            .stored("COMPUTE_RESOURCE")
            .await
            .into_iter()
            .map(|r| (r["id"].as_str().unwrap().to_owned(), r))
            .collect();
        assert_eq!(stored["r1"]["version"], 3);
        assert_eq!(stored["r1"]["deleted"], false);
        assert_eq!(stored["r1"]["resource"]["cpus"], 16);
        assert_eq!(stored["r2"]["deleted"], true, "tombstone kept");
        assert_eq!(stored["r2"]["version"], 4);
    }
    // The cursor reaches the head on both partners.
    let peers = a.node.get_json("/api/peers").await.unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 2);
    for _ in 0..200 {
        let peers = a.node.get_json("/api/peers").await.unwrap();
        if peers
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["acked_seq"] == 4 && p["pending"] == 0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "cursors never reached 4: {}",
        a.node.get_json("/api/peers").await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_was_down_catches_up() {
    init_tracing();
    const N: usize = 5_000;
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    let me = a.id();

    // B is down while A accepts every event.
    let mut inbox = a.app.subscribe("test.replies").await.unwrap();
    for i in 0..N {
        let body = event("PB_CREATE", &format!("res-{i}"), &me, json!({"n": i}));
        a.app
            .publish_with_reply("PROPALGATION_EVENT", "test.replies", body.to_string().into())
            .await
            .unwrap();
    }
    let mut ok = 0;
    while ok < N {
        let m = tokio::time::timeout(Duration::from_secs(60), futures::StreamExt::next(&mut inbox))
            .await
            .expect("all replies within 60 s")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        ok += 1;
    }
    let peers = a.node.get_json("/api/peers").await.unwrap();
    assert_eq!(peers[0]["pending"], N as u64, "{peers}");

    b.node.start_healthy().await.unwrap();
    seen_b.wait_distinct("all events on NATS B", N).await;
    let stored = b.stored("COMPUTE_RESOURCE").await;
    assert_eq!(stored.len(), N, "each event in B's store once");
    let applied = b.node.metric("oc_events_applied_total").await.unwrap();
    assert_eq!(applied, N as u64, "nothing applied twice");
    for _ in 0..400 {
        let peers = a.node.get_json("/api/peers").await.unwrap();
        if peers[0]["acked_seq"] == N as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("A's cursor for B did not reach the end");
}

/// A partner back after a long absence is caught up at once, and then gets new events live,
/// though the source's link to it was deep in its backoff (5 minutes here) and the
/// safety-net sync is as far away: the partner pulls at start-up, and its connection ends
/// the source link's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_partner_does_not_wait_out_the_backoff() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let slow = [
        "--backoff-min",
        "300s",
        "--backoff-max",
        "300s",
        "--sync-interval",
        "300s",
    ];
    for node in [&mut a.node, &mut b.node] {
        node.extra_args.extend(slow.map(String::from));
    }
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    for i in 0..100 {
        a.publish_ok(&event("PB_CREATE", &format!("early-{i}"), &me, json!({})))
            .await;
    }
    // A's link has failed to reach B: its next attempt is 300 s away.
    oc_testkit::wait_until(
        "A's link to fail while B is down",
        Duration::from_secs(30),
        || a.node.log().contains("partner session ended"),
    )
    .await
    .unwrap();

    b.node.start_healthy().await.unwrap();
    seen_b.wait_distinct("the backlog, pulled at start-up", 100).await;
    for i in 0..100 {
        a.publish_ok(&event("PB_CREATE", &format!("live-{i}"), &me, json!({})))
            .await;
    }
    seen_b.wait_distinct("new events, over A's link", 200).await;
    let peers = a.node.get_json("/api/peers").await.unwrap();
    assert_eq!(peers[0]["state"], "online", "{peers}");
}
