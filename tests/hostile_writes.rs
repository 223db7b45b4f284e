//! No foreign writes (issue 12, point 1): a hostile partner, a hand-driven libp2p peer that
//! the victim lists as a partner, sends `PB_DELETE` / `PB_CREATE` / `PB_UPDATE` for
//! resources it does not own at the victim's site: one of the victim's own resources, and
//! (victim on MongoDB) documents the site's application wrote straight into MongoDB. Each
//! is answered `conflict`, changes nothing and publishes nothing, the applied mark moves
//! past it (a later valid entry of the attacker is applied), while a good partner (a real
//! node) keeps exchanging events with the victim both ways.

use std::time::Duration;

use futures::AsyncReadExt;
use mongodb::bson::{doc, Document};
use oc_discovery::contract::{Action, JournalEntry};
use oc_discovery::p2p::wire::{self, ErrorFrame, ResourceFrame};
use oc_discovery::p2p::StreamKind;
use oc_testkit::{event, init_tracing, partner, Collector, HandPeer, MongoServer, Site};
use serde_json::{json, Value};

const DT: &str = "COMPUTE_RESOURCE";
const DB: &str = "opencloud_hostile";
/// Events each side of the good partnership publishes while the attack runs.
const GOOD_ROUNDS: usize = 20;
/// What the victim may use, attack or not.
const RSS_LIMIT: u64 = 256 * 1024 * 1024;

type Reader = futures::io::ReadHalf<libp2p::Stream>;
type Writer = futures::io::WriteHalf<libp2p::Stream>;

/// The hostile partner's three resource streams to the victim (the session's acks and
/// errors come back on the create stream, the first one open).
struct Hostile {
    hand: HandPeer,
    acks: Reader,
    writers: [Writer; 3],
    messages: std::collections::BTreeMap<u64, String>,
}

impl Hostile {
    /// Opens the create, update and delete streams, each with its `hello`.
    async fn connect(hand: HandPeer, victim: &Site, head: u64) -> Hostile {
        let (acks, create) = hand.hello(victim, head).await;
        let mut acks = acks;
        assert_eq!(
            read(&mut acks).await,
            ResourceFrame::Ack { seq: 0 },
            "hello answered"
        );
        let update = open(&hand, victim, StreamKind::Update, head).await;
        let delete = open(&hand, victim, StreamKind::Delete, head).await;
        Hostile {
            hand,
            acks,
            writers: [create, update, delete],
            messages: Default::default(),
        }
    }

    /// An entry of the attacker's own journal (origin and creator are its peer id, so it
    /// passes every check before the store).
    fn entry(&self, seq: u64, action: Action, id: &str, extra: Value) -> JournalEntry {
        let mut resource = json!({"id": id, "creator_id": self.hand.id});
        if let (Some(r), Some(e)) = (resource.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        JournalEntry {
            origin: self.hand.id.clone(),
            seq,
            action,
            data_type: DT.into(),
            user: "mallory".into(),
            resource: resource.into(),
            time_ms: 0,
        }
    }

    /// Sends the entries, each on its action's stream, then reads the answers until the
    /// cumulative ack covers the last one; returns the `(seq, code)` of the error frames
    /// (their messages are kept in `messages`, by seq).
    async fn send(&mut self, entries: Vec<JournalEntry>) -> Vec<(u64, String)> {
        let last = entries.last().map(|e| e.seq).unwrap_or(0);
        for e in entries {
            let kind = match e.action {
                Action::Create => 0,
                Action::Update => 1,
                Action::Delete => 2,
            };
            wire::write_frame(&mut self.writers[kind], &ResourceFrame::Event(e))
                .await
                .unwrap();
        }
        let mut errors = Vec::new();
        loop {
            match read(&mut self.acks).await {
                ResourceFrame::Error(ErrorFrame {
                    seq: Some(seq),
                    code,
                    message,
                }) => {
                    errors.push((seq, code));
                    self.messages.insert(seq, message);
                }
                ResourceFrame::Ack { seq } if seq >= last => break,
                ResourceFrame::Ack { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        errors.sort();
        errors
    }
}

async fn open(hand: &HandPeer, victim: &Site, kind: StreamKind, head: u64) -> Writer {
    let peer = victim.id().parse().unwrap();
    let stream = hand
        .net
        .open_stream(peer, kind.protocol(), Duration::from_secs(10))
        .await
        .unwrap();
    let (_answers, mut w) = stream.split();
    wire::write_frame(
        &mut w,
        &ResourceFrame::Hello {
            origin: hand.id.clone(),
            head,
        },
    )
    .await
    .unwrap();
    w
}

async fn read(r: &mut Reader) -> ResourceFrame {
    tokio::time::timeout(Duration::from_secs(30), wire::read_frame(r, 1 << 20))
        .await
        .expect("an answer within 30 s")
        .expect("a readable frame")
        .expect("stream open")
}

/// A victim listing a hostile partner (a hand-driven peer) and a good one (a real node).
struct Scene {
    victim: Site,
    good: Site,
    hand: Option<HandPeer>,
    /// `CREATE_RESOURCE` / `REMOVE_RESOURCE` on each site's NATS.
    seen_victim: Collector,
    seen_good: Collector,
}

impl Scene {
    async fn new(mongo: Option<&MongoServer>) -> Scene {
        let (mut victim, mut good) = (Site::new().await, Site::new().await);
        partner(&mut victim, &mut [&mut good]);
        let key = libp2p::identity::Keypair::generate_ed25519();
        let rogue = key.public().to_peer_id().to_string();
        // An address that answers nothing: the victim's link to it just backs off.
        victim
            .node
            .partners
            .push(format!("/ip4/127.0.0.1/tcp/9/p2p/{rogue}"));
        if let Some(mongo) = mongo {
            victim.node.extra_args.extend([
                "--store".to_owned(),
                "mongodb".to_owned(),
                "--mongo-uri".to_owned(),
                mongo.uri(),
                "--mongo-db".to_owned(),
                DB.to_owned(),
            ]);
        }
        let notices = ["CREATE_RESOURCE", "REMOVE_RESOURCE"];
        let seen_victim = victim.collect(&notices).await;
        let seen_good = good.collect(&notices).await;
        victim.node.start_healthy().await.unwrap();
        good.node.start_healthy().await.unwrap();
        Scene {
            victim,
            good,
            hand: Some(HandPeer::start(key)),
            seen_victim,
            seen_good,
        }
    }

    async fn hostile(&mut self, head: u64) -> Hostile {
        let hand = self.hand.take().expect("one hostile session");
        Hostile::connect(hand, &self.victim, head).await
    }

    fn rogue(&self) -> String {
        self.hand.as_ref().map(|h| h.id.clone()).unwrap_or_default()
    }

    /// The good partnership at work: each side publishes `GOOD_ROUNDS` creations.
    async fn good_traffic(&self, tag: &str) {
        let one_side = |site: &Site, prefix: String| {
            let (app, me) = (site.app.clone(), site.id());
            async move {
                for i in 0..GOOD_ROUNDS {
                    let body = event("PB_CREATE", &format!("{prefix}-{i}"), &me, json!({"n": i}));
                    let reply = tokio::time::timeout(
                        Duration::from_secs(30),
                        app.request("PROPALGATION_EVENT", body.to_string().into()),
                    )
                    .await
                    .expect("reply within 30 s")
                    .expect("request");
                    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
                    assert_eq!(reply["ok"], true, "{reply}");
                }
            }
        };
        tokio::join!(
            one_side(&self.victim, format!("victim-{tag}")),
            one_side(&self.good, format!("good-{tag}"))
        );
    }

    /// Every good event arrived on the other side (notice published) and is stored there.
    async fn good_delivered(&self, tag: &str) {
        let ids = |prefix: String| (0..GOOD_ROUNDS).map(move |i| format!("{prefix}-{i}"));
        for (seen, site, prefix) in [
            (&self.seen_good, &self.good, format!("victim-{tag}")),
            (&self.seen_victim, &self.victim, format!("good-{tag}")),
        ] {
            let want: Vec<String> = ids(prefix.clone()).collect();
            seen.wait_for(&format!("{prefix}-* notices"), |s| {
                want.iter()
                    .all(|id| s.iter().any(|m| m.body["resource"]["id"] == id.as_str()))
            })
            .await;
            let stored = site.stored(DT).await;
            for id in &want {
                assert!(
                    stored
                        .iter()
                        .any(|r| r["id"] == id.as_str() && r["deleted"] == false),
                    "{id} stored"
                );
            }
        }
    }

    /// No notice on the victim's NATS names any of `ids`.
    fn no_notice_for(&self, ids: &[&str]) {
        for m in self.seen_victim.all() {
            let id = m.body["resource"]["id"].as_str().unwrap_or("");
            assert!(!ids.contains(&id), "notice published for {id}: {m:?}");
        }
    }

    async fn conflicts_counted(&self) -> u64 {
        self.victim
            .node
            .metric("oc_refusals_total{place=\"inbound\",code=\"conflict\"}")
            .await
            .unwrap_or(0)
    }

    fn rss(&self) -> u64 {
        self.victim.node.rss_bytes().unwrap_or(0)
    }
}

/// (a) One of the victim's own resources (its application published it): deleting,
/// re-creating or updating it from a partner is a `conflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cannot_write_the_victims_own_resources() {
    init_tracing();
    let mut scene = Scene::new(None).await;
    let me = scene.victim.id();
    let own = event("PB_CREATE", "victim-own", &me, json!({"name": "the victim's"}));
    scene.victim.publish_ok(&own).await;
    scene
        .seen_good
        .wait_for("victim-own on the good partner", |s| {
            s.iter().any(|m| m.body["resource"]["id"] == "victim-own")
        })
        .await;
    let rogue = scene.rogue();
    let mut peak = scene.rss();

    let mut hostile = scene.hostile(4).await;
    let attack = vec![
        hostile.entry(1, Action::Delete, "victim-own", json!({})),
        hostile.entry(2, Action::Create, "victim-own", json!({"name": "mallory's"})),
        hostile.entry(3, Action::Update, "victim-own", json!({"name": "mallory's"})),
        hostile.entry(4, Action::Create, "rogue-ok", json!({})),
    ];
    let (errors, ()) = tokio::join!(hostile.send(attack), scene.good_traffic("during"));
    assert_eq!(
        errors,
        [1, 2, 3].map(|s| (s, "conflict".to_owned())).to_vec(),
        "the attacker gets conflict for each foreign write"
    );
    for m in hostile.messages.values() {
        assert_eq!(
            m,
            "the resource belongs to this node: it is one of its own resources"
        );
    }
    peak = peak.max(scene.rss());

    // The mark moved on: a later valid entry is applied and announced.
    assert!(hostile
        .send(vec![hostile.entry(5, Action::Create, "rogue-later", json!({}))])
        .await
        .is_empty());
    scene
        .seen_victim
        .wait_for("the attacker's valid entries", |s| {
            ["rogue-ok", "rogue-later"]
                .iter()
                .all(|id| s.iter().any(|m| m.body["resource"]["id"] == *id))
        })
        .await;
    scene.no_notice_for(&["victim-own"]);
    assert_eq!(scene.conflicts_counted().await, 3);
    let log = scene.victim.node.log();
    assert!(
        log.contains("conflict") && log.contains(&rogue),
        "a log line names the peer and the code"
    );

    // Unchanged: no copy of it among what partners stored, nothing journaled by the
    // attack, and the good partner still holds the victim's version.
    let stored = scene.victim.stored(DT).await;
    assert!(stored.iter().all(|r| r["id"] != "victim-own"), "{stored:?}");
    assert!(stored
        .iter()
        .any(|r| r["id"] == "rogue-ok" && r["origin"] == rogue.as_str()));
    let head = scene.victim.node.get_json("/api/node").await.unwrap()["journal_head"].clone();
    assert_eq!(head, json!(1 + GOOD_ROUNDS), "only the victim's own events");
    let held = scene.good.stored(DT).await;
    let copy = held
        .iter()
        .find(|r| r["id"] == "victim-own")
        .expect("on the good partner");
    assert_eq!(
        (copy["deleted"].clone(), copy["resource"]["name"].clone()),
        (json!(false), json!("the victim's"))
    );

    // The resource is still the victim's to change, and the good partnership still works.
    let update = event("PB_UPDATE", "victim-own", &me, json!({"name": "updated"}));
    scene.victim.publish_ok(&update).await;
    scene.good_traffic("after").await;
    scene.good_delivered("during").await;
    scene.good_delivered("after").await;
    scene
        .seen_good
        .wait_for("the victim's own update", |s| {
            s.iter().any(|m| m.body["resource"]["name"] == "updated")
        })
        .await;
    peak = peak.max(scene.rss());
    eprintln!(
        "victim peak RSS {} KiB; attacker got {errors:?} {:?}",
        peak / 1024,
        hostile.messages
    );
    assert!(peak < RSS_LIMIT, "victim RSS {peak}");
}

/// (b) The victim on MongoDB: documents the site's application inserted straight into
/// MongoDB (one even naming the attacker as creator), and an own resource whose document
/// the application wrote, are never deleted or overwritten by a partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cannot_write_the_sites_mongodb_documents() {
    init_tracing();
    let mongo = MongoServer::start().await.unwrap();
    let mut scene = Scene::new(Some(&mongo)).await;
    let me = scene.victim.id();
    let rogue = scene.rogue();
    let client = mongo.client().await.unwrap();
    let coll = client.database(DB).collection::<Document>("compute_resource");
    let app_doc = doc! {"_id": "app-doc", "id": "app-doc", "creator_id": &me, "name": "the site's"};
    let lure = doc! {"_id": "app-lure", "id": "app-lure", "creator_id": &rogue, "name": "names the attacker"};
    let own_doc = doc! {"_id": "victim-own", "id": "victim-own", "creator_id": &me, "name": "the victim's"};
    coll.insert_many([app_doc.clone(), lure.clone(), own_doc.clone()])
        .await
        .unwrap();
    // The application announces its own resource as well: the victim's journal holds it.
    let own = event("PB_CREATE", "victim-own", &me, json!({"name": "the victim's"}));
    scene.victim.publish_ok(&own).await;
    let mut peak = scene.rss();

    let mut hostile = scene.hostile(6).await;
    let attack = vec![
        hostile.entry(1, Action::Delete, "app-doc", json!({})),
        hostile.entry(2, Action::Create, "app-doc", json!({"name": "mallory's"})),
        hostile.entry(3, Action::Create, "app-lure", json!({"name": "mallory's"})),
        hostile.entry(4, Action::Update, "victim-own", json!({"name": "mallory's"})),
        hostile.entry(5, Action::Delete, "victim-own", json!({})),
        hostile.entry(6, Action::Create, "rogue-ok", json!({"n": 6})),
    ];
    let (errors, ()) = tokio::join!(hostile.send(attack), scene.good_traffic("during"));
    assert_eq!(
        errors,
        (1..=5).map(|s| (s, "conflict".to_owned())).collect::<Vec<_>>()
    );
    let said = |seq: u64| hostile.messages[&seq].clone();
    for seq in 1..=3 {
        assert!(
            said(seq).ends_with("a document this node did not write"),
            "{}",
            said(seq)
        );
    }
    for seq in 4..=5 {
        assert!(said(seq).ends_with("one of its own resources"), "{}", said(seq));
    }
    peak = peak.max(scene.rss());
    assert!(hostile
        .send(vec![hostile.entry(7, Action::Create, "rogue-later", json!({}))])
        .await
        .is_empty());
    scene
        .seen_victim
        .wait_for("the attacker's valid entries", |s| {
            ["rogue-ok", "rogue-later"]
                .iter()
                .all(|id| s.iter().any(|m| m.body["resource"]["id"] == *id))
        })
        .await;
    scene.no_notice_for(&["app-doc", "app-lure", "victim-own"]);
    assert_eq!(scene.conflicts_counted().await, 5);
    assert!(scene.victim.node.log().contains("conflict"));

    // The documents are exactly as the application wrote them, and the node keeps no
    // version of them; the attacker's valid entry is a plain document.
    for d in [&app_doc, &lure, &own_doc] {
        let id = d.get_str("_id").unwrap();
        assert_eq!(
            coll.find_one(doc! {"_id": id}).await.unwrap().as_ref(),
            Some(d),
            "{id}"
        );
    }
    let versions = client.database(DB).collection::<Document>("oc_versions");
    for id in ["app-doc", "app-lure", "victim-own"] {
        let filter = doc! {"_id": {"coll": "compute_resource", "id": id}};
        assert_eq!(versions.count_documents(filter).await.unwrap(), 0, "{id}");
    }
    let ok = coll
        .find_one(doc! {"_id": "rogue-ok"})
        .await
        .unwrap()
        .expect("rogue-ok");
    assert_eq!(
        (ok.get_str("creator_id").unwrap(), ok.get_i64("n").unwrap()),
        (rogue.as_str(), 6)
    );

    scene.good_traffic("after").await;
    scene.good_delivered("during").await;
    scene.good_delivered("after").await;
    peak = peak.max(scene.rss());
    eprintln!(
        "victim (MongoDB) peak RSS {} KiB; attacker got {errors:?}",
        peak / 1024
    );
    assert!(peak < RSS_LIMIT, "victim RSS {peak}");
}
