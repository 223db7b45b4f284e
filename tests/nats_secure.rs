//! Secured NATS connections against real nats-servers started from configuration files
//! written here: TLS (certificates made with rcgen) with a client certificate and a user
//! and password, a `.creds` file (operator mode, JWTs made here), an nkey user, a token, a
//! refused password, and a two-server cluster whose first server dies.
//!
//! Each test ends with the end-to-end proof the other suites use: an event an application
//! publishes on one site's NATS is journaled by its node (the node's reply) and reaches the
//! partner site's NATS as `CREATE_RESOURCE`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::ConnectOptions;
use oc_testkit::*;
use oc_testkit::{free_port, wait_until, NatsServer, NodeProcess};
use serde_json::{json, Value};

/// A site whose NATS asks for credentials (and maybe TLS): the server, the node (not
/// started) given the flags, and an application client connected the same way.
struct SecureSite {
    node: NodeProcess,
    app: async_nats::Client,
    nats: NatsServer,
}

impl SecureSite {
    /// `config` is the nats-server configuration; `node_args` the node's NATS flags;
    /// `app` how the application authenticates.
    async fn start(config: &str, scheme: &str, node_args: &[String], app: ConnectOptions) -> SecureSite {
        let nats = NatsServer::start_with_config(config).expect("nats-server with a configuration");
        let url = format!("{scheme}://127.0.0.1:{}", nats.port);
        let mut node = NodeProcess::new(&node_binary().unwrap(), &url).expect("node");
        node.extra_args.extend(node_args.iter().cloned());
        let app = tokio::time::timeout(Duration::from_secs(30), app.connect(&url))
            .await
            .expect("application connects within 30 s")
            .expect("application connects");
        SecureSite { node, app, nats }
    }

    fn id(&self) -> String {
        self.node.peer_id.clone()
    }
}

/// Writes a file only its owner may read, as secrets should be.
fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    set_mode(&path, 0o600);
    path
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn arg(flag: &str, path: &Path) -> [String; 2] {
    [flag.to_owned(), path.display().to_string()]
}

/// Certificates of a test CA, a server (127.0.0.1) and a client, as PEM files.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "oc-discovery test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let cert_path = dir.path().join(format!("{name}.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let key_path = secret_file(dir.path(), &format!("{name}.key"), &key.serialize_pem());
        (cert_path, key_path)
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let (client_cert, client_key) = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "client");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    Pki {
        _dir: dir,
        ca: ca_path,
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// Publishes an event as a request on `app` until the node answers (subscriptions may still
/// be travelling a cluster route, or the node reconnecting); returns the reply.
async fn request_until_answered(app: &async_nats::Client, body: &Value) -> Value {
    let mut last = String::new();
    let answered = tokio::time::timeout(WAIT, async {
        loop {
            let ask = app.request("PROPALGATION_EVENT", body.to_string().into());
            match tokio::time::timeout(Duration::from_secs(2), ask).await {
                Ok(Ok(reply)) => return serde_json::from_slice::<Value>(&reply.payload).expect("JSON reply"),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no reply within 2 s".into(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    answered.unwrap_or_else(|_| panic!("no answer to PROPALGATION_EVENT within {WAIT:?}: {last}"))
}

/// The end-to-end proof: an event published on `from`'s NATS is journaled (the node's `ok`)
/// and reaches the application of the partner site `to` as `CREATE_RESOURCE`.
async fn propagates(from: &async_nats::Client, origin: &str, to: &Collector, id: &str) {
    let reply = request_until_answered(from, &event("PB_CREATE", id, origin, json!({"n": 1}))).await;
    assert_eq!(reply["ok"], true, "refused: {reply}");
    to.wait_for(&format!("{id} on the partner's NATS"), |seen| {
        seen.iter()
            .any(|s| s.subject == "CREATE_RESOURCE" && s.body["resource"]["id"] == id)
    })
    .await;
}

/// Makes the two nodes partners of each other.
fn pair(a: &mut NodeProcess, b: &mut NodeProcess) {
    a.partners.push(b.addr());
    b.partners.push(a.addr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_and_a_password_carries_events_both_ways() {
    init_tracing();
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let password = secret_file(dir.path(), "password", "pa ss-word\n");
    let config = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n\
         authorization {{\n  user: oc\n  password: \"pa ss-word\"\n}}\n",
        pki.server_cert, pki.server_key, pki.ca
    );
    let node_args: Vec<String> = [
        arg("--nats-tls-ca", &pki.ca),
        arg("--nats-tls-cert", &pki.client_cert),
        arg("--nats-tls-key", &pki.client_key),
        ["--nats-user".into(), "oc".into()],
        arg("--nats-password-file", &password),
    ]
    .concat();
    let app = || {
        ConnectOptions::with_user_and_password("oc".into(), "pa ss-word".into())
            .add_root_certificates(pki.ca.clone())
            .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
            .require_tls(true)
    };
    // Site A is reached with a tls:// URL; site B with nats://, TLS implied by the flags.
    let mut a = SecureSite::start(&config, "tls", &node_args, app()).await;
    let mut b = SecureSite::start(&config, "nats", &node_args, app()).await;
    pair(&mut a.node, &mut b.node);
    let seen_b = Collector::start(&b.app, &["CREATE_RESOURCE"]).await;
    let seen_a = Collector::start(&a.app, &["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    propagates(&a.app, &a.id(), &seen_b, "from-a").await;
    propagates(&b.app, &b.id(), &seen_a, "from-b").await;
    assert!(
        !a.node.log().contains("readable by group or others"),
        "{}",
        a.node.log_tail(20)
    );

    // Without its client certificate the server refuses the node: /healthz says why.
    let mut bare = NodeProcess::new(
        &node_binary().unwrap(),
        &format!("tls://127.0.0.1:{}", a.nats.port),
    )
    .unwrap();
    bare.extra_args.extend(
        [
            arg("--nats-tls-ca", &pki.ca),
            ["--nats-user".into(), "oc".into()],
            arg("--nats-password-file", &password),
        ]
        .concat(),
    );
    bare.start().unwrap();
    let reasons = wait_for_nats_reason(&bare, |r| r.starts_with("nats: ") && r != "nats not connected").await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("tls://127.0.0.1:{}", a.nats.port))),
        "{reasons:?}"
    );
}

/// Polls `/healthz` until it answers 503 with a reason about NATS that `ok` accepts;
/// returns the reasons.
async fn wait_for_nats_reason(node: &NodeProcess, ok: impl Fn(&str) -> bool) -> Vec<String> {
    let mut last = String::new();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok((status, body)) = node.get("/healthz").await {
                last = format!("{status} {body}");
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let reasons: Vec<String> = v["reasons"]
                    .as_array()
                    .map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                if status == 503 && reasons.iter().any(|r| ok(r)) {
                    return reasons;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "/healthz never gave the NATS reason; last: {last}; log:\n{}",
            node.log_tail(30)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_user_connects_and_propagates() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let seed_file = secret_file(dir.path(), "node.nk", &format!("{seed}\n"));
    let config = format!(
        "authorization {{\n  users: [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    );
    let node_args = arg("--nats-nkey", &seed_file);
    let mut a = SecureSite::start(
        &config,
        "nats",
        &node_args,
        ConnectOptions::with_nkey(seed.clone()),
    )
    .await;
    let mut b = Site::new().await;
    pair(&mut a.node, &mut b.node);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    propagates(&a.app, &a.id(), &seen_b, "nkey-event").await;
}

/// A JWT as nats-server reads it: `header.claims.signature`, signed by `issuer`'s nkey.
fn jwt(subject: &str, name: &str, issuer: &nkeys::KeyPair, nats: Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = json!({
        "jti": format!("{name}-test"), "iat": 1_700_000_000, "iss": issuer.public_key(),
        "name": name, "sub": subject, "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64.encode(signature))
}

/// A nats-server configuration trusting a test operator with one account preloaded, and a
/// `.creds` text of a user of that account.
fn operator_mode() -> (String, String) {
    let (operator, account, user) = (
        nkeys::KeyPair::new_operator(),
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_user(),
    );
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1});
    let operator_jwt = jwt(
        &operator.public_key(),
        "op",
        &operator,
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &account.public_key(),
        "site",
        &operator,
        json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let user_jwt = jwt(
        &user.public_key(),
        "node",
        &account,
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let config = format!(
        "operator: \"{operator_jwt}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n}}\n",
        account.public_key()
    );
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    (config, creds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_of_an_operator_mode_server_connects_and_propagates() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (config, creds) = operator_mode();
    let creds_file = secret_file(dir.path(), "node.creds", &creds);
    let node_args = arg("--nats-creds", &creds_file);
    let app = ConnectOptions::with_credentials(&creds).unwrap();
    let mut a = SecureSite::start(&config, "nats", &node_args, app).await;
    let mut b = Site::new().await;
    pair(&mut a.node, &mut b.node);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    propagates(&a.app, &a.id(), &seen_b, "creds-event").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_connects_and_propagates_and_a_shared_token_file_is_warned_about() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let token = secret_file(dir.path(), "token", "  t0ken-of-site-a\n");
    set_mode(&token, 0o644);
    let config = "authorization {\n  token: \"t0ken-of-site-a\"\n}\n";
    let node_args = arg("--nats-token-file", &token);
    let app = ConnectOptions::with_token("t0ken-of-site-a".into());
    let mut a = SecureSite::start(config, "nats", &node_args, app).await;
    let mut b = Site::new().await;
    pair(&mut a.node, &mut b.node);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    propagates(&a.app, &a.id(), &seen_b, "token-event").await;
    let log = a.node.log();
    assert!(
        log.contains("readable by group or others") && log.contains("--nats-token-file"),
        "{}",
        a.node.log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_shows_on_healthz_and_the_right_one_recovers() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let password = secret_file(dir.path(), "password", "wrong\n");
    let config = "authorization {\n  user: oc\n  password: right\n}\n";
    let node_args: Vec<String> = [
        ["--nats-user".into(), "oc".into()],
        arg("--nats-password-file", &password),
    ]
    .concat();
    let app = ConnectOptions::with_user_and_password("oc".into(), "right".into());
    let mut a = SecureSite::start(config, "nats", &node_args, app).await;
    let mut b = Site::new().await;
    pair(&mut a.node, &mut b.node);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    b.node.start_healthy().await.unwrap();

    a.node.start().unwrap();
    let reasons = wait_for_nats_reason(&a.node, |r| r.starts_with("nats: authorization violation")).await;
    assert!(reasons.iter().any(|r| r.contains(&a.nats.url())), "{reasons:?}");
    // The node keeps retrying, one log line per failed attempt.
    wait_until("a second failed attempt in the log", WAIT, || {
        a.node.log().matches("NATS connection attempt failed").count() >= 2
    })
    .await
    .unwrap();
    assert!(a.node.is_running(), "a refused credential does not stop the node");

    // Rotation: replace the file, restart.
    a.node.stop();
    std::fs::write(&password, "right\n").unwrap();
    a.node.start_healthy().await.unwrap();
    propagates(&a.app, &a.id(), &seen_b, "after-the-right-password").await;
}

/// A nats-server configuration joining a two-server cluster: its route port, the other's,
/// and its monitoring port (`/connz` tells which server holds the node).
fn cluster_config(name: &str, route: u16, other: u16, monitor: u16) -> String {
    format!(
        "server_name: {name}\nhttp: \"127.0.0.1:{monitor}\"\ncluster {{\n  name: oc\n  listen: \"127.0.0.1:{route}\"\n  routes: [\"nats-route://127.0.0.1:{other}\"]\n}}\n"
    )
}

/// Whether the server monitored on `monitor` has the node's client connection.
async fn holds_the_node(monitor: u16) -> bool {
    let base = format!("http://127.0.0.1:{monitor}");
    let answer = tokio::task::spawn_blocking(move || oc_discovery::cli::http_get(&base, "/connz"))
        .await
        .unwrap();
    let Ok((200, body)) = answer else {
        return false;
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["connections"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["name"] == "oc-discovery"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_two_server_cluster_goes_on_through_the_second_when_the_first_dies() {
    init_tracing();
    let ports: Vec<u16> = (0..4).map(|_| free_port().unwrap()).collect();
    let (route1, route2, monitor1, monitor2) = (ports[0], ports[1], ports[2], ports[3]);
    let one = NatsServer::start_with_config(&cluster_config("n1", route1, route2, monitor1)).unwrap();
    let two = NatsServer::start_with_config(&cluster_config("n2", route2, route1, monitor2)).unwrap();
    let mut a = NodeProcess::new(&node_binary().unwrap(), &format!("{},{}", one.url(), two.url())).unwrap();
    let mut b = Site::new().await;
    pair(&mut a, &mut b.node);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    b.node.start_healthy().await.unwrap();
    a.start_healthy().await.unwrap();
    // "The first" is the server the node happens to be connected to (the client shuffles).
    let on_one = holds_the_node(monitor1).await;
    assert!(
        on_one || holds_the_node(monitor2).await,
        "neither server holds the node"
    );
    let (mut first, second) = if on_one { (one, two) } else { (two, one) };
    let app1 = async_nats::connect(first.url()).await.unwrap();
    let app2 = async_nats::connect(second.url()).await.unwrap();
    propagates(&app1, &a.peer_id, &seen_b, "through-the-first").await;

    first.stop();
    // Published on the second server: journaled by the node, which reconnected there.
    propagates(&app2, &a.peer_id, &seen_b, "through-the-second").await;
    a.wait_healthy(WAIT).await.unwrap();
    let stored = b.stored("COMPUTE_RESOURCE").await;
    let ids: Vec<&str> = stored.iter().filter_map(|r| r["id"].as_str()).collect();
    assert!(
        ids.contains(&"through-the-first") && ids.contains(&"through-the-second"),
        "{ids:?}"
    );
}
