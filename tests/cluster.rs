//! The three-site docker-compose cluster (`docker-compose.yml`) on a real Docker engine.
//!
//! Brings the cluster up under its own compose project, with its NATS and admin ports
//! published on free 127.0.0.1 ports (the admin API read with each site's token from
//! `docker/cluster/siteN/admin.token`; a change without it must get 401), then:
//! 1. publishes events on site 1's NATS and sees CREATE_RESOURCE on sites 2 and 3;
//! 2. `docker kill`s site 2's node, publishes more, starts it again and sees it catch up;
//! 3. cuts site 3's node off the inter-site network (`docker network disconnect`),
//!    publishes more, reconnects it and sees it catch up;
//! 4. checks that nothing was lost: sites 2 and 3 saw exactly the Nats-Msg-Ids
//!    `<site 1>:1..=N` (a JetStream stream deduplicating on the header counts them, a plain
//!    subscription lists them), and their nodes store every resource (site 3's in its
//!    MongoDB, counted there too; sites 1 and 2 on the embedded store).
//!
//! Everything is torn down at the end, on failure too (`Cluster`'s Drop). Every step has a
//! time limit. Images come from `scripts/docker-prepare.sh` (run here: it builds what is
//! missing, a no-op otherwise); the node image is made from the binary cargo built for
//! these tests, tagged `oc-discovery:test` so the demo's `oc-discovery:local` is left alone.
//!
//! The one skip: no Docker engine answers (`docker info` fails). The test says so and
//! passes; the README states that the cluster test runs when a Docker engine is present.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use oc_testkit::Collector;
use serde_json::{json, Value};

/// Events published in each of the three phases.
const PER_PHASE: u64 = 20;
const PROJECT_PREFIX: &str = "occlustertest";
const TEST_IMAGE: &str = "oc-discovery:test";
/// What the nodes republish and the test counts.
const NOTICE: &str = "CREATE_RESOURCE";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn node_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_oc-discovery"))
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[cluster] {}", msg.as_ref());
}

/// Runs `argv` under coreutils `timeout` (SIGTERM at `limit`, SIGKILL 10 s later),
/// capturing its output.
fn run(argv: &[String], envs: &[(String, String)], limit: Duration) -> anyhow::Result<Output> {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=10")
        .arg(limit.as_secs().max(1).to_string())
        .args(argv)
        .current_dir(root())
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("spawning {}", argv.join(" ")))?;
    if out.status.code() == Some(124) || out.status.code() == Some(137) {
        bail!("`{}` did not finish within {limit:?}", argv.join(" "));
    }
    Ok(out)
}

/// [`run`], failing unless the command succeeds; returns its stdout.
fn run_ok(argv: &[String], envs: &[(String, String)], limit: Duration) -> anyhow::Result<String> {
    let out = run(argv, envs, limit)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn docker(args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let mut a = argv(&["docker"]);
    a.extend(argv(args));
    run_ok(&a, &[], limit)
}

/// `docker info` answers (within 30 s: a hung daemon counts as none).
fn docker_engine_present() -> bool {
    run(&argv(&["docker", "info"]), &[], Duration::from_secs(30)).is_ok_and(|o| o.status.success())
}

/// `docker-compose` (v1) when installed, else the `docker compose` plugin (v2).
fn compose_command() -> anyhow::Result<Vec<String>> {
    let works = |a: &[&str]| {
        Command::new(a[0])
            .args(&a[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&["docker-compose", "version"]) {
        Ok(argv(&["docker-compose"]))
    } else if works(&["docker", "compose", "version"]) {
        Ok(argv(&["docker", "compose"]))
    } else {
        bail!(
            "a Docker engine is present but neither `docker-compose` nor `docker compose` works: \
             install Debian's docker-compose (./scripts/install-deps.sh does)"
        )
    }
}

fn free_port() -> u16 {
    oc_testkit::free_port().expect("free port")
}

/// One compose project of docker-compose.yml; `down -v` when dropped.
struct Cluster {
    compose: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    nats_ports: [u16; 3],
    admin_ports: [u16; 3],
    torn_down: bool,
}

impl Cluster {
    fn compose(&self, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        let file = root().join("docker-compose.yml");
        let mut a = self.compose.clone();
        a.extend(argv(&["-f", file.to_str().unwrap(), "--project-directory"]));
        a.push(root().to_str().unwrap().to_owned());
        a.extend(argv(&["-p", &self.project]));
        a.extend(argv(args));
        run_ok(&a, &self.env, limit)
    }

    /// The container id of a service.
    fn container(&self, service: &str) -> String {
        let id = self
            .compose(&["ps", "-q", service], Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!id.is_empty(), "no container for {service}");
        id.lines().next().unwrap().to_owned()
    }

    fn wan(&self) -> String {
        format!("{}_wan", self.project)
    }

    fn admin(&self, site: usize) -> String {
        format!("http://127.0.0.1:{}", self.admin_ports[site - 1])
    }

    fn nats(&self, site: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nats_ports[site - 1])
    }

    /// GET on a site's admin API with its token (made by the prepare script).
    async fn get(&self, site: usize, path: &str) -> anyhow::Result<(u16, String)> {
        let token_file = root().join(format!("docker/cluster/site{site}/admin.token"));
        let token = oc_discovery::secret_file::read_token(&token_file)?;
        let client = oc_discovery::cli::AdminClient::new(&self.admin(site), Some(token), None)?;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || client.call("GET", &path, None)).await?
    }

    async fn get_json(&self, site: usize, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(site, path).await?;
        if status != 200 {
            bail!("site {site}: GET {path} answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    fn down(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let start = Instant::now();
        match self.compose(
            &["down", "-v", "--remove-orphans", "-t", "5"],
            Duration::from_secs(180),
        ) {
            Ok(_) => say(format!(
                "project {} torn down in {:.1} s",
                self.project,
                start.elapsed().as_secs_f64()
            )),
            Err(e) => say(format!("tearing down {} failed: {e}", self.project)),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.torn_down {
            match self.compose(&["logs", "--no-color", "--tail", "40"], Duration::from_secs(60)) {
                Ok(logs) => eprintln!("--- last logs of project {} ---\n{logs}", self.project),
                Err(e) => eprintln!("no logs: {e}"),
            }
        }
        self.down();
    }
}

/// Projects of earlier runs of this test whose process is gone (killed before its Drop
/// ran): taken down so they do not pile up.
fn remove_stale_projects(compose: &[String]) {
    let Ok(labels) = docker(
        &[
            "ps",
            "-a",
            "--format",
            "{{.Label \"com.docker.compose.project\"}}",
        ],
        Duration::from_secs(30),
    ) else {
        return;
    };
    let stale: BTreeSet<String> = labels
        .lines()
        .filter_map(|p| {
            let pid = p.strip_prefix(PROJECT_PREFIX)?.parse::<u32>().ok()?;
            (!Path::new(&format!("/proc/{pid}")).exists()).then(|| p.to_owned())
        })
        .collect();
    for project in stale {
        say(format!("removing the stale project {project}"));
        let mut c = Cluster {
            compose: compose.to_vec(),
            project,
            env: Vec::new(),
            nats_ports: [0; 3],
            admin_ports: [0; 3],
            torn_down: false,
        };
        c.down();
    }
}

/// Polls `probe` every 250 ms until it returns `Some`, at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A JetStream stream on a site's NATS capturing CREATE_RESOURCE, deduplicated on
/// Nats-Msg-Id: its message count is the number of distinct notices.
async fn capture(client: &async_nats::Client) -> async_nats::jetstream::stream::Stream {
    let js = async_nats::jetstream::new(client.clone());
    tokio::time::timeout(
        Duration::from_secs(30),
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "TEST_NOTICES".into(),
            subjects: vec![NOTICE.into()],
            duplicate_window: Duration::from_secs(900),
            ..Default::default()
        }),
    )
    .await
    .expect("stream created within 30 s")
    .expect("notices stream")
}

async fn count(stream: &mut async_nats::jetstream::stream::Stream) -> u64 {
    match tokio::time::timeout(Duration::from_secs(5), stream.info()).await {
        Ok(Ok(info)) => info.state.messages,
        _ => 0,
    }
}

/// Waits until a site's capture stream holds `n` distinct notices.
async fn wait_count(
    site: usize,
    stream: &mut async_nats::jetstream::stream::Stream,
    n: u64,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let c = count(stream).await;
        if c == n {
            return;
        }
        assert!(
            c < n,
            "site {site} has {c} distinct notices, more than the {n} published"
        );
        if Instant::now() > deadline {
            panic!("site {site}: {c} of {n} notices after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Publishes events `from..=to` on site 1 through JetStream (confirmed by the PubAck of
/// the node's intake stream).
async fn publish(js: &async_nats::jetstream::Context, creator: &str, from: u64, to: u64) {
    for i in from..=to {
        let body = json!({
            "action": "PB_CREATE",
            "data_type": "COMPUTE_RESOURCE",
            "user": "alice",
            "from_app": "cluster-test",
            "payload": {"id": format!("res-{i:03}"), "creator_id": creator, "n": i},
        });
        let ack = tokio::time::timeout(Duration::from_secs(30), async {
            js.publish("PROPALGATION_EVENT", body.to_string().into())
                .await?
                .await
        })
        .await
        .unwrap_or_else(|_| panic!("no PubAck for event {i} within 30 s"));
        ack.unwrap_or_else(|e| panic!("publishing event {i}: {e}"));
    }
}

fn msg_ids(seen: &Collector) -> BTreeSet<String> {
    seen.all().into_iter().filter_map(|s| s.msg_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_site_cluster_survives_a_killed_node_and_a_network_cut() {
    if !docker_engine_present() {
        eprintln!(
            "cluster test skipped: no Docker engine (`docker info` failed). It runs whenever a \
             Docker engine is present."
        );
        return;
    }
    let t0 = Instant::now();
    let compose = compose_command().unwrap_or_else(|e| panic!("{e}"));
    remove_stale_projects(&compose);

    // Images (built when missing or changed) and the sites' identities.
    let prep = Instant::now();
    let prepare_env = vec![
        ("OC_DOCKER_NODE_BIN".to_owned(), node_bin().display().to_string()),
        ("OC_DOCKER_NODE_TAG".to_owned(), TEST_IMAGE.to_owned()),
    ];
    let out = run(
        &argv(&["./scripts/docker-prepare.sh"]),
        &prepare_env,
        Duration::from_secs(30 * 60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "scripts/docker-prepare.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prep_time = prep.elapsed();
    say(format!("images ready in {:.1} s", prep_time.as_secs_f64()));

    let ids: Vec<String> = (1..=3)
        .map(|n| {
            let dir = root().join(format!("docker/cluster/site{n}"));
            let out = Command::new(node_bin())
                .arg("id")
                .arg("--data-dir")
                .arg(&dir)
                .output()
                .expect("id");
            assert!(
                out.status.success(),
                "oc-discovery id: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    let me = ids[0].clone();

    let nats_ports = [free_port(), free_port(), free_port()];
    let admin_ports = [free_port(), free_port(), free_port()];
    let mut env = vec![
        ("NODE_IMAGE".to_owned(), TEST_IMAGE.to_owned()),
        ("SITE3_STORE".to_owned(), "mongodb".to_owned()),
        ("NODE_RUST_LOG".to_owned(), "info,oc_discovery=debug".to_owned()),
    ];
    for n in 0..3 {
        env.push((format!("NODE{}_ID", n + 1), ids[n].clone()));
        env.push((format!("SITE{}_NATS_PORT", n + 1), nats_ports[n].to_string()));
        env.push((format!("SITE{}_ADMIN_PORT", n + 1), admin_ports[n].to_string()));
    }
    let mut cluster = Cluster {
        compose,
        project: format!("{PROJECT_PREFIX}{}", std::process::id()),
        env,
        nats_ports,
        admin_ports,
        torn_down: false,
    };
    say(format!(
        "project {}: NATS on 127.0.0.1:{:?}, admin on {:?}, site 3 on MongoDB",
        cluster.project, nats_ports, admin_ports
    ));

    let up = Instant::now();
    cluster
        .compose(&["up", "-d"], Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}"));
    for site in 1..=3 {
        let c = &cluster;
        wait_for(
            &format!("site {site}'s node healthy"),
            Duration::from_secs(120),
            || async move { matches!(c.get(site, "/healthz").await, Ok((200, _))).then_some(()) },
        )
        .await;
    }
    for site in 1..=3 {
        let c = &cluster;
        wait_for(
            &format!("site {site}'s partners online"),
            Duration::from_secs(90),
            || async move {
                let peers = c.get_json(site, "/api/peers").await.ok()?;
                let peers = peers.as_array()?;
                (peers.len() == 2 && peers.iter().all(|p| p["state"] == "online")).then_some(())
            },
        )
        .await;
    }
    let up_time = up.elapsed();
    say(format!(
        "cluster up, healthy, partners online in {:.1} s",
        up_time.as_secs_f64()
    ));
    let node1 = cluster.get_json(1, "/api/node").await.unwrap();
    assert_eq!(
        node1["peer_id"],
        me.as_str(),
        "site 1 runs the identity made for it"
    );
    // The nodes listen on 0.0.0.0 in their containers: only with the site's token.
    let admin1 = cluster.admin(1);
    let anonymous = tokio::task::spawn_blocking(move || {
        oc_discovery::cli::http_request("POST", &admin1, "/api/partners", Some("{}"))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(anonymous.0, 401, "a change without the token: {}", anonymous.1);

    let connect = |url: String| async move {
        tokio::time::timeout(Duration::from_secs(30), async_nats::connect(url))
            .await
            .expect("NATS connect within 30 s")
            .expect("NATS connect")
    };
    let app1 = connect(cluster.nats(1)).await;
    let app2 = connect(cluster.nats(2)).await;
    let app3 = connect(cluster.nats(3)).await;
    let errors1 = Collector::start(&app1, &["PROPALGATION_ERROR"]).await;
    let seen2 = Collector::start(&app2, &[NOTICE]).await;
    let seen3 = Collector::start(&app3, &[NOTICE]).await;
    let mut stream2 = capture(&app2).await;
    let mut stream3 = capture(&app3).await;
    let js1 = async_nats::jetstream::new(app1.clone());

    // 1. Propagation to both partners.
    let phase = Instant::now();
    publish(&js1, &me, 1, PER_PHASE).await;
    wait_count(2, &mut stream2, PER_PHASE, Duration::from_secs(60)).await;
    wait_count(3, &mut stream3, PER_PHASE, Duration::from_secs(60)).await;
    say(format!(
        "phase 1: {PER_PHASE} events published and on sites 2 and 3 in {:.1} s",
        phase.elapsed().as_secs_f64()
    ));

    // 2. Site 2's node killed, more events, started again: it catches up.
    let node2 = cluster.container("node2");
    docker(&["kill", &node2], Duration::from_secs(60)).unwrap();
    let state = docker(
        &["inspect", "-f", "{{.State.Running}}", &node2],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(state, "false", "node2 still running after docker kill");
    publish(&js1, &me, PER_PHASE + 1, 2 * PER_PHASE).await;
    wait_count(3, &mut stream3, 2 * PER_PHASE, Duration::from_secs(60)).await;
    assert_eq!(
        count(&mut stream2).await,
        PER_PHASE,
        "site 2 got events while its node was dead"
    );
    let restart = Instant::now();
    docker(&["start", &node2], Duration::from_secs(60)).unwrap();
    wait_count(2, &mut stream2, 2 * PER_PHASE, Duration::from_secs(120)).await;
    say(format!(
        "phase 2: site 2's node killed, restarted, caught up {} events in {:.1} s",
        PER_PHASE,
        restart.elapsed().as_secs_f64()
    ));

    // 3. Site 3's node cut off the inter-site network, more events, reconnected.
    let node3 = cluster.container("node3");
    let wan = cluster.wan();
    docker(&["network", "disconnect", &wan, &node3], Duration::from_secs(60)).unwrap();
    let cut = Instant::now();
    // Half while site 1 still believes the link is up (those frames are lost on the wire),
    // half once it has noticed (heartbeat: 10 s without an answer in docker-compose.yml).
    let half = 2 * PER_PHASE + PER_PHASE / 2;
    publish(&js1, &me, 2 * PER_PHASE + 1, half).await;
    {
        let c = &cluster;
        let id3 = ids[2].as_str();
        wait_for(
            "site 1 to see site 3 offline",
            Duration::from_secs(60),
            || async move {
                let peers = c.get_json(1, "/api/peers").await.ok()?;
                let p3 = peers.as_array()?.iter().find(|p| p["peer_id"] == id3)?.clone();
                (p3["state"] != "online").then_some(())
            },
        )
        .await;
    }
    say(format!(
        "phase 3: site 1 saw site 3 go offline {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    ));
    publish(&js1, &me, half + 1, 3 * PER_PHASE).await;
    wait_count(2, &mut stream2, 3 * PER_PHASE, Duration::from_secs(60)).await;
    assert_eq!(
        count(&mut stream3).await,
        2 * PER_PHASE,
        "site 3 got events while cut off"
    );
    let reconnect = Instant::now();
    // The alias puts the name partners dial back into the network's DNS.
    docker(
        &["network", "connect", "--alias", "node3", &wan, &node3],
        Duration::from_secs(60),
    )
    .unwrap();
    wait_count(3, &mut stream3, 3 * PER_PHASE, Duration::from_secs(120)).await;
    say(format!(
        "phase 3: site 3 reconnected, caught up {} events in {:.1} s",
        PER_PHASE,
        reconnect.elapsed().as_secs_f64()
    ));

    // 4. Nothing lost, nothing foreign: exactly <site 1>:1..=N on both sites.
    let total = 3 * PER_PHASE;
    let expected: BTreeSet<String> = (1..=total).map(|s| format!("{me}:{s}")).collect();
    for (site, seen) in [(2, &seen2), (3, &seen3)] {
        let ids = wait_for(
            &format!("site {site}'s subscriber to see {total} distinct ids"),
            Duration::from_secs(30),
            || async {
                let ids = msg_ids(seen);
                (ids.len() as u64 >= total).then_some(ids)
            },
        )
        .await;
        assert_eq!(ids, expected, "site {site}: distinct Nats-Msg-Ids");
        let stored = cluster
            .get_json(site, "/api/resources/COMPUTE_RESOURCE?limit=1000")
            .await
            .unwrap();
        let stored = stored.as_array().cloned().unwrap_or_default();
        assert_eq!(
            stored.len() as u64,
            total,
            "site {site}'s node stores every resource"
        );
    }
    assert!(
        errors1.all().is_empty(),
        "site 1 refused events: {:?}",
        errors1.all()
    );
    assert_eq!(
        cluster.get_json(1, "/api/node").await.unwrap()["journal_head"],
        total,
        "site 1 journaled every event once"
    );
    {
        let mongo3 = cluster.container("mongo3");
        let n = docker(
            &[
                "exec",
                &mongo3,
                "python3",
                "-c",
                "from pymongo import MongoClient; \
                 print(MongoClient('127.0.0.1', 27017, directConnection=True)\
                 .opencloud.compute_resource.count_documents({}))",
            ],
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(n, total.to_string(), "site 3's MongoDB holds every resource");
        say(format!("site 3's MongoDB holds the {total} resources"));
    }

    let down = Instant::now();
    cluster.down();
    say(format!(
        "done: prepare {:.1} s, up {:.1} s, teardown {:.1} s, whole test {:.1} s",
        prep_time.as_secs_f64(),
        up_time.as_secs_f64(),
        down.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    ));
}
