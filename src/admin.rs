//! Admin HTTP API (actix-web): health, partners, metrics, and the resources received.
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | 200 `{"status":"ok"}` once NATS is connected, the swarm listens and the store answers; 503 with `reasons` (e.g. `store unavailable: ...`) otherwise |
//! | `GET /api/peers` | partners: `peer_id, addrs, connected, acked_seq, pending, state` |
//! | `GET /api/node` | this node: `peer_id, listen_addrs, journal_head` |
//! | `GET /api/resources/{data_type}?after=ID&limit=N` | stored resources (tombstones included) |
//! | `GET /api/resources/{data_type}/{id}` | one stored resource, 404 if unknown |
//! | `GET /metrics` | Prometheus text |

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde::Deserialize;
use serde_json::json;

use crate::actors::intake::{IntakeMode, IntakeStatus};
use crate::peers::manager::{refusal_json, Forget, ListPeers, PeerManager, SetRelation};
use crate::actors::stream_service::{GetPeers, StreamService};
use crate::event::{ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::p2p;
use crate::store::Relation;
use crate::store::Store;

const MAX_LIST_LIMIT: usize = 10_000;

pub struct AdminState {
    pub own_id: String,
    pub nats: async_nats::Client,
    pub net: p2p::Client,
    pub store: Arc<dyn Store>,
    pub links: Addr<StreamService>,
    pub peers: Addr<PeerManager>,
    pub metrics: Arc<Metrics>,
    pub intake: Arc<IntakeStatus>,
}

/// Binds the admin API; the returned server runs until stopped.
///
/// # Errors
/// The address cannot be bound.
pub fn serve(addr: &str, state: AdminState) -> std::io::Result<actix_web::dev::Server> {
    let state = web::Data::new(state);
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/api/peers", web::get().to(peers))
            .route("/api/node", web::get().to(node))
            .route("/api/resources/{data_type}", web::get().to(resources))
            .route("/api/resources/{data_type}/{id}", web::get().to(resource))
            .route("/metrics", web::get().to(metrics))
            .route("/api/partners", web::get().to(list_partners))
            .route("/api/partners", web::post().to(add_partner))
            .route("/api/partners/{peer_id}", web::delete().to(remove_partner))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)?
    .run())
}

async fn healthz(s: web::Data<AdminState>) -> HttpResponse {
    let mut reasons = Vec::new();
    if !crate::nats::is_connected(&s.nats) {
        reasons.push("nats not connected".to_owned());
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
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
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
    HttpResponse::Ok().json(json!({"peer_id": s.own_id, "listen_addrs": addrs, "journal_head": head}))
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
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
    }
}

async fn resource(s: web::Data<AdminState>, path: web::Path<(String, String)>) -> HttpResponse {
    let (data_type, id) = path.into_inner();
    match s.store.resource(&data_type, &id).await {
        Ok(Some(r)) => HttpResponse::Ok().json(r),
        Ok(None) => HttpResponse::NotFound().json(json!({"error": "no such resource"})),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
    }
}

async fn metrics(s: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body({
            let mut body = s.metrics.render();
            s.net.state().stats.render(&mut body);
            body
        })
}

async fn list_partners(s: web::Data<AdminState>) -> HttpResponse {
    match s.peers.send(ListPeers).await {
        Ok(Ok(list)) => HttpResponse::Ok().json(list),
        Ok(Err(r)) => HttpResponse::ServiceUnavailable().json(refusal_json(&r)),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
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
    let bad = |r: Refusal| HttpResponse::BadRequest().json(refusal_json(&r));
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
            HttpResponse::ServiceUnavailable().json(refusal_json(&r))
        }
        Ok(Err(r)) => bad(r),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
    }
}

async fn remove_partner(s: web::Data<AdminState>, path: web::Path<String>) -> HttpResponse {
    let Ok(peer) = path.parse::<libp2p::PeerId>() else {
        return HttpResponse::BadRequest().json(refusal_json(&Refusal::new(
            ErrorCode::InvalidField,
            "not a peer id",
        )));
    };
    match s.peers.send(Forget { peer }).await {
        Ok(Ok(existed)) => {
            HttpResponse::Ok().json(json!({"ok": true, "peer_id": peer.to_string(), "existed": existed}))
        }
        Ok(Err(r)) => HttpResponse::ServiceUnavailable().json(refusal_json(&r)),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()})),
    }
}
