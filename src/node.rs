//! Wires the node together and runs it until the shutdown signal.
//!
//! Start order follows the data flow backwards, so nothing is produced before its
//! consumer exists: identity → store → network loop → NATS → StreamService (links, one per
//! configured partner) → outbox drain, and inbound apply once the drain is done → peer
//! manager → peer directory (record publishing) → search service → command router →
//! intake → remote copy → admin API. Only inbound apply waits for the drain; the parts after it start at
//! once.
//!
//! A store that is down at start-up (MongoDB) does not stop the node: every user of the
//! store retries with backoff, and `/healthz` reports it until it answers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use tokio::sync::watch;

use crate::answers::Answers;
use crate::backoff::Backoff;
use crate::commands::forwarder::Forwarder;
use crate::commands::router::{CommandEnv, CommandRouter};
use crate::config::{NodeConfig, StoreConfig};
use crate::inbound::{InboundApply, InboundEnv};
use crate::intake::{self, Intake, IntakeEnv, IntakeStatus, StopIntake};
use crate::metrics::Metrics;
use crate::outbound::link::LinkEnv;
use crate::outbound::service::{AddPartner, Drain, JournalAdvanced, StreamService};
use crate::peers::directory::{Directory, DirectoryEnv, RECORD_EVENTS};
use crate::peers::manager::{Links, PeerEnv, PeerManager};
use crate::peers::partners::Partners;
use crate::search::{SearchEnv, SearchService, GOSSIP_QUEUE};
use crate::store::embedded::EmbeddedStore;
use crate::store::mongo::{MongoSettings, MongoStore};
use crate::store::Store;
use crate::{admin, identity, nats, p2p, secret_file};

/// Store file inside the data directory.
pub(crate) const STORE_FILE: &str = "store.redb";
/// How long shutdown waits for links to persist their cursors.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Outbox rows published per round at start-up.
const OUTBOX_ROUND: usize = 1024;
/// Backoff bounds while the store cannot give the journal head at start-up.
const HEAD_RETRY_MIN: Duration = Duration::from_millis(200);
const HEAD_RETRY_MAX: Duration = Duration::from_secs(10);
/// Retry bounds of the start-up outbox drain (NATS or the store not answering yet).
const OUTBOX_RETRY_MIN: Duration = Duration::from_millis(200);
const OUTBOX_RETRY_MAX: Duration = Duration::from_secs(10);

/// Runs a node until `shutdown` completes. Must be called inside an actix `System`.
///
/// # Errors
/// Start-up failures: unusable admin token or TLS files, a non-loopback admin address without
/// a token, unreadable identity or PSK, store locked, address in use, an unreadable or
/// malformed NATS secret, CA, certificate or key file, an unusable `--copy-root` or
/// `--copy-source-root`.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // First: a node refused for its admin settings must not have touched anything.
    let admin_security = admin::prepare(
        &cfg.admin_listen,
        cfg.admin_token_file.as_deref(),
        cfg.admin_tls.as_ref(),
    )?;
    let key = identity::load_or_create(&cfg.data_dir)?;
    let own = key.public().to_peer_id();
    let own_id = own.to_string();
    let store = open_store(&cfg).await?;
    if let Some(path) = &cfg.psk_file {
        secret_file::warn_if_shared(path, "PSK");
    }
    let psk = cfg.psk_file.as_deref().map(p2p::read_psk).transpose()?;
    let private = psk.is_some();
    // The directory signs the node's peer record and the search service its gossip queries.
    let (net, event_loop) = p2p::build_with(key.clone(), psk, &cfg.listen, cfg.net_limits, &cfg.transport)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let net_task = tokio::spawn(event_loop.run(stop_rx.clone()));

    let t = cfg.tuning.clone();
    let nats_retry = crate::backoff::Backoff::new(t.backoff_min, t.backoff_max);
    let (nats, nats_status) = nats::connect(&cfg.nats, t.io_timeout, nats_retry.clone())
        .await
        .context("connecting to NATS")?;
    // The notices and the peer manager's subscriptions to them: a second connection, without
    // echo, so the node is not handed back every notice it publishes.
    let (notices_nats, notices_status) = nats::connect_without_echo(&cfg.nats, t.io_timeout, nats_retry)
        .await
        .context("connecting to NATS")?;
    let metrics = Arc::new(Metrics::default());
    // MongoDB may be down at start-up: start from 0 and announce the real head once it
    // can be read, so NATS, libp2p and the admin API come up regardless.
    let head = match store.journal_head(&own_id).await {
        Ok(head) => head,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read the journal head yet; retrying in the background");
            0
        }
    };
    let links = StreamService::new(
        LinkEnv {
            own_id: own_id.clone(),
            store: store.clone(),
            net: net.clone(),
            metrics: metrics.clone(),
            tuning: t.clone(),
            shutdown: stop_rx.clone(),
        },
        head,
    )
    .start();
    if head == 0 {
        tokio::spawn(announce_head(
            store.clone(),
            own_id.clone(),
            links.clone().recipient(),
            stop_rx.clone(),
        ));
    }
    tokio::spawn(crate::store::retention::run(
        store.clone(),
        own_id.clone(),
        Arc::new(links.clone()),
        t.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    let partners = Arc::new(Partners::default());
    for (peer, addr) in &cfg.partners {
        partners.insert(*peer, Some(addr.clone()));
        // Partners bypass the connection limits.
        net.set_partner(*peer, true).await?;
        links.do_send(AddPartner {
            peer: *peer,
            addr: addr.clone(),
        });
    }
    // Inbound apply starts once the publishes a previous run left in the outbox are out, so
    // notices of one origin reach NATS in order.
    let publisher = Arc::new(nats::Publisher::new(notices_nats.clone()));
    let feed = crate::feed::Feed::new(
        crate::feed::DEFAULT_RING_ENTRIES,
        t.feed_ring_bytes,
        t.feed_max_clients,
    );
    tokio::spawn(crate::feed::follow_journal(
        feed.clone(),
        store.clone(),
        own_id.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(crate::feed::follow_applied(
        feed.clone(),
        store.clone(),
        stop_rx.clone(),
    ));
    let inbound_env = InboundEnv {
        own_id: own_id.clone(),
        store: store.clone(),
        publisher: publisher.clone(),
        forwarder: Forwarder::new(nats.clone(), metrics.clone(), t.clone()),
        net: net.clone(),
        partners: partners.clone(),
        metrics: metrics.clone(),
        tuning: t.clone(),
        shutdown: stop_rx.clone(),
        feed: feed.clone(),
    };
    let drain = drain_outbox(store.clone(), publisher, t.io_timeout, stop_rx.clone());
    actix::spawn(async move {
        if drain.await {
            InboundApply::new(inbound_env).start();
        }
    });
    let peers = PeerManager::new(PeerEnv {
        store: store.clone(),
        net: net.clone(),
        nats: notices_nats.clone(),
        partners: partners.clone(),
        links: Links::new(links.clone()),
        metrics: metrics.clone(),
        configured: cfg.partners.clone(),
    })
    .start();
    let directory = Directory::new(DirectoryEnv {
        key: key.clone(),
        name: cfg.name.clone(),
        ttl: cfg.record_ttl,
        bootstrap: cfg.bootstrap.clone(),
        max_known_peers: cfg.max_known_peers,
        net: net.clone(),
        store: store.clone(),
        partners: partners.clone(),
        metrics: metrics.clone(),
        tuning: t.clone(),
    });
    let (records_tx, records_rx) = tokio::sync::mpsc::channel(RECORD_EVENTS);
    let (gossip_tx, gossip_rx) = tokio::sync::mpsc::channel(GOSSIP_QUEUE);
    net.subscribe(p2p::Subscription::Records(records_tx)).await?;
    net.subscribe(p2p::Subscription::Gossip(gossip_tx)).await?;
    tokio::spawn(directory.clone().run(records_rx, stop_rx.clone()));
    let search = SearchService::new(
        SearchEnv {
            key,
            nats: nats.clone(),
            net: net.clone(),
            store: store.clone(),
            directory: directory.clone(),
            partners: partners.clone(),
            metrics: metrics.clone(),
            tuning: t.clone(),
            shutdown: stop_rx.clone(),
        },
        gossip_rx,
    )
    .start();
    let commands = CommandRouter::new(CommandEnv {
        nats: nats.clone(),
        net: net.clone(),
        directory: directory.clone(),
        search: Some(search.recipient()),
        metrics: metrics.clone(),
        tuning: t.clone(),
    })
    .start();
    let intake_status = Arc::new(IntakeStatus::default());
    let intake_env = Arc::new(IntakeEnv {
        own_id: own_id.clone(),
        store: store.clone(),
        nats: nats.clone(),
        links: links.clone().recipient(),
        commands: commands.recipient(),
        metrics: metrics.clone(),
        status: intake_status.clone(),
        max_event_bytes: cfg.max_event_bytes,
        batch: t.intake_batch,
        stream_name: cfg.intake_stream.clone(),
        stream_max_bytes: cfg.intake_max_bytes,
        stream_max_age: cfg.intake_max_age,
        max_ack_pending: t.max_ack_pending,
        backoff_max: t.backoff_max,
        io_timeout: t.io_timeout,
        consumer: Default::default(),
        answers: Answers::new(nats.clone(), metrics.clone(), intake::PLACE),
        feed: feed.clone(),
    });
    let intake = Intake::new(intake_env.clone()).start();
    let copies = crate::copy::CopyService::start(crate::copy::CopyEnv {
        data_dir: cfg.data_dir.clone(),
        settings: cfg.copy.clone(),
        net: net.clone(),
        nats: nats.clone(),
        partners: partners.clone(),
        metrics: metrics.clone(),
        tuning: t.clone(),
        shutdown: stop_rx.clone(),
    })
    .await?;
    let admin_token = admin_security.has_token();
    let admin_https = admin_security.is_https();
    let server = admin::serve(
        &cfg.admin_listen,
        admin_security,
        admin::AdminState {
            own_id: own_id.clone(),
            nats: nats.clone(),
            nats_status,
            notices_nats,
            notices_status,
            net: net.clone(),
            store: store.clone(),
            links: links.clone(),
            peers,
            metrics,
            copies,
            intake: intake_status,
            intake_stream: cfg.intake_stream.clone(),
            submit: intake_env,
            store_kind: match cfg.store {
                StoreConfig::Embedded => "embedded",
                StoreConfig::Mongodb { .. } => "mongodb",
            },
            started,
            feed,
        },
    )
    .with_context(|| format!("binding the admin API on {}", cfg.admin_listen))?;
    let admin_handle = server.handle();
    actix_web::rt::spawn(server);
    tracing::info!(
        peer_id = %own_id,
        journal_head = head,
        partners = cfg.partners.len(),
        name = %cfg.name,
        bootstrap = cfg.bootstrap.len(),
        private_network = private,
        admin = %cfg.admin_listen,
        admin_token,
        admin_https,
        "node started"
    );

    shutdown.await;
    tracing::info!("shutting down");
    // Intake first: no new event is accepted while the rest winds down.
    intake.do_send(StopIntake);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, links.send(Drain))
        .await
        .is_err()
    {
        tracing::warn!(
            "partner links did not stop in time; their cursors will be re-derived from the partners"
        );
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, nats.flush()).await;
    admin_handle.stop(true).await;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, net_task).await;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the configured backend. MongoDB is not contacted here: only a malformed URI or
/// database name stops the start.
async fn open_store(cfg: &NodeConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreConfig::Embedded => Arc::new(
            EmbeddedStore::open(&cfg.data_dir.join(STORE_FILE))
                .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
        ),
        StoreConfig::Mongodb { uri, db } => {
            let store = MongoStore::connect(uri, db, MongoSettings::default())
                .await
                .context("configuring the MongoDB store")?;
            tracing::info!(db = %db, "store: mongodb");
            Arc::new(store)
        }
    })
}

/// Reads the journal head until the store answers, then tells the partner links (a node
/// started while its store was down begins with head 0).
async fn announce_head(
    store: Arc<dyn Store>,
    own_id: String,
    links: Recipient<JournalAdvanced>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(HEAD_RETRY_MIN, HEAD_RETRY_MAX);
    loop {
        match store.journal_head(&own_id).await {
            Ok(head) => {
                if head > 0 {
                    tracing::info!(journal_head = head, "journal head read");
                    links.do_send(JournalAdvanced { head });
                }
                return;
            }
            Err(e) => {
                tracing::warn!(cause = %e, retry_in = ?backoff.current(), "cannot read the journal head")
            }
        }
        if !backoff.wait_or(crate::shutdown::signalled(&mut stop)).await {
            return;
        }
    }
}

/// Publishes outbox rows left by a previous run (a crash between commit and publish).
/// Returns false when shutdown came first.
async fn drain_outbox(
    store: Arc<dyn Store>,
    publisher: Arc<nats::Publisher>,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut backoff = Backoff::new(OUTBOX_RETRY_MIN, OUTBOX_RETRY_MAX);
    loop {
        let round = async {
            let rows = store.outbox(OUTBOX_ROUND).await.map_err(|e| e.to_string())?;
            if rows.is_empty() {
                return Ok::<bool, String>(true);
            }
            publisher
                .publish_rows(&rows, timeout)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(count = rows.len(), "published outbox rows left by a previous run");
            store
                .outbox_remove(rows.iter().map(|r| r.id).collect())
                .await
                .map_err(|e| e.to_string())?;
            Ok(false)
        };
        match round.await {
            Ok(true) => return true,
            Ok(false) => {
                backoff.reset();
                continue;
            }
            Err(e) => tracing::warn!(cause = %e, retry_in = ?backoff.current(), "outbox drain failed"),
        }
        if !backoff.wait_or(crate::shutdown::signalled(&mut stop)).await {
            return false;
        }
    }
}
