//! The live feed (`GET /api/feed`) end to end against real nodes and nats-servers: the
//! newest portion, older pages to the oldest entry, live entries, pause and resume, filters,
//! `lagged` for a client that does not read, error frames, the client limit, the token, and
//! `oc-discovery journal --follow` over it.

use std::io::BufRead;
use std::process::{Command, Stdio};

use oc_testkit::*;
use serde_json::{json, Value};
use tungstenite::Message;

fn seqs(page: &Value) -> Vec<u64> {
    page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["seq"].as_u64().or(e["entry"]["seq"].as_u64()).expect("seq"))
        .collect()
}

fn journal() -> Value {
    json!({"type": "subscribe", "feed": "journal", "portion": 3})
}

async fn publish_n(site: &Site, me: &str, from: usize, n: usize, data_type: &str) {
    for i in from..from + n {
        let mut body = event("PB_CREATE", &format!("r{i}"), me, json!({}));
        body["data_type"] = json!(data_type);
        site.publish_ok(&body).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_pages_back_goes_live_pauses_resumes_and_filters() {
    init_tracing();
    let mut a = Site::new().await;
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    publish_n(&a, &me, 1, 7, "COMPUTE_RESOURCE").await;

    // The newest portion, then older pages down to the oldest entry.
    let mut feed = FeedClient::connect(&a.node).await.unwrap();
    let first = feed.subscribe(journal()).await.unwrap();
    assert_eq!(seqs(&first), vec![7, 6, 5]);
    assert_eq!(
        (first["oldest_reached"].clone(), first["before"].clone()),
        (json!(false), json!(5))
    );
    feed.send(&json!({"type": "older", "before": 5})).await.unwrap();
    let second = feed.expect("page").await.unwrap();
    assert_eq!(seqs(&second), vec![4, 3, 2]);
    feed.send(&json!({"type": "older", "before": 2})).await.unwrap();
    let last = feed.expect("page").await.unwrap();
    assert_eq!(seqs(&last), vec![1]);
    assert_eq!(last["oldest_reached"], true);

    // A live entry, in the shape of GET /api/journal's entries.
    publish_n(&a, &me, 8, 1, "COMPUTE_RESOURCE").await;
    let live = feed.expect("live").await.unwrap();
    let newest = a.node.get_json("/api/journal?limit=1").await.unwrap();
    assert_eq!(live["entry"], newest["entries"][0]);
    assert_eq!(live["entry"]["seq"], 8);

    // Paused: entry 9 is not sent; resume answers the newest portion (9 first), then live.
    feed.send(&json!({"type": "pause"})).await.unwrap();
    publish_n(&a, &me, 9, 1, "COMPUTE_RESOURCE").await;
    eventually("entry 9 journaled", async || {
        a.node
            .get_json("/api/node")
            .await
            .ok()
            .map(|n| n["journal_head"].clone())
            == Some(json!(9))
    })
    .await;
    feed.send(&json!({"type": "resume"})).await.unwrap();
    let resumed = feed.expect("page").await.unwrap();
    assert_eq!(
        seqs(&resumed),
        vec![9, 8, 7],
        "the first message after resume is the page"
    );
    publish_n(&a, &me, 10, 1, "COMPUTE_RESOURCE").await;
    assert_eq!(feed.expect("live").await.unwrap()["entry"]["seq"], 10);

    // A filter: pages and live entries of that data type only.
    publish_n(&a, &me, 11, 2, "STORAGE_RESOURCE").await;
    let mut storage = FeedClient::connect(&a.node).await.unwrap();
    let page = storage
        .subscribe(
            json!({"type": "subscribe", "feed": "journal", "portion": 10, "data_type": "STORAGE_RESOURCE"}),
        )
        .await
        .unwrap();
    assert_eq!(seqs(&page), vec![12, 11]);
    assert_eq!(page["oldest_reached"], true);
    publish_n(&a, &me, 13, 1, "COMPUTE_RESOURCE").await;
    publish_n(&a, &me, 14, 1, "STORAGE_RESOURCE").await;
    let live = storage.expect("live").await.unwrap();
    assert_eq!(
        live["entry"]["seq"], 14,
        "entry 13 (another data type) is not sent: {live}"
    );
    // The unfiltered client saw 11 to 14 in order.
    for seq in 11..=14 {
        assert_eq!(feed.expect("live").await.unwrap()["entry"]["seq"], seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_error_frames_and_the_connection_goes_on() {
    init_tracing();
    let mut a = Site::new().await;
    a.node.extra_args = vec!["--feed-max-clients".into(), "2".into()];
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    publish_n(&a, &me, 1, 2, "COMPUTE_RESOURCE").await;
    let mut feed = FeedClient::connect(&a.node).await.unwrap();
    let code = |m: Value| m["code"].as_str().unwrap_or_default().to_owned();

    feed.send_raw(Message::text("{nope")).await.unwrap();
    assert_eq!(code(feed.expect("error").await.unwrap()), "invalid_json");
    feed.send(&json!({"type": "older", "before": 1})).await.unwrap();
    let e = feed.expect("error").await.unwrap();
    assert_eq!(code(e.clone()), "invalid_field");
    assert!(e["message"].as_str().unwrap().contains("subscribe"), "{e}");
    feed.send(&json!({"type": "subscribe", "feed": "journal", "portion": 5000}))
        .await
        .unwrap();
    assert_eq!(code(feed.expect("error").await.unwrap()), "invalid_field");
    feed.send(&json!({"type": "subscribe", "feed": "gossip"}))
        .await
        .unwrap();
    assert_eq!(code(feed.expect("error").await.unwrap()), "invalid_field");
    feed.send_raw(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(code(feed.expect("error").await.unwrap()), "invalid_json");
    // Still usable.
    let page = feed.subscribe(journal()).await.unwrap();
    assert_eq!(seqs(&page), vec![2, 1]);

    // An entry larger than a frame goes out in continuation frames, live and in a page.
    let filler = "z".repeat(300 * 1024);
    a.publish_ok(&event("PB_CREATE", "big", &me, json!({"filler": filler})))
        .await;
    let live = feed.expect("live").await.unwrap();
    assert_eq!(
        live["entry"]["resource"]["filler"].as_str().map(str::len),
        Some(filler.len())
    );
    let page = feed.subscribe(journal()).await.unwrap();
    assert_eq!(seqs(&page), vec![3, 2, 1]);
    assert_eq!(page["entries"][0], live["entry"]);

    // Too many clients: the third is told `busy`; a place freed is taken again.
    let mut second = FeedClient::connect(&a.node).await.unwrap();
    second.subscribe(journal()).await.unwrap();
    let mut third = FeedClient::connect(&a.node).await.unwrap();
    assert_eq!(code(third.expect("error").await.unwrap()), "busy");
    assert!(third.recv().await.is_err(), "then closed");
    drop(second);
    eventually("a place is free again", async || {
        match FeedClient::connect(&a.node).await {
            Ok(mut c) => c.subscribe(journal()).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;

    // A message over the size limit: payload_too_large, then the connection closes.
    feed.send_raw(Message::text("x".repeat(64 * 1024))).await.unwrap();
    assert_eq!(code(feed.expect("error").await.unwrap()), "payload_too_large");
    assert!(feed.recv().await.is_err());
    assert!(
        a.node
            .metric("oc_refusals_total{place=\"admin_feed\",code=\"busy\"}")
            .await
            .unwrap()
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_gets_lagged_and_nobody_else_waits() {
    init_tracing();
    let mut a = Site::new().await;
    // A small ring, so that a few megabytes overflow it past the sockets' buffers.
    a.node.extra_args = vec!["--feed-ring-bytes".into(), "65536".into()];
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    let mut slow = FeedClient::connect(&a.node).await.unwrap();
    assert!(seqs(&slow.subscribe(journal()).await.unwrap()).is_empty());
    let mut reader = FeedClient::connect(&a.node).await.unwrap();
    reader.subscribe(journal()).await.unwrap();
    let rss_before = a.node.rss_bytes().expect("rss");

    // 800 events of 16 KiB: about 13 MB, which the slow client never reads meanwhile.
    const N: u64 = 800;
    let read_to = tokio::spawn(async move {
        let mut newest_seen = 0;
        while newest_seen < N {
            let m = reader.recv().await.unwrap();
            if m["type"] == "live" {
                newest_seen = m["entry"]["seq"].as_u64().unwrap();
            }
        }
        newest_seen
    });
    let filler = "f".repeat(16 * 1024);
    for i in 0..N {
        let body = event("PB_CREATE", &format!("big{i}"), &me, json!({"filler": filler}));
        a.publish_ok(&body).await;
    }
    // Another client, reading all along, is served to the last entry.
    assert_eq!(read_to.await.unwrap(), N);
    let (status, _) = a.node.get("/api/journal?limit=1").await.unwrap();
    assert_eq!(status, 200);

    // The slow client: every entry is either received or counted as skipped, and some were.
    let (mut received, mut skipped, mut last) = (0u64, 0u64, 0u64);
    while last < N {
        let m = slow.recv().await.unwrap();
        match m["type"].as_str() {
            Some("live") => {
                let seq = m["entry"]["seq"].as_u64().unwrap();
                assert!(seq > last, "in order");
                received += 1;
                last = seq;
            }
            Some("lagged") => skipped += m["skipped"].as_u64().unwrap(),
            other => panic!("unexpected {other:?}: {m}"),
        }
    }
    assert!(skipped > 0, "the slow client lagged");
    assert_eq!(received + skipped, N, "each entry sent or counted");
    assert!(a.node.metric("oc_feed_lagged_total").await.unwrap() >= skipped);
    // Memory: the node did not keep what the slow client did not take (13 MB published; the
    // store's own cache grows with the journal, hence the allowance).
    let rss_after = a.node.rss_bytes().expect("rss");
    eprintln!("feed lagged: {received} received, {skipped} skipped of {N}; node RSS {rss_before} -> {rss_after} bytes");
    assert!(
        rss_after < rss_before + 128 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_needs_the_token_like_every_route() {
    init_tracing();
    let mut a = Site::new().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "feed-s3cret-token").unwrap();
    a.node.extra_args = vec!["--admin-token-file".into(), token_file.display().to_string()];
    a.node.admin_token = Some("feed-s3cret-token".into());
    a.node.start_healthy().await.unwrap();
    let mut with = FeedClient::connect(&a.node).await.unwrap();
    with.subscribe(journal()).await.unwrap();
    a.node.admin_token = None;
    let refused = FeedClient::connect(&a.node)
        .await
        .err()
        .expect("refused without a token");
    assert!(refused.to_string().contains("401"), "{refused}");
    // A browser page of another origin (its Origin header) is refused, with or without token.
    a.node.admin_token = Some("feed-s3cret-token".into());
    let url = format!("ws://127.0.0.1:{}/api/feed", a.node.admin_port);
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
    request
        .headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    request
        .headers_mut()
        .insert("Authorization", "Bearer feed-s3cret-token".parse().unwrap());
    match tungstenite::connect(request) {
        Err(tungstenite::Error::Http(answer)) => {
            assert_eq!(answer.status(), 403);
            let body = String::from_utf8_lossy(answer.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("forbidden_origin"), "{body}");
        }
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    a.node.admin_token = Some("wrong".into());
    let refused = FeedClient::connect(&a.node)
        .await
        .err()
        .expect("refused with a wrong token");
    assert!(refused.to_string().contains("refused the token"), "{refused}");
}

/// `oc-discovery journal --follow ...` with stdout read line by line on a thread.
struct Follow {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follow {
    fn start(site: &Site, args: &[&str]) -> Follow {
        let mut child = Command::new(node_binary().unwrap())
            .args(["journal", "--follow"])
            .args(args)
            .args(["--admin", &site.node.admin_url()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run oc-discovery journal --follow");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follow { child, lines }
    }

    async fn line(&self) -> String {
        for _ in 0..300 {
            match self.lines.try_recv() {
                Ok(l) => return l,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => panic!("journal --follow ended: {e}"),
            }
        }
        panic!("no line from journal --follow within 30 s");
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_follow_prints_the_page_then_entries_as_they_come() {
    init_tracing();
    let mut a = Site::new().await;
    let mut b = Site::new().await;
    partner(&mut a, &mut [&mut b]);
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();
    publish_n(&a, &me, 1, 3, "COMPUTE_RESOURCE").await;

    // JSON lines, oldest first: the newest 2, then each new entry.
    let follow = Follow::start(&a, &["--json", "--limit", "2"]);
    let first: Value = serde_json::from_str(&follow.line().await).unwrap();
    let second: Value = serde_json::from_str(&follow.line().await).unwrap();
    assert_eq!(
        (first["seq"].clone(), second["seq"].clone()),
        (json!(2), json!(3))
    );
    publish_n(&a, &me, 4, 1, "COMPUTE_RESOURCE").await;
    let live: Value = serde_json::from_str(&follow.line().await).unwrap();
    assert_eq!(
        (live["seq"].clone(), live["origin"].clone()),
        (json!(4), json!(me))
    );

    // The applied side on the partner, as a table: the header, then A's entries as B applies them.
    let applied = Follow::start(&b, &["--applied", "--origin", &me, "--limit", "1"]);
    let header = applied.line().await;
    assert!(header.contains("KEY") && header.contains("ORIGIN"), "{header}");
    let mut seen = Vec::new();
    publish_n(&a, &me, 5, 1, "COMPUTE_RESOURCE").await;
    while !seen.iter().any(|l: &String| l.contains("r5")) {
        seen.push(applied.line().await);
    }
    let row = seen.last().unwrap();
    assert!(row.contains(&me) && row.contains("PB_CREATE"), "{row}");
}
