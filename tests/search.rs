//! Peer records in the DHT and PB_SEARCH: peers by id and name, forged and expired records,
//! `partner` / `known` / `all` resource searches with access rules, limits, duplicates, a
//! silent peer and results larger than a frame.

use oc_testkit::{event, init_tracing, partner, Collector, HandPeer, Site, WAIT};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use oc_discovery::p2p::records::{self, PeerRecord};
use oc_discovery::p2p::wire::{self, SearchFrame};
use oc_discovery::search::PROTOCOL_SEARCH;
use serde_json::{json, Value};

/// What one search produced on the searcher's `SEARCH_EVENT`.
#[derive(Debug)]
struct Outcome {
    batches: Vec<Value>,
    done: Value,
    /// From the request to the final event.
    elapsed: Duration,
}

impl Outcome {
    fn results(&self) -> Vec<Value> {
        self.batches
            .iter()
            .flat_map(|b| b["results"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .results()
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        ids
    }

    fn from(&self, peer: &str) -> Vec<&Value> {
        self.batches.iter().filter(|b| b["from_peer"] == peer).collect()
    }
}

async fn search(site: &Site, events: &Collector, data_type: &str, payload: Value) -> Outcome {
    let started = Instant::now();
    let reply = site
        .request(&json!({"action": "PB_SEARCH", "data_type": data_type, "user": "alice", "payload": payload}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let query_id = reply["query_id"].as_str().expect("query_id").to_owned();
    assert_eq!(query_id.len(), 16, "{query_id}");
    events
        .wait_for("the final search event", |s| {
            s.iter()
                .any(|m| m.body["query_id"] == query_id.as_str() && m.body["done"] == true)
        })
        .await;
    let elapsed = started.elapsed();
    let mine: Vec<Value> = events
        .all()
        .into_iter()
        .map(|m| m.body)
        .filter(|b| b["query_id"] == query_id.as_str())
        .collect();
    let done = mine.iter().find(|b| b["done"] == true).cloned().unwrap();
    let batches = mine.into_iter().filter(|b| b["done"] == false).collect();
    Outcome {
        batches,
        done,
        elapsed,
    }
}

/// Repeats a search until `good` holds (the DHT and gossip mesh form in the background).
async fn search_until(
    site: &Site,
    events: &Collector,
    data_type: &str,
    payload: Value,
    what: &str,
    good: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let deadline = Instant::now() + WAIT;
    loop {
        let outcome = search(site, events, data_type, payload.clone()).await;
        if good(&outcome) {
            return outcome;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {WAIT:?}; last: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn peer_results(o: &Outcome) -> Vec<Value> {
    o.done["results"].as_array().cloned().unwrap_or_default()
}

fn named(mut sites: Vec<Site>, names: &[&str]) -> Vec<Site> {
    for (s, n) in sites.iter_mut().zip(names) {
        s.node.extra_args.extend(["--name".to_owned(), n.to_string()]);
    }
    sites
}

fn bootstrap_from(site: &mut Site, hub: &str) {
    site.node
        .extra_args
        .extend(["--bootstrap".to_owned(), hub.to_owned()]);
}

/// Puts raw bytes in the DHT from `peer` until some peer took them.
async fn put_raw(peer: &HandPeer, key: Vec<u8>, value: Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let put = peer
            .net
            .put_record(key.clone(), value.clone(), None, Duration::from_secs(10))
            .await;
        if put.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "rogue record never stored: {put:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> u64 {
    oc_discovery::contract::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_records_are_found_through_the_dht_and_forged_or_expired_ones_ignored() {
    init_tracing();
    let mut sites = named(
        vec![
            Site::new().await,
            Site::new().await,
            Site::new().await,
            Site::new().await,
            Site::new().await,
        ],
        &["site-a", "site-b", "site-c", "site-d", "site-e"],
    );
    let hub = sites[0].node.addr();
    for s in sites.iter_mut().skip(1) {
        bootstrap_from(s, &hub);
    }
    // C re-signs every 2 s: its record must stay findable long after 4 s.
    sites[2]
        .node
        .extra_args
        .extend(["--record-ttl".to_owned(), "4s".to_owned()]);
    let mut e = sites.pop().unwrap();
    for s in sites.iter_mut() {
        s.node.start_healthy().await.unwrap();
    }
    let (b, c, d) = (&sites[1], &sites[2], &sites[3]);
    let events_d = d.collect(&["SEARCH_EVENT"]).await;

    // D knows only the hub, yet finds C by id and by name.
    let by_id = search_until(
        d,
        &events_d,
        "PEER",
        json!({"search": c.id()}),
        "record of C",
        |o| !peer_results(o).is_empty(),
    )
    .await;
    let first = PeerRecord::from_value(&peer_results(&by_id)[0]).unwrap();
    let verified = first.verify(now_ms()).expect("a valid signed record");
    assert_eq!(verified.peer.to_string(), c.id());
    assert_eq!(first.name, "site-c");
    let c_addr = format!("/ip4/127.0.0.1/tcp/{}", c.node.p2p_port);
    assert!(first.addrs.contains(&c_addr), "{first:?}");
    assert_eq!(by_id.done["data_type"], "PEER");
    let by_name = search(d, &events_d, "PEER", json!({"search": "site-c"})).await;
    let named_c = peer_results(&by_name);
    assert_eq!(named_c.len(), 1, "{by_name:?}");
    assert_eq!(named_c[0]["peer_id"], c.id().as_str());

    // A node that joins late has none of the records in its store: it asks the DHT.
    e.node.start_healthy().await.unwrap();
    let e = &e;
    let events_e = e.collect(&["SEARCH_EVENT"]).await;
    let b_by_name = search_until(
        e,
        &events_e,
        "PEER",
        json!({"search": "site-b"}),
        "record of B",
        |o| !peer_results(o).is_empty(),
    )
    .await;
    assert_eq!(peer_results(&b_by_name)[0]["peer_id"], b.id().as_str());
    let b_by_id = search(e, &events_e, "PEER", json!({"search": b.id()})).await;
    assert_eq!(peer_results(&b_by_id)[0]["name"], "site-b");

    // A rogue joins the DHT and puts forged and expired records.
    let rogue = HandPeer::fresh();
    rogue.net.bootstrap(hub.parse().unwrap()).await.unwrap();
    let rogue_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", rogue.port).parse().unwrap();
    let mut forged = PeerRecord::sign(
        &rogue.key,
        "forged-site",
        std::slice::from_ref(&rogue_addr),
        now_ms() + 60_000,
    )
    .unwrap();
    forged.addrs = vec!["/ip4/127.0.0.1/tcp/1".into()];
    put_raw(&rogue, records::name_key("forged-site"), forged.encode()).await;
    let expired = PeerRecord::sign(
        &rogue.key,
        "expired-site",
        std::slice::from_ref(&rogue_addr),
        now_ms() - 1_000,
    )
    .unwrap();
    put_raw(&rogue, records::name_key("expired-site"), expired.encode()).await;
    // C's identity with the rogue's key and address.
    let mut stolen = PeerRecord::sign(
        &rogue.key,
        "site-c",
        std::slice::from_ref(&rogue_addr),
        now_ms() + 60_000,
    )
    .unwrap();
    stolen.peer_id = c.id();
    let c_peer: PeerId = c.id().parse().unwrap();
    put_raw(&rogue, records::peer_key(&c_peer), stolen.encode()).await;

    let deadline = Instant::now() + WAIT;
    loop {
        // Only the rogue holds these: D's lookups reach it and refuse what it serves.
        let f = search(d, &events_d, "PEER", json!({"search": "forged-site"})).await;
        assert!(peer_results(&f).is_empty(), "forged record served: {f:?}");
        let x = search(d, &events_d, "PEER", json!({"search": "expired-site"})).await;
        assert!(peer_results(&x).is_empty(), "expired record served: {x:?}");
        let bad_sig = d
            .node
            .metric("oc_peer_records_rejected_total{via=\"get\",reason=\"bad_signature\"}")
            .await
            .unwrap();
        let old = d
            .node
            .metric("oc_peer_records_rejected_total{via=\"get\",reason=\"expired\"}")
            .await
            .unwrap();
        if bad_sig > 0 && old > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "D never met the rogue's records (bad_signature {bad_sig}, expired {old})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Nodes refused the rogue's puts too.
    let mut refused_puts = 0;
    for s in sites.iter().chain([e]) {
        for reason in ["bad_signature", "expired", "peer_id_mismatch"] {
            refused_puts += s
                .node
                .metric(&format!(
                    "oc_peer_records_rejected_total{{via=\"put\",reason=\"{reason}\"}}"
                ))
                .await
                .unwrap();
        }
    }
    assert!(refused_puts >= 3, "only {refused_puts} rogue puts refused");

    // C's record is still its own, and re-signed: its 4 s TTL passed twice meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = search(e, &events_e, "PEER", json!({"search": c.id()})).await;
    let records_c = peer_results(&again);
    assert_eq!(records_c.len(), 1, "{again:?}");
    let later = PeerRecord::from_value(&records_c[0]).unwrap();
    later.verify(now_ms()).expect("valid");
    assert!(later.expires_at > first.expires_at + 4_000, "republished");
    assert!(later.addrs.contains(&c_addr), "{later:?}");
}

/// Publishes a resource of `site` and waits for its journal.
async fn offer(site: &Site, id: &str, extra: Value) {
    let mut body = event("PB_CREATE", id, &site.id(), extra);
    body["data_type"] = json!("COMPUTE_RESOURCE");
    site.publish_ok(&body).await;
}

/// The search text of the catalog's GPU resources. Matching looks at every value, the
/// resources' `creator_id` too, and a random peer id holds "gpu" in some case about once in
/// 800 ids; the space, never in a base58 peer id, keeps the non-GPU resources out by their
/// names alone.
const GPU: &str = "gpu ";

/// Each site offers a public, a partners-only and a private GPU, and a CPU.
async fn offer_catalog(site: &Site, tag: &str) {
    offer(
        site,
        &format!("{tag}-pub"),
        json!({"name": "GPU box", "access": "public"}),
    )
    .await;
    offer(
        site,
        &format!("{tag}-partners"),
        json!({"name": "gpu for partners", "access": "partners"}),
    )
    .await;
    offer(
        site,
        &format!("{tag}-private"),
        json!({"name": "gpu secret", "access": "private"}),
    )
    .await;
    offer(
        site,
        &format!("{tag}-cpu"),
        json!({"name": "cpu only", "cores": 8}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_known_and_all_searches_follow_access_rules_and_limits() {
    init_tracing();
    let mut sites = named(
        vec![
            Site::new().await,
            Site::new().await,
            Site::new().await,
            Site::new().await,
        ],
        &["searcher", "partner-b", "known-c", "known-d"],
    );
    let hub = sites[0].node.addr();
    for s in sites.iter_mut().skip(1) {
        bootstrap_from(s, &hub);
    }
    {
        let (a, rest) = sites.split_at_mut(1);
        partner(&mut a[0], &mut [&mut rest[0]]);
    }
    for s in sites.iter_mut() {
        s.node.start_healthy().await.unwrap();
    }
    let (a, b, c, d) = (&sites[0], &sites[1], &sites[2], &sites[3]);
    offer_catalog(b, "b").await;
    for i in 0..5 {
        offer(
            b,
            &format!("b-extra-{i}"),
            json!({"name": format!("spare gpu {i}")}),
        )
        .await;
    }
    offer_catalog(c, "c").await;
    offer_catalog(d, "d").await;
    let events = a.collect(&["SEARCH_EVENT"]).await;
    let errors = a.collect(&["PROPALGATION_ERROR"]).await;

    // partner: B only, partners-only resources included, private never, case-insensitive.
    let p = search(
        a,
        &events,
        "COMPUTE_RESOURCE",
        json!({"type": "partner", "search": GPU.to_uppercase(), "timeout_ms": 20_000}),
    )
    .await;
    let mut want: Vec<String> = ["b-pub", "b-partners"].map(String::from).to_vec();
    want.extend((0..5).map(|i| format!("b-extra-{i}")));
    want.sort();
    assert_eq!(p.ids(), want, "{p:?}");
    assert_eq!(p.done["peers_answered"], 1, "{:?}", p.done);
    assert_eq!(p.done["peers_targeted"], 1);
    assert!(p
        .batches
        .iter()
        .all(|x| x["from_peer"] == b.id().as_str() && x["data_type"] == "COMPUTE_RESOURCE"));
    assert!(
        p.elapsed < Duration::from_secs(15),
        "ends when every partner answered: {:?}",
        p.elapsed
    );

    // known: C and D (met through the DHT), public resources only.
    let k = search_until(
        a,
        &events,
        "COMPUTE_RESOURCE",
        json!({"type": "known", "search": GPU}),
        "answers of both known peers",
        |o| o.done["peers_answered"] == 2,
    )
    .await;
    assert_eq!(k.ids(), vec!["c-pub", "d-pub"], "{k:?}");
    assert_eq!(k.from(&c.id()).len(), 1);
    assert_eq!(k.from(&d.id()).len(), 1);

    // The limit holds across peers.
    let l = search(
        a,
        &events,
        "COMPUTE_RESOURCE",
        json!({"type": "partner", "search": GPU, "limit": 3}),
    )
    .await;
    assert_eq!(l.results().len(), 3, "{l:?}");
    assert_eq!(l.done["results_total"], 3);

    // all: over gossip, every site answers with what it may show the searcher.
    let mut want_all = want.clone();
    want_all.extend(["c-pub", "d-pub"].map(String::from));
    want_all.sort();
    let all = search_until(
        a,
        &events,
        "COMPUTE_RESOURCE",
        json!({"type": "all", "search": GPU, "timeout_ms": 2000}),
        "answers from every site over gossip",
        |o| o.ids() == want_all,
    )
    .await;
    assert_eq!(all.done["peers_answered"], 3, "{:?}", all.done);
    assert!(
        all.elapsed >= Duration::from_millis(1900),
        "all waits for its deadline"
    );
    assert!(!all
        .ids()
        .iter()
        .any(|i| i.ends_with("private") || i.ends_with("cpu")));
    assert!(a.node.metric("oc_search_queries_answered_total").await.unwrap() == 0);
    assert!(c.node.metric("oc_search_queries_answered_total").await.unwrap() > 0);

    // Bad input: the reply and the error event say what is wrong.
    for (payload, code) in [
        (json!({"type": "all"}), "missing_field"),
        (json!({"type": "friends", "search": "x"}), "invalid_field"),
        (json!({"type": "all", "search": "x", "limit": 0}), "invalid_field"),
        (json!({"search": "x"}), "missing_field"),
    ] {
        let reply = a
            .request(&json!({"action": "PB_SEARCH", "data_type": "COMPUTE_RESOURCE", "payload": payload}))
            .await;
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"]["code"], code, "{payload} → {reply}");
    }
    let reply = a
        .request(&json!({"action": "PB_SEARCH", "data_type": "PEER", "payload": {}}))
        .await;
    assert_eq!(reply["error"]["code"], "missing_field", "{reply}");
    errors.wait_for("five error events", |s| s.len() >= 5).await;
    assert!(errors
        .all()
        .iter()
        .all(|m| m.body["error"]["code"] == "missing_field" || m.body["error"]["code"] == "invalid_field"));
}

/// A partner that takes the search stream and never says a word.
fn silent_responder(peer: &HandPeer) {
    let mut incoming = peer.net.accept(PROTOCOL_SEARCH).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, stream)) = futures::StreamExt::next(&mut incoming).await {
            held.push(stream);
        }
    });
}

/// A partner that answers every query with duplicates (its own resources), across two
/// batches.
fn duplicating_responder(peer: &HandPeer) {
    let mut incoming = peer.net.accept(PROTOCOL_SEARCH).unwrap();
    let me = peer.peer_id().to_string();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = futures::StreamExt::next(&mut incoming).await {
            let me = me.clone();
            tokio::spawn(async move {
                let Ok(Some(SearchFrame::SearchQuery {
                    query_id, data_type, ..
                })) = wire::read_frame(&mut stream, 1 << 20).await
                else {
                    return;
                };
                let r = |id: &str| json!({"id": id, "creator_id": me, "name": "bulk from the echo"});
                for results in [
                    vec![r("dup-1"), r("dup-1"), r("dup-2")],
                    vec![r("dup-2"), r("dup-3")],
                ] {
                    let frame = SearchFrame::SearchResults {
                        query_id: query_id.clone(),
                        data_type: Some(data_type.clone()),
                        results,
                    };
                    wire::write_frame(&mut stream, &frame).await.unwrap();
                }
                let done = SearchFrame::SearchDone {
                    query_id,
                    count: 5,
                    skipped: 0,
                };
                wire::write_frame(&mut stream, &done).await.unwrap();
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_ends_at_the_deadline_and_large_answers_come_in_batches() {
    init_tracing();
    let silent = HandPeer::fresh();
    silent_responder(&silent);
    let echo = HandPeer::fresh();
    duplicating_responder(&echo);
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    a.node.partners.push(silent.addr());
    a.node.partners.push(echo.addr());
    // Frames of 4 KiB at the searcher: the responder cuts its answer to fit.
    a.node
        .extra_args
        .extend(["--max-frame-bytes".to_owned(), "4096".to_owned()]);
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    for i in 0..60 {
        offer(
            &b,
            &format!("bulk-{i:02}"),
            json!({"name": format!("bulk storage unit {i}"), "pad": "z".repeat(80)}),
        )
        .await;
    }
    let events = a.collect(&["SEARCH_EVENT"]).await;

    let o = search(
        &a,
        &events,
        "COMPUTE_RESOURCE",
        json!({"type": "partner", "search": "bulk", "timeout_ms": 4000}),
    )
    .await;
    // The silent partner holds the search until its deadline.
    assert!(o.elapsed >= Duration::from_millis(3900), "{:?}", o.elapsed);
    assert!(o.elapsed < Duration::from_secs(12), "{:?}", o.elapsed);
    assert_eq!(o.done["peers_targeted"], 3, "{:?}", o.done);
    assert_eq!(o.done["peers_answered"], 2, "{:?}", o.done);
    // B's 60 results do not fit in one 4 KiB frame: several batches, each under the cap.
    let from_b = o.from(&b.id());
    assert!(from_b.len() >= 2, "{} batches from B", from_b.len());
    for batch in &from_b {
        assert!(batch["results"].to_string().len() < 4096);
    }
    let b_ids: Vec<String> = o.ids().into_iter().filter(|i| i.starts_with("bulk-")).collect();
    assert_eq!(b_ids.len(), 60);
    // The echo's duplicates are dropped.
    let echo_ids: Vec<String> = o.ids().into_iter().filter(|i| i.starts_with("dup-")).collect();
    assert_eq!(echo_ids, vec!["dup-1", "dup-2", "dup-3"], "{o:?}");
    assert_eq!(o.done["results_total"], 63);

    // A limit smaller than one peer's answer.
    let l = search(
        &a,
        &events,
        "COMPUTE_RESOURCE",
        json!({"type": "partner", "search": "bulk", "timeout_ms": 2000, "limit": 7}),
    )
    .await;
    assert_eq!(l.results().len(), 7, "{l:?}");
}
