//! Hostile peers against the DHT record store, the peers table and the connection limits
//! (issue 12, points 5 and 7), each while a good partner keeps exchanging events with the
//! victim both ways.

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use oc_discovery::p2p::records::{self, PeerRecord};
use oc_testkit::{event, init_tracing, partner, Collector, HandPeer, RssPeak, Site, WAIT};
use serde_json::{json, Value};

const RSS_LIMIT: u64 = 256 * 1024 * 1024;
const FLOOD: usize = 20_000;
/// Puts of the flood in flight at once.
const FLOOD_IN_FLIGHT: usize = 24;
/// The whole flood must be sent within this.
const FLOOD_DEADLINE: Duration = Duration::from_secs(1200);

fn now_ms() -> u64 {
    oc_discovery::contract::now_ms()
}

/// Bytes of the files in `dir`, the test's log of the node excepted (the node itself
/// logs to stderr; the test harness puts that file there).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if entry.file_name() == "node.log" {
            continue;
        }
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// A victim and its good partner, both started, partners both ways.
async fn victim_and_partner(victim_args: &[&str]) -> (Site, Site) {
    let mut victim = Site::new().await;
    let mut good = Site::new().await;
    partner(&mut victim, &mut [&mut good]);
    victim
        .node
        .extra_args
        .extend(victim_args.iter().map(|s| s.to_string()));
    victim.node.extra_args.extend(["--name".into(), "victim".into()]);
    // Debug lines per refused record would only slow the victim down.
    victim.node.extra_env.push(("RUST_LOG".into(), "info".into()));
    victim.node.start_healthy().await.unwrap();
    good.node.start_healthy().await.unwrap();
    (victim, good)
}

/// Events published on each side, checked stored on the other.
struct Exchange {
    from_victim: Vec<String>,
    from_good: Vec<String>,
}

impl Exchange {
    fn new() -> Exchange {
        Exchange {
            from_victim: Vec::new(),
            from_good: Vec::new(),
        }
    }

    /// One event each way (journaled: the reply is `ok`).
    async fn round(&mut self, victim: &Site, good: &Site, tag: &str) {
        let n = self.from_victim.len();
        let id = format!("v-{tag}-{n}");
        victim
            .publish_ok(&event("PB_CREATE", &id, &victim.id(), json!({"n": n})))
            .await;
        self.from_victim.push(id);
        let id = format!("g-{tag}-{n}");
        good.publish_ok(&event("PB_CREATE", &id, &good.id(), json!({"n": n})))
            .await;
        self.from_good.push(id);
    }

    /// Every event arrived and is stored on the other side.
    async fn delivered(&self, victim: &Site, good: &Site) {
        for (site, want, what) in [
            (good, &self.from_victim, "victim's events at the good partner"),
            (victim, &self.from_good, "good partner's events at the victim"),
        ] {
            let deadline = Instant::now() + WAIT;
            loop {
                let stored: Vec<String> = site
                    .stored("COMPUTE_RESOURCE")
                    .await
                    .iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_owned))
                    .collect();
                let missing: Vec<&String> = want.iter().filter(|id| !stored.contains(id)).collect();
                if missing.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: {} of {} missing after {WAIT:?}, e.g. {:?}",
                    missing.len(),
                    want.len(),
                    missing.first()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The final `SEARCH_EVENT` of a `PB_SEARCH` of data type `PEER` on `site`.
async fn search_peer(site: &Site, events: &Collector, search: &str) -> Vec<Value> {
    let reply = site
        .request(&json!({"action": "PB_SEARCH", "data_type": "PEER", "user": "alice", "payload": {"search": search}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let query_id = reply["query_id"].as_str().expect("query_id").to_owned();
    events
        .wait_for("the final search event", |s| {
            s.iter()
                .any(|m| m.body["query_id"] == query_id.as_str() && m.body["done"] == true)
        })
        .await;
    events
        .all()
        .into_iter()
        .find(|m| m.body["query_id"] == query_id.as_str() && m.body["done"] == true)
        .and_then(|m| m.body["results"].as_array().cloned())
        .unwrap_or_default()
}

/// Searches until the results satisfy `good`, within [`WAIT`].
async fn search_peer_until(
    site: &Site,
    events: &Collector,
    search: &str,
    what: &str,
    good: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let results = search_peer(site, events, search).await;
        if good(&results) {
            return results;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {WAIT:?}: {results:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn metric(site: &Site, name: &str) -> u64 {
    site.node.metric(name).await.unwrap()
}

fn victim_addr(site: &Site) -> (PeerId, Multiaddr) {
    (
        site.id().parse().unwrap(),
        format!("/ip4/127.0.0.1/tcp/{}", site.node.p2p_port)
            .parse()
            .unwrap(),
    )
}

/// 20 000 valid records from fresh keys, put at the victim by one hostile peer (as a
/// relaying peer would): the store stays bounded, the peers table does not grow, an honest
/// node's record is still stored and found, a replayed older record is refused, and the
/// good partner keeps exchanging events both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_records_neither_fills_the_store_nor_the_disk() {
    init_tracing();
    let (victim, good) = victim_and_partner(&[]).await;
    let events = victim.collect(&["SEARCH_EVENT"]).await;
    let mut exchange = Exchange::new();
    exchange.round(&victim, &good, "before").await;
    exchange.delivered(&victim, &good).await;
    let disk_before = dir_bytes(victim.node.data_dir());
    let rss = RssPeak::watch(victim.node.pid().unwrap());

    // The hostile peer, connected to the victim.
    let attacker = HandPeer::start(Keypair::generate_ed25519());
    let (victim_id, addr) = victim_addr(&victim);
    attacker
        .net
        .dial(victim_id, addr.clone(), Duration::from_secs(10))
        .await
        .unwrap();

    // The flood, while the partners keep exchanging events.
    let started = Instant::now();
    let expires_at = now_ms() + 23 * 3600 * 1000;
    let fake: Multiaddr = "/ip4/10.9.9.9/tcp/4001".parse().unwrap();
    let net = attacker.net.clone();
    let flood = tokio::spawn(async move {
        futures::stream::iter(0..FLOOD)
            .map(|i| {
                let net = net.clone();
                let fake = fake.clone();
                async move {
                    let key = Keypair::generate_ed25519();
                    let record = PeerRecord::sign(&key, &format!("flood-{i}"), &[fake], expires_at).unwrap();
                    let dht_key = records::peer_key(&key.public().to_peer_id());
                    net.put_record_to(victim_id, dht_key, record.encode(), Duration::from_secs(20))
                        .await
                        .is_ok()
                }
            })
            .buffer_unordered(FLOOD_IN_FLIGHT)
            .fold(0usize, |n, ok| async move { n + usize::from(ok) })
            .await
    });
    let mut rounds = 0;
    while !flood.is_finished() {
        assert!(
            started.elapsed() < FLOOD_DEADLINE,
            "flood not sent within {FLOOD_DEADLINE:?}"
        );
        exchange.round(&victim, &good, "during").await;
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let accepted = flood.await.unwrap();
    let flood_time = started.elapsed();
    exchange.round(&victim, &good, "after").await;

    let stored = metric(&victim, "oc_dht_records").await;
    let evicted = metric(&victim, "oc_dht_records_evicted_total").await;
    let store_bytes = metric(&victim, "oc_dht_record_bytes").await;
    eprintln!(
        "flood: {accepted} of {FLOOD} puts answered in {flood_time:?}; victim stores {stored} records \
         ({store_bytes} bytes), evicted {evicted}; {rounds} exchange rounds during the flood"
    );
    assert!(accepted > FLOOD / 2, "the victim answered {accepted} puts");
    assert!(stored <= oc_discovery::p2p::DHT_MAX_RECORDS as u64, "{stored}");
    assert!(
        store_bytes <= oc_discovery::p2p::DHT_MAX_BYTES as u64,
        "{store_bytes}"
    );
    assert!(
        evicted as usize >= accepted.saturating_sub(oc_discovery::p2p::DHT_MAX_RECORDS),
        "a full store evicts: {evicted}"
    );

    // An honest node joining now is stored and found by the victim.
    let mut honest = Site::new().await;
    honest.node.extra_args.extend([
        "--name".to_owned(),
        "honest-new".to_owned(),
        "--bootstrap".to_owned(),
        victim.node.addr(),
    ]);
    honest.node.start_healthy().await.unwrap();
    let found = search_peer_until(&victim, &events, "honest-new", "record of the honest node", |r| {
        r.iter().any(|x| x["peer_id"] == honest.id().as_str())
    })
    .await;
    let record = PeerRecord::from_value(&found[0]).unwrap();
    record.verify(now_ms()).expect("a valid record");
    let by_id = search_peer(&victim, &events, &honest.id()).await;
    assert_eq!(by_id.len(), 1, "{by_id:?}");

    // A replayed older record is refused, and the newer one stays.
    let owner_key = Keypair::generate_ed25519();
    let owner = HandPeer::start(owner_key.clone());
    owner
        .net
        .dial(victim_id, addr.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    let owner_id = owner_key.public().to_peer_id();
    let here: Multiaddr = "/ip4/127.0.0.1/tcp/4999".parse().unwrap();
    let old = PeerRecord::sign_at(
        &owner_key,
        "replayed",
        std::slice::from_ref(&fake_addr()),
        Some(now_ms() - 10_000),
        expires_at,
    )
    .unwrap();
    let new = PeerRecord::sign_at(
        &owner_key,
        "replayed",
        std::slice::from_ref(&here),
        Some(now_ms()),
        expires_at,
    )
    .unwrap();
    owner
        .net
        .put_record_to(
            victim_id,
            records::peer_key(&owner_id),
            new.encode(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let stale_before = metric(
        &victim,
        "oc_peer_records_rejected_total{via=\"put\",reason=\"stale\"}",
    )
    .await;
    // The attacker replays the old one (it answers "stored": Kademlia has no refusal).
    attacker
        .net
        .put_record_to(
            victim_id,
            records::peer_key(&owner_id),
            old.encode(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while metric(
        &victim,
        "oc_peer_records_rejected_total{via=\"put\",reason=\"stale\"}",
    )
    .await
        <= stale_before
    {
        assert!(Instant::now() < deadline, "the replayed record was not refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let current = search_peer_until(
        &victim,
        &events,
        &owner_id.to_string(),
        "the owner's record",
        |r| !r.is_empty(),
    )
    .await;
    assert_eq!(current[0]["issued_at"], new.issued_at.unwrap(), "{current:?}");
    assert_eq!(current[0]["addrs"], json!([here.to_string()]));
    assert!(
        victim
            .node
            .log()
            .lines()
            .any(|l| l.contains("peer record refused") && l.contains("\"stale\"")),
        "a refusal log line with its code"
    );

    // The good partner's events, both ways, all stored.
    exchange.delivered(&victim, &good).await;
    let disk_after = dir_bytes(victim.node.data_dir());
    let grown = disk_after.saturating_sub(disk_before);
    let peak = rss.peak();
    let known_dropped = metric(&victim, "oc_known_peers_dropped_total").await;
    eprintln!(
        "victim: data dir {disk_before} -> {disk_after} bytes (+{grown}), peak RSS {} MiB, \
         known peers dropped {known_dropped}; {} events each way delivered",
        peak / (1024 * 1024),
        exchange.from_victim.len()
    );
    assert!(grown < 4 * 1024 * 1024, "data dir grew by {grown} bytes");
    assert!(peak > 0 && peak < RSS_LIMIT, "peak RSS {peak}");
}

fn fake_addr() -> Multiaddr {
    "/ip4/10.9.9.9/tcp/4001".parse().unwrap()
}

/// Peers that put their own records (one connection each) fill at most
/// `--max-known-peers` rows; the least recently seen go first, a blacklisted peer stays
/// whatever its age, and the partner keeps exchanging events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_peers_beyond_the_bound_are_dropped_least_recently_seen_first() {
    init_tracing();
    const MAX_KNOWN: usize = 10;
    const PEERS: usize = 30;
    let (mut victim, good) = victim_and_partner(&["--max-known-peers", "10"]).await;
    let mut exchange = Exchange::new();
    // The oldest row of all: blacklisted, never dropped.
    let black = Keypair::generate_ed25519().public().to_peer_id();
    let body = json!({"peer_id": black.to_string(), "relation": "blacklist"}).to_string();
    let admin = victim.node.admin_url();
    let (status, answer) = tokio::task::spawn_blocking(move || {
        oc_discovery::cli::http_request("POST", &admin, "/api/partners", Some(&body))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200, "{answer}");

    let (victim_id, addr) = victim_addr(&victim);
    let expires_at = now_ms() + 3600 * 1000;
    let mut ids = Vec::new();
    for i in 0..PEERS {
        // One peer at a time, each written before the next is seen.
        let met_before = metric(&victim, "oc_peer_records_met_total").await;
        let key = Keypair::generate_ed25519();
        let peer = HandPeer::start(key.clone());
        peer.net
            .dial(victim_id, addr.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        let id = key.public().to_peer_id();
        let record = PeerRecord::sign(&key, &format!("own-{i}"), &[fake_addr()], expires_at).unwrap();
        peer.net
            .put_record_to(
                victim_id,
                records::peer_key(&id),
                record.encode(),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while metric(&victim, "oc_peer_records_met_total").await <= met_before {
            assert!(Instant::now() < deadline, "record {i} not met");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids.push(id.to_string());
        if i % 10 == 0 {
            exchange.round(&victim, &good, "known").await;
        }
    }
    let dropped = metric(&victim, "oc_known_peers_dropped_total").await;
    assert!(dropped >= (PEERS - MAX_KNOWN) as u64, "{dropped} dropped");
    exchange.round(&victim, &good, "end").await;
    exchange.delivered(&victim, &good).await;

    // What the victim's peers table holds, read from its file once it stopped.
    victim.node.stop();
    let store =
        oc_discovery::store::embedded::EmbeddedStore::open(&victim.node.data_dir().join("store.redb"))
            .unwrap();
    use oc_discovery::store::{Relation, Store};
    let rows = store.peers().await.unwrap();
    let known: Vec<&str> = rows
        .iter()
        .filter(|r| r.relation == Relation::Known)
        .map(|r| r.peer_id.as_str())
        .collect();
    eprintln!("known rows kept: {}, dropped {dropped}", known.len());
    assert_eq!(known.len(), MAX_KNOWN, "{known:?}");
    // The most recently seen hostile peers are kept (the partner's own row may take one slot).
    for id in &ids[PEERS - MAX_KNOWN + 1..] {
        assert!(known.contains(&id.as_str()), "{id} was seen last and dropped");
    }
    for id in &ids[..PEERS - MAX_KNOWN - 1] {
        assert!(!known.contains(&id.as_str()), "{id} was seen first and kept");
    }
    assert!(
        rows.iter()
            .any(|r| r.peer_id == black.to_string() && r.relation == Relation::Blacklist),
        "the blacklisted row stays"
    );
}

/// A raw libp2p swarm with no behaviour: it only holds connections open.
fn raw_swarm(key: Keypair) -> libp2p::Swarm<libp2p::swarm::dummy::Behaviour> {
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

/// Dials `victim` `n` times from `swarm` and returns how many connections are still open
/// once each dial was established and, if refused, closed again.
async fn hold_connections(
    swarm: &mut libp2p::Swarm<libp2p::swarm::dummy::Behaviour>,
    victim: PeerId,
    addr: &Multiaddr,
    n: usize,
    settle: Duration,
) -> usize {
    for _ in 0..n {
        swarm
            .dial(
                DialOpts::peer_id(victim)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::Always)
                    .build(),
            )
            .unwrap();
    }
    let mut open = 0usize;
    let mut settled = 0usize;
    let deadline = tokio::time::Instant::now() + WAIT;
    // Every dial ends established or failed; refused ones are closed by the victim right
    // after the handshake. Then wait `settle` for closes still on their way.
    let mut quiet_until: Option<tokio::time::Instant> = None;
    loop {
        let until = quiet_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, swarm.select_next_some()).await {
            Ok(SwarmEvent::ConnectionEstablished { .. }) => {
                open += 1;
                settled += 1;
            }
            Ok(SwarmEvent::OutgoingConnectionError { .. }) => settled += 1,
            Ok(SwarmEvent::ConnectionClosed { .. }) => open = open.saturating_sub(1),
            Ok(_) => {}
            Err(_) => {
                assert!(quiet_until.is_some(), "dials did not settle within {WAIT:?}");
                return open;
            }
        }
        if settled >= n && quiet_until.is_none() {
            quiet_until = Some(tokio::time::Instant::now() + settle);
        }
    }
}

/// Many connections from one hostile peer, then from many: beyond the limits they are
/// refused (per peer, then in total), and the partner, exempt, stays online and keeps
/// exchanging events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limits_are_refused_and_the_partner_stays_online() {
    init_tracing();
    let (victim, good) =
        victim_and_partner(&["--max-connections-per-peer", "2", "--max-connections", "8"]).await;
    let mut exchange = Exchange::new();
    exchange.round(&victim, &good, "before").await;
    exchange.delivered(&victim, &good).await;
    let rss = RssPeak::watch(victim.node.pid().unwrap());
    let (victim_id, addr) = victim_addr(&victim);

    // One peer, 20 connections: 2 stay.
    let mut one = raw_swarm(Keypair::generate_ed25519());
    let held = hold_connections(&mut one, victim_id, &addr, 20, Duration::from_secs(2)).await;
    assert_eq!(held, 2, "connections from one peer held open");
    let per_peer = metric(&victim, "oc_connections_refused_total{limit=\"per_peer\"}").await;
    assert_eq!(per_peer, 18);
    exchange.round(&victim, &good, "per-peer").await;

    // 12 more peers: the total of 8 (partner connections counted, never refused) is reached.
    let mut many: Vec<_> = (0..12).map(|_| raw_swarm(Keypair::generate_ed25519())).collect();
    let mut held_total = held;
    for s in many.iter_mut() {
        held_total += hold_connections(s, victim_id, &addr, 1, Duration::from_millis(500)).await;
    }
    let total = metric(&victim, "oc_connections_refused_total{limit=\"total\"}").await;
    eprintln!("held {held_total} hostile connections; refused: per peer {per_peer}, total {total}");
    assert!(total > 0, "the total limit refused some");
    assert!(held_total <= 8, "{held_total} hostile connections held");
    assert!(victim
        .node
        .log()
        .contains("inbound connection refused by a limit"));

    // The partner stays online and events flow both ways.
    exchange.round(&victim, &good, "after").await;
    exchange.delivered(&victim, &good).await;
    let links = good.node.get_json("/api/peers").await.unwrap();
    let state = links
        .as_array()
        .and_then(|a| a.iter().find(|l| l["peer_id"] == victim.id().as_str()))
        .map(|l| l["state"].clone());
    assert_eq!(state, Some(json!("online")), "{links}");
    let peak = rss.peak();
    eprintln!("victim peak RSS {} MiB", peak / (1024 * 1024));
    assert!(peak < RSS_LIMIT);
    drop(many);
}
