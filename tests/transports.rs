//! Transports beside TCP and partners that cannot be dialled (issue 16, parts 1-3), with
//! real node processes: partnerships over `/ws` (inside the PSK) and `/wss` (a certificate
//! made here); TLS flags refused at start; a partner that listens nowhere and only dials
//! out, exchanging events and considers both ways and catching up after a cut and after a
//! restart, on TCP and on ws; two nodes that listen only through a relay propagating
//! through it (and again after the relay restarted), and a peer the relay does not allow
//! refused; a WebSocket frame above the cap refused while partners go on.

use std::path::{Path, PathBuf};
use std::process::Command;

use oc_testkit::{eventually, exchange, init_tracing, node_binary, Relay, Site};
use serde_json::{json, Value};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn write_psk(dir: &Path, name: &str, byte: u8) -> String {
    let hex: String = std::iter::repeat_n(format!("{byte:02x}"), 32).collect();
    let path = write(dir, name, &format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n"));
    path.to_str().unwrap().to_owned()
}

/// A site listening on `/ws` (or `/wss`) only, on its p2p port.
async fn ws_site(scheme: &str, host: &str) -> Site {
    let mut site = Site::new().await;
    site.node.listen = vec![format!("/{host}/tcp/{}/{scheme}", site.node.p2p_port)];
    site
}

/// How `site` reaches `other` over `scheme` (`ws` or `wss`), named by `host`.
fn ws_addr(other: &Site, scheme: &str, host: &str) -> String {
    format!("/{host}/tcp/{}/{scheme}/p2p/{}", other.node.p2p_port, other.id())
}

/// The `/api/peers` row of `peer` on `site`.
async fn peer_row(site: &Site, peer: &str) -> Value {
    let peers = site.node.get_json("/api/peers").await.unwrap();
    peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == peer)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn wait_online(site: &Site, peer: &str) {
    eventually("the partner online", || async {
        peer_row(site, peer).await["state"] == "online"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_over_websocket_inside_the_private_network() {
    init_tracing();
    let keys = tempfile::tempdir().unwrap();
    let (good, bad) = (
        write_psk(keys.path(), "good.key", 0x11),
        write_psk(keys.path(), "bad.key", 0x22),
    );
    let mut a = ws_site("ws", "ip4/127.0.0.1").await;
    let mut b = ws_site("ws", "ip4/127.0.0.1").await;
    let mut c = ws_site("ws", "ip4/127.0.0.1").await;
    a.node.partners = vec![
        ws_addr(&b, "ws", "ip4/127.0.0.1"),
        ws_addr(&c, "ws", "ip4/127.0.0.1"),
    ];
    b.node.partners = vec![ws_addr(&a, "ws", "ip4/127.0.0.1")];
    c.node.partners = vec![ws_addr(&a, "ws", "ip4/127.0.0.1")];
    a.node.extra_args = vec!["--psk-file".into(), good.clone()];
    b.node.extra_args = vec!["--psk-file".into(), good];
    c.node.extra_args = vec!["--psk-file".into(), bad];
    for s in [&mut a, &mut b, &mut c] {
        s.node.start_healthy().await.unwrap();
    }
    exchange(&a, &b, "ws", 5).await;
    let node = a.node.get_json("/api/node").await.unwrap();
    assert!(
        node["listen_addrs"][0].as_str().unwrap().ends_with("/ws"),
        "{node}"
    );
    assert!(
        ["public", "private", "unknown"].contains(&node["reachability"].as_str().unwrap()),
        "{node}"
    );
    // The wrong key over ws: the handshake never completes.
    eventually("the wrong key refused over ws", || async {
        a.node.log().contains("inbound connection refused")
            || c.node.log().contains("inbound connection refused")
    })
    .await;
    let to_c = peer_row(&a, &c.id()).await;
    assert_ne!(to_c["state"], "online", "{to_c}");
    assert_eq!(to_c["connected"], false, "{to_c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_over_websocket_tls_with_a_certificate_made_here() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = write(dir.path(), "cert.pem", &cert.cert.pem());
    let key_pem = write(dir.path(), "key.pem", &cert.key_pair.serialize_pem());
    let mut a = ws_site("wss", "ip4/127.0.0.1").await;
    let mut b = ws_site("wss", "ip4/127.0.0.1").await;
    a.node.partners = vec![ws_addr(&b, "wss", "dns4/localhost")];
    b.node.partners = vec![ws_addr(&a, "wss", "dns4/localhost")];
    for s in [&mut a, &mut b] {
        s.node.extra_args = [
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
            "--tls-ca",
            cert_pem.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        s.node.start_healthy().await.unwrap();
    }
    exchange(&a, &b, "wss", 5).await;
    let row = peer_row(&a, &b.id()).await;
    assert!(
        ["us", "them"].contains(&row["dialed_by"].as_str().unwrap()),
        "{row}"
    );

    // A node that does not trust the certificate (no --tls-ca) never connects: the
    // certificate is always verified.
    let mut c = Site::new().await;
    c.node.listen = Vec::new();
    c.node.partners = vec![ws_addr(&a, "wss", "dns4/localhost")];
    c.node.start_healthy().await.unwrap();
    eventually("the untrusted certificate refused", || async {
        let err = peer_row(&c, &a.id()).await["last_error"]
            .to_string()
            .to_lowercase();
        err.contains("certificate") || err.contains("issuer")
    })
    .await;
    assert_eq!(peer_row(&c, &a.id()).await["connected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transport_flags_are_refused_at_start_naming_the_flag() {
    init_tracing();
    let binary = node_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let not_pem = write(d, "cert.pem", "not a certificate\n");
    let key = rcgen::KeyPair::generate().unwrap();
    let key_pem = write(d, "key.pem", &key.serialize_pem());
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other_cert = write(d, "other.pem", &other.cert.pem());
    let data = d.join("data");
    let wss = "/ip4/127.0.0.1/tcp/1/wss";
    let cases: [(Vec<&str>, &str); 6] = [
        (vec!["--listen", wss], "--tls-cert and --tls-key"),
        (
            vec!["--listen", wss, "--tls-cert", other_cert.to_str().unwrap()],
            "--tls-cert and --tls-key go together",
        ),
        (
            vec![
                "--listen",
                wss,
                "--tls-cert",
                not_pem.to_str().unwrap(),
                "--tls-key",
                key_pem.to_str().unwrap(),
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--listen",
                wss,
                "--tls-cert",
                other_cert.to_str().unwrap(),
                "--tls-key",
                key_pem.to_str().unwrap(),
            ],
            "--tls-cert and --tls-key cannot be used together",
        ),
        (
            vec!["--listen", "/ip4/127.0.0.1/udp/1/quic-v1"],
            "QUIC is not supported",
        ),
        (
            vec!["--relay", "/ip4/127.0.0.1/tcp/1"],
            "--relay /ip4/127.0.0.1/tcp/1 must end in /p2p/",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(&binary)
            .args([
                "run",
                "--data-dir",
                data.to_str().unwrap(),
                "--nats-url",
                "nats://127.0.0.1:1",
            ])
            .args(["--admin-listen", "127.0.0.1:1"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// A considers message from `from` to `to`, seen on `to`'s NATS.
async fn considers(from: &Site, to: &Site, execution: &str) {
    let seen = to.collect(&["PROPALGATION_EVENT"]).await;
    let body = json!({"action": "PB_CONSIDERS", "data_type": "WORKFLOW_EXECUTION", "user": "alice",
                      "payload": {"peer_ids": [to.id()], "execution_id": execution}});
    let reply = from.request(&body).await;
    assert_eq!(reply["ok"], true, "{reply}");
    seen.wait_for("the considers event", |s| {
        s.iter()
            .any(|m| m.body["action"] == "PB_CONSIDERS" && m.body["payload"]["execution_id"] == execution)
    })
    .await;
}

/// B listens nowhere and reaches A through a cuttable TCP relay, over `scheme` (`tcp` or
/// `ws`): events and considers both ways, `dialed_by` on both sides, catch-up after the
/// connection is cut and after B is killed and restarted.
async fn dial_out_only(scheme: &str) {
    init_tracing();
    let mut a = Site::new().await;
    let mut b = Site::new().await;
    let suffix = if scheme == "ws" { "/ws" } else { "" };
    a.node.listen = vec![format!("/ip4/127.0.0.1/tcp/{}{suffix}", a.node.p2p_port)];
    b.node.listen = Vec::new();
    let cut = Relay::start(a.node.p2p_port).await;
    // A knows no way to B: the address it has is closed.
    a.node.partners = vec![format!("/ip4/127.0.0.1/tcp/1{suffix}/p2p/{}", b.id())];
    b.node.partners = vec![format!("/ip4/127.0.0.1/tcp/{}{suffix}/p2p/{}", cut.port, a.id())];
    for s in [&mut a, &mut b] {
        s.node.extra_args = [
            "--backoff-max",
            "1s",
            "--ping-interval",
            "1s",
            "--pong-discard-timeout",
            "4s",
        ]
        .map(String::from)
        .to_vec();
        s.node.start_healthy().await.unwrap();
    }
    let node_b = b.node.get_json("/api/node").await.unwrap();
    assert_eq!(node_b["listen_addrs"], json!([]), "{node_b}");
    exchange(&a, &b, &format!("{scheme}-1"), 3).await;
    wait_online(&a, &b.id()).await;
    assert_eq!(peer_row(&a, &b.id()).await["dialed_by"], "them");
    assert_eq!(peer_row(&b, &a.id()).await["dialed_by"], "us");
    considers(&a, &b, &format!("{scheme}-to-b")).await;
    considers(&b, &a, &format!("{scheme}-to-a")).await;

    // The connection cut: both sides keep journaling, the exchange resumes after.
    cut.cut();
    eventually("A sees B offline", || async {
        peer_row(&a, &b.id()).await["state"] != "online"
    })
    .await;
    let (me_a, me_b) = (a.id(), b.id());
    for i in 0..3 {
        a.publish_ok(&oc_testkit::event(
            "PB_CREATE",
            &format!("{scheme}-cut-a-{i}"),
            &me_a,
            json!({}),
        ))
        .await;
        b.publish_ok(&oc_testkit::event(
            "PB_CREATE",
            &format!("{scheme}-cut-b-{i}"),
            &me_b,
            json!({}),
        ))
        .await;
    }
    cut.restore();
    exchange(&a, &b, &format!("{scheme}-2"), 1).await;
    stored(&b, &format!("{scheme}-cut-a-"), 3).await;
    stored(&a, &format!("{scheme}-cut-b-"), 3).await;

    // B killed: what A journals meanwhile reaches B once it is back and has dialled.
    b.node.kill();
    for i in 0..3 {
        a.publish_ok(&oc_testkit::event(
            "PB_CREATE",
            &format!("{scheme}-down-{i}"),
            &me_a,
            json!({}),
        ))
        .await;
    }
    b.node.start_healthy().await.unwrap();
    stored(&b, &format!("{scheme}-down-"), 3).await;
    exchange(&a, &b, &format!("{scheme}-3"), 2).await;
    assert_eq!(peer_row(&a, &b.id()).await["dialed_by"], "them");
}

/// Waits until `site` stored `n` resources whose id starts with `prefix`.
async fn stored(site: &Site, prefix: &str, n: usize) {
    eventually(&format!("{n} resources {prefix}* stored"), || async {
        site.stored("COMPUTE_RESOURCE")
            .await
            .iter()
            .filter(|r| r["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
            .count()
            >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_only_dials_out_over_tcp_is_a_full_partner() {
    dial_out_only("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_only_dials_out_over_websocket_is_a_full_partner() {
    dial_out_only("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_listening_only_through_a_relay_propagate_through_it() {
    init_tracing();
    let mut relay = Site::new().await;
    let mut a = Site::new().await;
    let mut b = Site::new().await;
    let mut stranger = Site::new().await;
    // Everyone in one private network: the circuits travel inside PSK connections.
    let keys = tempfile::tempdir().unwrap();
    let psk = write_psk(keys.path(), "net.key", 0x33);
    relay.node.extra_args = vec![
        "--psk-file".into(),
        psk.clone(),
        "--relay-server".into(),
        "--relay-allow".into(),
        format!("{},{}", a.id(), b.id()),
    ];
    relay.node.start_healthy().await.unwrap();
    let via = |s: &Site| format!("{}/p2p-circuit/p2p/{}", relay.node.addr(), s.id());
    a.node.partners = vec![via(&b)];
    b.node.partners = vec![via(&a)];
    for s in [&mut a, &mut b, &mut stranger] {
        s.node.listen = Vec::new();
        s.node.extra_args = [
            "--psk-file",
            &psk,
            "--relay",
            &relay.node.addr(),
            "--backoff-max",
            "1s",
        ]
        .map(String::from)
        .to_vec();
    }
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let node_a = a.node.get_json("/api/node").await.unwrap();
    let listen = node_a["listen_addrs"].as_array().unwrap();
    assert!(
        !listen.is_empty()
            && listen
                .iter()
                .all(|l| l.as_str().unwrap().contains("/p2p-circuit")),
        "{node_a}"
    );
    exchange(&a, &b, "relayed", 5).await;

    // A peer the relay does not allow gets no slot, and is told so.
    stranger.node.start().unwrap();
    eventually("the stranger's reservation refused", || async {
        relay.node.log().contains("relay reservation refused")
    })
    .await;
    assert!(relay.node.log().contains(&stranger.id()));
    assert!(
        relay
            .node
            .metric("oc_relay_refused_total{request=\"reservation\"}")
            .await
            .unwrap()
            >= 1
    );
    // Its admin API comes up after its network: ask until it answers.
    eventually("the stranger's admin API", || async {
        stranger.node.get_json("/api/node").await.is_ok()
    })
    .await;
    let node_s = stranger.node.get_json("/api/node").await.unwrap();
    assert_eq!(node_s["listen_addrs"], json!([]), "{node_s}");

    // The relay restarted: both ask for their slot again, the links redial through it and
    // what A journaled meanwhile reaches B.
    relay.node.kill();
    let me_a = a.id();
    for i in 0..3 {
        a.publish_ok(&oc_testkit::event(
            "PB_CREATE",
            &format!("relay-down-{i}"),
            &me_a,
            json!({}),
        ))
        .await;
    }
    relay.node.start_healthy().await.unwrap();
    stored(&b, "relay-down-", 3).await;
    exchange(&a, &b, "relayed-after", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_frame_is_refused_and_partners_go_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let mut a = ws_site("ws", "ip4/127.0.0.1").await;
    let mut b = ws_site("ws", "ip4/127.0.0.1").await;
    a.node.partners = vec![ws_addr(&b, "ws", "ip4/127.0.0.1")];
    b.node.partners = vec![ws_addr(&a, "ws", "ip4/127.0.0.1")];
    for s in [&mut a, &mut b] {
        s.node.start_healthy().await.unwrap();
    }
    exchange(&a, &b, "before", 2).await;

    // A client that upgrades to WebSocket, then announces a 100 MiB frame.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", a.node.p2p_port))
        .await
        .unwrap();
    raw.write_all(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(oc_testkit::WAIT, raw.read(&mut byte))
            .await
            .expect("an upgrade answer")
            .unwrap();
        assert_eq!(n, 1, "closed before answering the upgrade");
        answer.push(byte[0]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&(100u64 * 1024 * 1024).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 4096]);
    let _ = raw.write_all(&frame).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(oc_testkit::WAIT, raw.read_to_end(&mut rest)).await;
    eventually("the oversized frame refused", || async {
        a.node.log().lines().any(|l| {
            l.contains("inbound connection refused") && l.contains("payload too large: len = 104857600")
        })
    })
    .await;
    exchange(&a, &b, "after", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autonat_learns_that_a_listening_node_is_reachable() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    oc_testkit::partner(&mut a, &mut [&mut b]);
    // Loopback addresses are probed only with --autonat-private-ips.
    for s in [&mut a, &mut b] {
        s.node.extra_args = vec!["--autonat-private-ips".into()];
        s.node.start_healthy().await.unwrap();
    }
    let listen = format!("/ip4/127.0.0.1/tcp/{}", a.node.p2p_port);
    eventually("A found public, its listen address confirmed", || async {
        let node = a.node.get_json("/api/node").await.unwrap();
        node["reachability"] == "public"
            && node["external_addrs"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|x| x.as_str().is_some_and(|x| x.starts_with(&listen)))
            })
    })
    .await;
}
