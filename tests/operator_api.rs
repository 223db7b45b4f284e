//! The operator's admin API end to end, against real nodes and nats-servers: journal and
//! applied pages, status, `POST /api/events`, `POST /api/search`, and the CLI over them.

use std::process::Command;

use oc_testkit::*;
use serde_json::{json, Value};

async fn get(site: &Site, path: &str) -> (u16, Value) {
    let (status, body) = site.node.get(path).await.expect("admin API");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn post(site: &Site, path: &str, body: &str) -> (u16, Value) {
    let (status, body) = site
        .node
        .request("POST", path, Some(body))
        .await
        .expect("admin API");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn seqs(page: &Value) -> Vec<u64> {
    page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["seq"].as_u64().or(e["entry"]["seq"].as_u64()).expect("seq"))
        .collect()
}

fn error_code(answer: &Value) -> &str {
    assert_eq!(answer["ok"], false, "{answer}");
    answer["error"]["code"].as_str().unwrap_or_default()
}

/// `oc-discovery <args> --admin <site>`: (exit code, stdout, stderr).
fn cli(site: &Site, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(node_binary().unwrap())
        .args(args)
        .args(["--admin", &site.node.admin_url()])
        .output()
        .expect("run oc-discovery");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_pages_back_to_its_oldest_entry_and_filters_by_data_type() {
    init_tracing();
    let mut a = Site::new().await;
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    for i in 0..5 {
        let mut body = event("PB_CREATE", &format!("r{i}"), &me, json!({}));
        if i % 2 == 1 {
            body["data_type"] = json!("STORAGE_RESOURCE");
        }
        a.publish_ok(&body).await;
    }
    let (status, first) = get(&a, "/api/journal?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(seqs(&first), vec![5, 4]);
    assert_eq!(
        (first["oldest_reached"].clone(), first["before"].clone()),
        (json!(false), json!(4))
    );
    let (_, second) = get(&a, "/api/journal?limit=2&before=4").await;
    assert_eq!(seqs(&second), vec![3, 2]);
    let (_, last) = get(&a, "/api/journal?limit=2&before=2").await;
    assert_eq!(seqs(&last), vec![1]);
    assert_eq!(last["oldest_reached"], true);
    assert!(last.get("before").is_none(), "{last}");
    let (_, storage) = get(&a, "/api/journal?data_type=STORAGE_RESOURCE").await;
    assert_eq!(seqs(&storage), vec![4, 2]);
    assert_eq!(storage["oldest_reached"], true);
    assert_eq!(storage["entries"][0]["origin"], me.as_str());

    for bad in ["limit=0", "limit=1001", "limit=abc", "before=0", "before=-1"] {
        let (status, answer) = get(&a, &format!("/api/journal?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(error_code(&answer), "invalid_field", "{bad}");
    }
    let (status, answer) = get(&a, "/api/no-such-route").await;
    assert_eq!((status, error_code(&answer)), (404, "not_found"));

    // The CLI over the same pages.
    let (code, table, err) = cli(&a, &["journal", "--limit", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("SEQ") && table.contains("--before 4"), "{table}");
    let (code, json_out, _) = cli(&a, &["journal", "--json", "--before", "2"]);
    assert_eq!(code, 0);
    let page: Value = serde_json::from_str(&json_out).expect("JSON");
    assert_eq!(seqs(&page), vec![1]);
    let (code, _, err) = cli(&a, &["journal", "--limit", "0"]);
    assert_eq!(code, 1, "the node refuses: {err}");
    assert!(err.contains("invalid_field"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_entries_page_by_apply_order_with_filters_and_status_shows_the_partner() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let origin = a.id();
    for i in 0..4 {
        let mut body = event("PB_CREATE", &format!("p{i}"), &origin, json!({}));
        if i == 2 {
            body["data_type"] = json!("STORAGE_RESOURCE");
        }
        a.publish_ok(&body).await;
    }
    let page = wait_for(&b, "/api/applied", |p| {
        p["entries"].as_array().map_or(0, Vec::len) == 4
    })
    .await;
    // Newest first, by local apply order.
    assert_eq!(seqs(&page), vec![4, 3, 2, 1]);
    assert_eq!(page["oldest_reached"], true);
    let keys: Vec<u64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_u64().unwrap())
        .collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "{keys:?}");
    assert!(page["entries"][0]["applied_ms"].as_u64().is_some());

    let (_, first) = get(&b, "/api/applied?limit=1&data_type=COMPUTE_RESOURCE").await;
    assert_eq!(seqs(&first), vec![4]);
    assert_eq!(first["oldest_reached"], false);
    let before = first["before"].as_u64().expect("a cursor");
    let (_, rest) = get(
        &b,
        &format!("/api/applied?before={before}&data_type=COMPUTE_RESOURCE&origin={origin}"),
    )
    .await;
    assert_eq!(seqs(&rest), vec![2, 1]);
    assert_eq!(rest["oldest_reached"], true);
    let (_, none) = get(&b, "/api/applied?origin=12D3KooWNobody").await;
    assert_eq!(seqs(&none), Vec::<u64>::new());
    assert_eq!(none["oldest_reached"], true);
    let (code, table, err) = cli(&b, &["journal", "--applied", "--data-type", "STORAGE_RESOURCE"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("KEY") && table.contains("p2"), "{table}");

    // Status of the sender: the partner online, everything acknowledged.
    let status = wait_for(&a, "/api/status", |s| {
        s["partners"][0]["state"] == "online" && s["partners"][0]["acked_seq"] == 4
    })
    .await;
    assert_eq!(status["peer_id"], origin.as_str());
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_s"].is_u64());
    assert_eq!(status["intake"]["mode"], "core");
    assert_eq!(
        status["store"],
        json!({"kind": "embedded", "healthy": true, "error": null})
    );
    assert_eq!(status["nats"]["state"], "connected");
    assert_eq!(status["journal_head"], 4);
    let p = &status["partners"][0];
    assert_eq!(p["peer_id"], b.id().as_str());
    assert_eq!(
        (p["pending"].clone(), p["lag"]["seq"].clone()),
        (json!(0), json!(0))
    );
    assert!(p["lag"]["oldest_unacked_age_ms"].is_null());
    assert!(p.get("rtt_ms").is_some() && p.get("last_error").is_some(), "{p}");
    let (code, table, err) = cli(&a, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains(&b.id()) && table.contains("online"), "{table}");
}

/// GETs `path` until its answer meets `check`, within [`WAIT`].
async fn wait_for(site: &Site, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, answer) = get(site, path).await;
        if check(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} not as expected within {WAIT:?}: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_events_journals_like_the_intake_and_answers_each_refusal() {
    init_tracing();
    let mut a = Site::new().await;
    a.node
        .extra_args
        .extend(["--max-event-bytes".to_owned(), "4096".to_owned()]);
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    let body = event("PB_CREATE", "h1", &me, json!({"name": "by http"}));
    let (status, answer) = post(&a, "/api/events", &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"ok": true, "origin": me, "seq": 1}));
    let (_, page) = get(&a, "/api/journal").await;
    assert_eq!(page["entries"][0]["resource"]["name"], "by http");

    let (status, answer) = post(&a, "/api/events", "{not json").await;
    assert_eq!((status, error_code(&answer)), (400, "invalid_json"));
    let (status, answer) = post(
        &a,
        "/api/events",
        &json!({"action": "PB_CREATE", "payload": {}}).to_string(),
    )
    .await;
    assert_eq!((status, error_code(&answer)), (400, "missing_field"));
    let big = event("PB_CREATE", "big", &me, json!({"blob": "x".repeat(8192)}));
    let (status, answer) = post(&a, "/api/events", &big.to_string()).await;
    assert_eq!((status, error_code(&answer)), (413, "payload_too_large"));
    let foreign = event("PB_CREATE", "f1", "12D3KooWSomeoneElse", json!({}));
    let (status, answer) = post(&a, "/api/events", &foreign.to_string()).await;
    assert_eq!((status, error_code(&answer)), (403, "not_creator"));
    // Nothing refused was journaled.
    assert_eq!(seqs(&get(&a, "/api/journal").await.1), vec![1]);

    // The CLI: a payload from a file, and a refusal's code on exit 1.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.json");
    std::fs::write(&file, json!({"id": "c1", "creator_id": me}).to_string()).unwrap();
    let (code, out, err) = cli(
        &a,
        &[
            "publish",
            "PB_CREATE",
            "COMPUTE_RESOURCE",
            "--payload",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("seq 2"), "{out}");
    std::fs::write(
        &file,
        json!({"id": "c2", "creator_id": "12D3KooWSomeoneElse"}).to_string(),
    )
    .unwrap();
    let (code, _, err) = cli(
        &a,
        &[
            "publish",
            "PB_CREATE",
            "COMPUTE_RESOURCE",
            "--payload",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not_creator"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_search_streams_search_events_until_the_final_one() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let mut offer = event(
        "PB_CREATE",
        "gpu-1",
        &b.id(),
        json!({"name": "GPU box", "access": "public"}),
    );
    offer["data_type"] = json!("COMPUTE_RESOURCE");
    b.publish_ok(&offer).await;
    let search = json!({"action": "PB_SEARCH", "data_type": "COMPUTE_RESOURCE",
        "payload": {"type": "partner", "search": "gpu", "timeout_ms": 20_000}});
    let (status, body) = a
        .node
        .request("POST", "/api/search", Some(&search.to_string()))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let last = lines.last().expect("a final line");
    assert_eq!(last["done"], true, "{body}");
    assert!(lines.iter().all(|l| l["query_id"] == last["query_id"]), "{body}");
    let ids: Vec<&str> = lines
        .iter()
        .flat_map(|l| l["results"].as_array().into_iter().flatten())
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["gpu-1"], "{body}");
    let refused = json!({"action": "PB_SEARCH", "data_type": "COMPUTE_RESOURCE", "payload": {"type": "all"}});
    let (status, answer) = post(&a, "/api/search", &refused.to_string()).await;
    assert_eq!((status, error_code(&answer)), (400, "missing_field"));

    let (code, out, err) = cli(
        &a,
        &[
            "search",
            "COMPUTE_RESOURCE",
            "gpu",
            "--scope",
            "partner",
            "--timeout",
            "20s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gpu-1"), "{out}");
    let (code, out, _) = cli(&a, &["resources", "list", "COMPUTE_RESOURCE", "--json"]);
    assert_eq!(code, 0);
    assert!(out.starts_with('['), "{out}");
}

#[test]
fn cli_exit_codes_say_usage_unreachable_and_completions_print() {
    let run = |args: &[&str]| {
        let out = Command::new(node_binary().unwrap())
            .args(args)
            .output()
            .expect("run");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(run(&["journal", "--limit", "many"]).0, 2, "usage");
    assert_eq!(run(&["search", "COMPUTE_RESOURCE"]).0, 2, "usage");
    let port = oc_testkit::free_port().unwrap();
    let down = format!("http://127.0.0.1:{port}");
    assert_eq!(run(&["status", "--admin", &down]).0, 3, "unreachable");
    assert_eq!(run(&["journal", "--admin", &down]).0, 3, "unreachable");
    for shell in ["bash", "zsh", "fish"] {
        let (code, script) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}");
        assert!(
            script.contains("journal") && script.contains("oc-discovery"),
            "{shell}"
        );
    }
}
