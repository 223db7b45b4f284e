//! Remote copy between real nodes (`protocols/copy.md`): a file and a directory arrive whole
//! (admin API, the CLI, `REMOTECOPY` over NATS), a 200 MB copy survives the receiver's
//! SIGKILL and a network cut without sending acknowledged chunks again, and hostile offers
//! from a hand peer (traversal, links in a tar, a wrong offset or hash, a non-partner) are
//! refused with nothing written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::AsyncWriteExt;
use oc_discovery::copy::job::WINDOW_BYTES;
use oc_discovery::copy::PROTOCOL_COPY;
use oc_discovery::p2p::wire::{self, CopyFrame};
use oc_testkit::{eventually, init_tracing, node_binary, partner, HandPeer, Relay, Site};
use serde_json::{json, Value};
use sha2::Digest;

/// Longest wait for the big copy (a debug build hashes and encrypts slowly).
const BIG_WAIT: Duration = Duration::from_secs(600);
const BIG_BYTES: usize = 200 * 1024 * 1024;

fn sha_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha_file(path: &Path) -> String {
    sha_hex(&std::fs::read(path).expect("read the copy"))
}

/// `n` bytes of a cheap pseudo-random stream (xorshift): no two chunks alike.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A sender `a` reading below its own source root and a receiver `b` writing below its
/// copy root; returns (source root, copy root).
fn copy_dirs(a: &mut Site, b: &mut Site) -> (PathBuf, PathBuf) {
    let src = a.node.data_dir().join("outgoing");
    let root = b.node.data_dir().join("incoming");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    a.node
        .extra_args
        .extend(["--copy-source-root".to_owned(), src.display().to_string()]);
    b.node
        .extra_args
        .extend(["--copy-root".to_owned(), root.display().to_string()]);
    (src, root)
}

async fn post_copy(site: &Site, source: &Path, peer: &str, destination: &str) -> (u16, Value) {
    let body = json!({"source": source.display().to_string(), "peer": peer, "destination": destination});
    let (status, text) = site
        .node
        .request("POST", "/api/copies", Some(&body.to_string()))
        .await
        .unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn job(site: &Site, id: &str) -> Value {
    site.node.get_json(&format!("/api/copies/{id}")).await.unwrap()
}

async fn wait_finished(site: &Site, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let j = job(site, id).await;
        if j["state"] == "done" || j["state"] == "failed" {
            return j;
        }
        assert!(Instant::now() < deadline, "copy {id} not finished: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `id` acknowledged at least `bytes`.
async fn wait_acked(site: &Site, id: &str, bytes: u64) -> Value {
    let deadline = Instant::now() + BIG_WAIT;
    loop {
        let j = job(site, id).await;
        assert_ne!(j["state"], "failed", "{j}");
        if j["bytes_acked"].as_u64().unwrap_or(0) >= bytes {
            return j;
        }
        assert!(Instant::now() < deadline, "copy {id} stuck: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every file below `dir` (relative path, content), sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_and_a_directory_arrive_whole_by_api_cli_and_nats() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let (src, root) = copy_dirs(&mut a, &mut b);
    let file = noise(3 * 1024 * 1024 + 17, 1);
    std::fs::write(src.join("big.bin"), &file).unwrap();
    let dir = src.join("conf");
    std::fs::create_dir_all(dir.join("engine/sub")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("engine/main.cfg"), b"define host {}\n").unwrap();
    std::fs::write(dir.join("engine/sub/x.bin"), noise(700_000, 2)).unwrap();
    std::fs::write(dir.join("top.txt"), b"top").unwrap();
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();

    // A file through the admin API.
    let (status, answer) = post_copy(&a, &src.join("big.bin"), &b.id(), "files/big.bin").await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().expect("a copy id").to_owned();
    let done = wait_finished(&a, &id, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["total"], file.len() as u64);
    assert_eq!(done["sha256"], sha_hex(&file));
    assert_eq!(sha_file(&root.join("files/big.bin")), sha_hex(&file));
    let listed = a.node.get_json("/api/copies").await.unwrap();
    assert!(listed.as_array().unwrap().iter().any(|j| j["id"] == id.as_str()));

    // A directory through the CLI, which waits and prints the final state.
    let client = a.node.admin_url();
    let (source, target) = (dir.display().to_string(), format!("{}:sites/conf", b.id()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(node_binary().unwrap())
            .args(["copy", &source, &target, "--json", "--admin", &client])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("--json prints the job");
    assert_eq!(printed["state"], "done");
    assert_eq!(printed["kind"], "dir");
    assert_eq!(tree(&root.join("sites/conf")), tree(&dir));
    assert!(root.join("sites/conf/empty").is_dir());

    // The same directory again, changed: the new tree replaces the old one.
    std::fs::remove_file(dir.join("top.txt")).unwrap();
    std::fs::write(dir.join("new.txt"), b"new").unwrap();
    // Over NATS, Gorgone's body plus the peer.
    let body = json!({"source": dir.display().to_string(), "destination": "sites/conf", "cache_dir": "/var/cache/x", "peer": b.id()});
    let reply = a
        .app
        .request("REMOTECOPY", body.to_string().into())
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let id = reply["copy_id"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_finished(&a, &id, Duration::from_secs(120)).await["state"],
        "done"
    );
    assert_eq!(tree(&root.join("sites/conf")), tree(&dir));

    // Refusals of the sender, in the node's usual shapes.
    let reply = a
        .app
        .request(
            "REMOTECOPY",
            json!({"source": "x", "destination": "y"}).to_string().into(),
        )
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["error"]["code"], "missing_field", "{reply}");
    let (status, text) = a
        .node
        .request("POST", "/api/copies", Some(r#"{"source":"x"}"#))
        .await
        .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("missing_field"), "{text}");
    let (status, answer) = post_copy(&a, &src.join("big.bin"), &b.id(), "/etc/passwd").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{answer}"
    );
    let (status, answer) = post_copy(&a, Path::new("/etc/passwd"), &b.id(), "x").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{answer}"
    );
    let stranger = HandPeer::fresh();
    let (status, answer) = post_copy(&a, &src.join("big.bin"), &stranger.id, "x").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("not_partner")),
        "{answer}"
    );
    // A refused copy is exit code 1 and the node's reason.
    let out = std::process::Command::new(node_binary().unwrap())
        .args([
            "copy",
            "/nope",
            &format!("{}:x", b.id()),
            "--admin",
            &a.node.admin_url(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_field"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_copy_survives_a_receiver_kill_and_a_cut_without_resending_acknowledged_chunks() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    // Every connection between them goes through a relay the test can cut.
    let to_b = Relay::start(b.node.p2p_port).await;
    let to_a = Relay::start(a.node.p2p_port).await;
    a.node.partners.push(to_b.addr(&b.id()));
    b.node.partners.push(to_a.addr(&a.id()));
    let (src, root) = copy_dirs(&mut a, &mut b);
    let data = noise(BIG_BYTES, 3);
    let want = sha_hex(&data);
    std::fs::write(src.join("image.bin"), &data).unwrap();
    drop(data);
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let (status, answer) = post_copy(&a, &src.join("image.bin"), &b.id(), "images/image.bin").await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let total = BIG_BYTES as u64;

    // 1: the receiver is SIGKILLed in the middle, and restarted.
    wait_acked(&a, &id, total / 4).await;
    b.node.kill();
    let staged = root.join(".oc-copy");
    let part = std::fs::read_dir(&staged)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "part"))
        .expect("the partial file is kept")
        .path();
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(
        kept >= total / 4,
        "the partial holds what was acknowledged ({kept})"
    );
    b.node.start_healthy().await.unwrap();

    // 2: the connection is cut (both relays hang), then restored.
    let before_cut = wait_acked(&a, &id, total / 2).await;
    to_a.cut();
    to_b.cut();
    let attempts = before_cut["attempts"].as_u64().unwrap();
    // The attempt under way notices the cut (no acknowledgement in time) and a new one starts.
    let deadline = Instant::now() + BIG_WAIT;
    loop {
        let j = job(&a, &id).await;
        assert_ne!(j["state"], "done", "the copy ended before the cut landed: {j}");
        if j["attempts"].as_u64().unwrap() > attempts {
            break;
        }
        assert!(Instant::now() < deadline, "the cut went unnoticed: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    to_a.restore();
    to_b.restore();

    let done = wait_finished(&a, &id, BIG_WAIT).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["sha256"], want);
    assert_eq!(sha_file(&root.join("images/image.bin")), want);
    // Only what was in flight at each interruption travelled twice: at most one window per
    // interruption, never an acknowledged chunk.
    let sent = done["bytes_sent"].as_u64().unwrap();
    eprintln!(
        "200 MB copy: {sent} bytes sent for {total} ({} resent), {} attempts",
        sent.saturating_sub(total),
        done["attempts"]
    );
    assert!(sent >= total);
    assert!(
        sent <= total + 2 * WINDOW_BYTES,
        "{sent} bytes sent for {total}: acknowledged chunks were sent again"
    );
    assert_eq!(a.node.metric("oc_copy_bytes_sent_total").await.unwrap(), sent);
    assert!(!part.exists(), "the partial file is gone once in place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_killed_mid_copy_resumes_after_its_restart() {
    init_tracing();
    const BYTES: usize = 48 * 1024 * 1024;
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let (src, root) = copy_dirs(&mut a, &mut b);
    let data = noise(BYTES, 4);
    let want = sha_hex(&data);
    std::fs::write(src.join("db.dump"), &data).unwrap();
    drop(data);
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let (status, answer) = post_copy(&a, &src.join("db.dump"), &b.id(), "dumps/db.dump").await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let total = BYTES as u64;

    wait_acked(&a, &id, total / 3).await;
    a.node.kill();
    a.node.start_healthy().await.unwrap();
    // The job is back from A's data directory and resumes from B's offset.
    let done = wait_finished(&a, &id, BIG_WAIT).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(sha_file(&root.join("dumps/db.dump")), want);
    // B counted every chunk it wrote: what it held when A died was not sent again.
    let received = b.node.metric("oc_copy_bytes_received_total").await.unwrap();
    eprintln!("sender restart: {received} bytes received for {total}");
    assert!(received >= total);
    assert!(
        received <= total + WINDOW_BYTES,
        "{received} bytes received for {total}: acknowledged chunks were sent again"
    );
}

/// A hand peer's copy stream to `site`: offers, and returns the node's first answer.
async fn offer(
    peer: &HandPeer,
    site: &Site,
    kind: &str,
    destination: &str,
    bytes: &[u8],
    sha: &str,
) -> (libp2p::Stream, CopyFrame) {
    let mut stream = peer.open(site, PROTOCOL_COPY).await;
    let frame = CopyFrame::CopyOffer {
        copy_id: format!("hostile-{}", rand_id()),
        kind: kind.to_owned(),
        destination: destination.to_owned(),
        total: bytes.len() as u64,
        sha256: sha.to_owned(),
    };
    wire::write_frame(&mut stream, &frame).await.unwrap();
    let answer = read(&mut stream).await;
    (stream, answer)
}

fn rand_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn read(stream: &mut libp2p::Stream) -> CopyFrame {
    tokio::time::timeout(
        Duration::from_secs(30),
        wire::read_frame::<CopyFrame, _>(stream, 1 << 20),
    )
    .await
    .expect("an answer in time")
    .expect("a frame")
    .expect("not the end of the stream")
}

/// Sends `bytes` in one chunk at `offset` and returns the answer.
async fn chunk(stream: &mut libp2p::Stream, offset: u64, bytes: &[u8]) -> CopyFrame {
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    wire::write_frame(stream, &CopyFrame::CopyChunk { offset, data })
        .await
        .unwrap();
    read(stream).await
}

fn code(frame: &CopyFrame) -> &str {
    match frame {
        CopyFrame::Error(e) => &e.code,
        _ => "",
    }
}

/// A tar holding one entry whose raw name and type are set by hand (what a liar sends).
fn raw_tar(name: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    {
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    let body = b"owned\n";
    header.set_size(if kind == tar::EntryType::Regular {
        body.len() as u64
    } else {
        0
    });
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    if kind == tar::EntryType::Regular {
        let mut padded = body.to_vec();
        padded.resize(512, 0);
        out.extend_from_slice(&padded);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Every path below `root` outside the staging directory.
fn written(root: &Path) -> Vec<String> {
    tree(root)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| !p.starts_with(".oc-copy"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_offers_are_refused_with_nothing_written() {
    init_tracing();
    let mut b = Site::new().await;
    let liar = HandPeer::fresh();
    b.node.partners.push(liar.addr());
    let root = b.node.data_dir().join("incoming");
    let outside = b.node.data_dir().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    b.node
        .extra_args
        .extend(["--copy-root".to_owned(), root.display().to_string()]);
    b.node.start_healthy().await.unwrap();
    let body = b"hello".to_vec();
    let sha = sha_hex(&body);

    // Destinations that leave the root.
    for dest in ["/etc/cron.d/x", "../x", "a/../../x", "link/x", ".oc-copy/x"] {
        let (_, answer) = offer(&liar, &b, "file", dest, &body, &sha).await;
        assert_eq!(code(&answer), "invalid_field", "{dest}: {answer:?}");
    }

    // Tars with a symlink, a hard link, a device, an absolute path and `..`.
    for (what, tar_bytes) in [
        (
            "symlink",
            raw_tar("l", tar::EntryType::Symlink, Some("/etc/passwd")),
        ),
        (
            "hard link",
            raw_tar("h", tar::EntryType::Link, Some("/etc/passwd")),
        ),
        ("device", raw_tar("d", tar::EntryType::Char, None)),
        ("absolute", raw_tar("/tmp/owned", tar::EntryType::Regular, None)),
        ("dotdot", raw_tar("../owned", tar::EntryType::Regular, None)),
    ] {
        let (mut stream, answer) = offer(&liar, &b, "dir", "d", &tar_bytes, &sha_hex(&tar_bytes)).await;
        assert!(
            matches!(answer, CopyFrame::CopyAccept { offset: 0, .. }),
            "{answer:?}"
        );
        let mut answer = chunk(&mut stream, 0, &tar_bytes).await;
        if let CopyFrame::CopyAck { .. } = answer {
            answer = read(&mut stream).await;
        }
        assert_eq!(code(&answer), "invalid_field", "{what}: {answer:?}");
        let _ = stream.close().await;
    }

    // A chunk at another offset than expected, then a wrong hash.
    let (mut stream, _) = offer(&liar, &b, "file", "f", &body, &sha).await;
    assert_eq!(code(&chunk(&mut stream, 3, &body).await), "invalid_field");
    let (mut stream, _) = offer(&liar, &b, "file", "f", &body, &sha_hex(b"other")).await;
    assert!(matches!(
        chunk(&mut stream, 0, &body).await,
        CopyFrame::CopyAck { offset: 5 }
    ));
    assert_eq!(code(&read(&mut stream).await), "hash_mismatch");
    // A total above --copy-max-bytes (1 GiB by default) is refused before any byte.
    let mut stream = liar.open(&b, PROTOCOL_COPY).await;
    let huge = CopyFrame::CopyOffer {
        copy_id: rand_id(),
        kind: "file".into(),
        destination: "huge".into(),
        total: 1 << 40,
        sha256: sha.clone(),
    };
    wire::write_frame(&mut stream, &huge).await.unwrap();
    assert_eq!(code(&read(&mut stream).await), "payload_too_large");
    // A malformed offer.
    let (_, answer) = offer(&liar, &b, "file", "f", &body, &"0".repeat(63)).await;
    assert_eq!(code(&answer), "invalid_field", "a malformed hash");

    assert!(written(&root).is_empty(), "written: {:?}", written(&root));
    assert!(tree(&outside).is_empty());
    assert!(!Path::new("/tmp/owned").exists());

    // At most --copy-max-per-peer (2) copies of one partner at once: a third is busy.
    let (_one, first) = offer(&liar, &b, "file", "p/1", &body, &sha).await;
    let (_two, second) = offer(&liar, &b, "file", "p/2", &body, &sha).await;
    assert!(matches!(first, CopyFrame::CopyAccept { .. }) && matches!(second, CopyFrame::CopyAccept { .. }));
    let (_, third) = offer(&liar, &b, "file", "p/3", &body, &sha).await;
    assert_eq!(code(&third), "busy");
    drop((_one, _two));

    // A peer that is not a partner is refused, logged and counted.
    let stranger = HandPeer::fresh();
    let (_, answer) = offer(&stranger, &b, "file", "f", &body, &sha).await;
    assert_eq!(code(&answer), "not_partner");
    eventually("the refusal counted", async || {
        b.node
            .metric("oc_refusals_total{place=\"copy\",code=\"not_partner\"}")
            .await
            .unwrap()
            >= 1
    })
    .await;
    assert!(b.node.log().contains("copy refused"));

    // And a good copy from the partner still lands.
    let (mut stream, answer) = offer(&liar, &b, "file", "ok/f", &body, &sha).await;
    assert!(matches!(answer, CopyFrame::CopyAccept { offset: 0, .. }));
    assert!(matches!(
        chunk(&mut stream, 0, &body).await,
        CopyFrame::CopyAck { offset: 5 }
    ));
    assert!(matches!(read(&mut stream).await, CopyFrame::CopyDone { .. }));
    assert_eq!(std::fs::read(root.join("ok/f")).unwrap(), body);
}
