//! Bad input gets a clear error and never blocks the valid events around it.

use std::time::Duration;

use oc_discovery::contract::{Action, JournalEntry};
use oc_discovery::p2p::wire::{self, ErrorFrame, ResourceFrame};
use oc_testkit::{event, init_tracing, partner, HandPeer, Site};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_is_reported_and_valid_events_still_flow() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    a.node.extra_args = vec!["--max-event-bytes".into(), "2048".into()];
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    let errors_a = a.collect(&["PROPALGATION_ERROR"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();

    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{not json".to_vec()),
        ("invalid_json", b"[1,2,3]".to_vec()),
        ("missing_field", json!({"data_type": "COMPUTE_RESOURCE", "payload": {"id": "x", "creator_id": me}}).to_string().into_bytes()),
        ("missing_field", json!({"action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE", "payload": {"id": "x"}}).to_string().into_bytes()),
        ("invalid_field", json!({"action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE", "payload": "nope"}).to_string().into_bytes()),
        ("invalid_field", json!({"action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE", "payload": {"id": 7, "creator_id": me}}).to_string().into_bytes()),
        ("unsupported_action", json!({"action": "PB_TELEPORT", "data_type": "COMPUTE_RESOURCE", "payload": {}}).to_string().into_bytes()),
        ("not_creator", event("PB_CREATE", "x", "12D3KooWsomeoneelse", json!({})).to_string().into_bytes()),
        ("payload_too_large", event("PB_CREATE", "x", &me, json!({"blob": "z".repeat(4000)})).to_string().into_bytes()),
    ];
    let mut valid = 0;
    for (i, (code, body)) in bad.iter().enumerate() {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            a.app.request("PROPALGATION_EVENT", body.clone().into()),
        )
        .await
        .expect("reply in time")
        .expect("request");
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"]["code"], *code, "{reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        // A valid event right behind each bad one.
        a.publish_ok(&event("PB_CREATE", &format!("ok-{i}"), &me, json!({})))
            .await;
        valid += 1;
    }
    seen_b.wait_for("valid events on B", |s| s.len() >= valid).await;
    assert_eq!(b.stored("COMPUTE_RESOURCE").await.len(), valid);
    errors_a.wait_for("error events", |s| s.len() >= bad.len()).await;
    for (seen, (code, body)) in errors_a.all().iter().zip(&bad) {
        assert_eq!(seen.body["error"]["code"], *code);
        assert_eq!(seen.body["subject"], "PROPALGATION_EVENT");
        let echoed = seen.body["event"].as_str().unwrap();
        assert!(echoed.len() <= 4096);
        assert!(String::from_utf8_lossy(body).starts_with(echoed));
    }
    assert_eq!(
        a.node
            .metric("oc_refusals_total{place=\"intake\",code=\"invalid_json\"}")
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        a.node
            .metric("oc_refusals_total{place=\"intake\",code=\"payload_too_large\"}")
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_echoes_are_ignored_without_reply() {
    init_tracing();
    let mut a = Site::new().await;
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    let mut echo = event("PB_CREATE", "e1", &me, json!({}));
    echo["from_app"] = json!("oc-discovery");
    let reply = tokio::time::timeout(
        Duration::from_millis(1500),
        a.app.request("PROPALGATION_EVENT", echo.to_string().into()),
    )
    .await;
    assert!(!matches!(reply, Ok(Ok(_))), "an echo must not be answered");
    // The next event is seq 1: the echo was not journaled.
    assert_eq!(a.publish_ok(&event("PB_CREATE", "e2", &me, json!({}))).await, 1);
    assert_eq!(a.node.metric("oc_intake_echoes_total").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_not_a_partner_is_refused() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    // A replicates to B, but B does not list A as a partner.
    a.node.partners.push(b.node.addr());
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "r1", &me, json!({}))).await;

    let mut refused = false;
    for _ in 0..300 {
        let peers = a.node.get_json("/api/peers").await.unwrap();
        if peers[0]["state"] == "refused"
            && peers[0]["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("not_partner")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "A must see B's refusal: {}",
        a.node.get_json("/api/peers").await.unwrap()
    );
    assert!(
        b.node
            .metric("oc_refusals_total{place=\"inbound\",code=\"not_partner\"}")
            .await
            .unwrap()
            >= 1
    );
    assert!(b.node.log().contains("not_partner"));
    assert_eq!(seen_b.len(), 0);
    assert!(b.stored("COMPUTE_RESOURCE").await.is_empty());
    assert_eq!(
        a.node.get_json("/api/peers").await.unwrap()[0]["pending"],
        1,
        "kept for later"
    );
}

/// A partner that speaks the protocol by hand: forges a creator and an origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_creator_and_origin_are_refused_and_the_stream_goes_on() {
    init_tracing();
    let mut b = Site::new().await;
    let rogue_key = libp2p::identity::Keypair::generate_ed25519();
    let rogue = rogue_key.public().to_peer_id().to_string();
    b.node.partners.push(format!("/ip4/127.0.0.1/tcp/9/p2p/{rogue}"));
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    b.node.start_healthy().await.unwrap();

    let hand = HandPeer::start(rogue_key);
    let (mut r, mut w) = hand.hello(&b, 3).await;
    assert_eq!(read(&mut r).await, ResourceFrame::Ack { seq: 0 });

    let entry = |seq: u64, origin: &str, creator: &str| {
        ResourceFrame::Event(JournalEntry {
            origin: origin.into(),
            seq,
            action: Action::Create,
            data_type: "COMPUTE_RESOURCE".into(),
            user: "mallory".into(),
            resource: json!({"id": format!("r{seq}"), "creator_id": creator}).into(),
            time_ms: 0,
        })
    };
    let someone = "12D3KooWHonestSiteThatDidNotSendThis";
    wire::write_frame(&mut w, &entry(1, &rogue, someone))
        .await
        .unwrap();
    wire::write_frame(&mut w, &entry(2, someone, someone))
        .await
        .unwrap();
    wire::write_frame(&mut w, &entry(3, &rogue, &rogue))
        .await
        .unwrap();

    let mut errors = Vec::new();
    let mut acked = 0;
    while acked < 3 {
        match read(&mut r).await {
            ResourceFrame::Error(ErrorFrame {
                seq: Some(seq), code, ..
            }) => errors.push((seq, code)),
            ResourceFrame::Ack { seq } => acked = seq,
            other => panic!("unexpected {other:?}"),
        }
    }
    errors.sort();
    assert_eq!(
        errors,
        vec![(1, "not_creator".to_owned()), (2, "forged_origin".to_owned())]
    );
    seen_b.wait_for("the honest event", |s| !s.is_empty()).await;
    let stored = b.stored("COMPUTE_RESOURCE").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["id"], "r3");
    assert_eq!(
        b.node
            .metric("oc_refusals_total{place=\"inbound\",code=\"not_creator\"}")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        b.node
            .metric("oc_refusals_total{place=\"inbound\",code=\"forged_origin\"}")
            .await
            .unwrap(),
        1
    );
}

async fn read(r: &mut futures::io::ReadHalf<libp2p::Stream>) -> ResourceFrame {
    tokio::time::timeout(Duration::from_secs(10), wire::read_frame(r, 1 << 20))
        .await
        .expect("an answer within 10 s")
        .expect("a readable frame")
        .expect("stream open")
}
