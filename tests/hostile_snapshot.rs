//! A partner that sends snapshot frames out of turn, against a real node: a part for a job
//! that was never begun, out of order, oversize, entries of another origin, from a peer that
//! is not a partner. Each gets an `error` frame and a count in
//! `oc_refusals_total{place="snapshot"}` (or `not_partner`), and nothing is applied.

use base64::Engine;
use futures::AsyncReadExt;
use oc_discovery::p2p::wire::{self, SyncFrame};
use oc_discovery::sync::PROTOCOL_SYNC;
use oc_testkit::{init_tracing, HandPeer, Site};
use serde_json::json;

const MAX: usize = 1 << 20;

async fn answer(r: &mut futures::io::ReadHalf<libp2p::Stream>) -> SyncFrame {
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        wire::read_frame::<SyncFrame, _>(r, MAX),
    )
    .await
    .expect("an answer in time")
    .expect("a readable frame")
    .expect("a frame, not the end")
}

fn code(frame: &SyncFrame) -> String {
    match frame {
        SyncFrame::Error(e) => e.code.clone(),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

async fn begin(
    hand: &HandPeer,
    b: &Site,
    job: u64,
) -> (
    futures::io::ReadHalf<libp2p::Stream>,
    futures::io::WriteHalf<libp2p::Stream>,
) {
    let (mut r, mut w) = hand.open(b, PROTOCOL_SYNC).await.split();
    let begin = SyncFrame::SnapshotBegin {
        job,
        position: 10,
        total: 1,
    };
    wire::write_frame(&mut w, &begin).await.unwrap();
    match answer(&mut r).await {
        SyncFrame::SnapshotReady {
            job: j, next_part, ..
        } => assert_eq!((j, next_part), (job, 0)),
        other => panic!("expected snapshot_ready, got {other:?}"),
    }
    (r, w)
}

fn lines(origin: &str, ids: &[&str]) -> String {
    let mut blob = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let e = json!({"origin": origin, "seq": i + 1, "action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE",
            "user": "u", "resource": {"id": id, "creator_id": origin}, "time_ms": 1});
        blob.extend(serde_json::to_vec(&e).unwrap());
        blob.push(b'\n');
    }
    base64::engine::general_purpose::STANDARD.encode(blob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_frames_out_of_turn_are_refused_and_nothing_is_applied() {
    init_tracing();
    let hand = HandPeer::fresh();
    hand.listening().await;
    let mut b = Site::new().await;
    b.node.partners.push(hand.addr());
    b.node.start_healthy().await.unwrap();
    let part = |job, index, data: String| SyncFrame::SnapshotPart {
        job,
        index,
        data,
        continued: false,
    };

    // A part with no job begun.
    let (mut r, mut w) = hand.open(&b, PROTOCOL_SYNC).await.split();
    wire::write_frame(&mut w, &part(1, 0, lines(&hand.id, &["a"])))
        .await
        .unwrap();
    assert_eq!(code(&answer(&mut r).await), "invalid_field");

    // Out of order, and a job other than the one begun.
    let (mut r, mut w) = begin(&hand, &b, 5).await;
    wire::write_frame(&mut w, &part(5, 3, lines(&hand.id, &["a"])))
        .await
        .unwrap();
    assert_eq!(code(&answer(&mut r).await), "invalid_field");
    let (mut r, mut w) = begin(&hand, &b, 5).await;
    wire::write_frame(&mut w, &part(6, 0, lines(&hand.id, &["a"])))
        .await
        .unwrap();
    assert_eq!(code(&answer(&mut r).await), "invalid_field");

    // Oversize: more data than a part holds, within the frame cap.
    let (mut r, mut w) = begin(&hand, &b, 5).await;
    wire::write_frame(&mut w, &part(5, 0, "A".repeat(MAX - 200)))
        .await
        .unwrap();
    assert_eq!(code(&answer(&mut r).await), "payload_too_large");

    // Entries of another origin.
    let (mut r, mut w) = begin(&hand, &b, 5).await;
    wire::write_frame(&mut w, &part(5, 0, lines("12D3KooWSomeoneElse", &["a"])))
        .await
        .unwrap();
    assert_eq!(code(&answer(&mut r).await), "forged_origin");

    // An end that does not match what was received.
    let (mut r, mut w) = begin(&hand, &b, 5).await;
    let end = SyncFrame::SnapshotEnd {
        job: 5,
        parts: 4,
        resources: 9,
    };
    wire::write_frame(&mut w, &end).await.unwrap();
    assert_eq!(code(&answer(&mut r).await), "invalid_field");

    // Not a partner.
    let stranger = HandPeer::fresh();
    let (mut r, mut w) = stranger.open(&b, PROTOCOL_SYNC).await.split();
    let begin = SyncFrame::SnapshotBegin {
        job: 1,
        position: 1,
        total: 1,
    };
    wire::write_frame(&mut w, &begin).await.unwrap();
    assert_eq!(code(&answer(&mut r).await), "not_partner");

    let m = |c: &str| format!("oc_refusals_total{{place=\"snapshot\",code=\"{c}\"}}");
    assert_eq!(b.node.metric(&m("invalid_field")).await.unwrap(), 4);
    assert_eq!(b.node.metric(&m("payload_too_large")).await.unwrap(), 1);
    assert_eq!(b.node.metric(&m("forged_origin")).await.unwrap(), 1);
    assert!(b.stored("COMPUTE_RESOURCE").await.is_empty(), "nothing applied");
    assert_eq!(b.node.metric("oc_snapshot_parts_applied_total").await.unwrap(), 0);
}
