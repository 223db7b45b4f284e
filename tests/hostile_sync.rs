//! Journal sync and framing against hostile peers: a hand-driven peer (a registered partner of
//! the victim) lies as a journal owner, pulls greedily as a puller, or opens streams that
//! announce frames and never send them, while a good partner (a real node) keeps exchanging
//! events with the victim both ways. Each test asserts the refusal, the good partner's
//! delivery and the victim's peak resident memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use oc_discovery::p2p::wire::{self, ErrorFrame, ResourceFrame, SyncFrame};
use oc_discovery::p2p::StreamKind;
use oc_discovery::sync::PROTOCOL_SYNC;
use oc_testkit::{event, exchange, init_tracing, partner, HandPeer, Site};
use serde_json::json;

/// The victim's resident memory must stay below this whatever the attack.
const RSS_LIMIT: u64 = 256 * 1024 * 1024;
/// Longest wait for any one condition.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `/proc/<pid>/status` field in bytes (Linux), 0 when absent.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident memory of a process so far (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A victim, its good partner and a hostile hand peer registered as the victim's partner.
struct Scene {
    victim: Site,
    good: Site,
    hand: HandPeer,
}

impl Scene {
    async fn start(victim_args: &[&str]) -> Scene {
        init_tracing();
        let hand = HandPeer::fresh();
        hand.listening().await;
        let (mut victim, mut good) = (Site::new().await, Site::new().await);
        partner(&mut victim, &mut [&mut good]);
        victim.node.partners.push(hand.addr());
        victim.node.extra_args = victim_args.iter().map(|s| s.to_string()).collect();
        victim.node.start_healthy().await.unwrap();
        good.node.start_healthy().await.unwrap();
        Scene { victim, good, hand }
    }

    fn victim_peer(&self) -> libp2p::PeerId {
        self.victim.id().parse().unwrap()
    }

    async fn connect_hand(&self) {
        self.hand.dial(&self.victim).await;
    }

    fn peak_rss(&self) -> u64 {
        peak_rss(self.victim.node.pid().expect("victim running"))
    }
}

/// Reads one frame from a sync stream within the patience.
async fn next_frame(stream: &mut libp2p::Stream) -> Option<SyncFrame> {
    tokio::time::timeout(PATIENCE, wire::read_frame(stream, 2 << 20))
        .await
        .expect("the owner answers in time")
        .expect("a readable frame")
}

/// The hostile owner's lies, one per sync request, in turn.
fn lie(k: u64, since: u64) -> Vec<SyncFrame> {
    let header = |until: u64, total: u32, bytes: u64| SyncFrame::SyncHeader {
        since,
        until,
        head: until.max(since + 1),
        total,
        bytes,
    };
    let part = |index: u32, total: u32, bytes: usize| SyncFrame::SyncPart {
        index,
        total,
        data: base64_of(&vec![b'x'; bytes]),
    };
    match k % 5 {
        // A header announcing everything: the old puller made a list of u32::MAX indexes.
        0 => vec![header(since + 1, u32::MAX, u64::MAX)],
        // More parts than announced.
        1 => vec![header(since + 1, 1, 100), part(0, 1, 100), part(1, 1, 100)],
        // A part far larger than announced (700 KB for a 100-byte answer).
        2 => vec![header(since + 1, 1, 100), part(0, 1, 700_000)],
        // A range past the round cap.
        3 => vec![header(since + 1_000_000, 1, 100)],
        // The same part twice.
        _ => vec![header(since + 1, 2, 1000), part(0, 2, 900), part(0, 2, 900)],
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A lying journal owner: each sync request gets a header announcing u32::MAX parts and
/// u64::MAX bytes, or more / larger parts than announced, or a range beyond the cap. The
/// victim refuses each answer (metric, log), holds nothing of it, and its good partner keeps
/// delivering both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_owner_gets_its_answers_refused_and_costs_no_memory() {
    let mut scene = Scene::start(&["--backoff-max", "1s"]).await;
    exchange(&scene.victim, &scene.good, "before", 5).await;

    let served = Arc::new(AtomicU64::new(0));
    let mut incoming = scene.hand.net.accept(PROTOCOL_SYNC).unwrap();
    {
        let served = served.clone();
        tokio::spawn(async move {
            while let Some((_, mut stream)) = incoming.next().await {
                let Ok(Ok(Some(SyncFrame::SyncRequest { since, .. }))) =
                    tokio::time::timeout(PATIENCE, wire::read_frame(&mut stream, 1 << 20)).await
                else {
                    continue;
                };
                let k = served.load(Ordering::SeqCst);
                let mut buf = Vec::new();
                for f in lie(k, since) {
                    wire::encode_frame(&f, &mut buf);
                }
                let _ = stream.write_all(&buf).await;
                let _ = stream.close().await;
                served.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    // Each `large` frame makes the victim pull from the hand peer (once the previous pull,
    // refused, has waited out its backoff).
    let (_r, mut w) = scene.hand.hello(&scene.victim, 10).await;
    let lies = 10;
    let attack = async {
        for _ in 0..600 {
            if served.load(Ordering::SeqCst) >= lies {
                return;
            }
            wire::write_frame(&mut w, &ResourceFrame::Large { seq: 10 })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the victim pulled only {} times", served.load(Ordering::SeqCst));
    };
    tokio::join!(attack, exchange(&scene.victim, &scene.good, "during", 20));
    let refused = r#"oc_refusals_total{place="sync",code="invalid_field"}"#;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut counted = 0;
    while counted < lies && tokio::time::Instant::now() < deadline {
        counted = scene.victim.node.metric(refused).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted >= lies, "{counted} refusals counted for {lies} lies");
    assert!(scene.victim.node.log().contains("journal sync answer refused"));
    exchange(&scene.victim, &scene.good, "after", 5).await;
    let peak = scene.peak_rss();
    eprintln!(
        "lying owner: {} answers refused, victim peak RSS {:.1} MiB",
        counted,
        mib(peak)
    );
    assert!(peak < RSS_LIMIT, "victim peak RSS {:.1} MiB", mib(peak));
    assert!(scene.victim.node.is_running(), "the victim is still up");
}

/// A greedy puller: `until = u64::MAX` over a journal far larger than a round, and `parts`
/// lists repeating one index. The owner answers one capped round (entries and bytes), sends
/// each part at most once, refuses a list longer than the answer's parts with
/// `invalid_field`, and its good partner keeps delivering both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_puller_gets_capped_rounds_and_each_part_once() {
    let round_bytes: u64 = 512 * 1024;
    let scene = Scene::start(&[
        "--max-event-bytes",
        "65536",
        "--sync-max-bytes",
        &round_bytes.to_string(),
    ])
    .await;
    // A journal of 3000 entries of about 1 KB: six rounds by bytes.
    let journal = 3000;
    let pad = "p".repeat(1000);
    let me = scene.victim.id();
    for i in 0..journal {
        scene
            .victim
            .publish(&event("PB_CREATE", &format!("j-{i}"), &me, json!({ "pad": pad })))
            .await;
    }
    scene.victim.app.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while scene.good.stored("COMPUTE_RESOURCE").await.len() < journal {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the good partner got the journal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    scene.connect_hand().await;
    let peer = scene.victim_peer();
    let open = || async {
        scene
            .hand
            .net
            .open_stream(peer, PROTOCOL_SYNC, Duration::from_secs(10))
            .await
            .expect("sync stream")
    };
    let request =
        |since: u64, until: Option<u64>, part_bytes: u64, parts: Option<Vec<u32>>| SyncFrame::SyncRequest {
            origin: me.clone(),
            since,
            until,
            part_bytes,
            max_bytes: None,
            parts,
        };
    // Reads a whole answer: (header fields, part indexes in order).
    async fn answer(stream: &mut libp2p::Stream) -> ((u64, u64, u32, u64), Vec<u32>) {
        let Some(SyncFrame::SyncHeader {
            until,
            head,
            total,
            bytes,
            ..
        }) = next_frame(stream).await
        else {
            panic!("no header");
        };
        let mut indexes = Vec::new();
        while let Some(frame) = next_frame(stream).await {
            let SyncFrame::SyncPart { index, .. } = frame else {
                panic!("not a part: {frame:?}");
            };
            indexes.push(index);
        }
        ((until, head, total, bytes), indexes)
    }

    let attack = async {
        // until = u64::MAX, again and again: one capped round each time.
        let mut first = None;
        for _ in 0..20 {
            let mut s = open().await;
            wire::write_frame(&mut s, &request(0, Some(u64::MAX), 65536, None))
                .await
                .unwrap();
            let ((until, head, total, bytes), indexes) = answer(&mut s).await;
            assert!(head >= journal as u64);
            assert!(
                until > 0 && until < head,
                "a round, not the journal: until {until} of {head}"
            );
            assert!(bytes <= round_bytes, "{bytes} bytes for a cap of {round_bytes}");
            assert_eq!(indexes, (0..total).collect::<Vec<_>>());
            first = Some((until, total));
        }
        let (until, total) = first.unwrap();
        assert!(total > 1);
        // 100 000 times one index: longer than the answer's parts, refused.
        let mut s = open().await;
        wire::write_frame(&mut s, &request(0, Some(until), 65536, Some(vec![0; 100_000])))
            .await
            .unwrap();
        match next_frame(&mut s).await {
            Some(SyncFrame::Error(ErrorFrame { code, .. })) => assert_eq!(code, "invalid_field"),
            other => panic!("expected invalid_field, got {other:?}"),
        }
        // As many indexes as parts, all the same: that part, once.
        let mut s = open().await;
        wire::write_frame(
            &mut s,
            &request(0, Some(until), 65536, Some(vec![1; total as usize])),
        )
        .await
        .unwrap();
        assert_eq!(answer(&mut s).await.1, vec![1]);
        // Arithmetic at the edges: nothing, no overflow.
        for (since, part_bytes) in [(u64::MAX - 1, u64::MAX), (u64::MAX, 0)] {
            let mut s = open().await;
            wire::write_frame(&mut s, &request(since, Some(u64::MAX), part_bytes, None))
                .await
                .unwrap();
            let ((until, _, total, bytes), indexes) = answer(&mut s).await;
            assert_eq!((until, total, bytes, indexes.len()), (since, 0, 0, 0));
        }
    };
    tokio::join!(attack, exchange(&scene.victim, &scene.good, "during", 20));
    let refusals = scene
        .victim
        .node
        .metric(r#"oc_refusals_total{place="inbound",code="invalid_field"}"#)
        .await
        .unwrap();
    assert!(refusals >= 1);
    exchange(&scene.victim, &scene.good, "after", 5).await;
    let peak = scene.peak_rss();
    eprintln!(
        "greedy puller: 20 capped rounds of at most {round_bytes} bytes, parts list refused, victim peak RSS {:.1} MiB",
        mib(peak)
    );
    assert!(peak < RSS_LIMIT, "victim peak RSS {:.1} MiB", mib(peak));
}

/// 200 streams from one partner, each sending only the 4-byte length prefix of a 1 MiB
/// frame, then nothing: the victim holds no buffer for them, closes the sync ones at its
/// `--sync-timeout`, and its good partner keeps flowing both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_length_prefixes_cost_nothing() {
    let scene = Scene::start(&["--sync-timeout", "3s"]).await;
    exchange(&scene.victim, &scene.good, "before", 5).await;
    scene.connect_hand().await;
    let before = scene.victim.node.rss_bytes().unwrap_or(0);
    let pid = scene.victim.node.pid().unwrap();
    let data_before = status_bytes(pid, "VmData:");
    let peer = scene.victim_peer();
    let protocols = [
        StreamKind::Create.protocol(),
        StreamKind::Update.protocol(),
        StreamKind::Delete.protocol(),
        oc_discovery::p2p::PROTOCOL_HEARTBEAT,
        PROTOCOL_SYNC,
    ];
    let mut held = Vec::new();
    let mut syncs = Vec::new();
    let mut opened = 0;
    let mut failures = Vec::new();
    for i in 0..400 {
        if opened == 200 {
            break;
        }
        let protocol = protocols[i % protocols.len()].clone();
        let mut s = match scene
            .hand
            .net
            .open_stream(peer, protocol.clone(), Duration::from_secs(10))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                failures.push(e.to_string());
                scene.connect_hand().await;
                continue;
            }
        };
        if let Err(e) = async {
            s.write_all(&(1u32 << 20).to_be_bytes()).await?;
            s.flush().await
        }
        .await
        {
            failures.push(e.to_string());
            continue;
        }
        opened += 1;
        if protocol == PROTOCOL_SYNC {
            syncs.push(s);
        } else {
            held.push(s);
        }
    }
    eprintln!(
        "stalled prefixes: {opened} streams opened, {} failures: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(opened, 200);
    exchange(&scene.victim, &scene.good, "during", 20).await;
    let during = scene.victim.node.rss_bytes().unwrap_or(0);
    let data_during = status_bytes(pid, "VmData:");
    // The sync streams are closed by the victim once its --sync-timeout passes; beyond the
    // two a peer may have served at once, they are answered `busy` and closed at once.
    let mut closed = 0;
    for s in &mut syncs {
        let read = tokio::time::timeout(PATIENCE, wire::read_frame::<SyncFrame, _>(s, 1 << 20)).await;
        let busy = matches!(&read, Ok(Ok(Some(SyncFrame::Error(ErrorFrame { code, .. })))) if code == "busy");
        if busy || matches!(read, Ok(Ok(None)) | Ok(Err(_))) {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        syncs.len(),
        "every stalled sync stream closed by the victim"
    );
    exchange(&scene.victim, &scene.good, "after", 5).await;
    let peak = scene.peak_rss();
    eprintln!(
        "stalled prefixes: {opened} streams opened, {closed} sync streams closed by the victim, RSS {:.1} MiB before, {:.1} MiB during, peak {:.1} MiB; data segment {:.1} MiB before, {:.1} MiB during",
        mib(before),
        mib(during),
        mib(peak),
        mib(data_before),
        mib(data_during)
    );
    assert!(peak < RSS_LIMIT, "victim peak RSS {:.1} MiB", mib(peak));
    assert!(
        during < before + 64 * 1024 * 1024,
        "{:.1} MiB grew to {:.1} MiB for {opened} bare prefixes",
        mib(before),
        mib(during)
    );
    drop(held);
}

/// The caps cost honest partners nothing: a partner more than a window behind catches up
/// by pulling rounds that its owner cuts by bytes (`--sync-max-bytes` of 256 KiB, entries
/// of about 1 KB: some forty rounds), and every entry arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_far_behind_catches_up_in_rounds_cut_by_bytes() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let args = ["--max-event-bytes", "65536", "--sync-max-bytes", "262144"];
    for s in [&mut a, &mut b] {
        s.node.extra_args = args.map(String::from).to_vec();
    }
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    let (n, pad) = (9000, "p".repeat(1000));
    for i in 0..n {
        a.publish(&event(
            "PB_CREATE",
            &format!("far-{i}"),
            &me,
            json!({ "pad": pad }),
        ))
        .await;
    }
    a.publish(&event("PB_CREATE", "far-last", &me, json!({}))).await;
    a.app.flush().await.unwrap();
    // Waits on the journal head rather than on a reply: a loaded machine can take longer
    // than a request's 30 s to journal the backlog in a debug build.
    let journaled = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let head = a.node.get_json("/api/node").await.unwrap()["journal_head"]
            .as_u64()
            .unwrap_or(0);
        if head == n as u64 + 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < journaled,
            "{head} of {} journaled",
            n + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.node.start_healthy().await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let stored = b.stored("COMPUTE_RESOURCE").await.len();
        if stored == n + 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stored} of {} caught up",
            n + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = b
        .node
        .metric(r#"oc_refusals_total{place="sync",code="invalid_field"}"#)
        .await
        .unwrap();
    assert_eq!(refused, 0, "no honest answer refused");
    assert!(
        b.node.log().contains("journal sync round"),
        "caught up by pulling"
    );
}
