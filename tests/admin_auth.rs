//! The admin API's trust boundary, on real node processes: the bearer token, the
//! loopback-only rule without one, HTTPS with a certificate made here, the CLI over both,
//! and the warnings about secret files others can read.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oc_discovery::cli::AdminClient;
use oc_discovery::secret_file::Token;
use oc_testkit::*;
use serde_json::{json, Value};

const TOKEN: &str = "tok-0123456789abcdef0123456789abcdef";

/// Writes `text` into `dir/name` with `mode`; returns the path.
fn file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn some_peer_id() -> String {
    libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string()
}

/// A site whose node requires `TOKEN` (the kit's requests carry it).
async fn site_with_token(dir: &Path) -> Site {
    let mut site = Site::new().await;
    let token_file = file(dir, "admin.token", &format!("{TOKEN}\n"), 0o600);
    site.node.extra_args.push("--admin-token-file".into());
    site.node.extra_args.push(token_file.display().to_string());
    site.node.admin_token = Some(TOKEN.to_owned());
    site
}

fn client(base: &str, token: Option<&str>, ca: Option<&Path>) -> AdminClient {
    let token = token.map(|t| Token::new(t.as_bytes()).unwrap());
    AdminClient::new(base, token, ca).unwrap()
}

/// Runs a blocking admin request off the async runtime.
async fn send(
    client: &AdminClient,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> oc_discovery::cli::AdminResponse {
    let (client, method, path, body) = (
        client.clone(),
        method.to_owned(),
        path.to_owned(),
        body.map(str::to_owned),
    );
    tokio::task::spawn_blocking(move || client.send(&method, &path, body.as_deref()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A log without its ANSI colour sequences, so that fields read `name=value`.
fn plain_log(site: &Site) -> String {
    let mut out = String::new();
    let log = site.node.log();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `oc-discovery run ARGS` that must stop by itself within 30 s; returns its stderr.
fn refused_start(args: &[&str]) -> String {
    let mut child = Command::new(node_binary().unwrap())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("oc-discovery run {args:?} did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{args:?} started: {stderr}");
    stderr
}

/// CLI run off the async runtime: (exit code, stdout, stderr).
async fn cli(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(node_binary().unwrap()).args(&args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_loopback_admin_api_takes_changes_and_shared_key_files_are_warned_about() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::new().await;
    // Secrets readable by everyone: the node starts, and says so.
    let psk = file(
        dir.path(),
        "swarm.key",
        &format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32)),
        0o644,
    );
    let identity = site.node.data_dir().join("identity.key");
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o644)).unwrap();
    site.node
        .extra_args
        .extend(["--psk-file".into(), psk.display().to_string()]);
    site.node.start_healthy().await.unwrap();

    let body = serde_json::json!({"peer_id": some_peer_id(), "relation": "blacklist"}).to_string();
    let (status, answer) = site
        .node
        .request("POST", "/api/partners", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["ok"], true);

    let log = plain_log(&site);
    for path in [&psk, &identity] {
        let line = log
            .lines()
            .find(|l| l.contains("accessible to group or others") && l.contains(&path.display().to_string()))
            .unwrap_or_else(|| panic!("no warning about {}:\n{log}", path.display()));
        assert!(line.contains("mode=0644") && line.contains("WARN"), "{line}");
    }
}

/// One HTTP/1.1 request written by hand (so that `Host` and `Origin` are what a browser
/// of another site would send); the status and the raw answer.
async fn raw_request(addr: &str, head: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_sites_can_neither_change_a_tokenless_node_nor_rebind_to_it() {
    init_tracing();
    let mut site = Site::new().await;
    site.node.start_healthy().await.unwrap();
    let addr = site.node.admin_url().trim_start_matches("http://").to_owned();
    let peer = some_peer_id();
    let body = json!({"peer_id": peer, "relation": "blacklist"}).to_string();
    let listed = |peers: &Value| {
        peers
            .as_array()
            .is_some_and(|l| l.iter().any(|p| p["peer_id"] == peer.as_str()))
    };

    // A form or fetch of another site's page: refused before anything changes.
    let (status, answer) = raw_request(
        &addr,
        &format!("POST /api/partners HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example"),
        &body,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("\"forbidden_origin\""), "{answer}");
    assert!(!listed(&site.node.get_json("/api/partners").await.unwrap()));

    // A domain rebound to 127.0.0.1: its pages are same-origin with it, the Host gives it away.
    let (status, answer) = raw_request(
        &addr,
        "GET /api/peers HTTP/1.1\r\nHost: rebound.example:8650\r\nOrigin: http://rebound.example:8650",
        "",
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("\"forbidden_host\""), "{answer}");

    // The node's own page, and a client that is not a browser, still change it.
    let (status, answer) = raw_request(
        &addr,
        &format!("POST /api/partners HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}"),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(listed(&site.node.get_json("/api/partners").await.unwrap()));
    let (status, answer) = raw_request(
        &addr,
        &format!(
            "GET /api/status HTTP/1.1\r\nHost: localhost:{}",
            addr.rsplit(':').next().unwrap()
        ),
        "",
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    let refusals = site
        .node
        .metric("oc_refusals_total{place=\"admin\",code=\"invalid_field\"}")
        .await
        .unwrap();
    assert_eq!(refusals, 2, "both refusals counted");
    let log = plain_log(&site);
    assert!(
        log.lines().any(|l| l.contains("a page of another site")
            && l.contains("forbidden_origin")
            && l.contains("evil.example")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_admin_api_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = oc_testkit::free_port().unwrap().to_string();
    for listen in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let err = refused_start(&[
            "--data-dir",
            data.to_str().unwrap(),
            "--nats-url",
            "nats://127.0.0.1:1",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--admin-listen",
            &listen,
        ]);
        assert!(err.contains("--admin-token-file"), "{listen}: {err}");
        assert!(err.contains(&listen), "names the address: {err}");
    }
    assert!(!data.exists(), "refused before anything was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_token_and_tls_files_stop_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = file(d, "empty.token", " \n", 0o600);
    let big = file(d, "big.token", &"a".repeat(5000), 0o600);
    let spaced = file(d, "spaced.token", "two words", 0o600);
    let not_pem = file(d, "cert.pem", "not a certificate\n", 0o600);
    let key = rcgen::KeyPair::generate().unwrap();
    let key_pem = file(d, "key.pem", &key.serialize_pem(), 0o600);
    let data = d.join("data");
    let base = [
        "--data-dir",
        data.to_str().unwrap(),
        "--nats-url",
        "nats://127.0.0.1:1",
        "--admin-listen",
        "127.0.0.1:1",
    ];
    let cases: [(&[&str], &str); 6] = [
        (&["--admin-token-file", empty.to_str().unwrap()], "is empty"),
        (
            &["--admin-token-file", big.to_str().unwrap()],
            "larger than 4096 bytes",
        ),
        (&["--admin-token-file", spaced.to_str().unwrap()], "visible ASCII"),
        (&["--admin-token-file", "/nonexistent/admin.token"], "cannot read"),
        (
            &["--admin-tls-cert", not_pem.to_str().unwrap()],
            "--admin-tls-key",
        ),
        (
            &[
                "--admin-tls-cert",
                not_pem.to_str().unwrap(),
                "--admin-tls-key",
                key_pem.to_str().unwrap(),
            ],
            "--admin-tls-cert",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let err = refused_start(&args);
        assert!(
            err.contains(expected),
            "{extra:?}: expected {expected:?} in {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_route_but_health_and_metrics_needs_it() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut site = site_with_token(dir.path()).await;
    site.node.start_healthy().await.unwrap();
    let base = site.node.admin_url();
    let body = serde_json::json!({"peer_id": some_peer_id(), "relation": "known"}).to_string();
    let routes = [
        ("GET", "/api/peers", None),
        ("POST", "/api/partners", Some(body.as_str())),
    ];

    for (method, path, body) in routes {
        for token in [None, Some("not-the-token")] {
            let answer = send(&client(&base, token, None), method, path, body).await;
            assert_eq!(
                answer.status, 401,
                "{method} {path} with {token:?}: {}",
                answer.body
            );
            assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"));
            let v: Value = serde_json::from_str(&answer.body).unwrap();
            assert_eq!(v["ok"], false, "{v}");
            assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            assert!(
                v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{v}"
            );
        }
        let answer = send(&client(&base, Some(TOKEN), None), method, path, body).await;
        assert_eq!(
            answer.status, 200,
            "{method} {path} with the token: {}",
            answer.body
        );
    }
    // Routes added later are covered too: an unknown path is 401 before it is 404.
    let answer = send(&client(&base, None, None), "GET", "/api/anything", None).await;
    assert_eq!(answer.status, 401);

    let anonymous = client(&base, None, None);
    assert_eq!(send(&anonymous, "GET", "/healthz", None).await.status, 200);
    let metrics = send(&anonymous, "GET", "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.lines().any(|l| l == "oc_admin_unauthorized_total 5"),
        "{}",
        metrics.body
    );
    let log = plain_log(&site);
    assert!(
        log.lines().any(|l| l.contains("admin API request refused")
            && l.contains("path=/api/peers")
            && l.contains("reason=\"missing_token\"")
            && l.contains("peer=127.0.0.1:")),
        "no refusal line with its fields:\n{log}"
    );
}

/// A CA and a certificate for 127.0.0.1 signed by it: (CA PEM, certificate PEM, key PEM).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "oc-discovery test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_serves_the_cli_and_a_wrong_token_exits_3() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_pem, cert_pem, key_pem) = test_pki();
    let ca = file(d, "ca.pem", &ca_pem, 0o644);
    let cert = file(d, "cert.pem", &cert_pem, 0o644);
    let key = file(d, "key.pem", &key_pem, 0o600);
    let mut site = site_with_token(d).await;
    site.node.extra_args.extend([
        "--admin-tls-cert".into(),
        cert.display().to_string(),
        "--admin-tls-key".into(),
        key.display().to_string(),
    ]);
    site.node.admin_ca = Some(ca.clone());
    site.node.start_healthy().await.unwrap();
    let https = site.node.admin_url();
    assert!(https.starts_with("https://"), "{https}");

    // HTTPS only: a plain HTTP request gets no answer.
    let plain = https.replacen("https://", "http://", 1);
    let plain_client = client(&plain, Some(TOKEN), None);
    let answer = tokio::task::spawn_blocking(move || plain_client.send("GET", "/healthz", None))
        .await
        .unwrap();
    assert!(
        answer.as_ref().map_or(true, |a| a.status != 200),
        "plain HTTP answered: {answer:?}"
    );

    let token_file = d.join("admin.token").display().to_string();
    let wrong = file(d, "wrong.token", "not-the-token", 0o600)
        .display()
        .to_string();
    let ca_arg = ca.display().to_string();
    let peers = |token: &str, ca: Option<&str>| {
        let mut args = vec![
            "peers".to_owned(),
            "--admin".into(),
            https.clone(),
            "--admin-token-file".into(),
            token.to_owned(),
        ];
        if let Some(ca) = ca {
            args.extend(["--admin-ca".into(), ca.to_owned()]);
        }
        args
    };
    let (code, table, err) = cli(peers(&token_file, Some(&ca_arg))).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(table.starts_with("PEER ID"), "{table}");

    let (code, _, err) = cli(peers(&wrong, Some(&ca_arg))).await;
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("401"), "{err}");

    // Without the private CA the certificate is not trusted: no answer, exit 3.
    let (code, _, err) = cli(peers(&token_file, None)).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("connecting to"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_over_wss_trusts_the_private_ca_only() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_pem, cert_pem, key_pem) = test_pki();
    let ca = file(d, "ca.pem", &ca_pem, 0o644);
    let cert = file(d, "cert.pem", &cert_pem, 0o644);
    let key = file(d, "key.pem", &key_pem, 0o600);
    let mut site = site_with_token(d).await;
    site.node.extra_args.extend([
        "--admin-tls-cert".into(),
        cert.display().to_string(),
        "--admin-tls-key".into(),
        key.display().to_string(),
    ]);
    site.node.admin_ca = Some(ca.clone());
    site.node.start_healthy().await.unwrap();
    let me = site.id();
    site.publish_ok(&event("PB_CREATE", "over-tls", &me, json!({})))
        .await;

    // wss:// with the CA and the token: the page, then a live entry.
    let mut feed = FeedClient::connect(&site.node).await.unwrap();
    let page = feed
        .subscribe(json!({"type": "subscribe", "feed": "journal", "portion": 5}))
        .await
        .unwrap();
    assert_eq!(page["entries"][0]["resource"]["id"], "over-tls");
    site.publish_ok(&event("PB_CREATE", "live-over-tls", &me, json!({})))
        .await;
    let live = feed.expect("live").await.unwrap();
    assert_eq!(live["entry"]["resource"]["id"], "live-over-tls");

    // Without the CA the node's certificate is not trusted: unreachable, exit 3 in the CLI.
    let untrusted = client(&site.node.admin_url(), Some(TOKEN), None);
    let refused =
        tokio::task::spawn_blocking(move || untrusted.websocket("/api/feed", Duration::from_secs(10)).err())
            .await
            .unwrap()
            .expect("an untrusted certificate is refused");
    assert!(
        refused.downcast_ref::<oc_discovery::cli::AdminError>().is_some(),
        "{refused:#}"
    );
}
