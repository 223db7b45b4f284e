//! Helpers shared by the integration tests: sites (a nats-server plus a node), collectors of
//! what a site's NATS sees, and event builders.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use oc_discovery::testkit::{NatsServer, NodeProcess};
use serde_json::{json, Value};

pub const WAIT: Duration = Duration::from_secs(60);

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_oc-discovery"))
}

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
        let node = NodeProcess::new(&bin(), &nats.url()).expect("node");
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

/// A received NATS message, decoded.
#[derive(Debug, Clone)]
pub struct Seen {
    pub subject: String,
    pub msg_id: Option<String>,
    pub body: Value,
}

fn distinct(seen: &[Seen]) -> usize {
    seen.iter()
        .filter_map(|s| s.msg_id.as_deref())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Everything a site's NATS shows on some subjects, in arrival order per subject.
#[derive(Clone, Default)]
pub struct Collector(pub Arc<Mutex<Vec<Seen>>>);

impl Collector {
    pub async fn start(client: &async_nats::Client, subjects: &[&str]) -> Collector {
        let c = Collector::default();
        for s in subjects {
            let mut sub = client.subscribe(s.to_string()).await.expect("subscribe");
            let sink = c.0.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let msg_id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string());
                    let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                    sink.lock().unwrap().push(Seen {
                        subject: m.subject.to_string(),
                        msg_id,
                        body,
                    });
                }
            });
        }
        // Make sure the subscriptions reached the server before anything is published.
        client.flush().await.expect("flush");
        c
    }

    pub fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn distinct_msg_ids(&self) -> usize {
        distinct(&self.all())
    }

    /// Waits until `n` distinct `Nats-Msg-Id`s were seen.
    pub async fn wait_distinct(&self, what: &str, n: usize) {
        self.wait_for(what, |s| distinct(s) >= n).await;
    }

    pub async fn wait_for(&self, what: &str, mut cond: impl FnMut(&[Seen]) -> bool) {
        let inner = self.0.clone();
        oc_discovery::testkit::wait_until(what, WAIT, || cond(&inner.lock().unwrap()))
            .await
            .unwrap_or_else(|e| panic!("{e}; seen {} messages", self.len()));
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

/// A TCP relay in front of a node's libp2p port that the test can cut (a network
/// partition: bytes stop flowing, connections hang) and restore (hung connections are
/// dropped, new ones flow).
pub struct Relay {
    pub port: u16,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        // Even epochs flow, odd epochs are cut; a connection lives in one epoch only.
        let (cut, epochs) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut epochs = epochs.clone();
                tokio::spawn(async move {
                    let epoch = *epochs.borrow_and_update();
                    if epoch % 2 == 1 {
                        // Cut: accept and hold, never forward; dropped at restore.
                        let _ = epochs.changed().await;
                        return;
                    }
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let copying = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut ri, &mut wo) => {}
                            _ = tokio::io::copy(&mut ro, &mut wi) => {}
                        }
                    };
                    let cut = async {
                        let _ = epochs.wait_for(|e| *e != epoch).await;
                    };
                    tokio::select! {
                        _ = copying => return,
                        _ = cut => {}
                    }
                    // Cut: nothing flows, the sockets stay open until the network is back.
                    let _ = epochs.changed().await;
                    drop((ri, wi, ro, wo));
                });
            }
        });
        Relay { port, cut }
    }

    pub fn addr(&self, peer_id: &str) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer_id}", self.port)
    }

    pub fn cut(&self) {
        self.cut.send_modify(|e| *e |= 1);
    }

    pub fn restore(&self) {
        self.cut.send_modify(|e| *e = (*e | 1) + 1);
    }
}

/// A peer that speaks the node's protocols by hand, inside the test process (a rogue
/// partner, a scripted journal owner).
pub struct HandPeer {
    pub net: oc_discovery::p2p::Client,
    pub id: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl HandPeer {
    pub fn start(key: libp2p::identity::Keypair) -> HandPeer {
        let id = key.public().to_peer_id().to_string();
        let listen = ["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        let (net, event_loop) = oc_discovery::p2p::build(key, None, &listen).unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(event_loop.run(stop_rx));
        HandPeer { net, id, _stop: stop }
    }

    /// Opens the create stream to `site`'s node and says `hello` with `head`; the node's
    /// answer is left to the caller.
    pub async fn hello(
        &self,
        site: &Site,
        head: u64,
    ) -> (
        futures::io::ReadHalf<libp2p::Stream>,
        futures::io::WriteHalf<libp2p::Stream>,
    ) {
        use futures::AsyncReadExt;
        use oc_discovery::p2p::wire::{self, ResourceFrame};
        let peer = site.id().parse().unwrap();
        let addr = format!("/ip4/127.0.0.1/tcp/{}", site.node.p2p_port)
            .parse()
            .unwrap();
        self.net.dial(peer, addr, Duration::from_secs(10)).await.unwrap();
        let protocol = oc_discovery::p2p::StreamKind::Create.protocol();
        let stream = self
            .net
            .open_stream(peer, protocol, Duration::from_secs(10))
            .await
            .unwrap();
        let (r, mut w) = stream.split();
        wire::write_frame(
            &mut w,
            &ResourceFrame::Hello {
                origin: self.id.clone(),
                head,
            },
        )
        .await
        .unwrap();
        (r, w)
    }
}

/// Samples a process's resident memory every 50 ms and keeps the peak, until dropped: the
/// victim's memory in the hostile-peer tests.
pub struct RssPeak {
    peak: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    pub fn watch(pid: u32) -> RssPeak {
        use std::sync::atomic::{AtomicU64, Ordering};
        let peak = Arc::new(AtomicU64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some(rss) = oc_discovery::testkit::rss_of_pid(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssPeak { peak, task }
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}
