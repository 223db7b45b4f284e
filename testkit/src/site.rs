//! A site of the integration tests: a nats-server, a node (not started) and a NATS client
//! for the site's application; partnerships between sites, event builders, and the traffic
//! a good partner keeps exchanging with a victim during an attack.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{node_binary, Collector, NatsServer, NodeProcess};

/// Longest wait for any one condition of an integration test.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
}

/// One site: its NATS, its node (not started), and a NATS client for the "application".
pub struct Site {
    pub node: NodeProcess,
    pub app: async_nats::Client,
    pub nats: NatsServer,
}

impl Site {
    /// A site whose NATS has no JetStream: the node answers requests itself.
    pub async fn new() -> Site {
        Site::on(NatsServer::start().expect("nats-server")).await
    }

    /// A site whose NATS has JetStream: durable intake, the server answers requests.
    pub async fn jetstream() -> Site {
        Site::on(NatsServer::start_jetstream().expect("nats-server")).await
    }

    async fn on(nats: NatsServer) -> Site {
        let binary = node_binary().expect("the oc-discovery binary");
        let node = NodeProcess::new(&binary, &nats.url()).expect("node");
        let app = async_nats::connect(nats.url()).await.expect("connect to NATS");
        Site { node, app, nats }
    }

    pub fn id(&self) -> String {
        self.node.peer_id.clone()
    }

    /// Publishes an event as a request and returns the node's reply.
    pub async fn request(&self, body: &Value) -> Value {
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            self.app.request("PROPALGATION_EVENT", body.to_string().into()),
        )
        .await
        .expect("reply within 30 s")
        .expect("request");
        serde_json::from_slice(&reply.payload).expect("JSON reply")
    }

    /// Publishes an event and expects `ok`; returns its seq.
    pub async fn publish_ok(&self, body: &Value) -> u64 {
        let reply = self.request(body).await;
        assert_eq!(reply["ok"], true, "refused: {reply}");
        reply["seq"].as_u64().expect("seq")
    }

    pub async fn collect(&self, subjects: &[&str]) -> Collector {
        Collector::start(&self.app, subjects).await
    }

    /// Publishes without waiting for anything but the client's buffer.
    pub async fn publish(&self, body: &Value) {
        self.app
            .publish("PROPALGATION_EVENT", body.to_string().into())
            .await
            .expect("publish");
    }

    /// The resources this site's node stored for a data type (all pages).
    pub async fn stored(&self, data_type: &str) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let after = all
                .last()
                .and_then(|r| r["id"].as_str())
                .map(|id| format!("&after={id}"))
                .unwrap_or_default();
            let page = self
                .node
                .get_json(&format!("/api/resources/{data_type}?limit=10000{after}"))
                .await
                .expect("resources");
            let page = page.as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }
}

/// Makes `a` replicate to each of `others` and each of them accept `a`.
pub fn partner(a: &mut Site, others: &mut [&mut Site]) {
    for o in others.iter_mut() {
        a.node.partners.push(o.node.addr());
        o.node.partners.push(a.node.addr());
    }
}

pub fn event(action: &str, id: &str, creator: &str, extra: Value) -> Value {
    let mut payload = json!({"id": id, "creator_id": creator});
    if let (Some(p), Some(e)) = (payload.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
    json!({"action": action, "data_type": "COMPUTE_RESOURCE", "user": "alice", "from_app": "oc-catalog", "payload": payload})
}

/// A JetStream stream on `site`'s NATS capturing what its node publishes, deduplicated on
/// `Nats-Msg-Id`: its message count is the number of distinct events published.
pub async fn capture_notices(site: &Site) -> async_nats::jetstream::stream::Stream {
    let js = async_nats::jetstream::new(site.app.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "TEST_NOTICES".into(),
        subjects: vec!["CREATE_RESOURCE".into(), "REMOVE_RESOURCE".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .expect("notices stream")
}

pub async fn stream_count(stream: &mut async_nats::jetstream::stream::Stream) -> u64 {
    match stream.info().await {
        Ok(info) => info.state.messages,
        Err(_) => 0,
    }
}

/// Polls an async condition every 100 ms until it holds, within [`WAIT`].
///
/// # Panics
/// The condition did not hold in time; the message says what was awaited.
pub async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `n` events on each side (`<round>-v-<i>` from the victim, `<round>-g-<i>` from
/// the good partner, each answered `ok`), then waits until each side stored the other's.
///
/// # Panics
/// An event is refused, or not stored on the other side within [`WAIT`].
pub async fn exchange(victim: &Site, good: &Site, round: &str, n: usize) {
    for i in 0..n {
        let id = format!("{round}-v-{i}");
        victim
            .publish_ok(&event("PB_CREATE", &id, &victim.id(), json!({})))
            .await;
        let id = format!("{round}-g-{i}");
        good.publish_ok(&event("PB_CREATE", &id, &good.id(), json!({})))
            .await;
    }
    for (site, prefix) in [(good, format!("{round}-v-")), (victim, format!("{round}-g-"))] {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = site
                .stored("COMPUTE_RESOURCE")
                .await
                .iter()
                .filter(|r| r["id"].as_str().is_some_and(|id| id.starts_with(&prefix)))
                .count();
            if got >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: only {got} of {n} events {prefix}* stored on {}",
                site.id()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
