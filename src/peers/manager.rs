//! Peer manager: partnerships and the blacklist, made at run time.
//!
//! Sources of changes, all applied the same way and persisted in the store's peers table:
//! - an application publishing `CREATE_RESOURCE` with data_type `PEER` on the local NATS:
//!   `relation: "partner"` plus an address makes that peer a partner (connected, replicated
//!   to, accepted from); `relation: "blacklist"` makes the connection gater refuse it and
//!   closes its connections; `REMOVE_RESOURCE` of a `PEER` ends the partnership;
//! - the admin API and `oc-discovery partners add|remove|list`.
//!
//! The node never reacts to its own publishes (`from_app: "oc-discovery"`), which also
//! covers the PEER resources partners propagate to it. Partners given by `--partner` are
//! partners for the life of the process; they are not persisted.

use std::sync::Arc;

use actix::prelude::*;
use async_nats::Message as NatsMessage;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::actors::stream_service::{AddPartner, RemovePartner, StreamService};
use crate::event::{self, now_ms, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::p2p;
use super::partners::Partners;
use crate::store::{PeerRow, Relation, Store, StoreResult};

/// Backoff bounds while the persisted relations cannot be read at start-up.
const RESTORE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(200);
const RESTORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

pub struct PeerEnv {
    pub store: Arc<dyn Store>,
    pub net: p2p::Client,
    pub nats: async_nats::Client,
    pub partners: Arc<Partners>,
    pub links: Addr<StreamService>,
    pub metrics: Arc<Metrics>,
    /// Partners from `--partner`: never persisted.
    pub configured: Vec<(PeerId, Multiaddr)>,
}

pub struct PeerManager {
    env: Arc<PeerEnv>,
}

impl PeerManager {
    pub fn new(env: PeerEnv) -> Self {
        PeerManager { env: Arc::new(env) }
    }
}

/// Sets a peer's relation (and address, required for a partner).
#[derive(Message)]
#[rtype(result = "Result<PeerRow, Refusal>")]
pub struct SetRelation {
    pub peer: PeerId,
    pub addr: Option<Multiaddr>,
    pub relation: Relation,
}

/// Ends any relation with a peer: no longer a partner, no longer blacklisted.
#[derive(Message)]
#[rtype(result = "Result<bool, Refusal>")]
pub struct Forget {
    pub peer: PeerId,
}

/// Partners and blacklisted peers, for the admin API and the CLI.
#[derive(Message)]
#[rtype(result = "Result<Vec<PeerEntry>, Refusal>")]
pub struct ListPeers;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub peer_id: String,
    pub relation: Relation,
    pub addrs: Vec<String>,
    /// `config` (from --partner) or `runtime` (NATS, admin API, CLI).
    pub source: String,
}

impl Actor for PeerManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let env = self.env.clone();
        ctx.wait(
            async move {
                env.restore().await;
                let create = env.nats.subscribe(event::SUBJECT_CREATE).await;
                let remove = env.nats.subscribe(event::SUBJECT_REMOVE).await;
                match (create, remove) {
                    (Ok(c), Ok(r)) => Some(futures::stream::select(c, r)),
                    (c, r) => {
                        let cause = c.err().map(|e| e.to_string()).or(r.err().map(|e| e.to_string()));
                        tracing::error!(cause = ?cause, "cannot subscribe to PEER resources; run-time partnerships off");
                        None
                    }
                }
            }
            .into_actor(self)
            .map(|subscription, _, ctx| {
                if let Some(s) = subscription {
                    ctx.add_stream(s);
                }
            }),
        );
    }
}

impl StreamHandler<NatsMessage> for PeerManager {
    fn handle(&mut self, msg: NatsMessage, ctx: &mut Self::Context) {
        let env = self.env.clone();
        // One change at a time, in arrival order.
        ctx.wait(async move { env.on_notice(msg).await }.into_actor(self));
    }

    fn finished(&mut self, _: &mut Self::Context) {
        tracing::warn!("PEER resource subscription ended");
    }
}

impl Handler<SetRelation> for PeerManager {
    type Result = ResponseFuture<Result<PeerRow, Refusal>>;

    fn handle(&mut self, msg: SetRelation, _: &mut Self::Context) -> Self::Result {
        let env = self.env.clone();
        Box::pin(async move { env.set_relation(msg.peer, msg.addr, msg.relation).await })
    }
}

impl Handler<Forget> for PeerManager {
    type Result = ResponseFuture<Result<bool, Refusal>>;

    fn handle(&mut self, msg: Forget, _: &mut Self::Context) -> Self::Result {
        let env = self.env.clone();
        Box::pin(async move { env.forget(msg.peer).await })
    }
}

impl Handler<ListPeers> for PeerManager {
    type Result = ResponseFuture<Result<Vec<PeerEntry>, Refusal>>;

    fn handle(&mut self, _: ListPeers, _: &mut Self::Context) -> Self::Result {
        let env = self.env.clone();
        Box::pin(async move {
            let mut out: Vec<PeerEntry> = env
                .configured
                .iter()
                .map(|(peer, addr)| PeerEntry {
                    peer_id: peer.to_string(),
                    relation: Relation::Partner,
                    addrs: vec![addr.to_string()],
                    source: "config".into(),
                })
                .collect();
            let rows = env.store.peers().await.map_err(store_refusal)?;
            out.extend(
                rows.into_iter()
                    .filter(|r| r.relation != Relation::Known)
                    .map(|r| PeerEntry {
                        peer_id: r.peer_id,
                        relation: r.relation,
                        addrs: r.addrs,
                        source: "runtime".into(),
                    }),
            );
            Ok(out)
        })
    }
}

fn store_refusal(e: crate::store::StoreError) -> Refusal {
    Refusal::new(ErrorCode::StoreUnavailable, e.to_string())
}

/// `addr` ending in `/p2p/<peer>`; a trailing peer id that is another peer is refused.
fn with_peer_id(addr: Multiaddr, peer: PeerId) -> Result<Multiaddr, Refusal> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => Ok(addr),
        Some(Protocol::P2p(p)) => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("address ends in /p2p/{p}, not the peer {peer}"),
        )),
        _ => Ok(addr.with(Protocol::P2p(peer))),
    }
}

impl PeerEnv {
    /// Re-applies the persisted relations at start-up. A store that cannot be read yet
    /// (MongoDB down) is retried in the background with backoff, so the manager serves
    /// NATS and commands meanwhile; nothing can be persisted until the store is back.
    async fn restore(self: &Arc<Self>) {
        let Err(e) = self.restore_once().await else {
            return;
        };
        tracing::warn!(cause = %e, "cannot read persisted partnerships yet; retrying in the background");
        let env = self.clone();
        tokio::spawn(async move {
            let mut delay = RESTORE_RETRY_MIN;
            loop {
                tokio::time::sleep(delay).await;
                match env.restore_once().await {
                    Ok(()) => {
                        tracing::info!("persisted partnerships restored");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, retry_in = ?delay, "cannot read persisted partnerships")
                    }
                }
                delay = (delay * 2).min(RESTORE_RETRY_MAX);
            }
        });
    }

    async fn restore_once(&self) -> StoreResult<()> {
        // `known` rows are peers met through the DHT (`Store::meet_peer`): no relation to
        // restore, and a configured partner may be one of them.
        let rows = self.store.peers().await?;
        for row in rows.into_iter().filter(|r| r.relation != Relation::Known) {
            let Ok(peer) = row.peer_id.parse::<PeerId>() else {
                continue;
            };
            let addr = row.addrs.first().and_then(|a| a.parse::<Multiaddr>().ok());
            self.enact(peer, addr, row.relation).await;
        }
        Ok(())
    }

    /// Makes the running node follow a relation (no persistence).
    async fn enact(&self, peer: PeerId, addr: Option<Multiaddr>, relation: Relation) {
        match (relation, addr) {
            (Relation::Partner, Some(addr)) => {
                let _ = self.net.set_blocked(peer, false).await;
                // Partners bypass the connection limits: a flood never keeps them out.
                let _ = self.net.set_partner(peer, true).await;
                self.partners.insert(peer, Some(addr.clone()));
                self.links.do_send(AddPartner { peer, addr });
            }
            (Relation::Blacklist, _) => {
                self.partners.remove(&peer);
                let _ = self.net.set_partner(peer, false).await;
                self.links.do_send(RemovePartner { peer });
                let _ = self.net.set_blocked(peer, true).await;
            }
            (Relation::Partner, None) | (Relation::Known, _) => {
                self.partners.remove(&peer);
                let _ = self.net.set_partner(peer, false).await;
                self.links.do_send(RemovePartner { peer });
                let _ = self.net.set_blocked(peer, false).await;
            }
        }
    }

    async fn set_relation(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        relation: Relation,
    ) -> Result<PeerRow, Refusal> {
        let addr = addr.map(|a| with_peer_id(a, peer)).transpose()?;
        if relation == Relation::Partner && addr.is_none() {
            return Err(Refusal::new(
                ErrorCode::MissingField,
                "a partner needs an address",
            ));
        }
        let row = PeerRow {
            peer_id: peer.to_string(),
            relation,
            addrs: addr.iter().map(ToString::to_string).collect(),
            name: None,
            record: None,
            updated_ms: now_ms(),
        };
        self.store.put_peer(row.clone()).await.map_err(store_refusal)?;
        self.enact(peer, addr, relation).await;
        tracing::info!(%peer, relation = ?relation, "peer relation set");
        Ok(row)
    }

    async fn forget(&self, peer: PeerId) -> Result<bool, Refusal> {
        let known = self
            .store
            .peer(&peer.to_string())
            .await
            .map_err(store_refusal)?
            .is_some();
        self.store
            .remove_peer(&peer.to_string())
            .await
            .map_err(store_refusal)?;
        self.enact(peer, None, Relation::Known).await;
        tracing::info!(%peer, known, "peer relation ended");
        Ok(known)
    }

    /// A `CREATE_RESOURCE` / `REMOVE_RESOURCE` seen on the local NATS.
    async fn on_notice(&self, msg: NatsMessage) {
        let Ok(Value::Object(raw)) = serde_json::from_slice::<Value>(&msg.payload) else {
            return;
        };
        let fields: Map<String, Value> = raw
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase().replace('_', ""), v))
            .collect();
        let text = |k: &str| {
            fields
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if text("fromapp") == event::OWN_APP || !text("datatype").eq_ignore_ascii_case("PEER") {
            return;
        }
        let result = self.peer_notice(&msg, &fields).await;
        if let Err(refusal) = result {
            tracing::warn!(subject = %msg.subject, code = refusal.code.as_str(), reason = %refusal.message, "PEER resource refused");
            self.metrics.refused("peers", refusal.code);
            let body = event::error_event(&refusal, msg.subject.as_str(), &msg.payload);
            if let Err(e) = self
                .nats
                .publish(event::SUBJECT_ERROR, body.to_string().into())
                .await
            {
                tracing::warn!(cause = %e, "cannot publish error event");
            }
        }
    }

    async fn peer_notice(&self, msg: &NatsMessage, fields: &Map<String, Value>) -> Result<(), Refusal> {
        // The peer's fields: under `resource` or `payload`, or at the top level.
        let peer_obj = ["resource", "payload"]
            .iter()
            .find_map(|k| fields.get(*k))
            .and_then(Value::as_object);
        let get = |names: &[&str]| -> Option<Value> {
            names.iter().find_map(|n| {
                peer_obj
                    .and_then(|o| o.get(*n))
                    .or_else(|| fields.get(*n))
                    .cloned()
            })
        };
        let raw_peer = get(&["peer_id", "peerid", "id"])
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| Refusal::new(ErrorCode::MissingField, "missing PEER field peer_id"))?;
        let peer: PeerId = raw_peer
            .parse()
            .map_err(|_| Refusal::new(ErrorCode::InvalidField, format!("{raw_peer:?} is not a peer id")))?;
        if msg.subject.as_str() == event::SUBJECT_REMOVE {
            self.forget(peer).await?;
            return Ok(());
        }
        let relation_text = get(&["relation"])
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let relation = Relation::parse(&relation_text).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidField,
                format!("relation {relation_text:?}: expected partner, known or blacklist"),
            )
        })?;
        let addr_value = get(&["address", "addr", "stream_address", "addrs"]);
        let addr_text = match &addr_value {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list.iter().find_map(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let addr = addr_text
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| Refusal::new(ErrorCode::InvalidField, format!("address {a:?}: {e}")))
            })
            .transpose()?;
        self.set_relation(peer, addr, relation).await.map(|_| ())
    }
}

/// JSON for an admin API refusal.
pub fn refusal_json(r: &Refusal) -> Value {
    json!({"ok": false, "error": r.to_json()})
}
