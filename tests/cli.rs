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
        "--admin-token-file",
        "--admin-tls-cert",
        "--admin-tls-key",
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
    // A node that is not there: a clear error, not a panic, and exit 3.
    let out = Command::new(node_binary().unwrap())
        .args(["peers", "--admin", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("connecting to"), "{err}");
}

/// (exit code, stdout, stderr) of the CLI with extra environment variables.
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(node_binary().unwrap())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run oc-discovery");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_and_partners_send_the_token_and_a_refused_one_exits_3() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "right-token\n").unwrap();
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "wrong-token").unwrap();
    let (token, wrong) = (token.display().to_string(), wrong.display().to_string());
    let mut site = Site::new().await;
    site.node
        .extra_args
        .extend(["--admin-token-file".into(), token.clone()]);
    site.node.start_healthy().await.unwrap();
    let admin = site.node.admin_url();
    let peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let addr = format!("/ip4/127.0.0.1/tcp/9/p2p/{peer}");

    let (admin2, token2, wrong2) = (admin.clone(), token.clone(), wrong.clone());
    let results = tokio::task::spawn_blocking(move || {
        let a = admin2.as_str();
        [
            // No token at all, a wrong one (flag, then environment), for each command.
            run_with_env(&["peers", "--admin", a], &[]),
            run_with_env(&["peers", "--admin", a, "--admin-token-file", &wrong2], &[]),
            run_with_env(
                &["partners", "list", "--admin", a],
                &[("OC_DISCOVERY_ADMIN_TOKEN_FILE", &wrong2)],
            ),
            run_with_env(
                &[
                    "partners",
                    "--admin",
                    a,
                    "--admin-token-file",
                    &wrong2,
                    "add",
                    &addr,
                ],
                &[],
            ),
            // The right one.
            run_with_env(
                &[
                    "partners",
                    "add",
                    &addr,
                    "--relation",
                    "blacklist",
                    "--admin",
                    a,
                    "--admin-token-file",
                    &token2,
                ],
                &[],
            ),
            run_with_env(
                &["partners", "list", "--admin", a],
                &[("OC_DISCOVERY_ADMIN_TOKEN_FILE", &token2)],
            ),
            run_with_env(&["peers", "--admin", a, "--admin-token-file", &token2], &[]),
        ]
    })
    .await
    .unwrap();
    let (refused, accepted) = results.split_at(4);
    for (i, (code, _, err)) in refused.iter().enumerate() {
        assert_eq!(*code, Some(3), "refused #{i}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("401 unauthorized"), "{err}");
    }
    assert!(
        refused[0].2.contains("--admin-token-file"),
        "says what is missing: {}",
        refused[0].2
    );
    assert!(refused[1].2.contains("refused the token"), "{}", refused[1].2);
    for (i, (code, out, err)) in accepted.iter().enumerate() {
        assert_eq!(*code, Some(0), "accepted #{i}: {err}");
        assert!(!out.is_empty(), "accepted #{i} printed nothing");
    }
    assert!(
        accepted[1].1.contains(&peer.to_string()),
        "listed: {}",
        accepted[1].1
    );
    assert!(accepted[2].1.starts_with("PEER ID"), "{}", accepted[2].1);
}
