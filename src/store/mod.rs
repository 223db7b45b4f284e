//! The node's persistent state behind one trait, so backends are interchangeable.
//!
//! What is stored: the journal of the node's own events, the resources received from
//! partners with their versions (tombstones for deletions), the per-origin "applied up to"
//! mark, the per-partner send cursor, and the outbox of NATS publishes not yet confirmed.

pub mod embedded;
pub mod mongo;
pub mod retention;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::{Action, JournalEntry, NewEvent};

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

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// One row of the applied log: an entry a partner sent that this node applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedRecord {
    /// The local apply counter: grows with every entry applied here, never reused.
    pub key: u64,
    /// When this node committed the apply, in milliseconds since the Unix epoch.
    pub applied_ms: u64,
    /// Nested, not flattened: the entry's raw resource text does not pass serde's flatten.
    pub entry: JournalEntry,
}

/// Whether the oldest remaining applied-log row goes ([`Store::trim_applied_log`]): `rows`
/// are left from it to the newest (itself included), `applied_ms` tells its age (read only
/// when the count alone does not decide). The newest row always stays: the next key
/// follows it, so keys are never reused (a page cursor keeps its meaning).
pub(crate) fn trims_applied_row(
    rows: u64,
    keep_rows: u64,
    older_than_ms: u64,
    applied_ms: impl FnOnce() -> StoreResult<u64>,
) -> StoreResult<bool> {
    if rows <= 1 {
        return Ok(false);
    }
    Ok(rows > keep_rows || applied_ms()? <= older_than_ms)
}

/// The apply time of an applied-log row's JSON, without decoding its entry.
pub(crate) fn applied_ms_of(json: &[u8]) -> Result<u64, serde_json::Error> {
    #[derive(Deserialize)]
    struct Stamp {
        applied_ms: u64,
    }
    serde_json::from_slice::<Stamp>(json).map(|s| s.applied_ms)
}

/// [`AppliedRecord`] as written, borrowing the applied entry.
#[derive(Serialize)]
pub(crate) struct AppliedRef<'a> {
    pub key: u64,
    pub applied_ms: u64,
    pub entry: &'a JournalEntry,
}

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

/// Bounds of one [`Store::own_resources_page`]: at most `max_count` resources, and none
/// added once `max_bytes` of JSON text are held. A page holds at least one resource when
/// one remains, so a reader always moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBounds {
    pub max_count: usize,
    pub max_bytes: usize,
}

/// One page of this node's own resources of a data type, in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnPage {
    /// `(id, resource JSON text)`, as the application published it.
    pub items: Vec<(String, String)>,
    /// The id to read after for the next page; `None`: this page was the last.
    pub next: Option<String>,
}

impl OwnPage {
    /// Fills a page from `(id, json)` pairs in id order, within `bounds`.
    pub(crate) fn fill<E>(
        mut items: impl Iterator<Item = Result<(String, String), E>>,
        bounds: PageBounds,
    ) -> Result<OwnPage, E> {
        let mut page = OwnPage::default();
        let mut bytes = 0usize;
        for item in items.by_ref() {
            let (id, json) = item?;
            bytes = bytes.saturating_add(json.len()).saturating_add(id.len());
            page.items.push((id, json));
            if page.items.len() >= bounds.max_count.max(1) || bytes >= bounds.max_bytes {
                page.next = page.items.last().map(|(id, _)| id.clone());
                break;
            }
        }
        Ok(page)
    }
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
    pub(crate) fn encode(entry: &JournalEntry) -> StoreResult<RawEntry> {
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
    /// The sending origin does not own the resource at this site ([`decide_at`]): nothing
    /// changed, the entry counts as handled.
    Conflict {
        owner: Owner,
    },
    /// The backend cannot hold this resource as it is (MongoDB: a field name starting
    /// with `$`, a document over 16 MiB, ...). Nothing was stored for it; the batch goes on.
    Rejected {
        reason: String,
    },
}

/// A resource's key: `(data_type, id)`; snapshots and their sweeps go in this order.
pub type ResourceKey = (String, String);

/// What one compaction run may remove ([`Store::compact_journal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactBounds {
    /// Only entries with `seq <= up_to` are compacted: what every partner still waited for
    /// acknowledged.
    pub up_to: u64,
    /// Only entries journaled at or before this time (ms since the epoch) are compacted.
    pub older_than_ms: u64,
    /// Tombstones of the compacted range journaled at or before this time are dropped.
    pub tombstones_older_than_ms: u64,
    /// Most entries examined in this run (the rest waits for the next run).
    pub max_examined: usize,
}

/// What one compaction run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    pub examined: u64,
    /// Entries removed: superseded by a later entry of their resource.
    pub removed: u64,
    /// Tombstones dropped after `--tombstone-retention`.
    pub tombstones_dropped: u64,
    /// Every entry `<= floor` has been compacted ([`Store::journal_floor`]).
    pub floor: u64,
}

/// One page of [`Store::snapshot_page`]: the latest journal entry of each live own
/// resource, in key order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotPage {
    pub entries: Vec<(ResourceKey, RawEntry)>,
    /// The key to read after for the next page; `None`: this page was the last.
    pub next: Option<ResourceKey>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends the events to `origin`'s journal in one durable commit and returns their
    /// entries, with consecutive seqs following the current head ([`Store::append_journal_marked`]
    /// without intake sequences).
    async fn append_journal(&self, origin: &str, events: Vec<NewEvent>) -> StoreResult<Vec<JournalEntry>> {
        self.append_journal_marked(origin, events, Vec::new()).await
    }

    /// [`Store::append_journal`] that also records, in the same commit, the JetStream stream
    /// sequences of the intake messages journaled, so a redelivery is recognised
    /// ([`Store::intake_seen`]). Every backend implements this one; `append_journal` is it
    /// with no intake sequences.
    async fn append_journal_marked(
        &self,
        origin: &str,
        events: Vec<NewEvent>,
        intake_seqs: Vec<u64>,
    ) -> StoreResult<Vec<JournalEntry>>;

    /// [`Store::append_journal_marked`] for a caller that keeps the events to try again after
    /// a failure and needs only the entries' seqs (in order): the events are lent, not
    /// copied for each attempt, and a backend may serialize them where they are.
    async fn append_journal_lent(
        &self,
        origin: &str,
        events: Arc<[NewEvent]>,
        intake_seqs: Arc<[u64]>,
    ) -> StoreResult<Vec<u64>> {
        let entries = self
            .append_journal_marked(origin, events.to_vec(), intake_seqs.to_vec())
            .await?;
        Ok(entries.into_iter().map(|e| e.seq).collect())
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

    /// Up to `limit` rows of the applied log with `key < before`, newest first: what this
    /// node applied from partners, in local apply order. Written in the commit of each apply.
    async fn applied_log(&self, before: u64, limit: usize) -> StoreResult<Vec<AppliedRecord>>;

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

    /// [`Store::apply_batch_clearing`] that hands the batch's outbox rows to `rows` as soon as
    /// they are decided, before the commit is durable, so that the caller publishes them while
    /// the store writes and syncs: the publish-then-commit-then-ack order of invariant 4 in
    /// docs/ARCHITECTURE.md. A commit lost in a crash after the publish leaves the entries
    /// unacknowledged: the sender sends them again, they are applied again and published again
    /// (a duplicate notice, never a lost one). Nothing reads the batch from the store before
    /// its commit returns, and a backend that hands the rows before makes every operation
    /// that begins after that wait for the commit, so that the resource of a notice can be
    /// read as soon as the notice arrived. Backends that cannot split their commit hand the
    /// rows after it.
    async fn apply_batch_publishing_early(
        &self,
        origin: &str,
        up_to: u64,
        entries: std::sync::Arc<[JournalEntry]>,
        published: Vec<u64>,
        rows: tokio::sync::oneshot::Sender<Vec<OutboxRow>>,
    ) -> StoreResult<Vec<ApplyOutcome>> {
        let (outcomes, decided) = self
            .apply_batch_clearing(origin, up_to, entries, published)
            .await?;
        // A caller that stopped waiting for the rows has nothing to publish them for.
        let _ = rows.send(decided);
        Ok(outcomes)
    }

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
                    let alive = e.action != crate::contract::Action::Delete;
                    latest.insert(id, alive.then(|| e.resource.to_value()));
                }
            }
            next = last + 1;
        }
        Ok(latest.into_values().flatten().collect())
    }

    /// One page of [`Store::own_resources`] as JSON text, ids after `after`, within
    /// `bounds`: what a search responder streams, so that its memory does not grow with the
    /// number of own resources.
    ///
    /// Required of every store: reading them all would hold every own resource at once.
    async fn own_resources_page(
        &self,
        origin: &str,
        data_type: &str,
        after: Option<String>,
        bounds: PageBounds,
    ) -> StoreResult<OwnPage>;

    /// The compaction floor of `origin`'s journal: entries `<= floor` were compacted (per
    /// resource only its latest entry, or its tombstone until `--tombstone-retention`), so
    /// a partner whose cursor is below it needs a snapshot. 0 when never compacted.
    ///
    /// Both backends implement the retention methods; their defaults are a store that
    /// never compacts and keeps no bookkeeping values (for wrappers in tests).
    async fn journal_floor(&self, origin: &str) -> StoreResult<u64> {
        let _ = origin;
        Ok(0)
    }

    /// Compacts `origin`'s journal from the floor on, within `bounds`: removes each entry a
    /// later entry of the same resource supersedes, and the tombstones older than
    /// `bounds.tombstones_older_than_ms`; moves the floor. Several commits of bounded size;
    /// an interrupted run leaves a valid journal (only superseded entries go).
    async fn compact_journal(&self, origin: &str, bounds: CompactBounds) -> StoreResult<CompactReport> {
        let _ = (origin, bounds);
        Ok(CompactReport::default())
    }

    /// Gives the space freed by compaction back to the file system where the backend can
    /// (redb: `compact()`; MongoDB: the `compact` command on the journal). Returns the
    /// bytes given back (redb: the file's shrink; MongoDB: the command's `bytesFreed`).
    async fn reclaim_space(&self) -> StoreResult<u64> {
        Ok(0)
    }

    /// Bytes the journal takes on disk (for `--journal-max-bytes` and the metrics).
    async fn journal_bytes(&self) -> StoreResult<u64> {
        Ok(0)
    }

    /// Trims the applied log ([`Store::applied_log`]) from its oldest end: removes the rows
    /// beyond the newest `keep_rows`, and the rows applied at or before `older_than_ms`,
    /// at most `max_remove` in one call. Rows are only ever removed from the old end, so
    /// the keys that remain stay contiguous, and the newest row always stays, so keys are
    /// never reused. Returns how many were removed.
    async fn trim_applied_log(
        &self,
        older_than_ms: u64,
        keep_rows: u64,
        max_remove: usize,
    ) -> StoreResult<u64> {
        let _ = (older_than_ms, keep_rows, max_remove);
        Ok(0)
    }

    /// How many own live resources a snapshot holds now (its `total`).
    async fn own_count(&self, origin: &str) -> StoreResult<u64> {
        let _ = origin;
        Ok(0)
    }

    /// Up to `max_count` own live resources after `after` (all data types, key order),
    /// each as its latest journal entry, none added once `max_bytes` are held (at least
    /// one when one remains).
    async fn snapshot_page(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        max_count: usize,
        max_bytes: usize,
    ) -> StoreResult<SnapshotPage> {
        let _ = (origin, after, max_count, max_bytes);
        Ok(SnapshotPage::default())
    }

    /// Resources stored for `origin` (a partner) with `after < key <= upto` (`upto`
    /// `None`: to the end), live ones only, at most `limit`, in key order: what a snapshot
    /// receiver compares with the part it applied.
    async fn origin_resources(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        upto: Option<ResourceKey>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>> {
        let _ = (origin, after, upto, limit);
        Ok(Vec::new())
    }

    /// A small persisted value of the node's own bookkeeping (snapshot jobs), by key.
    async fn meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let _ = key;
        Ok(None)
    }
    /// Writes (or with `None` removes) a [`Store::meta`] value, durably.
    async fn set_meta(&self, key: &str, value: Option<Vec<u8>>) -> StoreResult<()> {
        let _ = (key, value);
        Ok(())
    }

    /// Peers this node met, with their relation.
    async fn peers(&self) -> StoreResult<Vec<PeerRow>>;
    async fn put_peer(&self, row: PeerRow) -> StoreResult<()>;
    async fn remove_peer(&self, peer_id: &str) -> StoreResult<()>;

    /// Drops the rows of relation `known` beyond `keep`, least recently seen
    /// (`updated_ms`) first; partners and blacklisted peers are never dropped. Returns how
    /// many were dropped. Backends keep an index so that this costs little when nothing is
    /// to be dropped (it is called after each peer met).
    async fn trim_known_peers(&self, keep: usize) -> StoreResult<usize>;

    /// One peer's row.
    async fn peer(&self, peer_id: &str) -> StoreResult<Option<PeerRow>>;

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

/// What [`Store::meet_peer`] keeps of an existing row: its relation, a partner's or
/// blacklisted peer's addresses, and its record (with name and addresses) when that record
/// is newer than the one met (a replayed old record does not bring back old addresses).
pub(crate) fn keep_relation(met: &mut PeerRow, existing: PeerRow) {
    met.relation = existing.relation;
    let newer_stored = match (&existing.record, &met.record) {
        (Some(stored), Some(incoming)) => record_version(stored) > record_version(incoming),
        _ => false,
    };
    if newer_stored {
        met.record = existing.record;
        met.name = existing.name;
    }
    if newer_stored || existing.relation != Relation::Known {
        met.addrs = existing.addrs;
    }
}

/// `(issued_at, expires_at)` of a stored record's JSON (`records::PeerRecord::version`).
fn record_version(record: &serde_json::Value) -> (u64, u64) {
    let field = |name: &str| record.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
    (field("issued_at"), field("expires_at"))
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
pub(crate) struct Holder {
    pub origin: String,
    pub version: u64,
    /// A tombstone: the node's last write of this resource removed it.
    #[serde(default)]
    pub deleted: bool,
}

/// Who keeps an inbound entry from changing a resource ([`ApplyOutcome::Conflict`]). Its
/// `Display` completes "the resource belongs to ...", the message of the `conflict` frame;
/// it never quotes what the site's applications wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Another origin created it here: its peer id.
    Origin(String),
    /// One of this node's own resources: its journal holds it (`own_at`, `oc_own`).
    ThisNode,
    /// MongoDB: a document in the data type's collection that this node did not write (no
    /// version row for it, or a tombstone: the node's last write removed it).
    SiteDocument,
    /// MongoDB: the stored document's `creator_id` is not the sending origin (absent, or
    /// changed by an application after the node wrote it).
    OtherCreator,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Origin(peer) => f.write_str(peer),
            Owner::ThisNode => f.write_str("this node: it is one of its own resources"),
            Owner::SiteDocument => f.write_str("this site: a document this node did not write"),
            Owner::OtherCreator => {
                f.write_str("this site: the stored document's creator_id is not the sending origin")
            }
        }
    }
}

/// What the site holds under a resource's key besides the node's version row: what
/// [`decide_at`] reads on top of the [`Holder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Local<'a> {
    /// The key (same data type and id) is one of this node's own live resources.
    pub own: bool,
    /// MongoDB: the document under the resource's id in its collection, if any. Always
    /// `None` in the embedded store, where only the node writes resources.
    pub document: Option<&'a SiteDoc>,
}

/// A document found in a resource collection, as far as the rule cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SiteDoc {
    /// Its `creator_id` when that is a string.
    pub creator_id: Option<String>,
}

/// The version rule shared by every backend (ARCHITECTURE invariant 3): apply iff the
/// incoming seq is higher than what is stored, and only the creator may change a resource.
pub(crate) fn decide(existing: Option<&Holder>, entry: &JournalEntry) -> ApplyOutcome {
    match existing {
        None => ApplyOutcome::Applied,
        Some(s) if s.origin != entry.origin => ApplyOutcome::Conflict {
            owner: Owner::Origin(s.origin.clone()),
        },
        Some(s) if s.version >= entry.seq => ApplyOutcome::Stale,
        Some(_) => ApplyOutcome::Applied,
    }
}

/// The full rule for an inbound entry: no foreign writes, then [`decide`]. The sending
/// origin owns a resource at this site only if it is not one of this node's own (whatever
/// the origin claims), no other origin holds it, and any document under its id is one the
/// node wrote for that origin: a version row that is not a tombstone, and the document's
/// `creator_id` equal to the origin. Anything else is a [`ApplyOutcome::Conflict`]: an
/// application's document is never overwritten or removed by a partner.
pub(crate) fn decide_at(existing: Option<&Holder>, local: &Local<'_>, entry: &JournalEntry) -> ApplyOutcome {
    if local.own {
        return ApplyOutcome::Conflict {
            owner: Owner::ThisNode,
        };
    }
    let by_version = decide(existing, entry);
    if matches!(by_version, ApplyOutcome::Conflict { .. }) {
        return by_version;
    }
    match local.document {
        None => by_version,
        Some(_) if existing.is_none_or(|h| h.deleted) => ApplyOutcome::Conflict {
            owner: Owner::SiteDocument,
        },
        Some(doc) if doc.creator_id.as_deref() != Some(entry.origin.as_str()) => ApplyOutcome::Conflict {
            owner: Owner::OtherCreator,
        },
        Some(_) => by_version,
    }
}

/// The `CREATE_RESOURCE` / `REMOVE_RESOURCE` publish an applied entry owes NATS.
pub(crate) fn outbox_row(entry: &JournalEntry, outbox_id: u64) -> OutboxRow {
    use crate::contract::ResourceNotice;
    OutboxRow {
        id: outbox_id,
        subject: ResourceNotice::subject(entry.action).to_owned(),
        msg_id: notice_msg_id(entry),
        payload: ResourceNotice::body_of(entry),
    }
}

/// The `user` of the removals a snapshot receiver makes for resources absent from the
/// snapshot (deleted in the origin's compacted journal): several share the seq of the
/// snapshot's position, so their `Nats-Msg-Id` also names the resource.
pub const SNAPSHOT_REMOVAL_USER: &str = "oc-discovery:snapshot";

/// `Nats-Msg-Id` of an applied entry: `<origin>:<seq>`, and for a snapshot removal
/// `<origin>:<seq>:<data_type>/<id>`.
fn notice_msg_id(entry: &JournalEntry) -> String {
    match entry.resource_id() {
        Some(id) if entry.action == Action::Delete && entry.user == SNAPSHOT_REMOVAL_USER => {
            format!("{}:{}/{id}", entry.msg_id(), entry.data_type)
        }
        _ => entry.msg_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "12D3KooWorigin";
    const OTHER: &str = "12D3KooWother";

    fn entry(seq: u64) -> JournalEntry {
        JournalEntry {
            origin: ORIGIN.into(),
            seq,
            action: Action::Update,
            data_type: "COMPUTE_RESOURCE".into(),
            user: "u".into(),
            resource: serde_json::json!({"id": "r1", "creator_id": ORIGIN}).into(),
            time_ms: 1,
        }
    }

    fn holder(origin: &str, version: u64, deleted: bool) -> Holder {
        Holder {
            origin: origin.into(),
            version,
            deleted,
        }
    }

    fn doc(creator: Option<&str>) -> Option<SiteDoc> {
        Some(SiteDoc {
            creator_id: creator.map(str::to_owned),
        })
    }

    fn local(own: bool, document: Option<&SiteDoc>) -> Local<'_> {
        Local { own, document }
    }

    fn conflict(owner: Owner) -> ApplyOutcome {
        ApplyOutcome::Conflict { owner }
    }

    /// The version rule alone: the creator's higher seq applies, an equal or lower one is
    /// stale (a tombstone keeps its version), another origin's resource is a conflict.
    #[test]
    fn the_version_rule_applies_only_newer_seqs_of_the_same_origin() {
        assert_eq!(decide(None, &entry(1)), ApplyOutcome::Applied);
        for deleted in [false, true] {
            let case = format!("tombstone: {deleted}");
            let stored = holder(ORIGIN, 4, deleted);
            assert_eq!(decide(Some(&stored), &entry(5)), ApplyOutcome::Applied, "{case}");
            assert_eq!(
                decide(Some(&stored), &entry(4)),
                ApplyOutcome::Stale,
                "{case}: applying twice changes nothing"
            );
            assert_eq!(decide(Some(&stored), &entry(3)), ApplyOutcome::Stale, "{case}");
            let theirs = holder(OTHER, 1, deleted);
            assert_eq!(
                decide(Some(&theirs), &entry(5)),
                conflict(Owner::Origin(OTHER.into())),
                "{case}"
            );
        }
    }

    #[test]
    fn an_applied_entry_owes_its_notice_once_per_msg_id() {
        let mut e = entry(7);
        let row = outbox_row(&e, 3);
        assert_eq!(
            (row.id, row.subject.as_str(), row.msg_id.as_str()),
            (3, crate::contract::SUBJECT_CREATE, "12D3KooWorigin:7")
        );
        assert_eq!(row.payload, crate::contract::ResourceNotice::body_of(&e));
        e.action = Action::Delete;
        assert_eq!(outbox_row(&e, 4).subject, crate::contract::SUBJECT_REMOVE);
    }

    #[test]
    fn a_page_stops_at_its_bounds_and_holds_at_least_one_resource() {
        let items = |n: usize| (0..n).map(|i| Ok::<_, ()>((format!("r{i}"), "x".repeat(10))));
        let bounds = |max_count, max_bytes| PageBounds { max_count, max_bytes };
        let page = OwnPage::fill(items(5), bounds(2, 1000)).unwrap();
        assert_eq!((page.items.len(), page.next.as_deref()), (2, Some("r1")));
        let page = OwnPage::fill(items(5), bounds(100, 1)).unwrap();
        assert_eq!(
            (page.items.len(), page.next.as_deref()),
            (1, Some("r0")),
            "a resource beyond the byte bound still makes a page"
        );
        let page = OwnPage::fill(items(5), bounds(0, 1000)).unwrap();
        assert_eq!(page.items.len(), 1, "a count of 0 is taken as 1");
        let page = OwnPage::fill(items(3), bounds(100, 1000)).unwrap();
        assert_eq!((page.items.len(), page.next), (3, None), "the last page");
    }

    #[test]
    fn foreign_writes_are_conflicts() {
        let e = entry(5);
        let live = holder(ORIGIN, 3, false);
        // Nothing at this site: the origin's.
        assert_eq!(decide_at(None, &Local::default(), &e), ApplyOutcome::Applied);
        // One of this node's own resources, whatever the origin's history with it.
        for existing in [None, Some(&live)] {
            assert_eq!(
                decide_at(existing, &local(true, None), &e),
                conflict(Owner::ThisNode)
            );
            assert_eq!(
                decide_at(existing, &local(true, doc(Some(ORIGIN)).as_ref()), &e),
                conflict(Owner::ThisNode)
            );
        }
        // Another origin's: its peer id, document or not.
        let theirs = holder(OTHER, 9, false);
        assert_eq!(
            decide_at(Some(&theirs), &local(false, doc(Some(OTHER)).as_ref()), &e),
            conflict(Owner::Origin(OTHER.into()))
        );
        // A document the node never wrote, even one claiming the origin as creator.
        for creator in [None, Some(ORIGIN), Some(OTHER)] {
            assert_eq!(
                decide_at(None, &local(false, doc(creator).as_ref()), &e),
                conflict(Owner::SiteDocument)
            );
            let tomb = holder(ORIGIN, 3, true);
            assert_eq!(
                decide_at(Some(&tomb), &local(false, doc(creator).as_ref()), &e),
                conflict(Owner::SiteDocument),
                "the node's last write removed it"
            );
        }
        // The node wrote it, then an application changed its creator.
        for creator in [None, Some(OTHER)] {
            assert_eq!(
                decide_at(Some(&live), &local(false, doc(creator).as_ref()), &e),
                conflict(Owner::OtherCreator)
            );
        }
        // The node's document for this origin: the version rule decides.
        assert_eq!(
            decide_at(Some(&live), &local(false, doc(Some(ORIGIN)).as_ref()), &e),
            ApplyOutcome::Applied
        );
        assert_eq!(
            decide_at(Some(&live), &local(false, doc(Some(ORIGIN)).as_ref()), &entry(2)),
            ApplyOutcome::Stale
        );
        // Removed behind the node's back: nothing to overwrite, the origin writes it again.
        assert_eq!(
            decide_at(Some(&live), &Local::default(), &e),
            ApplyOutcome::Applied
        );
    }

    /// Every combination: an entry is applied only where the origin owns the resource, and
    /// without local claims the rule is the version rule.
    #[test]
    fn applied_only_where_the_origin_owns_the_resource() {
        let holders = [
            None,
            Some(holder(ORIGIN, 4, false)),
            Some(holder(ORIGIN, 4, true)),
            Some(holder(OTHER, 4, false)),
            Some(holder(OTHER, 4, true)),
        ];
        let documents = [None, doc(None), doc(Some(ORIGIN)), doc(Some(OTHER))];
        for existing in &holders {
            for own in [false, true] {
                for document in &documents {
                    for seq in [3, 4, 5] {
                        let e = entry(seq);
                        let local = local(own, document.as_ref());
                        let outcome = decide_at(existing.as_ref(), &local, &e);
                        let case = format!("{existing:?} {local:?} seq {seq}: {outcome:?}");
                        if outcome == ApplyOutcome::Applied {
                            assert!(!own, "{case}");
                            assert!(existing.as_ref().is_none_or(|h| h.origin == ORIGIN), "{case}");
                            if let Some(d) = document {
                                let h = existing.as_ref().expect(&case);
                                assert!(!h.deleted && d.creator_id.as_deref() == Some(ORIGIN), "{case}");
                            }
                        }
                        if !own && document.is_none() {
                            assert_eq!(outcome, decide(existing.as_ref(), &e), "{case}");
                        }
                        if own {
                            assert_eq!(outcome, conflict(Owner::ThisNode), "{case}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn conflict_messages_name_the_owner_without_site_data() {
        let said = |o: Owner| format!("the resource belongs to {o}");
        assert_eq!(
            said(Owner::Origin(OTHER.into())),
            format!("the resource belongs to {OTHER}")
        );
        assert!(said(Owner::ThisNode).contains("own resources"));
        assert!(said(Owner::SiteDocument).contains("did not write"));
        assert!(said(Owner::OtherCreator).contains("creator_id"));
    }

    fn met(issued_at: u64, addr: &str) -> PeerRow {
        PeerRow {
            peer_id: "p".into(),
            relation: Relation::Known,
            addrs: vec![addr.into()],
            name: Some(format!("n{issued_at}")),
            record: Some(serde_json::json!({"issued_at": issued_at, "expires_at": 99})),
            updated_ms: issued_at,
        }
    }

    #[test]
    fn a_replayed_older_record_does_not_replace_a_newer_one() {
        let mut old = met(1, "/old");
        keep_relation(&mut old, met(2, "/new"));
        assert_eq!(old.addrs, ["/new"]);
        assert_eq!(old.name.as_deref(), Some("n2"));
        assert_eq!(old.record, met(2, "/new").record);
        assert_eq!(old.updated_ms, 1, "the row counts as seen now");

        let mut newer = met(3, "/newer");
        keep_relation(&mut newer, met(2, "/new"));
        assert_eq!(newer.addrs, ["/newer"]);
        assert_eq!(newer.name.as_deref(), Some("n3"));

        let mut partner = met(3, "/newer");
        let mut existing = met(2, "/set");
        existing.relation = Relation::Partner;
        keep_relation(&mut partner, existing);
        assert_eq!(
            (partner.relation, partner.addrs),
            (Relation::Partner, vec!["/set".to_owned()])
        );
    }
}
