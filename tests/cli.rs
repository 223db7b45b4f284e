//! The command line as operators use it.

use oc_testkit::{init_tracing, node_binary, partner, Site};
use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(node_binary().unwrap())
        .args(args)
        .output()
        .expect("run oc-discovery");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn id_prints_a_stable_peer_id_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, first, _) = run(&["id", "--data-dir", d]);
    assert!(ok);
    let (_, second, _) = run(&["id", "--data-dir", d]);
    assert_eq!(first, second);
    let id = first.trim();
    assert!(id.starts_with("12D3KooW"), "{id}");
    assert_eq!(first, format!("{id}\n"), "the peer id alone on stdout");
    assert!(dir.path().join("identity.key").exists());
    // The environment names the same directory.
    let out = Command::new(node_binary().unwrap())
        .arg("id")
        .env("OC_DISCOVERY_DATA_DIR", d)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), first);
}

#[test]
fn run_help_explains_every_flag() {
    let (ok, help, _) = run(&["run", "--help"]);
    assert!(ok);
    for flag in [
        "--config",
        "--data-dir",
        "--nats-url",
        "--listen",
        "--admin-listen",
        "--partner",
        "--psk-file",
        "--max-event-bytes",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(help.contains("OC_DISCOVERY_NATS_URL"));
}

#[test]
fn bad_options_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = run(&["run", "--data-dir", d, "--partner", "/ip4/127.0.0.1/tcp/4001"]);
    assert!(!ok);
    assert!(err.contains("/p2p/<peer id>"), "{err}");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "nats_urll = 'x'\n").unwrap();
    let (ok, _, err) = run(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("nats_urll"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_shows_partners_as_a_table_and_as_json() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    a.node.start_healthy().await.unwrap();
    let admin = a.node.admin_url();
    let b_id = b.id();
    let (ok, table, err) = tokio::task::spawn_blocking(move || run(&["peers", "--admin", &admin]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(table.starts_with("PEER ID"), "{table}");
    assert!(table.contains(&b_id), "{table}");
    let admin = a.node.admin_url();
    let (ok, json, _) = tokio::task::spawn_blocking(move || run(&["peers", "--admin", &admin, "--json"]))
        .await
        .unwrap();
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let p = &v[0];
    assert_eq!(p["peer_id"], b_id.as_str());
    for field in ["addrs", "connected", "acked_seq", "pending", "state"] {
        assert!(p.get(field).is_some(), "{field} missing in {p}");
    }
    // A node that is not there: a clear error, not a panic.
    let (ok, _, err) = run(&["peers", "--admin", "http://127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("connecting to"), "{err}");
}
