//! `GET /api/status`: one answer an operator reads first: version, peer id, uptime, the
//! intake and its backlog, the store, NATS, the journal head and every partner link.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::{reply, AdminState};
use crate::intake::{IntakeMode, CONSUMER_NAME};
use crate::outbound::service::{GetPeers, PeerStatus};

/// Longest wait for the JetStream consumer's figures; the answer says `null` after it.
pub const CONSUMER_INFO_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn status(s: web::Data<AdminState>) -> HttpResponse {
    let peers = match s.links.send(GetPeers).await {
        Ok(list) => list,
        Err(e) => return reply::actor_gone(e),
    };
    let head = s.store.journal_head(&s.own_id).await;
    let health = s.store.health().await;
    let store_error = match (&head, &health) {
        (Err(e), _) | (Ok(_), Err(e)) => Some(e.to_string()),
        (Ok(_), Ok(())) => None,
    };
    let mut partners = Vec::with_capacity(peers.len());
    for p in peers {
        partners.push(partner(&s, p).await);
    }
    let mode = s.intake.mode();
    HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "peer_id": s.own_id,
        "uptime_s": s.started.elapsed().as_secs(),
        "intake": {"mode": mode.as_str(), "pending": intake_pending(&s, mode).await},
        "store": {"kind": s.store_kind, "healthy": store_error.is_none(), "error": store_error},
        "nats": {
            "state": s.nats.connection_state().to_string(),
            "last_error": s.nats_status.last_error(),
        },
        "journal_head": head.ok(),
        "partners": partners,
    }))
}

/// Milliseconds since the oldest own journal entry the partner has not acknowledged was
/// journaled; `None` when it acknowledged everything or the store does not answer.
pub(crate) async fn oldest_unacked_ms(s: &AdminState, p: &PeerStatus) -> Option<u64> {
    if p.pending == 0 {
        return None;
    }
    match s
        .store
        .read_journal(&s.own_id, p.acked_seq.saturating_add(1), 1)
        .await
    {
        Ok(rows) => rows
            .first()
            .map(|e| crate::contract::now_ms().saturating_sub(e.time_ms)),
        Err(_) => None,
    }
}

/// One partner: its link figures, and the age of the oldest entry it has not acknowledged.
async fn partner(s: &AdminState, p: PeerStatus) -> Value {
    let oldest_unacked_ms = oldest_unacked_ms(s, &p).await;
    json!({
        "peer_id": p.peer_id,
        "addrs": p.addrs,
        "connected": p.connected,
        "dialed_by": p.dialed_by,
        "state": p.state,
        "since": p.since,
        "acked_seq": p.acked_seq,
        "pending": p.pending,
        "lag": {"seq": p.lag, "oldest_unacked_age_ms": oldest_unacked_ms},
        "rtt_ms": p.rtt_ms,
        "last_error": p.last_error,
        "snapshot": p.snapshot,
    })
}

/// The JetStream consumer's `num_pending`; `None` on a core intake, or when NATS does not
/// answer within [`CONSUMER_INFO_TIMEOUT`].
async fn intake_pending(s: &AdminState, mode: IntakeMode) -> Option<u64> {
    if mode != IntakeMode::JetStream {
        return None;
    }
    let js = async_nats::jetstream::new(s.nats.clone());
    let ask = async {
        let stream = js.get_stream(&s.intake_stream).await.ok()?;
        let info = stream.consumer_info(CONSUMER_NAME).await.ok()?;
        Some(info.num_pending)
    };
    tokio::time::timeout(CONSUMER_INFO_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}
