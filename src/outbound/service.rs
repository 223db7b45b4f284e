//! StreamService actor: owns one partner link per partner and tells them when the
//! journal grows. The links themselves ([`super::link`]) are tasks that read the
//! journal from the partner's cursor, so a partner that is down or slow costs no memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::link::{self, LinkEnv};
use super::status::LinkStatus;

/// The journal now ends at `head`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JournalAdvanced {
    pub head: u64,
}

/// Start replicating to a partner (no-op if it is one already).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct AddPartner {
    pub peer: PeerId,
    pub addr: Multiaddr,
}

/// Stop replicating to a peer (no-op if it is not a partner).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RemovePartner {
    pub peer: PeerId,
}

/// Wait until every link has stopped and persisted its cursor (after the shutdown signal).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Drain;

/// State of every partner link, for the admin API.
#[derive(Message)]
#[rtype(result = "Vec<PeerStatus>")]
pub(crate) struct GetPeers;

/// One row of `GET /api/peers` and `oc-discovery peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PeerStatus {
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// Every own journal entry up to this seq is acknowledged by the partner.
    pub acked_seq: u64,
    /// Own journal entries the partner has not acknowledged yet.
    pub pending: u64,
    /// The same figure under the name of the liveness contract.
    #[serde(default)]
    pub lag: u64,
    /// `connecting`, `online`, `offline` or `refused`.
    pub state: String,
    /// When `state` last changed, milliseconds since the Unix epoch.
    #[serde(default)]
    pub since: u64,
    /// Last heartbeat round trip in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Last error of the link, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Which side opened the connection in use: `us` or `them` (`null` when not connected).
    /// A partner that can only dial out shows `them` on the other side.
    #[serde(default)]
    pub dialed_by: Option<String>,
    /// The snapshot job towards the partner.
    #[serde(default)]
    pub snapshot: SnapshotView,
}

/// A snapshot job as `/api/peers`, `/api/status` and `oc-discovery peers` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    /// 0 idle, 1 running, 2 done and waiting for the partner's confirmation.
    pub state: u8,
    /// The job id (0 when idle).
    #[serde(default)]
    pub job: u64,
    /// Journal position P of the snapshot.
    #[serde(default)]
    pub position: u64,
    /// Resources confirmed by the partner.
    #[serde(default)]
    pub sent: u64,
    /// Own resources when the job began.
    #[serde(default)]
    pub total: u64,
}

impl From<crate::sync::snapshot::SenderJob> for SnapshotView {
    fn from(j: crate::sync::snapshot::SenderJob) -> Self {
        SnapshotView {
            state: j.state,
            job: j.job,
            position: j.position,
            sent: j.sent,
            total: j.total,
        }
    }
}

/// Start a snapshot job towards a partner (`partners resync`).
#[derive(Message)]
#[rtype(result = "Result<(), ResyncRefused>")]
pub(crate) struct Resync {
    pub peer: PeerId,
}

/// Why a resync request was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResyncRefused {
    #[error("{0} is not a partner")]
    NotPartner(PeerId),
    #[error(transparent)]
    Busy(#[from] super::status::SnapshotBusy),
}

impl Handler<Resync> for StreamService {
    type Result = Result<(), ResyncRefused>;

    fn handle(&mut self, msg: Resync, _: &mut Self::Context) -> Self::Result {
        let link = self
            .links
            .get(&msg.peer)
            .ok_or(ResyncRefused::NotPartner(msg.peer))?;
        link.status.request_resync()?;
        tracing::info!(peer = %msg.peer, "snapshot requested");
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::store::retention::PartnerMarks for Addr<StreamService> {
    async fn marks(&self) -> Vec<(String, u64, Option<u64>)> {
        match self.send(GetPeers).await {
            Ok(peers) => peers
                .into_iter()
                .map(|p| {
                    let at = (p.snapshot.state != 0).then_some(p.snapshot.position);
                    (p.peer_id, p.acked_seq, at)
                })
                .collect(),
            // The service is gone (shutdown): hold everything.
            Err(_) => vec![(String::new(), 0, Some(0))],
        }
    }
}

struct Link {
    addr: Multiaddr,
    status: Arc<LinkStatus>,
    task: JoinHandle<()>,
}

pub struct StreamService {
    env: Arc<LinkEnv>,
    head: watch::Sender<u64>,
    links: BTreeMap<PeerId, Link>,
}

impl StreamService {
    /// `head` is the journal head at start-up.
    pub(crate) fn new(env: LinkEnv, head: u64) -> Self {
        let (tx, _) = watch::channel(head);
        StreamService {
            env: Arc::new(env),
            head: tx,
            links: BTreeMap::new(),
        }
    }
}

impl Actor for StreamService {
    type Context = Context<Self>;

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        // Links persist their cursor when they see the shutdown signal; aborting here only
        // covers a stop without it.
        for link in self.links.values() {
            link.task.abort();
        }
        Running::Stop
    }
}

impl Handler<JournalAdvanced> for StreamService {
    type Result = ();

    fn handle(&mut self, msg: JournalAdvanced, _: &mut Self::Context) {
        self.head.send_if_modified(|head| {
            let grew = msg.head > *head;
            if grew {
                *head = msg.head;
            }
            grew
        });
    }
}

impl Handler<AddPartner> for StreamService {
    type Result = ();

    fn handle(&mut self, msg: AddPartner, _: &mut Self::Context) {
        if self.links.contains_key(&msg.peer) {
            return;
        }
        let status = Arc::new(LinkStatus::new(self.env.tuning.pong_discard_timeout));
        let task = tokio::spawn(link::run(
            self.env.clone(),
            msg.peer,
            msg.addr.clone(),
            status.clone(),
            self.head.subscribe(),
        ));
        tracing::info!(peer = %msg.peer, addr = %msg.addr, "partner link started");
        self.links.insert(
            msg.peer,
            Link {
                addr: msg.addr,
                status,
                task,
            },
        );
    }
}

impl Handler<GetPeers> for StreamService {
    type Result = MessageResult<GetPeers>;

    fn handle(&mut self, _: GetPeers, _: &mut Self::Context) -> Self::Result {
        let head = *self.head.borrow();
        MessageResult(
            self.links
                .iter()
                .map(|(peer, link)| {
                    let snap = link.status.snapshot();
                    PeerStatus {
                        peer_id: peer.to_string(),
                        addrs: vec![link.addr.to_string()],
                        connected: self.env.net.state().is_connected(peer),
                        acked_seq: snap.acked,
                        pending: head.saturating_sub(snap.acked),
                        lag: head.saturating_sub(snap.acked),
                        state: snap.state.as_str().to_owned(),
                        since: snap.since_ms,
                        rtt_ms: snap.rtt_ms,
                        last_error: snap.last_error,
                        dialed_by: self.env.net.state().dialed_by(peer).map(str::to_owned),
                        snapshot: link.status.snapshot_job().into(),
                    }
                })
                .collect(),
        )
    }
}

impl Handler<Drain> for StreamService {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, _: &mut Self::Context) -> Self::Result {
        let tasks: Vec<_> = std::mem::take(&mut self.links)
            .into_values()
            .map(|l| l.task)
            .collect();
        Box::pin(async move {
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

impl Handler<RemovePartner> for StreamService {
    type Result = ();

    fn handle(&mut self, msg: RemovePartner, _: &mut Self::Context) {
        if let Some(link) = self.links.remove(&msg.peer) {
            // Its cursor stays in the store: a partnership made again resumes from the
            // partner's own report anyway.
            link.task.abort();
            tracing::info!(peer = %msg.peer, "partner link stopped");
        }
    }
}
