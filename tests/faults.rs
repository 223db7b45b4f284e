//! Crashes in the middle of a stream: nothing acknowledged is lost, nothing applied twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use oc_testkit::{
    capture_notices, event, init_tracing, partner, stream_count, wait_until, Relay, Site, WAIT,
};
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

    wait_applied_some(&b).await;
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
        .wait_distinct("the whole journal on NATS B", head as usize)
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
    seen_b.wait_distinct("every event on NATS B", total).await;
    let stored = b.stored("COMPUTE_RESOURCE").await;
    assert_eq!(stored.len(), total, "every published event stored once");
    let head = a.node.get_json("/api/node").await.unwrap()["journal_head"]
        .as_u64()
        .unwrap();
    if head != total as u64 {
        // Which stream sequences each batch journaled, and which came back redelivered.
        let log = a.node.log();
        let intake = log.lines().filter(|l| {
            ["intake", "redeliver", "journaled", "node started"]
                .iter()
                .any(|w| l.contains(w))
        });
        for line in intake {
            println!("A: {line}");
        }
    }
    assert_eq!(head, total as u64, "nothing journaled twice after the redelivery");
    println!(
        "published {total}, journaled {head}, stored on B {}",
        stored.len()
    );
}

/// Two partnered sites on JetStream NATS, running, with B's notices captured in a stream.
async fn running_jetstream_pair() -> (Site, Site, async_nats::jetstream::stream::Stream) {
    let (mut a, mut b) = (Site::jetstream().await, Site::jetstream().await);
    partner(&mut a, &mut [&mut b]);
    let notices = capture_notices(&b).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    (a, b, notices)
}

/// Publishes `n` events on `site`'s NATS without waiting (JetStream captures them).
async fn publish_many(site: &Site, prefix: &str, n: usize) {
    let me = site.id();
    for i in 0..n {
        site.publish(&event(
            "PB_CREATE",
            &format!("{prefix}-{i}"),
            &me,
            json!({"i": i}),
        ))
        .await;
    }
    site.app.flush().await.unwrap();
}

/// Waits until `b` holds `n` resources and its NATS stream captured `n` distinct notices;
/// prints the counts.
async fn expect_exactly(what: &str, b: &Site, notices: &mut async_nats::jetstream::stream::Stream, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let stored = b.stored("COMPUTE_RESOURCE").await.len();
        let published = stream_count(notices).await;
        if stored >= n && published >= n as u64 {
            assert_eq!(stored, n, "{what}: each event stored once");
            assert_eq!(
                published, n as u64,
                "{what}: each event seen on the partner's NATS"
            );
            let applied = b.node.metric("oc_events_applied_total").await.unwrap_or(0);
            println!("{what}: published {n}, stored on partner {stored}, distinct notices on partner NATS {published}, applied by the running partner process {applied}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: stored {stored}, notices {published} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_applied_some(b: &Site) {
    let admin = b.node.admin_url();
    wait_until("the partner applied some events", WAIT, || {
        oc_discovery::cli::http_get(&admin, "/metrics")
            .map(|(_, m)| {
                m.lines()
                    .any(|l| l.starts_with("oc_events_applied_total ") && !l.ends_with(" 0"))
            })
            .unwrap_or(false)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_killed_in_the_middle_of_20000_events() {
    init_tracing();
    const N: usize = 20_000;
    let (a, mut b, mut notices) = running_jetstream_pair().await;
    let publisher = {
        let app = a.app.clone();
        let me = a.id();
        tokio::spawn(async move {
            for i in 0..N {
                let body = event("PB_CREATE", &format!("r-{i}"), &me, json!({"i": i}));
                app.publish("PROPALGATION_EVENT", body.to_string().into())
                    .await
                    .unwrap();
                if i % 500 == 499 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            app.flush().await.unwrap();
        })
    };
    wait_applied_some(&b).await;
    b.node.kill();
    publisher.await.unwrap();
    b.node.start_healthy().await.unwrap();
    expect_exactly("partner SIGKILL", &b, &mut notices, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_in_the_middle_of_20000_events() {
    init_tracing();
    const N: usize = 20_000;
    let (mut a, b, mut notices) = running_jetstream_pair().await;
    publish_many(&a, "r", N / 2).await;
    wait_applied_some(&b).await;
    a.node.kill();
    publish_many(&a, "s", N / 2).await;
    a.node.start_healthy().await.unwrap();
    expect_exactly("source SIGKILL", &b, &mut notices, N).await;
    let head = a.node.get_json("/api/node").await.unwrap()["journal_head"]
        .as_u64()
        .unwrap();
    assert_eq!(head, N as u64, "nothing journaled twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_on_either_side() {
    init_tracing();
    const N: usize = 6_000;
    let (mut a, mut b, mut notices) = running_jetstream_pair().await;
    publish_many(&a, "r", N / 3).await;
    wait_applied_some(&b).await;
    // The partner's NATS goes away while events are being applied and published there.
    b.nats.stop();
    publish_many(&a, "s", N / 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.nats.restart().unwrap();
    // The source's NATS restarts: its JetStream keeps what was published before.
    a.nats.stop();
    a.nats.restart().unwrap();
    let app = async_nats::connect(a.nats.url()).await.unwrap();
    let me = a.id();
    for i in 0..N / 3 {
        let body = event("PB_CREATE", &format!("t-{i}"), &me, json!({}));
        app.publish("PROPALGATION_EVENT", body.to_string().into())
            .await
            .unwrap();
    }
    app.flush().await.unwrap();
    let mut notices_after = {
        // The test's own client reconnects by itself; take a fresh handle for the count.
        let js = async_nats::jetstream::new(async_nats::connect(b.nats.url()).await.unwrap());
        js.get_stream("TEST_NOTICES").await.unwrap()
    };
    let _ = &mut notices;
    expect_exactly("NATS restarts", &b, &mut notices_after, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_network_cut_loses_nothing() {
    init_tracing();
    const N: usize = 3_000;
    let (mut a, mut b) = (Site::jetstream().await, Site::jetstream().await);
    let to_b = Relay::start(b.node.p2p_port).await;
    let to_a = Relay::start(a.node.p2p_port).await;
    a.node.partners.push(to_b.addr(&b.id()));
    b.node.partners.push(to_a.addr(&a.id()));
    for s in [&mut a, &mut b] {
        s.node.extra_args = ["--ping-interval", "1s", "--pong-discard-timeout", "5s"]
            .map(String::from)
            .to_vec();
    }
    let mut notices = capture_notices(&b).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    publish_many(&a, "before", N / 3).await;
    wait_applied_some(&b).await;

    to_b.cut();
    to_a.cut();
    publish_many(&a, "during", N / 3).await;
    // The heartbeat notices the silence.
    let mut offline = false;
    for _ in 0..300 {
        let peers = a.node.get_json("/api/peers").await.unwrap();
        if peers[0]["state"] == "offline" {
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        offline,
        "B never shown offline: {}",
        a.node.get_json("/api/peers").await.unwrap()
    );
    tokio::time::sleep(Duration::from_secs(25)).await;
    to_b.restore();
    to_a.restore();
    publish_many(&a, "after", N / 3).await;
    expect_exactly("30 s network cut", &b, &mut notices, N).await;
    let peers = a.node.get_json("/api/peers").await.unwrap();
    assert_eq!(peers[0]["state"], "online", "{peers}");
    assert!(peers[0]["rtt_ms"].as_f64().is_some(), "{peers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_a_restart_resumes_where_it_stopped() {
    init_tracing();
    const N: usize = 5_000;
    let (mut a, mut b, mut notices) = running_jetstream_pair().await;
    publish_many(&a, "r", N / 2).await;
    wait_applied_some(&b).await;
    for site in [&mut a, &mut b] {
        let status = site.node.stop().expect("stopped by itself within 15 s");
        assert!(status.success(), "exit status {status}");
        assert!(site.node.log().contains("stopped"), "{}", site.node.log_tail(20));
    }
    publish_many(&a, "s", N / 2).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    expect_exactly("SIGTERM and restart", &b, &mut notices, N).await;
    let head = a.node.get_json("/api/node").await.unwrap()["journal_head"]
        .as_u64()
        .unwrap();
    assert_eq!(head, N as u64);
}

/// The intake forgets a journaled stream sequence only once the stream no longer holds that
/// message. Here an operator's consumer keeps every message stored after the node
/// acknowledged them, and the node's consumer is deleted while the node is down: the
/// consumer the node creates again delivers all of them anew (delivery count 1). Pruning by
/// the consumer's ack floor alone had forgotten them, so they were journaled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_consumer_redelivering_pruned_messages_journals_nothing_twice() {
    init_tracing();
    const N: u64 = 200;
    let mut a = Site::jetstream().await;
    a.node.start_healthy().await.unwrap();
    let js = async_nats::jetstream::new(a.app.clone());
    let stream = js.get_stream("OC_PROPAGATION").await.expect("intake stream");
    // Another reader of the stream that never acknowledges: the messages stay stored.
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("operator".into()),
            ..Default::default()
        })
        .await
        .expect("operator consumer");
    publish_many(&a, "p", N as usize).await;
    wait_head(&a, N).await;
    // All acknowledged by the node's consumer; wait for the intake's pruning after that.
    wait_settled(&stream, "all acknowledged by the node").await;
    let seen = a.node.log().len();
    wait_until("the intake pruned its records", Duration::from_secs(90), || {
        a.node
            .log()
            .get(seen..)
            .is_some_and(|l| l.contains("intake records pruned"))
    })
    .await
    .unwrap();

    a.node.kill();
    stream
        .delete_consumer(oc_discovery::intake::CONSUMER_NAME)
        .await
        .expect("delete the node's consumer");
    a.node.start_healthy().await.unwrap();
    let last = event("PB_CREATE", "last", &a.id(), json!({}));
    a.publish(&last).await;
    a.app.flush().await.unwrap();
    // The new consumer delivered the N old messages and the last one, all acknowledged.
    wait_settled(&stream, "the new consumer delivered and acknowledged all").await;
    let head = journal_head(&a).await;
    assert_eq!(
        head,
        N + 1,
        "old messages journaled again: {}",
        a.node.log_tail(30)
    );
}

async fn journal_head(site: &Site) -> u64 {
    site.node.get_json("/api/node").await.unwrap()["journal_head"]
        .as_u64()
        .unwrap()
}

async fn wait_head(site: &Site, n: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while journal_head(site).await < n {
        assert!(std::time::Instant::now() < deadline, "journal head below {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the node's consumer exists, has nothing left to deliver and nothing
/// unacknowledged.
async fn wait_settled(stream: &async_nats::jetstream::stream::Stream, what: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while !consumer_settled(stream).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn consumer_settled(stream: &async_nats::jetstream::stream::Stream) -> bool {
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
        stream.get_consumer(oc_discovery::intake::CONSUMER_NAME).await;
    let Ok(mut consumer) = consumer else {
        return false;
    };
    match consumer.info().await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0,
        Err(_) => false,
    }
}
