//! The node's persistent state behind one trait, so backends are interchangeable.
//!
//! What is stored: the journal of the node's own events, the resources received from
//! partners with their versions (tombstones for deletions), the per-origin "applied up to"
//! mark, the per-partner send cursor, and the outbox of NATS publishes not yet confirmed.

pub mod embedded;
pub mod mongo;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Action, JournalEntry, NewEvent};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or failed to commit; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored bytes that do not decode: a bug or a damaged file, never retried blindly.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A resource as the receiving node keeps it, with the version that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResource {
    pub data_type: String,
    pub id: String,
    /// The creator's peer id; only it may change the resource.
    pub origin: String,
    /// The origin's journal seq of the change that produced this state.
    pub version: u64,
    /// A tombstone: the resource was deleted at `version`.
    pub deleted: bool,
    pub resource: Value,
}

/// One publish the receiving node owes NATS, recorded in the same commit as the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRow {
    pub id: u64,
    pub subject: String,
    /// `Nats-Msg-Id`: `<origin>:<seq>`.
    pub msg_id: String,
    pub payload: Vec<u8>,
}

/// A journal entry as the JSON text of its [`JournalEntry`], for senders that pass entries
/// on without decoding them (partner links, journal sync).
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub seq: u64,
    pub action: Action,
    pub json: Vec<u8>,
}

impl RawEntry {
    pub fn encode(entry: &JournalEntry) -> StoreResult<RawEntry> {
        Ok(RawEntry {
            seq: entry.seq,
            action: entry.action,
            json: serde_json::to_vec(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        })
    }
}

/// Outcome of one inbound entry in [`Store::apply_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    /// Already at this version or newer: nothing changed.
    Stale,
    /// The resource exists with another creator.
    Conflict {
        owner: String,
    },
    /// The backend cannot hold this resource as it is (MongoDB: a field name starting
    /// with `$`, a document over 16 MiB, ...). Nothing was stored for it; the batch goes on.
    Rejected {
        reason: String,
    },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends the events to `origin`'s journal in one durable commit and returns their
    /// entries, with consecutive seqs following the current head.
    async fn append_journal(&self, origin: &str, events: Vec<NewEvent>) -> StoreResult<Vec<JournalEntry>>;

    /// [`Store::append_journal`] that also records, in the same commit, the JetStream stream
    /// sequences of the intake messages journaled, so a redelivery is recognised
    /// ([`Store::intake_seen`]). A backend that does not record them journals redeliveries
    /// again (at-least-once intake).
    async fn append_journal_marked(
        &self,
        origin: &str,
        events: Vec<NewEvent>,
        intake_seqs: Vec<u64>,
    ) -> StoreResult<Vec<JournalEntry>> {
        let _ = intake_seqs;
        self.append_journal(origin, events).await
    }

    /// Which of these JetStream stream sequences were journaled already.
    async fn intake_seen(&self, seqs: Vec<u64>) -> StoreResult<Vec<u64>> {
        let _ = seqs;
        Ok(Vec::new())
    }

    /// The highest stream sequence recorded as journaled (0 when none).
    async fn intake_high(&self) -> StoreResult<u64> {
        Ok(0)
    }

    /// Forgets recorded stream sequences below `seq` (the consumer's ack floor: the server
    /// never redelivers those).
    async fn intake_forget_below(&self, seq: u64) -> StoreResult<()> {
        let _ = seq;
        Ok(())
    }

    /// Up to `limit` entries of `origin`'s journal with `seq >= from`, in seq order.
    async fn read_journal(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<JournalEntry>>;

    /// [`Store::read_journal`] as JSON text, which a backend that stores the text hands out
    /// without decoding and encoding it again.
    async fn read_journal_raw(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<RawEntry>> {
        let entries = self.read_journal(origin, from, limit).await?;
        entries.iter().map(RawEntry::encode).collect()
    }

    /// Highest seq in `origin`'s journal, 0 when empty.
    async fn journal_head(&self, origin: &str) -> StoreResult<u64>;

    /// The send cursor of a partner: every entry `<= cursor` was acknowledged by it.
    async fn cursor(&self, peer: &str) -> StoreResult<u64>;
    async fn set_cursor(&self, peer: &str, seq: u64) -> StoreResult<()>;

    /// Every entry of `origin` up to this seq has been handled by this node.
    async fn applied(&self, origin: &str) -> StoreResult<u64>;

    /// In one commit: applies `entries` (all from `origin`, ascending seq) by version,
    /// records an outbox row for each applied one, and sets `applied(origin) = up_to`.
    async fn apply_batch(
        &self,
        origin: &str,
        up_to: u64,
        entries: Vec<JournalEntry>,
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)>;

    /// Oldest outbox rows first.
    async fn outbox(&self, limit: usize) -> StoreResult<Vec<OutboxRow>>;
    async fn outbox_remove(&self, ids: Vec<u64>) -> StoreResult<()>;

    /// [`Store::apply_batch`] on shared entries (a caller that retries keeps them without a
    /// copy) that also removes the outbox rows `published` since the last call, in the same
    /// commit where the backend can: one commit per applied batch instead of two.
    async fn apply_batch_clearing(
        &self,
        origin: &str,
        up_to: u64,
        entries: std::sync::Arc<[JournalEntry]>,
        published: Vec<u64>,
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)>;

    async fn resource(&self, data_type: &str, id: &str) -> StoreResult<Option<StoredResource>>;

    /// Whether the backend answers now (`/healthz`). A local file is always there.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] with the reason the backend cannot be used.
    async fn health(&self) -> StoreResult<()> {
        Ok(())
    }
    /// Resources (tombstones included) of a data type, ordered by id, after `after`.
    async fn resources(
        &self,
        data_type: &str,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>>;

    /// The current state of this node's own resources of a data type (deleted ones left
    /// out), derived from its journal: what a search responder offers.
    ///
    /// The default folds the whole journal; backends keep an index instead.
    async fn own_resources(&self, origin: &str, data_type: &str) -> StoreResult<Vec<serde_json::Value>> {
        let mut latest: std::collections::BTreeMap<String, Option<serde_json::Value>> = Default::default();
        let mut next = 1;
        loop {
            let chunk = self.read_journal(origin, next, 4096).await?;
            let Some(last) = chunk.last().map(|e| e.seq) else {
                break;
            };
            for e in chunk.into_iter().filter(|e| e.data_type == data_type) {
                if let Some(id) = e.resource_id().map(str::to_owned) {
                    let alive = e.action != crate::event::Action::Delete;
                    latest.insert(id, alive.then(|| e.resource.to_value()));
                }
            }
            next = last + 1;
        }
        Ok(latest.into_values().flatten().collect())
    }

    /// Peers this node met, with their relation.
    async fn peers(&self) -> StoreResult<Vec<PeerRow>>;
    async fn put_peer(&self, row: PeerRow) -> StoreResult<()>;
    async fn remove_peer(&self, peer_id: &str) -> StoreResult<()>;

    /// One peer's row.
    async fn peer(&self, peer_id: &str) -> StoreResult<Option<PeerRow>> {
        Ok(self.peers().await?.into_iter().find(|r| r.peer_id == peer_id))
    }

    /// Records a peer met through the DHT or a search: its name and record replace what
    /// was known; its relation stays what it was (a partner or a blacklisted peer stays so;
    /// a new peer is `known`), and so do the addresses of a partner or blacklisted peer
    /// (set with the partnership). Returns the relation kept.
    ///
    /// The default reads then writes; backends make it one transaction so a relation set
    /// meanwhile (`put_peer`) is never overwritten.
    async fn meet_peer(&self, mut row: PeerRow) -> StoreResult<Relation> {
        if let Some(existing) = self.peer(&row.peer_id).await? {
            keep_relation(&mut row, existing);
        }
        let relation = row.relation;
        self.put_peer(row).await?;
        Ok(relation)
    }
}

/// What [`Store::meet_peer`] keeps of an existing row.
pub fn keep_relation(met: &mut PeerRow, existing: PeerRow) {
    met.relation = existing.relation;
    if existing.relation != Relation::Known {
        met.addrs = existing.addrs;
    }
}

/// How this node relates to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    /// Replicated to and accepted from.
    Partner,
    /// Met (search, DHT, considers) but no partnership.
    Known,
    /// Refused at connection time.
    Blacklist,
}

impl Relation {
    pub fn parse(s: &str) -> Option<Relation> {
        match s.to_ascii_lowercase().as_str() {
            "partner" => Some(Relation::Partner),
            "known" => Some(Relation::Known),
            "blacklist" => Some(Relation::Blacklist),
            _ => None,
        }
    }
}

/// A peer this node met.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    pub peer_id: String,
    pub relation: Relation,
    #[serde(default)]
    pub addrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The peer's last verified signed record, when it came from the DHT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    pub updated_ms: u64,
}

/// Who holds a stored resource and at which version: all the version rule reads. It
/// deserializes from a stored [`StoredResource`] without building its resource.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Holder {
    pub origin: String,
    pub version: u64,
}

/// The version rule shared by every backend (ARCHITECTURE invariant 3): apply iff the
/// incoming seq is higher than what is stored, and only the creator may change a resource.
pub fn decide(existing: Option<&Holder>, entry: &JournalEntry) -> ApplyOutcome {
    match existing {
        None => ApplyOutcome::Applied,
        Some(s) if s.origin != entry.origin => ApplyOutcome::Conflict {
            owner: s.origin.clone(),
        },
        Some(s) if s.version >= entry.seq => ApplyOutcome::Stale,
        Some(_) => ApplyOutcome::Applied,
    }
}

/// The `CREATE_RESOURCE` / `REMOVE_RESOURCE` publish an applied entry owes NATS.
pub fn outbox_row(entry: &JournalEntry, outbox_id: u64) -> OutboxRow {
    use crate::event::ResourceNotice;
    OutboxRow {
        id: outbox_id,
        subject: ResourceNotice::subject(entry.action).to_owned(),
        msg_id: entry.msg_id(),
        payload: ResourceNotice::body_of(entry),
    }
}
