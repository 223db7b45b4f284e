//! Admin HTTP API (actix-web): health, status, partners, metrics, the journal and what was
//! applied, events and searches without NATS, and the resources received. Every error
//! answer is [`reply::error`]'s `{"ok":false,"error":{"code","message"}}`.
//!
//! | path | answer |
//! |---|---|
//! | `GET /api/status` | [`status`]: intake, store, NATS, journal head, partner links |
//! | `GET /api/journal`, `GET /api/applied` | [`history`]: pages newest first, `oldest_reached` |
//! | `POST /api/events` | [`events`]: a `PROPALGATION_EVENT` journaled by the intake's path |
//! | `POST /api/search` | [`search`]: a `PB_SEARCH`, its `SEARCH_EVENT`s as JSON lines |
//! | `GET /api/feed` | [`feed`]: a WebSocket, the journal or applied log live (page, older, pause, resume) |
//! | `GET /`, `/ui/*` | [`page`]: the web page (live feed and peers), files built into the binary |
//! | `GET /healthz` | 200 `{"status":"ok"}` once NATS is connected, the swarm listens and the store answers; 503 with `reasons` (e.g. `store unavailable: ...`, `nats: authorization violation (nats://...)`) otherwise |
//! | `GET /api/peers` | partners: `peer_id, addrs, connected, dialed_by, acked_seq, pending, state, snapshot` |
//! | `POST /api/partners/{peer_id}/resync` | starts a snapshot job towards a partner: 202, 404 not a partner, 409 `busy` |
//! | `GET /api/node` | this node: `peer_id, listen_addrs, journal_head, reachability, external_addrs` |
//! | `GET /api/resources/{data_type}?after=ID&limit=N` | stored resources (tombstones included) |
//! | `GET /api/resources/{data_type}/{id}` | one stored resource, 404 if unknown |
//! | `POST /api/copies`, `GET /api/copies`, `GET /api/copies/{id}` | [`copies`]: remote copies to partners |
//! | `GET /metrics` | Prometheus text |
//!
//! Who may call it: [`auth`]. With `--admin-token-file`, every route but `GET /healthz` and
//! `GET /metrics` needs `Authorization: Bearer <token>` (401 otherwise); without a token the
//! node listens on loopback only. HTTPS only with `--admin-tls-cert` / `--admin-tls-key`:
//! [`tls`].

pub mod auth;
pub mod copies;
pub mod events;
pub mod feed;
pub mod history;
pub mod page;
pub mod reply;
pub mod search;
pub mod status;
pub mod tls;

use std::sync::Arc;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde::Deserialize;
use serde_json::json;

use crate::contract::{ErrorCode, Refusal};
use crate::intake::{IntakeMode, IntakeStatus};
use crate::metrics::Metrics;
use crate::outbound::service::{GetPeers, StreamService};
use crate::p2p;
use crate::peers::manager::{Forget, ListPeers, PeerManager, SetRelation};
use crate::store::Relation;
use crate::store::Store;

const MAX_LIST_LIMIT: usize = 10_000;

pub struct AdminState {
    pub own_id: String,
    pub nats: async_nats::Client,
    /// Why NATS is not connected (a refused credential or certificate, ...).
    pub nats_status: Arc<crate::nats::ConnectionStatus>,
    /// The connection without echo the notices go out on ([`crate::nats::connect_without_echo`]).
    pub notices_nats: async_nats::Client,
    pub notices_status: Arc<crate::nats::ConnectionStatus>,
    pub net: p2p::Client,
    pub store: Arc<dyn Store>,
    pub links: Addr<StreamService>,
    pub peers: Addr<PeerManager>,
    pub metrics: Arc<Metrics>,
    /// Remote copies (`/api/copies`).
    pub copies: Arc<crate::copy::CopyService>,
    pub intake: Arc<IntakeStatus>,
    /// The JetStream intake stream (its consumer's backlog is in `GET /api/status`).
    pub intake_stream: String,
    /// The intake's journaling path, for `POST /api/events`.
    pub submit: Arc<crate::intake::IntakeEnv>,
    /// `embedded` or `mongodb`.
    pub store_kind: &'static str,
    /// When the node started, for its uptime.
    pub started: std::time::Instant,
    /// The live feed's rings and client count ([`feed`]).
    pub feed: Arc<crate::feed::Feed>,
}

/// What protects the admin API, read and checked at start-up before anything else starts.
pub(crate) struct AdminSecurity {
    token: Option<crate::secret_file::Token>,
    tls: Option<rustls::ServerConfig>,
}

impl AdminSecurity {
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    pub(crate) fn is_https(&self) -> bool {
        self.tls.is_some()
    }
}

/// Why the admin API cannot start as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AdminSetupError {
    #[error(transparent)]
    Token(#[from] crate::secret_file::TokenFileError),
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    #[error(transparent)]
    Exposure(#[from] auth::ExposureError),
}

/// Reads the token and TLS files and checks that a node without a token listens on
/// loopback only; warns about secret files readable by group or others.
///
/// # Errors
/// See [`AdminSetupError`].
pub(crate) fn prepare(
    listen: &str,
    token_file: Option<&std::path::Path>,
    tls_files: Option<&crate::config::AdminTlsFiles>,
) -> Result<AdminSecurity, AdminSetupError> {
    let token = token_file
        .map(|path| {
            crate::secret_file::warn_if_shared(path, "admin token");
            crate::secret_file::read_token(path)
        })
        .transpose()?;
    auth::check_exposure(listen, token.is_some())?;
    let tls = tls_files
        .map(|files| {
            crate::secret_file::warn_if_shared(&files.key, "admin TLS key");
            tls::server_config(files)
        })
        .transpose()?;
    Ok(AdminSecurity { token, tls })
}

/// Binds the admin API (HTTPS only when `security` has a TLS configuration); the returned
/// server runs until stopped.
///
/// # Errors
/// The address cannot be bound.
pub(crate) fn serve(
    addr: &str,
    security: AdminSecurity,
    state: AdminState,
) -> std::io::Result<actix_web::dev::Server> {
    let gate = web::Data::new(auth::Gate::new(security.token, state.metrics.clone()));
    let state = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(gate.clone())
            // Outermost, so that it covers every route, the default 404 included.
            .wrap(from_fn(auth::require_token))
            .route("/healthz", web::get().to(healthz))
            .route("/api/peers", web::get().to(peers))
            .route("/api/node", web::get().to(node))
            .route("/api/status", web::get().to(status::status))
            .route("/api/events", web::post().to(events::publish))
            .route("/api/search", web::post().to(search::search))
            .route("/api/journal", web::get().to(history::journal))
            .route(auth::FEED_PATH, web::get().to(feed::feed))
            .route("/", web::get().to(page::index))
            .route("/ui/feed.js", web::get().to(page::script))
            .route("/ui/feed.css", web::get().to(page::style))
            .route("/api/applied", web::get().to(history::applied))
            .route("/api/resources/{data_type}", web::get().to(resources))
            .route("/api/resources/{data_type}/{id}", web::get().to(resource))
            .route("/api/copies", web::post().to(copies::start))
            .route("/api/copies", web::get().to(copies::list))
            .route("/api/copies/{id}", web::get().to(copies::one))
            .route("/metrics", web::get().to(metrics))
            .route("/api/partners", web::get().to(list_partners))
            .route("/api/partners", web::post().to(add_partner))
            .route("/api/partners/{peer_id}", web::delete().to(remove_partner))
            .route("/api/partners/{peer_id}/resync", web::post().to(resync_partner))
            .app_data(reply::query_config())
            .app_data(reply::json_config())
            .default_service(web::to(reply::not_found))
    })
    .workers(1)
    .disable_signals();
    let server = match security.tls {
        Some(tls) => server.bind_rustls_0_23(addr, tls)?,
        None => server.bind(addr)?,
    };
    Ok(server.run())
}

async fn healthz(s: web::Data<AdminState>) -> HttpResponse {
    let mut reasons = Vec::new();
    if let Some(reason) = s.nats_status.problem(&s.nats) {
        reasons.push(reason);
    } else if let Some(reason) = s.notices_status.problem(&s.notices_nats) {
        reasons.push(format!("notices connection: {reason}"));
    }
    if !s.net.state().is_listening() {
        reasons.push("libp2p swarm not listening yet".to_owned());
    }
    // StoreError's display already reads "store unavailable: ...".
    if let Err(e) = s.store.health().await {
        reasons.push(e.to_string());
    }
    let intake = s.intake.mode();
    match intake {
        IntakeMode::Starting => reasons.push("intake not subscribed yet".to_owned()),
        IntakeMode::Stopped => reasons.push("intake stopped".to_owned()),
        IntakeMode::Core | IntakeMode::JetStream => {}
    }
    let mut body = json!({"peer_id": s.own_id, "intake": intake.as_str()});
    if intake == IntakeMode::Core {
        body["warning"] = json!("NATS has no JetStream: events published while this node is down are lost");
    }
    if reasons.is_empty() {
        body["status"] = json!("ok");
        HttpResponse::Ok().json(body)
    } else {
        body["status"] = json!("unavailable");
        body["reasons"] = json!(reasons);
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn peers(s: web::Data<AdminState>) -> HttpResponse {
    match s.links.send(GetPeers).await {
        Ok(list) => HttpResponse::Ok().json(list),
        Err(e) => reply::actor_gone(e),
    }
}

async fn node(s: web::Data<AdminState>) -> HttpResponse {
    let head = s.store.journal_head(&s.own_id).await.ok();
    let addrs: Vec<String> = s
        .net
        .state()
        .listen_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    let (reachability, external) = s.net.state().reachability();
    let external: Vec<String> = external.iter().map(ToString::to_string).collect();
    HttpResponse::Ok().json(json!({
        "peer_id": s.own_id,
        "listen_addrs": addrs,
        "journal_head": head,
        "reachability": reachability.as_str(),
        "external_addrs": external,
    }))
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn resources(
    s: web::Data<AdminState>,
    path: web::Path<String>,
    q: web::Query<ListQuery>,
) -> HttpResponse {
    let q = q.into_inner();
    let limit = q.limit.unwrap_or(1000).min(MAX_LIST_LIMIT);
    match s.store.resources(&path, q.after, limit).await {
        Ok(list) => HttpResponse::Ok().json(list),
        Err(e) => reply::store(&e),
    }
}

async fn resource(s: web::Data<AdminState>, path: web::Path<(String, String)>) -> HttpResponse {
    let (data_type, id) = path.into_inner();
    match s.store.resource(&data_type, &id).await {
        Ok(Some(r)) => HttpResponse::Ok().json(r),
        Ok(None) => reply::error(StatusCode::NOT_FOUND, reply::NOT_FOUND, "no such resource"),
        Err(e) => reply::store(&e),
    }
}

/// How long a scrape waits for the links' status before leaving the partner rows out.
const SCRAPE_LINKS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn metrics(s: web::Data<AdminState>) -> HttpResponse {
    match s.links.send(GetPeers).timeout(SCRAPE_LINKS_TIMEOUT).await {
        Ok(links) => {
            let mut ages = Vec::with_capacity(links.len());
            for l in &links {
                ages.push(status::oldest_unacked_ms(&s, l).await.unwrap_or(0));
            }
            s.metrics.set_partners(
                links
                    .iter()
                    .zip(ages)
                    .map(|(l, age_ms)| crate::metrics::PartnerFigures {
                        peer: &l.peer_id,
                        pending: l.pending,
                        lag: l.lag,
                        state: &l.state,
                        rtt_seconds: l.rtt_ms.map(|ms| ms / 1000.0),
                        lag_seconds: age_ms as f64 / 1000.0,
                    }),
            )
        }
        Err(e) => tracing::warn!(cause = %e, "metrics scrape without the partner links' status"),
    }
    s.metrics
        .feed_clients
        .set(i64::try_from(s.feed.clients()).unwrap_or(i64::MAX));
    let net = s.net.state();
    match crate::metrics::render(&[s.metrics.registry(), net.stats.registry(), s.copies.registry()]) {
        Ok(body) => HttpResponse::Ok()
            .content_type(crate::metrics::CONTENT_TYPE)
            .body(body),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

async fn list_partners(s: web::Data<AdminState>) -> HttpResponse {
    match s.peers.send(ListPeers).await {
        Ok(Ok(list)) => HttpResponse::Ok().json(list),
        Ok(Err(r)) => reply::refusal(StatusCode::SERVICE_UNAVAILABLE, &r),
        Err(e) => reply::actor_gone(e),
    }
}

/// Body of `POST /api/partners`.
#[derive(Deserialize)]
struct PartnerBody {
    /// Multiaddr ending in `/p2p/<peer id>` (or give `peer_id` apart).
    addr: Option<String>,
    peer_id: Option<String>,
    /// `partner` (default), `known` or `blacklist`.
    relation: Option<String>,
}

async fn add_partner(s: web::Data<AdminState>, body: web::Json<PartnerBody>) -> HttpResponse {
    let bad = |r: Refusal| reply::refusal(StatusCode::BAD_REQUEST, &r);
    let body = body.into_inner();
    let addr: Option<libp2p::Multiaddr> = match body.addr.as_deref().map(str::parse) {
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => return bad(Refusal::new(ErrorCode::InvalidField, format!("addr: {e}"))),
        None => None,
    };
    let from_addr = addr.as_ref().and_then(|a| match a.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
        _ => None,
    });
    let peer = match (
        body.peer_id.as_deref().map(str::parse::<libp2p::PeerId>),
        from_addr,
    ) {
        (Some(Ok(p)), _) => p,
        (Some(Err(_)), _) => return bad(Refusal::new(ErrorCode::InvalidField, "peer_id is not a peer id")),
        (None, Some(p)) => p,
        (None, None) => {
            return bad(Refusal::new(
                ErrorCode::MissingField,
                "give addr ending in /p2p/<peer id>, or peer_id",
            ))
        }
    };
    let relation = match body.relation.as_deref().map(Relation::parse) {
        None => Relation::Partner,
        Some(Some(r)) => r,
        Some(None) => {
            return bad(Refusal::new(
                ErrorCode::InvalidField,
                "relation: partner, known or blacklist",
            ))
        }
    };
    match s.peers.send(SetRelation { peer, addr, relation }).await {
        Ok(Ok(row)) => HttpResponse::Ok().json(json!({"ok": true, "peer": row})),
        Ok(Err(r)) if r.code == ErrorCode::StoreUnavailable => {
            reply::refusal(StatusCode::SERVICE_UNAVAILABLE, &r)
        }
        Ok(Err(r)) => bad(r),
        Err(e) => reply::actor_gone(e),
    }
}

async fn remove_partner(s: web::Data<AdminState>, path: web::Path<String>) -> HttpResponse {
    let Ok(peer) = path.parse::<libp2p::PeerId>() else {
        return reply::invalid_field("not a peer id");
    };
    match s.peers.send(Forget { peer }).await {
        Ok(Ok(existed)) => {
            HttpResponse::Ok().json(json!({"ok": true, "peer_id": peer.to_string(), "existed": existed}))
        }
        Ok(Err(r)) => reply::refusal(StatusCode::SERVICE_UNAVAILABLE, &r),
        Err(e) => reply::actor_gone(e),
    }
}

/// `POST /api/partners/{peer_id}/resync`: a snapshot job towards the partner, at most one
/// at a time (a second request while one is asked for or runs gets 409 `busy`).
async fn resync_partner(s: web::Data<AdminState>, path: web::Path<String>) -> HttpResponse {
    use crate::outbound::service::{Resync, ResyncRefused};
    let Ok(peer) = path.parse::<libp2p::PeerId>() else {
        return reply::invalid_field("not a peer id");
    };
    match s.links.send(Resync { peer }).await {
        Ok(Ok(())) => HttpResponse::Accepted()
            .json(json!({"ok": true, "peer_id": peer.to_string(), "snapshot": "requested"})),
        Ok(Err(e @ ResyncRefused::NotPartner(_))) => reply::refusal(
            StatusCode::NOT_FOUND,
            &Refusal::new(ErrorCode::NotPartner, e.to_string()),
        ),
        Ok(Err(e @ ResyncRefused::Busy(_))) => reply::refusal(
            StatusCode::CONFLICT,
            &Refusal::new(ErrorCode::Busy, e.to_string()),
        ),
        Err(e) => reply::actor_gone(e),
    }
}
