//! Crashes in the middle of a stream: nothing acknowledged is lost, nothing applied twice.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use oc_discovery::testkit::wait_until;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_mid_stream_loses_nothing_acknowledged() {
    init_tracing();
    const N: usize = 4_000;
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();

    // Every id the node answered "ok" for: the events it promised to deliver.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut replies = a.app.subscribe("test.acks").await.unwrap();
    let sink = acked.clone();
    tokio::spawn(async move {
        while let Some(m) = replies.next().await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["ok"] == true {
                sink.lock().unwrap().insert(format!("res-{}", v["seq"]));
            }
        }
    });
    // Paced publishing so the kill lands in the middle of the stream.
    let app = a.app.clone();
    let creator = me.clone();
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(500));
        for i in 0..N {
            tick.tick().await;
            // The resource id encodes nothing: ids of acked events are derived from seqs.
            let body = event("PB_CREATE", &format!("pub-{i}"), &creator, json!({"i": i}));
            let _ = app
                .publish_with_reply("PROPALGATION_EVENT", "test.acks", body.to_string().into())
                .await;
        }
    });

    let b_admin = b.node.admin_url();
    wait_until("B applied some events", WAIT, || {
        oc_discovery::cli::http_get(&b_admin, "/metrics")
            .map(|(_, m)| {
                m.lines()
                    .any(|l| l.starts_with("oc_events_applied_total ") && !l.ends_with(" 0"))
            })
            .unwrap_or(false)
    })
    .await
    .unwrap();
    a.node.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.node.start_healthy().await.unwrap();
    publisher.await.unwrap();
    // Intake is in order: once this last event is answered, everything before it was handled.
    let head = a.publish_ok(&event("PB_CREATE", "last", &me, json!({}))).await;

    // Everything A journaled reaches B: at least every acknowledged event.
    let acked_count = acked.lock().unwrap().len() as u64;
    assert!(acked_count <= head);
    seen_b
        .wait_for("the whole journal on NATS B", |s| {
            s.iter()
                .filter_map(|m| m.msg_id.clone())
                .collect::<HashSet<_>>()
                .len() as u64
                >= head
        })
        .await;
    let stored = b.stored("COMPUTE_RESOURCE").await;
    assert_eq!(stored.len() as u64, head, "each journaled event stored once");
    let versions: HashSet<u64> = stored.iter().map(|r| r["version"].as_u64().unwrap()).collect();
    for id in acked.lock().unwrap().iter() {
        let seq: u64 = id.trim_start_matches("res-").parse().unwrap();
        assert!(versions.contains(&seq), "acknowledged event {seq} missing on B");
    }
    assert_eq!(
        b.node.metric("oc_events_applied_total").await.unwrap(),
        head,
        "nothing applied twice"
    );
    println!(
        "journaled {head}, acknowledged {acked_count}, stored on B {}, NATS B messages {}",
        stored.len(),
        seen_b.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_events_published_while_the_node_is_down_are_not_lost() {
    init_tracing();
    const N: usize = 1_000;
    let (mut a, mut b) = (Site::jetstream().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    let errors_a = a.collect(&["PROPALGATION_ERROR"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let health = a.node.get_json("/healthz").await.unwrap();
    assert_eq!(health["intake"], "jetstream", "{health}");
    let me = a.id();

    // A request is answered by the server's PubAck, errors arrive on PROPALGATION_ERROR.
    let ack = a.app.request(
        "PROPALGATION_EVENT",
        event("PB_CREATE", "first", &me, json!({})).to_string().into(),
    );
    let ack: Value = serde_json::from_slice(&ack.await.unwrap().payload).unwrap();
    assert_eq!(ack["stream"], "OC_PROPAGATION", "{ack}");
    a.publish(&json!({"action": "PB_CREATE"})).await;
    errors_a.wait_for("the error event", |s| !s.is_empty()).await;
    assert_eq!(errors_a.all()[0].body["error"]["code"], "missing_field");

    for i in 0..N {
        a.publish(&event("PB_CREATE", &format!("up-{i}"), &me, json!({})))
            .await;
    }
    // The node goes down abruptly; the application keeps publishing.
    a.node.kill();
    for i in 0..N {
        a.publish(&event("PB_CREATE", &format!("down-{i}"), &me, json!({})))
            .await;
    }
    a.app.flush().await.unwrap();
    a.node.start_healthy().await.unwrap();

    let total = 2 * N + 1;
    seen_b
        .wait_for("every event on NATS B", |s| {
            s.iter()
                .filter_map(|m| m.msg_id.clone())
                .collect::<HashSet<_>>()
                .len()
                >= total
        })
        .await;
    let stored = b.stored("COMPUTE_RESOURCE").await;
    assert_eq!(stored.len(), total, "every published event stored once");
    let head = a.node.get_json("/api/node").await.unwrap()["journal_head"]
        .as_u64()
        .unwrap();
    assert_eq!(head, total as u64, "nothing journaled twice after the redelivery");
    println!(
        "published {total}, journaled {head}, stored on B {}",
        stored.len()
    );
}
