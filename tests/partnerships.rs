//! Partnerships made at run time, the blacklist, and the private network key.

use std::process::Command;
use std::time::Duration;

use oc_testkit::{event, eventually, init_tracing, node_binary, partner, Site};
use serde_json::{json, Value};

async fn announce(site: &Site, subject: &str, resource: Value) {
    let body = json!({"data_type": "PEER", "user": "admin", "from_app": "oc-peers", "resource": resource});
    site.app
        .publish(subject.to_owned(), body.to_string().into())
        .await
        .unwrap();
    site.app.flush().await.unwrap();
}

async fn partner_ids(site: &Site) -> Vec<String> {
    let list = site.node.get_json("/api/partners").await.unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|p| p["relation"] == "partner")
        .map(|p| p["peer_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_made_over_nats_persist_and_end_with_remove_resource() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    announce(&a, "CREATE_RESOURCE", json!({"peer_id": b.id(), "relation": "PARTNER", "address": format!("/ip4/127.0.0.1/tcp/{}", b.node.p2p_port)})).await;
    announce(
        &b,
        "CREATE_RESOURCE",
        json!({"peer_id": a.id(), "relation": "partner", "address": a.node.addr()}),
    )
    .await;
    eventually("A lists B as partner", || async {
        partner_ids(&a).await.contains(&b.id())
    })
    .await;
    eventually("B lists A as partner", || async {
        partner_ids(&b).await.contains(&a.id())
    })
    .await;

    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "r1", &me, json!({}))).await;
    seen_b
        .wait_for("r1 on B", |s| s.iter().any(|m| m.body["resource"]["id"] == "r1"))
        .await;

    // A PEER resource propagated by a partner is the node's own publish on B: ignored.
    let stranger = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    a.publish_ok(&json!({"action": "PB_CREATE", "data_type": "PEER", "payload": {
        "id": stranger, "creator_id": me, "peer_id": stranger, "relation": "partner", "address": "/ip4/127.0.0.1/tcp/9"}}))
        .await;
    seen_b
        .wait_for("the PEER resource on B", |s| {
            s.iter().any(|m| m.body["data_type"] == "PEER")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !partner_ids(&b).await.contains(&stranger),
        "own publish must not make partners"
    );

    // Persisted: a restarted A still replicates to B.
    a.node.stop();
    a.node.start_healthy().await.unwrap();
    assert!(partner_ids(&a).await.contains(&b.id()));
    a.publish_ok(&event("PB_CREATE", "r2", &me, json!({}))).await;
    seen_b
        .wait_for("r2 on B", |s| s.iter().any(|m| m.body["resource"]["id"] == "r2"))
        .await;

    // REMOVE_RESOURCE of the PEER ends it.
    announce(&a, "REMOVE_RESOURCE", json!({"peer_id": b.id()})).await;
    eventually("B no longer a partner of A", || async {
        !partner_ids(&a).await.contains(&b.id())
    })
    .await;
    let peers = a.node.get_json("/api/peers").await.unwrap();
    assert!(peers.as_array().unwrap().is_empty(), "{peers}");
    let seq = a.publish_ok(&event("PB_CREATE", "r3", &me, json!({}))).await;
    assert_eq!(seq, 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !seen_b.all().iter().any(|m| m.body["resource"]["id"] == "r3"),
        "no longer replicated"
    );

    // A PEER resource without what it needs gets an error event.
    let errors = a.collect(&["PROPALGATION_ERROR"]).await;
    announce(
        &a,
        "CREATE_RESOURCE",
        json!({"peer_id": b.id(), "relation": "partner"}),
    )
    .await;
    errors
        .wait_for("missing address refused", |s| !s.is_empty())
        .await;
    assert_eq!(errors.all()[0].body["error"]["code"], "missing_field");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_partners_and_the_blacklist_refuses_a_peer() {
    init_tracing();
    let (mut a, mut b, mut c) = (Site::new().await, Site::new().await, Site::new().await);
    // C insists on replicating to B; B blacklists C.
    c.node.partners.push(b.node.addr());
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    for s in [&mut a, &mut b] {
        s.node.start_healthy().await.unwrap();
    }
    let cli = |args: Vec<String>| {
        let out = Command::new(node_binary().unwrap()).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let b_admin = b.node.admin_url();
    let (ba, ca, aa) = (b_admin.clone(), c.node.addr(), a.node.addr());
    tokio::task::spawn_blocking(move || {
        cli(vec![
            "partners".into(),
            "add".into(),
            ca,
            "--relation".into(),
            "blacklist".into(),
            "--admin".into(),
            ba.clone(),
        ]);
        cli(vec![
            "partners".into(),
            "add".into(),
            aa,
            "--admin".into(),
            ba.clone(),
        ]);
        let table = cli(vec!["partners".into(), "list".into(), "--admin".into(), ba]);
        assert!(
            table.contains("blacklist") && table.contains("partner"),
            "{table}"
        );
    })
    .await
    .unwrap();
    c.node.start_healthy().await.unwrap();
    let me = c.id();
    c.publish_ok(&event("PB_CREATE", "from-c", &me, json!({}))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peers = c.node.get_json("/api/peers").await.unwrap();
    assert_ne!(peers[0]["state"], "online", "{peers}");
    assert_eq!(peers[0]["pending"], 1);
    assert!(seen_b.all().is_empty());
    assert!(b.node.log().contains("peer blacklisted"));

    // Lifting it: C's events arrive (B also needs C as a partner to accept them).
    let (ba, ca) = (b_admin.clone(), c.node.addr());
    tokio::task::spawn_blocking(move || cli(vec!["partners".into(), "add".into(), ca, "--admin".into(), ba]))
        .await
        .unwrap();
    seen_b
        .wait_for("C's event after the blacklist was lifted", |s| !s.is_empty())
        .await;
    let c_id = c.id();
    let ba = b_admin.clone();
    tokio::task::spawn_blocking(move || {
        cli(vec![
            "partners".into(),
            "remove".into(),
            c_id,
            "--admin".into(),
            ba,
        ])
    })
    .await
    .unwrap();
    eventually("C removed", || async { !partner_ids(&b).await.contains(&c.id()) }).await;
}

fn write_psk(dir: &std::path::Path, name: &str, byte: u8) -> String {
    let path = dir.join(name);
    let hex: String = std::iter::repeat_n(format!("{byte:02x}"), 32).collect();
    std::fs::write(&path, format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_network_key_cannot_connect() {
    init_tracing();
    let keys = tempfile::tempdir().unwrap();
    let (good, bad) = (
        write_psk(keys.path(), "good.key", 0x11),
        write_psk(keys.path(), "bad.key", 0x22),
    );
    let (mut a, mut b, mut c) = (Site::new().await, Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b, &mut c]);
    a.node.extra_args = vec!["--psk-file".into(), good.clone()];
    b.node.extra_args = vec!["--psk-file".into(), good];
    c.node.extra_args = vec!["--psk-file".into(), bad];
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    for s in [&mut a, &mut b, &mut c] {
        s.node.start_healthy().await.unwrap();
    }
    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "r1", &me, json!({}))).await;
    seen_b.wait_for("same key: delivered", |s| !s.is_empty()).await;
    let started = std::time::Instant::now();
    eventually("the wrong key refused and logged", || async {
        c.node.log().contains("inbound connection refused")
            || a.node.log().contains("inbound connection refused")
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(25));
    let peers = a.node.get_json("/api/peers").await.unwrap();
    let to_c = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == c.id().as_str())
        .unwrap()
        .clone();
    assert_ne!(to_c["state"], "online", "{to_c}");
    assert_eq!(to_c["pending"], 1);
}
