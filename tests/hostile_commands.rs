//! Hostile peers on the considers / planner protocols, and applications that overfill the
//! JetStream intake: each attack runs against a real node while a good partner (another
//! real node) keeps exchanging events with it both ways.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libp2p::Stream;
use oc_discovery::commands::forwarder::{FORWARD_STREAMS_PER_PEER, MAX_FORWARD_STREAMS};
use oc_discovery::commands::{PROTOCOL_CONSIDERS, PROTOCOL_PLANNER};
use oc_discovery::p2p::wire::{self, ErrorFrame, ForwardFrame};
use oc_testkit::{event, eventually, init_tracing, partner, HandPeer, Seen, Site, WAIT};
use serde_json::{json, Value};

/// The victim's RSS must stay below this whatever the attack.
const RSS_CAP: u64 = 256 * 1024 * 1024;
const T: Duration = Duration::from_secs(10);

fn rss_mib(site: &Site) -> u64 {
    site.node.rss_bytes().expect("victim RSS") / (1024 * 1024)
}

async fn has_resource(site: &Site, id: &str) -> bool {
    site.stored("COMPUTE_RESOURCE")
        .await
        .iter()
        .any(|r| r["id"] == id)
}

/// Accepted by the node (core NATS) or stored by the server (JetStream PubAck).
fn accepted(answer: &Value) -> bool {
    answer["ok"] == true || (answer["seq"].is_u64() && answer.get("error").is_none())
}

/// One event each way between `victim` and `good`, both stored on the other side.
async fn exchange_both_ways(victim: &Site, good: &Site, tag: &str) {
    let (v, g) = (format!("victim-{tag}"), format!("good-{tag}"));
    let answer = victim
        .request(&event("PB_CREATE", &v, &victim.id(), json!({})))
        .await;
    assert!(accepted(&answer), "victim refused its own event: {answer}");
    let answer = good.request(&event("PB_CREATE", &g, &good.id(), json!({}))).await;
    assert!(accepted(&answer), "good partner refused its own event: {answer}");
    eventually(&format!("{v} stored by the good partner"), || {
        has_resource(good, &v)
    })
    .await;
    eventually(&format!("{g} stored by the victim"), || has_resource(victim, &g)).await;
}

/// Events published on both sides while an attack runs: one each way every 100 ms until
/// [`Traffic::finish`], which waits until every one is stored on the other side.
struct Traffic {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl Traffic {
    fn start(victim: &Site, good: &Site, tag: &str) -> Traffic {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (va, vid) = (victim.app.clone(), victim.id());
        let (ga, gid) = (good.app.clone(), good.id());
        let tag = tag.to_owned();
        let task = tokio::spawn(async move {
            let (mut from_victim, mut from_good) = (Vec::new(), Vec::new());
            for i in 0..600 {
                for (app, id, sent) in [(&va, &vid, &mut from_victim), (&ga, &gid, &mut from_good)] {
                    let rid = format!("{tag}-{}-{i}", &id[id.len() - 6..]);
                    let body = event("PB_CREATE", &rid, id, json!({}));
                    let answer = tokio::time::timeout(
                        Duration::from_secs(30),
                        app.request("PROPALGATION_EVENT", body.to_string().into()),
                    )
                    .await
                    .expect("answer in time")
                    .expect("request");
                    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
                    assert!(accepted(&answer), "refused during the attack: {answer}");
                    sent.push(rid);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => break,
                }
            }
            (from_victim, from_good)
        });
        Traffic { stop, task }
    }

    /// Stops publishing; every event published is stored on the other side.
    async fn finish(self, victim: &Site, good: &Site) -> usize {
        let _ = self.stop.send(true);
        let (from_victim, from_good) = self.task.await.expect("traffic task");
        for id in &from_victim {
            eventually(&format!("{id} stored by the good partner"), || {
                has_resource(good, id)
            })
            .await;
        }
        for id in &from_good {
            eventually(&format!("{id} stored by the victim"), || has_resource(victim, id)).await;
        }
        from_victim.len() + from_good.len()
    }
}

fn forward(action: &str, n: usize) -> ForwardFrame {
    ForwardFrame::Forward {
        action: action.to_owned(),
        data_type: "COMPUTE_RESOURCE".to_owned(),
        user: "mallory".to_owned(),
        payload: json!({"id": "victim-r0", "creator_id": "someone", "from_peer": "forged", "n": n}),
    }
}

/// Sends one frame and reads the answer.
async fn ask(stream: &mut Stream, frame: &ForwardFrame) -> ForwardFrame {
    wire::write_frame(stream, frame).await.expect("write");
    tokio::time::timeout(T, wire::read_frame(stream, 1 << 20))
        .await
        .expect("answer in time")
        .expect("readable answer")
        .expect("an answer, not the end")
}

fn code(frame: &ForwardFrame) -> Option<&str> {
    match frame {
        ForwardFrame::Error(ErrorFrame { code, .. }) => Some(code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_forward_is_republished_as_considers_from_its_real_id_and_a_flood_is_rate_limited() {
    init_tracing();
    let (mut victim, mut good) = (Site::new().await, Site::new().await);
    partner(&mut victim, &mut [&mut good]);
    victim.node.extra_args.extend(
        [
            "--forward-rate",
            "1",
            "--forward-burst",
            "5",
            "--planner-idle",
            "1s",
        ]
        .map(String::from),
    );
    let seen = victim.collect(&["PROPALGATION_EVENT"]).await;
    victim.node.start_healthy().await.unwrap();
    good.node.start_healthy().await.unwrap();
    exchange_both_ways(&victim, &good, "before").await;
    let traffic = Traffic::start(&victim, &good, "during");

    let hostile = HandPeer::fresh();
    let target = hostile.dial(&victim).await;
    let mut stream = hostile
        .net
        .open_stream(target, PROTOCOL_CONSIDERS, T)
        .await
        .expect("considers stream");
    // PB_DELETE in the frame: the victim publishes PB_CONSIDERS, from the hostile's real id.
    let answer = ask(&mut stream, &forward("PB_DELETE", 0)).await;
    assert!(matches!(answer, ForwardFrame::Ack { .. }), "{answer:?}");
    let from_hostile = |s: &[Seen]| {
        s.iter()
            .filter(|m| m.body["from_peer"] == hostile.id.as_str())
            .count()
    };
    seen.wait_for("the hostile's message republished", |s| from_hostile(s) == 1)
        .await;
    let published = seen.all();
    let m = published
        .iter()
        .find(|m| m.body["from_peer"] == hostile.id.as_str())
        .unwrap();
    assert_eq!(m.body["action"], "PB_CONSIDERS", "{}", m.body);
    assert_eq!(m.body["from_app"], "oc-discovery");
    assert_eq!(m.body["payload"]["from_peer"], "forged", "carried, not trusted");

    // A flood on the same stream: beyond the burst, `rate_limited`, and nothing published.
    const FLOOD: usize = 60;
    let (mut acks, mut limited) = (1usize, 0usize);
    for n in 1..=FLOOD {
        let answer = ask(&mut stream, &forward("PB_CONSIDERS", n)).await;
        match code(&answer) {
            None => acks += 1,
            Some("rate_limited") => limited += 1,
            Some(other) => panic!("unexpected answer {other}: {answer:?}"),
        }
    }
    assert!(limited > 0, "no rate_limited within {FLOOD} messages");
    assert_eq!(acks + limited, FLOOD + 1);
    // Each ack is one publish, each refusal none (the good partner's considers come later).
    seen.wait_for("every acked message republished", |s| from_hostile(s) == acks)
        .await;
    let leaked = seen
        .all()
        .iter()
        .filter(|m| m.body["from_app"] == "oc-discovery" && m.body["action"] != "PB_CONSIDERS")
        .count();
    assert_eq!(
        leaked, 0,
        "only PB_CONSIDERS is ever republished from a considers stream"
    );
    let counted = victim
        .node
        .metric("oc_refusals_total{place=\"forward\",code=\"rate_limited\"}")
        .await
        .unwrap();
    assert!(counted >= limited as u64, "metric {counted} < {limited}");

    // An idle planner stream is closed after --planner-idle.
    let mut planner = hostile
        .net
        .open_stream(target, PROTOCOL_PLANNER, T)
        .await
        .expect("planner stream");
    let end = tokio::time::timeout(WAIT, wire::read_frame::<ForwardFrame, _>(&mut planner, 1 << 20)).await;
    assert!(
        matches!(end, Ok(Ok(None)) | Ok(Err(_))),
        "the idle planner stream was not closed: {end:?}"
    );

    // The good partner's own considers still arrive, and events flow both ways.
    let answer = good
        .request(
            &json!({"action": "PB_CONSIDERS", "data_type": "WORKFLOW_EXECUTION", "user": "alice",
                         "payload": {"peer_ids": [victim.id(), victim.id()], "execution_id": "good-1"}}),
        )
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        answer["delivered"].as_array().map(Vec::len),
        Some(1),
        "deduplicated: {answer}"
    );
    seen.wait_for("the good partner's considers", |s| {
        s.iter().any(|m| {
            m.body["from_peer"] == good.id().as_str() && m.body["payload"]["execution_id"] == "good-1"
        })
    })
    .await;
    let exchanged = traffic.finish(&victim, &good).await;
    exchange_both_ways(&victim, &good, "after").await;
    let rss = rss_mib(&victim);
    assert!(rss * 1024 * 1024 < RSS_CAP, "victim RSS {rss} MiB");
    println!(
        "forward flood: {acks} acked, {limited} rate_limited, victim RSS {rss} MiB, {exchanged} events exchanged both ways during the attack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_planner_streams_of_many_peers_stalled_mid_frame_do_not_lock_out_a_good_partner() {
    init_tracing();
    let (mut victim, mut good) = (Site::new().await, Site::new().await);
    partner(&mut victim, &mut [&mut good]);
    let seen = victim.collect(&["PROPALGATION_EVENT"]).await;
    victim.node.start_healthy().await.unwrap();
    good.node.start_healthy().await.unwrap();
    exchange_both_ways(&victim, &good, "before").await;
    let traffic = Traffic::start(&victim, &good, "during");

    // Enough hostile peers, each at its share, to fill every forwarding stream and more.
    const PARTIAL_BODY: usize = 768 * 1024;
    let peers = MAX_FORWARD_STREAMS / FORWARD_STREAMS_PER_PEER + 2;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut hostiles = Vec::new();
    for _ in 0..peers {
        let hand = HandPeer::fresh();
        let target = hand.dial(&victim).await;
        for _ in 0..FORWARD_STREAMS_PER_PEER {
            let mut stream = hand
                .net
                .open_stream(target, PROTOCOL_PLANNER, T)
                .await
                .expect("planner stream");
            // Idle: announces a frame of almost 1 MiB, sends three quarters of it and stalls;
            // notes when the victim closes the stream.
            let closed = closed.clone();
            tokio::spawn(async move {
                use futures::AsyncWriteExt;
                let mut partial = ((1u32 << 20) - 64).to_be_bytes().to_vec();
                partial.extend(std::iter::repeat_n(b' ', PARTIAL_BODY));
                let _ = tokio::time::timeout(T, stream.write_all(&partial)).await;
                let _ = tokio::time::timeout(T, stream.flush()).await;
                if let Ok(Ok(None) | Err(_)) = tokio::time::timeout(
                    WAIT * 2,
                    wire::read_frame::<ForwardFrame, _>(&mut stream, 1 << 20),
                )
                .await
                {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        hostiles.push(hand);
    }
    let opened = peers * FORWARD_STREAMS_PER_PEER;
    let beyond = opened - MAX_FORWARD_STREAMS;
    oc_testkit::wait_until("idle hostile streams closed to make room", WAIT, || {
        closed.load(Ordering::Relaxed) >= beyond
    })
    .await
    .unwrap();

    // The good partner's planner and considers messages still get through.
    for step in 0..3 {
        let answer = good
            .request(
                &json!({"action": "PB_PLANNER", "data_type": "BOOKING", "user": "alice",
                             "payload": {"peer_id": victim.id(), "step": step}}),
            )
            .await;
        assert_eq!(answer["ok"], true, "{answer}");
    }
    let answer = good
        .request(
            &json!({"action": "PB_CONSIDERS", "data_type": "WORKFLOW_EXECUTION", "user": "alice",
                         "payload": {"peer_ids": [victim.id()], "execution_id": "good-2"}}),
        )
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    seen.wait_for("the good partner's planner and considers messages", |s| {
        let from_good: Vec<&Seen> = s
            .iter()
            .filter(|m| m.body["from_peer"] == good.id().as_str())
            .collect();
        from_good
            .iter()
            .filter(|m| m.body["action"] == "PB_PLANNER")
            .count()
            == 3
            && from_good.iter().any(|m| m.body["action"] == "PB_CONSIDERS")
    })
    .await;
    let exchanged = traffic.finish(&victim, &good).await;
    exchange_both_ways(&victim, &good, "after").await;
    let rss = rss_mib(&victim);
    assert!(rss * 1024 * 1024 < RSS_CAP, "victim RSS {rss} MiB");
    println!(
        "{exchanged} events exchanged during the attack; idle planner streams: {opened} opened by {peers} peers, each stalled {} KiB into a 1 MiB frame, {} closed by the victim, victim RSS {rss} MiB",
        PARTIAL_BODY / 1024,
        closed.load(Ordering::Relaxed)
    );
    drop(hostiles);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_intake_stream_refuses_publishes_until_the_node_drains_it() {
    init_tracing();
    let (mut victim, mut good) = (Site::jetstream().await, Site::new().await);
    partner(&mut victim, &mut [&mut good]);
    // A stream made before (e.g. by an older version) without limits: the node bounds it.
    let js = async_nats::jetstream::new(victim.app.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OC_PROPAGATION".into(),
        subjects: vec!["PROPALGATION_EVENT".into()],
        retention: async_nats::jetstream::stream::RetentionPolicy::Interest,
        ..Default::default()
    })
    .await
    .expect("unbounded stream");
    const MAX_BYTES: i64 = 8 * 1024;
    victim
        .node
        .extra_args
        .extend(["--intake-max-bytes", "8192", "--intake-max-age", "1d"].map(String::from));
    victim.node.start_healthy().await.unwrap();
    good.node.start_healthy().await.unwrap();
    let mut stream = js.get_stream("OC_PROPAGATION").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_bytes, MAX_BYTES);
    assert_eq!(config.max_age, Duration::from_secs(86_400));
    assert_eq!(config.discard, async_nats::jetstream::stream::DiscardPolicy::New);
    exchange_both_ways(&victim, &good, "before").await;

    // The node is down: the application fills the stream until the server refuses.
    victim.node.stop();
    let (mut stored, mut refusal) = (Vec::new(), None);
    for i in 0..1000 {
        let id = format!("queued-{i}");
        let answer = victim
            .request(&event(
                "PB_CREATE",
                &id,
                &victim.id(),
                json!({"pad": "x".repeat(200)}),
            ))
            .await;
        if accepted(&answer) {
            stored.push(id);
        } else {
            refusal = Some(answer);
            break;
        }
    }
    // The good partner keeps publishing meanwhile: its events wait for the victim.
    let mut from_good = Vec::new();
    for i in 0..5 {
        let id = format!("good-while-down-{i}");
        let answer = good
            .request(&event("PB_CREATE", &id, &good.id(), json!({})))
            .await;
        assert!(accepted(&answer), "{answer}");
        from_good.push(id);
    }
    let refusal = refusal.expect("the full stream refused a publish");
    let description = refusal["error"]["description"].as_str().unwrap_or_default();
    assert!(description.contains("maximum bytes"), "{refusal}");
    assert!(!stored.is_empty());

    // Back up, the node drains the stream; publishes are accepted again.
    victim.node.start_healthy().await.unwrap();
    for id in &stored {
        eventually(&format!("{id} reaches the good partner"), || {
            has_resource(&good, id)
        })
        .await;
    }
    for id in &from_good {
        eventually(&format!("{id} reaches the victim"), || has_resource(&victim, id)).await;
    }
    eventually("the stream drained", || {
        let js = js.clone();
        async move {
            match js.get_stream("OC_PROPAGATION").await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages == 0).unwrap_or(false),
                Err(_) => false,
            }
        }
    })
    .await;
    let answer = victim
        .request(&event("PB_CREATE", "after-drain", &victim.id(), json!({})))
        .await;
    assert!(accepted(&answer), "{answer}");
    eventually("after-drain reaches the good partner", || {
        has_resource(&good, "after-drain")
    })
    .await;
    exchange_both_ways(&victim, &good, "after").await;
    let rss = rss_mib(&victim);
    assert!(rss * 1024 * 1024 < RSS_CAP, "victim RSS {rss} MiB");
    println!(
        "intake full after {} events: {refusal}; drained and accepting again, victim RSS {rss} MiB",
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn considers_naming_too_many_peers_are_refused() {
    init_tracing();
    let (mut victim, mut good) = (Site::new().await, Site::new().await);
    partner(&mut victim, &mut [&mut good]);
    let errors = victim.collect(&["PROPALGATION_ERROR"]).await;
    victim.node.start_healthy().await.unwrap();
    good.node.start_healthy().await.unwrap();
    let ids: Vec<String> = (0..=oc_discovery::contract::MAX_COMMAND_PEERS)
        .map(|_| {
            libp2p::identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
                .to_string()
        })
        .collect();
    for action in ["PB_CONSIDERS", "PB_PLANNER"] {
        let answer = victim
            .request(&json!({"action": action, "data_type": "WORKFLOW_EXECUTION",
                             "payload": {"peer_ids": ids, "peer_id": good.id()}}))
            .await;
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_field", "{answer}");
    }
    errors
        .wait_for("two invalid_field error events", |s| {
            s.iter()
                .filter(|m| m.body["error"]["code"] == "invalid_field")
                .count()
                == 2
        })
        .await;
    exchange_both_ways(&victim, &good, "after").await;
}
