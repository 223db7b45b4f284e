//! Journal sync: entries larger than a frame travel split in parts; missing parts are asked
//! for again, and a request that times out keeps its progress.

use oc_testkit::{event, init_tracing, partner, HandPeer, Site};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use oc_discovery::contract::{Action, NewEvent};
use oc_discovery::p2p::wire::{self, ResourceFrame, SyncFrame};
use oc_discovery::store::embedded::EmbeddedStore;
use oc_discovery::store::Store;
use oc_discovery::sync::plan::RoundCap;
use oc_discovery::sync::serve::Answer;
use oc_discovery::sync::PROTOCOL_SYNC;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_larger_than_a_frame_arrives_whole() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    for s in [&mut a, &mut b] {
        s.node.extra_args = ["--max-frame-bytes", "4096"].map(String::from).to_vec();
    }
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();
    let blob: String = (0..100_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    a.publish_ok(&event("PB_CREATE", "small-1", &me, json!({}))).await;
    a.publish_ok(&event("PB_CREATE", "big", &me, json!({"blob": blob})))
        .await;
    a.publish_ok(&event("PB_CREATE", "small-2", &me, json!({}))).await;
    seen_b.wait_for("three events", |s| s.len() >= 3).await;
    let all = seen_b.all();
    let ids: Vec<_> = all
        .iter()
        .map(|s| s.body["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["small-1", "big", "small-2"], "in journal order");
    assert_eq!(all[1].body["resource"]["blob"].as_str().unwrap(), blob);
}

/// A hand-driven owner: answers the first sync request without part 1 and then stalls, so
/// the node must time out, keep what it got, and ask for part 1 alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_part_is_asked_for_again_after_the_sync_timeout() {
    init_tracing();
    let mut b = Site::new().await;
    let rogue_key = libp2p::identity::Keypair::generate_ed25519();
    let rogue = rogue_key.public().to_peer_id().to_string();
    b.node.partners.push(format!("/ip4/127.0.0.1/tcp/9/p2p/{rogue}"));
    b.node.extra_args = ["--max-frame-bytes", "4096", "--sync-timeout", "2s"]
        .map(String::from)
        .to_vec();
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    b.node.start_healthy().await.unwrap();

    // The rogue's journal: 40 entries of its own.
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(EmbeddedStore::open(&dir.path().join("j.redb")).unwrap());
    let events = (0..40)
        .map(|i| NewEvent {
            action: Action::Create,
            data_type: "COMPUTE_RESOURCE".into(),
            user: "r".into(),
            from_app: "test".into(),
            resource: json!({"id": format!("r{i}"), "creator_id": rogue, "pad": "x".repeat(200)}).into(),
            resource_id: format!("r{i}"),
        })
        .collect();
    journal.append_journal(&rogue, events).await.unwrap();

    let hand = HandPeer::start(rogue_key);
    let requests: Arc<Mutex<Vec<SyncFrame>>> = Arc::default();
    let mut incoming = hand.net.accept(PROTOCOL_SYNC).unwrap();
    {
        let (requests, journal, rogue) = (requests.clone(), journal.clone(), rogue.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((_, mut stream)) = incoming.next().await {
                let request = wire::read_frame::<SyncFrame, _>(&mut stream, 1 << 20)
                    .await
                    .unwrap()
                    .unwrap();
                requests.lock().unwrap().push(request.clone());
                let SyncFrame::SyncRequest {
                    since,
                    until,
                    part_bytes,
                    parts,
                    ..
                } = request
                else {
                    panic!()
                };
                let cap = RoundCap {
                    entries: 4096,
                    bytes: 64 << 20,
                };
                let answer = Answer::build(journal.as_ref(), &rogue, since, until, part_bytes, cap)
                    .await
                    .unwrap();
                wire::write_frame(&mut stream, &answer.header()).await.unwrap();
                let first = parts.is_none();
                for i in parts.unwrap_or_else(|| (0..answer.total()).collect()) {
                    if first && i == 1 {
                        continue;
                    }
                    wire::write_frame(&mut stream, &answer.part(i).unwrap())
                        .await
                        .unwrap();
                }
                if first {
                    held.push(stream); // stall: never closed
                }
            }
        });
    }
    let (mut r, mut w) = hand.hello(&b, 40).await;
    // "Entry 40 is too large for a frame": the node pulls 1..=40.
    wire::write_frame(&mut w, &ResourceFrame::Large { seq: 40 })
        .await
        .unwrap();
    let mut acked = 0;
    while acked < 40 {
        match tokio::time::timeout(
            Duration::from_secs(30),
            wire::read_frame::<ResourceFrame, _>(&mut r, 1 << 20),
        )
        .await
        {
            Ok(Ok(Some(ResourceFrame::Ack { seq }))) => acked = seq,
            Ok(Ok(Some(other))) => panic!("unexpected {other:?}"),
            other => panic!("no ack: {other:?}; requests {:?}", requests.lock().unwrap()),
        }
    }
    seen_b.wait_for("40 events", |s| s.len() >= 40).await;
    assert_eq!(b.stored("COMPUTE_RESOURCE").await.len(), 40);
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let SyncFrame::SyncRequest {
        since: 0,
        until: Some(40),
        parts: Some(parts),
        ..
    } = &requests[1]
    else {
        panic!("second request should ask for the missing part only: {requests:?}")
    };
    assert_eq!(parts, &vec![1]);
}
