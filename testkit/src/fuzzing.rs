//! Entry points of the coverage-guided fuzz targets (`fuzz/`, docs/FUZZING.md): one
//! function per decoder of outside bytes, shared by the fuzz crate and by the corpus replay
//! test (`tests/fuzz_corpus.rs`), so CI runs every saved input through the same code.
//!
//! Each function takes arbitrary bytes, runs them through the node's real decoder and checks
//! what must hold of what comes out (it round-trips, it fits the journal's JSON lines, it
//! stays within its limits). A panic here is a finding: either the decoder panicked on
//! hostile bytes, or it accepted something the rest of the node cannot carry. The asserts
//! are the oracle of the harness, never reached on the node's own paths.
//!
//! Everything here runs on the node crate's public API, so it lives in the test kit and
//! not in the shipped library.

use base64::Engine;
use libp2p::identity::Keypair;
use libp2p::PeerId;

use oc_discovery::contract::{self, Action, CommandAction, Decoded, JournalEntry};
use oc_discovery::p2p::records::{self, PeerRecord};
use oc_discovery::p2p::wire::{
    self, CopyFrame, ErrorFrame, ForwardFrame, Frame, FrameError, HeartbeatFrame, ResourceFrame, SearchFrame,
    SyncFrame,
};
use oc_discovery::search::GossipQuery;
use oc_discovery::sync::plan;

/// The victim's own peer id in the targets (the creator `decode_intake` accepts).
pub const OWN_ID: &str = "12D3KooWLYt2p9DJu8m6tG4cNj5DoTqr2fj5DPRmB6N8L6ZKhM2A";
/// `decode_intake`'s size cap in the target (the default `--max-event-bytes` is larger than
/// any input libFuzzer builds, so the cap is exercised at this smaller one).
pub const MAX_EVENT_BYTES: usize = 2048;
/// Reader's frame cap in the targets: small, so that oversized frames are skipped too.
pub const FRAME_CAP: usize = 1024;
/// "Now" for record checks: the seed record is valid at this instant.
pub const NOW_MS: u64 = 1_700_000_000_000;
/// Most frames read from one input (an input of n bytes holds at most n / 4 anyway).
const MAX_FRAMES: usize = 4096;

/// The body of a fuzz target: arbitrary bytes in, a panic on a finding.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: the name is the directory under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("intake", intake),
    ("frames", frames),
    ("sync_answer", sync_answer),
    ("records", records),
    ("search", search),
    ("heartbeat", heartbeat),
    ("copy", copy),
];

/// A fixed key for the targets: seed records and gossip queries are signed with it, so the
/// fuzzer starts from inputs that pass verification.
pub fn fixed_key() -> Keypair {
    // 32 bytes always make an ed25519 secret key.
    Keypair::ed25519_from_bytes([7u8; 32]).unwrap_or_else(|_| Keypair::generate_ed25519())
}

/// `PROPALGATION_EVENT` bodies as the NATS intake decodes them, then what the node does
/// with a command's payload (PB_SEARCH parsing, PB_CONSIDERS / PB_PLANNER peer ids).
pub fn intake(data: &[u8]) {
    match contract::decode_intake(data, OWN_ID, MAX_EVENT_BYTES) {
        Ok(Decoded::Accept(e)) => {
            assert!(data.len() <= MAX_EVENT_BYTES, "accepted above the cap");
            assert!(!e.resource_id.is_empty());
            assert_eq!(e.resource.id(), Some(e.resource_id.as_str()));
            assert_eq!(e.resource.creator_id(), Some(OWN_ID));
            assert!(!e.data_type.is_empty());
            // Search, the MongoDB store and the embedded store's own resources read it as a
            // tree: what intake accepts must be one.
            if let Err(err) = serde_json::from_str::<serde_json::Value>(e.resource.json()) {
                panic!("an accepted resource does not read as a tree: {err}");
            }
            // What intake journals must travel: one JSON line, an `event` frame, a line read
            // back by a puller, all the same entry.
            let entry = JournalEntry {
                origin: OWN_ID.to_owned(),
                seq: 1,
                action: e.action,
                data_type: e.data_type,
                user: e.user,
                resource: e.resource,
                time_ms: 1,
            };
            let line = match serde_json::to_vec(&entry) {
                Ok(line) => line,
                Err(err) => panic!("an accepted event does not serialize: {err}"),
            };
            assert!(!line.contains(&b'\n'), "a journal line holds a line break");
            match serde_json::from_slice::<JournalEntry>(&line) {
                Ok(back) => assert_eq!(back, entry, "the journal line reads back"),
                Err(err) => panic!("a journal line does not read back: {err}"),
            }
            let mut framed = Vec::new();
            assert!(wire::encode_event_json(&line, &mut framed));
            match framed.get(4..).map(wire::decode_frame::<ResourceFrame>) {
                Some(Ok(ResourceFrame::Event(back))) => assert_eq!(back, entry, "the event frame reads back"),
                other => panic!("an event frame does not read back: {other:?}"),
            }
        }
        Ok(Decoded::Command(c)) => match c.action {
            CommandAction::Search => {
                let _ = oc_discovery::search::parse(&c);
            }
            CommandAction::Considers => {
                if let Some(list) = c.payload.get("peer_ids").and_then(serde_json::Value::as_array) {
                    for raw in list.iter().take(MAX_FRAMES) {
                        let _ = raw.as_str().unwrap_or_default().parse::<PeerId>();
                    }
                }
            }
            CommandAction::Planner | CommandAction::ClosePlanner => {
                let _ = oc_discovery::commands::router::peer_field(&c.payload);
            }
        },
        Ok(Decoded::OwnEcho) => {}
        Err(refusal) => assert!(!refusal.message.is_empty()),
    }
}

/// Stream frames, read as each protocol's reader reads them: the bytes as one frame body
/// (`decode_frame`), then as a stream of length-prefixed frames (`read_frame`, as every
/// resource, heartbeat, sync, forwarding and search stream reads them).
pub fn frames(data: &[u8]) {
    frames_of::<ResourceFrame>(data);
    frames_of::<HeartbeatFrame>(data);
    frames_of::<SyncFrame>(data);
    frames_of::<ForwardFrame>(data);
    frames_of::<SearchFrame>(data);
}

/// [`frames`] for the frames of one protocol.
fn frames_of<F: Frame + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(frame) = wire::decode_frame::<F>(data) {
        check_round_trip(&frame);
    }
    for frame in read_all::<F>(data, FRAME_CAP) {
        check_round_trip(&frame);
    }
    // The same stream arriving a few bytes at a time (the first byte says how many), read
    // charging a peer's byte budget: the same frames, and the budget all given back.
    if let Some((&step, rest)) = data.split_first() {
        let budget = wire::ByteBudget::new(FRAME_CAP);
        let trickle = Trickle {
            data: rest,
            step: usize::from(step % 16) + 1,
        };
        let trickled = read_stream::<F, _>(trickle, FRAME_CAP, Some(&budget));
        assert_eq!(budget.in_use(), 0, "a frame's charge outlived it");
        assert_eq!(
            trickled,
            read_all::<F>(rest, FRAME_CAP),
            "frames depend on how bytes arrive"
        );
    }
}

/// A stream that hands out at most `step` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl futures::AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = self.step.min(buf.len()).min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        if let Some(to) = buf.get_mut(..n) {
            to.copy_from_slice(head);
        }
        self.data = tail;
        std::task::Poll::Ready(Ok(n))
    }
}

/// Journal sync: an answer stream (`sync_header`, then `sync_part`s) checked and assembled
/// as the puller does it ([`plan::Assembly`], the pure core of `sync::pull::pull`), and the
/// owner's reading of a `sync_request` (`plan::plan_until`, `plan::wanted_parts`).
pub fn sync_answer(data: &[u8]) {
    /// What the fuzz puller asks: since 0, parts of at most 2 KiB, small round caps.
    const ASK: plan::Ask = plan::Ask {
        since: 0,
        part_bytes: 2048,
        max_entries: 64,
        max_bytes: 64 * 1024,
    };
    let mut assembly: Option<plan::Assembly> = None;
    for frame in read_all::<SyncFrame>(data, ASK.part_bytes as usize) {
        match frame {
            SyncFrame::SyncHeader {
                since,
                until,
                head,
                total,
                bytes,
            } => {
                let header = plan::Header {
                    since,
                    until,
                    head,
                    total,
                    bytes,
                };
                if let Some(a) = &assembly {
                    if *a.header() != header {
                        return;
                    }
                    continue;
                }
                let Ok(a) = plan::Assembly::new(ASK, header) else {
                    return;
                };
                assert!(header.until.saturating_sub(header.since) <= ASK.max_entries);
                assert!(header.bytes <= ASK.max_bytes);
                assert_eq!(a.missing().len(), total as usize);
                assembly = Some(a);
            }
            SyncFrame::SyncPart { index, total, data } => {
                let Some(a) = assembly.as_mut() else {
                    return;
                };
                if a.add(index, total, &data).is_err() {
                    return;
                }
                assert!(a.held() <= a.header().total as usize);
            }
            SyncFrame::SyncRequest {
                since, until, parts, ..
            } => {
                let planned = plan::plan_until(since, until, u64::MAX, ASK.max_entries);
                assert!(planned >= since && planned - since <= ASK.max_entries);
                if let Ok(list) = plan::wanted_parts(parts, 1024) {
                    assert!(list.windows(2).all(|w| w[0] < w[1]), "parts sorted, each once");
                    assert!(list.iter().all(|i| *i < 1024));
                }
            }
            _ => return,
        }
    }
    let Some(a) = assembly else {
        return;
    };
    let h = *a.header();
    if let Ok(entries) = a.finish() {
        assert!(entries.len() as u64 <= h.until - h.since);
        let mut previous = h.since;
        for entry in &entries {
            assert!(
                entry.seq > previous && entry.seq <= h.until,
                "seq {} out of order",
                entry.seq
            );
            previous = entry.seq;
            // An entry the puller keeps must go on to the store and to NATS as it came.
            assert!(!contract::ResourceNotice::body_of(entry).is_empty());
        }
    }
}

/// Peer records from the DHT: the first byte is the length of the key (modulo 64), the key
/// follows, the rest is the record's bytes, checked as `records::check` checks a record put
/// or fetched.
pub fn records(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(n % 64).min(rest.len()));
    if let Ok(v) = records::check(key, value, NOW_MS) {
        assert_eq!(v.peer.to_string(), v.record.peer_id);
        assert!(v.addrs.len() <= records::MAX_ADDRS);
        assert!(!v.record.name.is_empty() && v.record.name.len() <= records::MAX_NAME_BYTES);
        assert!(v.record.expires_at > NOW_MS);
    }
    if let Ok(r) = PeerRecord::decode(value) {
        assert_eq!(
            PeerRecord::decode(&r.encode()).ok().as_ref(),
            Some(&r),
            "encode round trip"
        );
        assert_eq!(
            PeerRecord::from_value(&r.to_value()).ok().as_ref(),
            Some(&r),
            "value round trip"
        );
        let _ = r.verify(NOW_MS);
    }
}

/// Search: the bytes as a frame of a search stream (query, results, done) with what the
/// node reads of each result, and as a gossip query (`GossipQuery`) checked as a responder
/// checks one: its searcher a peer id, its signature against the signer's key.
pub fn search(data: &[u8]) {
    match wire::decode_frame::<SearchFrame>(data) {
        Ok(SearchFrame::SearchResults {
            query_id, results, ..
        }) => {
            let _ = query_id.len();
            for r in results.iter().take(MAX_FRAMES) {
                let _ = oc_discovery::search::dedupe_key(r);
            }
        }
        Ok(frame) => check_round_trip(&frame),
        Err(_) => {}
    }
    if let Ok(q) = serde_json::from_slice::<GossipQuery>(data) {
        let _ = q.searcher.parse::<PeerId>();
        let verified = q.verify(&fixed_key().public());
        if verified {
            let resigned = q
                .clone()
                .sign(&fixed_key())
                .map(|s| s.verify(&fixed_key().public()));
            assert!(matches!(resigned, Ok(true)));
        }
        match serde_json::to_vec(&q).map(|b| serde_json::from_slice::<GossipQuery>(&b)) {
            Ok(Ok(back)) => assert_eq!(back, q, "gossip query round trip"),
            other => panic!("a gossip query does not round-trip: {other:?}"),
        }
    }
}

/// Heartbeat streams: frames read as the heartbeat responder reads them; each `ping` gets
/// the `pong` it would, which must read back with the same nonce.
pub fn heartbeat(data: &[u8]) {
    /// The heartbeat responder reads with the node's frame cap; a small one here.
    const HEARTBEAT_CAP: usize = 256;
    for frame in read_all::<HeartbeatFrame>(data, HEARTBEAT_CAP) {
        if let HeartbeatFrame::Ping { nonce } = frame {
            let mut out = Vec::new();
            wire::encode_frame(&HeartbeatFrame::Pong { nonce }, &mut out);
            let back = futures::executor::block_on(wire::read_frame::<HeartbeatFrame, _>(
                &mut out.as_slice(),
                HEARTBEAT_CAP,
            ));
            assert!(matches!(back, Ok(Some(HeartbeatFrame::Pong { nonce: n })) if n == nonce));
        }
    }
}

/// Remote copy (`protocols/copy.md`): the bytes as a copy stream (each frame round-trips; each
/// chunk's data goes through the receiver's base64 decode and offset check, which keep it
/// within the offer), and the same bytes as a received directory's tar (the check never
/// panics, and what it accepts holds at most its entry limit).
pub fn copy(data: &[u8]) {
    use oc_discovery::copy::{archive, ledger::ReceiveCursor};
    /// The receiver's largest chunk in the target.
    const CHUNK_CAP: u64 = 512;
    let mut cursor: Option<ReceiveCursor> = None;
    for frame in read_all::<CopyFrame>(data, FRAME_CAP) {
        check_round_trip(&frame);
        match frame {
            CopyFrame::CopyOffer { total, .. } => cursor = ReceiveCursor::new(0, total, CHUNK_CAP).ok(),
            CopyFrame::CopyChunk { offset, data } => {
                let (Some(c), Ok(bytes)) = (
                    cursor.as_mut(),
                    base64::engine::general_purpose::STANDARD.decode(data.as_bytes()),
                ) else {
                    continue;
                };
                let len = bytes.len() as u64;
                if c.check(offset, len).is_ok() {
                    let before = c.expected();
                    let after = c.advance(len);
                    assert_eq!(
                        after,
                        before + len,
                        "an accepted chunk moves the offset by its length"
                    );
                }
            }
            _ => {}
        }
    }
    if let Ok(n) = archive::check_tar_from(data) {
        assert!(n <= archive::MAX_TAR_ENTRIES);
    }
}

/// Every frame `read_frame` gets from `data` as a stream, past recoverable errors, as the
/// stream readers do.
fn read_all<F: Frame>(data: &[u8], cap: usize) -> Vec<F> {
    read_stream::<F, _>(futures::io::Cursor::new(data), cap, None)
}

/// [`read_all`] over any reader, charging `budget` when given (`read_frame_budgeted`).
fn read_stream<F: Frame, R: futures::AsyncRead + Unpin>(
    mut reader: R,
    cap: usize,
    budget: Option<&wire::ByteBudget>,
) -> Vec<F> {
    let mut out = Vec::new();
    futures::executor::block_on(async {
        for _ in 0..MAX_FRAMES {
            let read = match budget {
                Some(b) => wire::read_frame_budgeted::<F, _>(&mut reader, cap, b).await,
                None => wire::read_frame::<F, _>(&mut reader, cap).await,
            };
            match read {
                Ok(Some(frame)) => out.push(frame),
                Ok(None) => break,
                Err(e) if e.is_recoverable() => {
                    assert!(matches!(
                        e,
                        FrameError::TooLarge { .. } | FrameError::Decode(_) | FrameError::Unexpected { .. }
                    ));
                }
                Err(_) => break,
            }
        }
    });
    out
}

/// A decoded frame encodes and decodes to itself. Frames holding free JSON values
/// (`forward`, `search_results`) are left out: serde_json's float parsing is not exact, so
/// a number may come back one bit apart.
fn check_round_trip<F: Frame + PartialEq + std::fmt::Debug>(frame: &F) {
    if matches!(frame.kind(), "forward" | "search_results") {
        return;
    }
    let mut out = Vec::new();
    wire::encode_frame(frame, &mut out);
    let len = out
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    assert_eq!(
        len,
        Some(out.len().saturating_sub(4)),
        "length prefix of {frame:?}"
    );
    match out.get(4..).map(wire::decode_frame::<F>) {
        Some(Ok(back)) => assert_eq!(&back, frame, "frame round trip"),
        other => panic!("{frame:?} encodes to {out:?}, which reads back as {other:?}"),
    }
}

/// Seed inputs, one list per target: what a well-behaved peer or application sends, so the
/// fuzzer starts from inputs that go deep. `tests/fuzz_corpus.rs` runs them too.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    fn frame<F: Frame>(f: &F) -> Vec<u8> {
        let mut out = Vec::new();
        wire::encode_frame(f, &mut out);
        out
    }
    let entry = |seq: u64| JournalEntry {
        origin: OWN_ID.to_owned(),
        seq,
        action: Action::Create,
        data_type: "COMPUTE_RESOURCE".into(),
        user: "u".into(),
        resource: serde_json::json!({"id": format!("r{seq}"), "creator_id": OWN_ID, "n": 1}).into(),
        time_ms: 1,
    };
    match target {
        "intake" => [
            format!(r#"{{"action":"PB_CREATE","data_type":"COMPUTE_RESOURCE","user":"u","payload":{{"id":"r1","creator_id":"{OWN_ID}"}}}}"#),
            format!(r#"{{"Action":"pb_update","DataType":"D","Payload":"{{\"id\":\"r2\",\"creator_id\":\"{OWN_ID}\"}}"}}"#),
            r#"{"action":"PB_SEARCH","data_type":"COMPUTE_RESOURCE","payload":{"search":"gpu","type":"all","limit":10,"timeout_ms":500}}"#.into(),
            r#"{"action":"PB_SEARCH","data_type":"PEER","payload":{"search":"site-a"}}"#.into(),
            format!(r#"{{"action":"PB_CONSIDERS","data_type":"D","payload":{{"peer_ids":["{OWN_ID}","x"]}}}}"#),
            format!(r#"{{"action":"PB_PLANNER","data_type":"D","payload":{{"peer_id":"{OWN_ID}","plan":[1,2.5]}}}}"#),
            r#"{"from_app":"oc-discovery","action":"PB_CREATE"}"#.into(),
        ]
        .map(String::into_bytes)
        .to_vec(),
        "frames" => vec![
            [
                frame(&ResourceFrame::Hello {
                    origin: OWN_ID.into(),
                    head: 3,
                }),
                frame(&ResourceFrame::Event(entry(1))),
                frame(&ResourceFrame::Ack { seq: 1 }),
                frame(&ResourceFrame::Large { seq: 2 }),
                frame(&ResourceFrame::Error(ErrorFrame {
                    seq: Some(2),
                    code: "conflict".into(),
                    message: "m".into(),
                })),
            ]
            .concat(),
            frame(&ForwardFrame::Forward {
                action: "PB_CONSIDERS".into(),
                data_type: "D".into(),
                user: "u".into(),
                payload: serde_json::json!({"peer_ids": [OWN_ID], "x": [1, 2.5, null, true]}),
            }),
            serde_json::to_vec(&entry(9)).unwrap_or_default(),
            br#"{"type":"ack","seq":18446744073709551615}"#.to_vec(),
        ],
        "sync_answer" => {
            // Three entries of about 500 bytes: cut in parts of 1000 bytes, two parts.
            let blob: Vec<u8> = (1..=3)
                .flat_map(|s| {
                    let mut e = entry(s);
                    e.resource = serde_json::json!({"id": format!("r{s}"), "creator_id": OWN_ID, "pad": "x".repeat(400)}).into();
                    let mut line = serde_json::to_vec(&e).unwrap_or_default();
                    line.push(b'\n');
                    line
                })
                .collect();
            let (first, second) = blob.split_at(blob.len().min(1000));
            let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
            let header = |total: u32| {
                frame(&SyncFrame::SyncHeader {
                    since: 0,
                    until: 3,
                    head: 5,
                    total,
                    bytes: blob.len() as u64,
                })
            };
            let part = |index: u32, total: u32, data: &[u8]| {
                frame(&SyncFrame::SyncPart {
                    index,
                    total,
                    data: b64(data),
                })
            };
            vec![
                [header(2), part(1, 2, second), part(0, 2, first)].concat(),
                [header(1), part(0, 1, &blob)].concat(),
                frame(&SyncFrame::SyncRequest {
                    origin: OWN_ID.into(),
                    since: 0,
                    until: Some(10),
                    part_bytes: 2048,
                    max_bytes: Some(1 << 20),
                    parts: Some(vec![3, 0, 0, 7]),
                }),
            ]
        }
        "records" => {
            let key = fixed_key();
            let addrs = ["/ip4/127.0.0.1/tcp/4001", "/dns4/example.org/tcp/4001"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect::<Vec<_>>();
            let Ok(record) = PeerRecord::sign(&key, "site-a", &addrs, NOW_MS + 60_000) else {
                return Vec::new();
            };
            let with_key = |k: Vec<u8>| {
                let mut out = vec![k.len() as u8];
                out.extend(k);
                out.extend(record.encode());
                out
            };
            vec![
                with_key(records::peer_key(&key.public().to_peer_id())),
                with_key(records::name_key("site-a")),
            ]
        }
        "search" => {
            let query = GossipQuery {
                query_id: "0123456789abcdef".into(),
                searcher: fixed_key().public().to_peer_id().to_string(),
                data_type: "COMPUTE_RESOURCE".into(),
                search: "gpu".into(),
                limit: 10,
                max_frame_bytes: 65536,
                expires_at: NOW_MS + 5000,
                signature: String::new(),
            }
            .sign(&fixed_key());
            let mut out = vec![
                serde_json::to_vec(&SearchFrame::SearchQuery {
                    query_id: "q".into(),
                    data_type: "D".into(),
                    search: "gpu".into(),
                    limit: Some(5),
                    max_frame_bytes: Some(4096),
                })
                .unwrap_or_default(),
                serde_json::to_vec(&SearchFrame::SearchResults {
                    query_id: "q".into(),
                    data_type: Some("D".into()),
                    results: vec![serde_json::json!({"id": "r1", "creator_id": OWN_ID}), serde_json::json!([1])],
                })
                .unwrap_or_default(),
                serde_json::to_vec(&SearchFrame::SearchDone {
                    query_id: "q".into(),
                    count: 1,
                    skipped: 0,
                })
                .unwrap_or_default(),
            ];
            if let Ok(q) = query {
                out.push(serde_json::to_vec(&q).unwrap_or_default());
            }
            out
        }
        "heartbeat" => vec![
            [
                frame(&HeartbeatFrame::Ping { nonce: 1 }),
                frame(&HeartbeatFrame::Pong { nonce: 1 }),
                frame(&HeartbeatFrame::Ping { nonce: u64::MAX }),
            ]
            .concat(),
        ],
        "copy" => {
            let body = b"define host {}\n".to_vec();
            let mut tar = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            let _ = tar.append_data(&mut h, "engine", std::io::empty());
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(body.len() as u64);
            let _ = tar.append_data(&mut h, "engine/main.cfg", body.as_slice());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            let _ = tar.append_link(&mut h, "l", "/etc/passwd");
            let tar = tar.into_inner().unwrap_or_default();
            let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
            vec![
                [
                    frame(&CopyFrame::CopyOffer {
                        copy_id: "0123456789abcdef".into(),
                        kind: "file".into(),
                        destination: "conf/main.cfg".into(),
                        total: body.len() as u64,
                        sha256: "0".repeat(64),
                    }),
                    frame(&CopyFrame::CopyChunk {
                        offset: 0,
                        data: b64(&body[..4]),
                    }),
                    frame(&CopyFrame::CopyChunk {
                        offset: 4,
                        data: b64(&body[4..]),
                    }),
                    frame(&CopyFrame::CopyAck { offset: 4 }),
                    frame(&CopyFrame::CopyAccept {
                        offset: 0,
                        max_chunk: 262_144,
                    }),
                    frame(&CopyFrame::CopyDone { sha256: "0".repeat(64) }),
                ]
                .concat(),
                tar,
            ]
        }
        _ => Vec::new(),
    }
}
