//! Hostile partners on the inbound sessions, the helper pools and the partner link's acks.
//!
//! Each test has a victim node, a GOOD partner node exchanging events with it both ways, and
//! a hand-driven hostile partner (a [`HandPeer`] the victim lists as a partner) attacking the
//! victim. Each asserts the refusal, the good partner's delivery both ways and, where the
//! attack is about memory, the victim's resident memory staying below 256 MiB.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use oc_discovery::contract::{Action, JournalEntry};
use oc_discovery::p2p::wire::{self, ErrorFrame, Frame, HeartbeatFrame, ResourceFrame, SyncFrame};
use oc_discovery::p2p::{StreamKind, PROTOCOL_HEARTBEAT};
use oc_discovery::sync::PROTOCOL_SYNC;
use oc_testkit::{event, exchange, init_tracing, partner, HandPeer, RssPeak, Site, WAIT};
use serde_json::{json, Value};

const RSS_LIMIT: u64 = 256 * 1024 * 1024;
const IO: Duration = Duration::from_secs(10);

/// A victim, its good partner, and a hostile hand-driven partner of the victim.
struct Arena {
    victim: Site,
    good: Site,
    hand: HandPeer,
}

/// Starts the hand first (the victim lists it as a partner at its real address), then the
/// victim and the good partner, partners of each other.
async fn arena(victim_args: &[&str], good_args: &[&str]) -> Arena {
    init_tracing();
    let hand = HandPeer::fresh();
    hand.listening().await;
    let (mut victim, mut good) = (Site::new().await, Site::new().await);
    partner(&mut victim, &mut [&mut good]);
    victim.node.partners.push(hand.addr());
    victim.node.extra_args = victim_args.iter().map(|s| s.to_string()).collect();
    good.node.extra_args = good_args.iter().map(|s| s.to_string()).collect();
    victim.node.start_healthy().await.unwrap();
    good.node.start_healthy().await.unwrap();
    Arena { victim, good, hand }
}

/// Opens a stream from the hand to the victim, dialing first.
async fn open(a: &Arena, protocol: libp2p::StreamProtocol) -> libp2p::Stream {
    a.hand.open(&a.victim, protocol).await
}

async fn read<F: Frame, R: futures::AsyncRead + Unpin>(r: &mut R) -> Option<F> {
    tokio::time::timeout(IO, wire::read_frame::<F, R>(r, 1 << 20))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
}

/// The state the victim's `/api/peers` shows for `peer`.
async fn peer_row(site: &Site, peer: &str) -> Value {
    let peers = site.node.get_json("/api/peers").await.expect("/api/peers");
    peers
        .as_array()
        .and_then(|list| list.iter().find(|p| p["peer_id"] == peer))
        .cloned()
        .unwrap_or(Value::Null)
}

async fn wait_online(site: &Site, peer: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = peer_row(site, peer).await;
        if row["state"] == "online" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{peer} not online on {}: {row}",
            site.id()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn entry(origin: &str, seq: u64, pad: &str) -> ResourceFrame {
    ResourceFrame::Event(JournalEntry {
        origin: origin.into(),
        seq,
        action: Action::Create,
        data_type: "COMPUTE_RESOURCE".into(),
        user: "mallory".into(),
        resource: json!({"id": format!("h{seq}"), "creator_id": origin, "pad": pad}).into(),
        time_ms: 0,
    })
}

/// Point 1: large event frames that never fill the first seq. The victim's session takes at
/// most `--max-partner-buffer-bytes` (64 MiB) of them, then stops reading: the hostile
/// writes block, the victim's memory stays bounded, and the good partner's events flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_never_fill_the_first_seq_hold_at_most_the_partner_buffer() {
    let a = arena(&[], &[]).await;
    let rss = RssPeak::watch(a.victim.node.pid().unwrap());
    exchange(&a.victim, &a.good, "before", 3).await;

    let stream = open(&a, StreamKind::Create.protocol()).await;
    let (mut r, mut w) = stream.split();
    wire::write_frame(
        &mut w,
        &ResourceFrame::Hello {
            origin: a.hand.id.clone(),
            head: 1,
        },
    )
    .await
    .unwrap();
    assert_eq!(read(&mut r).await, Some(ResourceFrame::Ack { seq: 0 }));

    // Seq 1 never comes; 900 KiB entries from seq 2 on, up to 400 of them (360 MiB), until
    // the victim stops reading (a write blocked for 5 s).
    let pad = "x".repeat(900 * 1024);
    let (mut written, mut blocked) = (0u64, false);
    let flood_started = Instant::now();
    for seq in 2..402 {
        let mut buf = Vec::new();
        wire::encode_frame(&entry(&a.hand.id, seq, &pad), &mut buf);
        let write = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(5), write).await {
            Ok(Ok(())) => written += buf.len() as u64,
            Ok(Err(e)) => panic!("the victim reset the stream instead of pushing back: {e}"),
            Err(_) => {
                blocked = true;
                break;
            }
        }
        assert!(
            flood_started.elapsed() < Duration::from_secs(120),
            "flood bounded in time"
        );
    }
    eprintln!(
        "hostile partner wrote {} MiB before the victim stopped reading (blocked: {blocked})",
        written >> 20
    );
    assert!(
        blocked,
        "the victim kept reading {written} bytes of entries it cannot apply"
    );
    assert!(
        written < 200 * 1024 * 1024,
        "the victim took {written} bytes before pushing back"
    );

    // While the hostile stream is stuck, the good partner's events flow both ways.
    exchange(&a.victim, &a.good, "during", 5).await;
    let peak = rss.peak();
    eprintln!("victim peak RSS {} MiB", peak >> 20);
    assert!(peak < RSS_LIMIT, "victim RSS {} MiB", peak >> 20);
    let stored = a.victim.stored("COMPUTE_RESOURCE").await;
    assert!(
        !stored
            .iter()
            .any(|r| r["id"].as_str().is_some_and(|id| id.starts_with('h'))),
        "nothing of the hostile run is applied: seq 1 never came"
    );
    drop((r, w));
}

/// Point 2: one stream per resource protocol per session. A second `create` stream from the
/// same peer replaces the first, which is reset; after 20 of them only the last one lives,
/// and it still carries events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_stream_of_a_kind_replaces_the_open_one() {
    let a = arena(&[], &[]).await;
    exchange(&a.victim, &a.good, "before", 2).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let stream = open(&a, StreamKind::Create.protocol()).await;
        let (mut r, mut w) = stream.split();
        wire::write_frame(
            &mut w,
            &ResourceFrame::Hello {
                origin: a.hand.id.clone(),
                head: 0,
            },
        )
        .await
        .unwrap();
        assert_eq!(read(&mut r).await, Some(ResourceFrame::Ack { seq: 0 }));
        streams.push((r, w));
    }
    let (mut last_r, mut last_w) = streams.pop().unwrap();
    for (i, (mut r, _w)) in streams.into_iter().enumerate() {
        // A replaced stream ends: end of stream or a reset, never a frame.
        let mut byte = [0u8; 1];
        let end = tokio::time::timeout(IO, r.read(&mut byte)).await;
        assert!(
            matches!(end, Ok(Ok(0)) | Ok(Err(_))),
            "stream {i} still open after being replaced: {end:?}"
        );
    }
    wire::write_frame(&mut last_w, &entry(&a.hand.id, 1, "ok"))
        .await
        .unwrap();
    assert_eq!(read(&mut last_r).await, Some(ResourceFrame::Ack { seq: 1 }));
    exchange(&a.victim, &a.good, "after", 3).await;
    let stored = a.victim.stored("COMPUTE_RESOURCE").await;
    assert!(
        stored.iter().any(|r| r["id"] == "h1"),
        "the last stream's event is applied"
    );
    assert!(a.victim.node.log().contains("replaces the open one of its kind"));
}

/// Point 3: a hostile partner opens 300 heartbeat streams and 24 sync streams it never
/// finishes. One heartbeat stream per session (a new one replaces the old), at most two
/// sync requests served at once for it (the others answered `busy` or reset); the good
/// partner stays online and its journal sync pulls still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_sync_floods_leave_the_good_partner_its_share() {
    // Frames of 4 KiB: the good partner's 10 KiB entries travel as `large` and are pulled.
    let small = ["--max-frame-bytes", "4096", "--sync-interval", "2s"];
    let a = arena(&small, &small).await;
    let rss = RssPeak::watch(a.victim.node.pid().unwrap());
    exchange(&a.victim, &a.good, "before", 2).await;

    let mut heartbeats = Vec::new();
    for _ in 0..300 {
        heartbeats.push(open(&a, PROTOCOL_HEARTBEAT).await);
    }
    // The newest heartbeat stream is answered. A stream of the flood may have been reset
    // at the door (libp2p-stream drops an inbound stream while the node has not yet taken
    // the one before it), the flood's last one included: then the next one opened after
    // it is the newest.
    let deadline = Instant::now() + WAIT;
    let mut last = heartbeats.pop().unwrap();
    let mut nonce = 7;
    loop {
        let written = wire::write_frame(&mut last, &HeartbeatFrame::Ping { nonce }).await;
        if written.is_ok() && read(&mut last).await == Some(HeartbeatFrame::Pong { nonce }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat stream answered after the flood"
        );
        nonce += 1;
        last = open(&a, PROTOCOL_HEARTBEAT).await;
    }
    let mut first = heartbeats.swap_remove(0);
    let _ = wire::write_frame(&mut first, &HeartbeatFrame::Ping { nonce: 1 }).await;
    assert_eq!(
        read::<HeartbeatFrame, _>(&mut first).await,
        None,
        "a replaced heartbeat stream is not answered"
    );

    // Sync streams that never send their request: each holds a serve permit until the
    // victim's --sync-timeout. Two are served; the rest are answered `busy` (or reset when
    // even the refusal share is taken).
    let mut syncs = Vec::new();
    for _ in 0..24 {
        syncs.push(open(&a, PROTOCOL_SYNC).await);
    }
    let (busy, served, reset) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut readers = Vec::new();
    for mut s in syncs {
        let (busy, served, reset) = (busy.clone(), served.clone(), reset.clone());
        readers.push(tokio::spawn(async move {
            match tokio::time::timeout(
                Duration::from_secs(3),
                wire::read_frame::<SyncFrame, _>(&mut s, 1 << 20),
            )
            .await
            {
                Ok(Ok(Some(SyncFrame::Error(ErrorFrame { code, .. })))) if code == "busy" => {
                    busy.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Some(other))) => panic!("unexpected answer {other:?}"),
                // Still waiting for its request: being served.
                Err(_) => {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                // Closed or reset without a frame (the refusal share was taken).
                Ok(_) => {
                    reset.fetch_add(1, Ordering::Relaxed);
                }
            }
            s
        }));
    }
    let mut held = Vec::new();
    for r in readers {
        held.push(r.await.unwrap());
    }
    let (busy, served, reset) = (
        busy.load(Ordering::Relaxed),
        served.load(Ordering::Relaxed),
        reset.load(Ordering::Relaxed),
    );
    eprintln!("sync flood: {busy} answered busy, {served} being served, {reset} reset");
    assert!(busy >= 1, "no sync request was answered busy");
    assert!(served <= 2, "{served} sync requests of one peer served at once");
    assert_eq!(busy + served + reset, 24);

    // The good partner: online both ways, pushes both ways, and an entry larger than a
    // frame, which only journal sync carries, arrives.
    wait_online(&a.victim, &a.good.id()).await;
    wait_online(&a.good, &a.victim.id()).await;
    exchange(&a.victim, &a.good, "during", 3).await;
    let victim_id = a.victim.id();
    let blob = "b".repeat(10 * 1024);
    a.victim
        .publish_ok(&event(
            "PB_CREATE",
            "pulled-big",
            &victim_id,
            json!({"blob": blob}),
        ))
        .await;
    let deadline = Instant::now() + WAIT;
    while !a
        .good
        .stored("COMPUTE_RESOURCE")
        .await
        .iter()
        .any(|r| r["id"] == "pulled-big")
    {
        assert!(
            Instant::now() < deadline,
            "the large entry was not pulled by the good partner"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let busy_metric = a
        .victim
        .node
        .metric("oc_refusals_total{place=\"inbound\",code=\"busy\"}")
        .await
        .unwrap();
    assert!(busy_metric >= busy as u64, "every busy answer is counted");
    let peak = rss.peak();
    eprintln!("victim peak RSS {} MiB", peak >> 20);
    assert!(peak < RSS_LIMIT);
    drop((heartbeats, held, first, last));
}

/// Point 4: a hostile partner answers `hello` with an ack far beyond the victim's journal.
/// The ack is refused with `invalid_field`, the cursor does not move, and `/api/peers`
/// does not show the link caught up. Then it answers `hello` honestly but acks far beyond
/// in the middle of the session: refused again, nothing moves, the session goes on, and its
/// true acks that follow move the cursor. The good partner is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_beyond_the_journal_head_moves_nothing() {
    const HUGE: u64 = u64::MAX / 2;
    let a = arena(&[], &[]).await;
    let honest_hello = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (hello_refused, session_refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    for kind in StreamKind::ALL {
        let mut incoming = a.hand.net.accept(kind.protocol()).unwrap();
        let (honest_hello, hello_refused, session_refused) = (
            honest_hello.clone(),
            hello_refused.clone(),
            session_refused.clone(),
        );
        tokio::spawn(async move {
            while let Some((_, mut s)) = incoming.next().await {
                let (honest_hello, hello_refused, session_refused) = (
                    honest_hello.clone(),
                    hello_refused.clone(),
                    session_refused.clone(),
                );
                tokio::spawn(async move {
                    if !matches!(read(&mut s).await, Some(ResourceFrame::Hello { .. })) {
                        return;
                    }
                    let honest = honest_hello.load(Ordering::Relaxed);
                    let answer = if honest { 0 } else { HUGE };
                    let _ = wire::write_frame(&mut s, &ResourceFrame::Ack { seq: answer }).await;
                    let mut lied = false;
                    while let Some(f) = read(&mut s).await {
                        match f {
                            ResourceFrame::Error(ErrorFrame { code, .. }) if code == "invalid_field" => {
                                let counter = if honest { &session_refused } else { &hello_refused };
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            // The first entry of an honest session is answered with a lie,
                            // every one after it with the truth.
                            ResourceFrame::Event(e) if honest => {
                                let seq = if lied { e.seq } else { HUGE };
                                lied = true;
                                let _ = wire::write_frame(&mut s, &ResourceFrame::Ack { seq }).await;
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
    }
    let mut heartbeat = a.hand.net.accept(PROTOCOL_HEARTBEAT).unwrap();
    tokio::spawn(async move {
        while let Some((_, mut s)) = heartbeat.next().await {
            tokio::spawn(async move {
                while let Some(HeartbeatFrame::Ping { nonce }) = read(&mut s).await {
                    let _ = wire::write_frame(&mut s, &HeartbeatFrame::Pong { nonce }).await;
                }
            });
        }
    });
    exchange(&a.victim, &a.good, "before", 3).await;
    // The victim's link reaches the hand (it is a partner at its real address).
    let deadline = Instant::now() + WAIT;
    while hello_refused.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the huge ack was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    exchange(&a.victim, &a.good, "during", 3).await;
    let row = peer_row(&a.victim, &a.hand.id).await;
    eprintln!("victim's /api/peers row for the hostile partner: {row}");
    let acked = row["acked_seq"].as_u64().unwrap();
    let pending = row["pending"].as_u64().unwrap();
    assert!(acked < 1000, "the cursor moved to {acked}");
    assert!(pending >= 6, "the link shows caught up: {row}");
    assert_ne!(
        row["state"], "online",
        "a partner claiming the impossible is not online: {row}"
    );
    let refused = a
        .victim
        .node
        .metric("oc_refusals_total{place=\"partner_link\",code=\"invalid_field\"}")
        .await
        .unwrap();
    assert!(refused >= 1);
    let good = peer_row(&a.victim, &a.good.id()).await;
    assert_eq!(good["state"], "online", "{good}");

    // Honest hello, a lie in the middle of the session.
    honest_hello.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    while session_refused.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the huge ack in the session was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let head = a.victim.node.get_json("/api/node").await.unwrap()["journal_head"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let row = peer_row(&a.victim, &a.hand.id).await;
        let acked = row["acked_seq"].as_u64().unwrap();
        assert!(acked <= head, "the cursor passed the head: {row}");
        if acked == head && row["state"] == "online" {
            eprintln!("after the in-session lie and the true acks: {row}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the true acks did not move the cursor: {row}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exchange(&a.victim, &a.good, "after", 2).await;
}

/// Point 1, the other side of the bound: an honest partner's backlog of 450 entries of
/// 1.5 KiB (about 750 KiB, on three streams, and pulled at the victim's start-up) into a
/// partner buffer of 16 KiB. Readers stop while the buffer is full, a pulled round larger
/// than the bound is applied as it goes in: everything is delivered, nothing stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_partner_under_a_tight_partner_buffer_delivers_everything() {
    let a = arena(
        &[
            "--max-frame-bytes",
            "4096",
            "--max-partner-buffer-bytes",
            "16384",
            "--sync-interval",
            "2s",
        ],
        &["--max-frame-bytes", "4096"],
    )
    .await;
    let good_id = a.good.id();
    let pad = "p".repeat(1500);
    // Published while the victim is down, so the sender pushes a backlog: on reconnect each
    // chunk's creates go on the create stream, its updates on the update stream, and so on.
    let mut a = a;
    a.victim.node.stop();
    let mut published = 0u64;
    for i in 0..200 {
        let id = format!("t-{i}");
        a.good
            .publish(&event("PB_CREATE", &id, &good_id, json!({"pad": pad})))
            .await;
        a.good
            .publish(&event("PB_UPDATE", &id, &good_id, json!({"pad": pad, "v": 2})))
            .await;
        published += 2;
        if i % 4 == 0 {
            a.good
                .publish(&event("PB_DELETE", &id, &good_id, json!({})))
                .await;
            published += 1;
        }
    }
    a.good.app.flush().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while a.good.node.metric("oc_intake_accepted_total").await.unwrap() < published {
        assert!(
            Instant::now() < deadline,
            "the good partner did not journal the burst"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.victim.node.start_healthy().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let row = peer_row(&a.good, &a.victim.id()).await;
        if row["acked_seq"].as_u64() >= Some(published) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim did not take everything: {row}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = a.victim.stored("COMPUTE_RESOURCE").await;
    let updated = stored
        .iter()
        .filter(|r| {
            r["id"].as_str().is_some_and(|id| id.starts_with("t-"))
                && r["resource"]["v"] == 2
                && r["deleted"] != true
        })
        .count();
    eprintln!(
        "tight buffer: {published} entries acknowledged, {updated} updated resources stored, {} dropped and pulled",
        a.victim
            .node
            .metric("oc_events_buffer_dropped_total")
            .await
            .unwrap()
    );
    eprintln!(
        "tight buffer: gaps filled by journal sync: {}",
        a.victim.node.log().matches("filling a gap").count()
    );
    assert_eq!(updated, 150, "200 updated, 50 of them deleted");
    exchange(&a.victim, &a.good, "after", 3).await;
}
