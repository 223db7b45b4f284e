//! The default store: one redb file (`<data-dir>/store.redb`), every commit fsynced.
//!
//! redb is synchronous, so each call runs on tokio's blocking pool. Callers batch
//! (group commit): one `append_journal` or `apply_batch` call is one fsync however many
//! events it carries.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{
    decide_at, outbox_row, AppliedRecord, ApplyOutcome, CompactBounds, CompactReport, Holder, Local,
    OutboxRow, OwnPage, PageBounds, PeerRow, RawEntry, ResourceKey, SnapshotPage, Store, StoreError,
    StoreResult, StoredResource,
};
use crate::contract::{now_ms, Action, JournalEntry, NewEvent, Resource, ResourceNotice};

mod applied_log;
mod gate;
mod groups;
use applied_log::Log;
use groups::GROUPS;

/// redb's page cache. Its default (1 GiB) made a node catching up on a million events
/// grow past 1 GiB of RSS; the journal is read sequentially, so a small cache costs little.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// (origin, seq) → the entry's action code then the JSON of its [`JournalEntry`]
/// ([`write_journal_value`]; stores of earlier versions hold the JSON alone). The entries at
/// or below the compaction floor; those above it are in [`GROUPS`] (see [`groups`]).
const JOURNAL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("journal");
/// partner peer id → seq acknowledged by that partner.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// origin peer id → seq up to which this node handled the origin's entries.
const APPLIED: TableDefinition<&str, u64> = TableDefinition::new("applied");
/// (data_type, id) → JSON of [`StoredResource`] (tombstones included).
const RESOURCES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("resources");
/// (data_type, id) → seq of the journal entry that last changed this node's own resource
/// (absent once deleted). A pointer, not a copy: the journal holds the state already.
const OWN_AT: TableDefinition<(&str, &str), u64> = TableDefinition::new("own_at");
/// The former own-resources index, a full copy of each state; migrated to `OWN_AT` at open.
const OWN_COPIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("own");
/// peer id → JSON of [`PeerRow`].
const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");
/// (updated_ms, peer id) → () for every row of relation `known`: the order in which
/// [`Store::trim_known_peers`] drops them (least recently seen first), and their count.
/// Built from `PEERS` at open when missing (stores of earlier versions).
const PEERS_SEEN: TableDefinition<(u64, &str), ()> = TableDefinition::new("peers_seen");
/// Stores of earlier versions: JetStream stream sequence of a journaled intake message → its
/// journal seq, one row per message; moved to `INTAKE_RUNS` at open.
const INTAKE: TableDefinition<u64, u64> = TableDefinition::new("intake");
/// The JetStream stream sequences of journaled intake messages, as runs: first → last
/// (inclusive). A batch's sequences are mostly consecutive and follow the previous batch's,
/// so a commit rewrites one row instead of adding one per message. Runs never overlap nor
/// touch (`add_run` merges them).
const INTAKE_RUNS: TableDefinition<u64, u64> = TableDefinition::new("intake_runs");
/// highest row id in the group → the outbox rows of one applied batch ([`encode_group`]):
/// one B-tree insert and one removal per batch instead of one per event. Stores of earlier
/// versions hold one row per key (row id → [`encode_outbox`] or JSON); both are read.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// (data_type, id) → seq of the delete entry of this node's own resource that was deleted
/// last (absent while it lives): what compaction keeps as its tombstone.
const OWN_GONE: TableDefinition<(&str, &str), u64> = TableDefinition::new("own_gone");
/// The node's small bookkeeping values ([`Store::meta`]): snapshot jobs, the compaction
/// floor (`floor:<origin>`), whether `OWN_GONE` was built (`own_gone`).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Journal entries examined per compaction commit.
const COMPACT_BATCH: usize = 8192;

pub struct EmbeddedStore {
    /// Written (exclusively) only by [`Store::reclaim_space`]: redb's `compact()` needs
    /// the database alone.
    db: Arc<std::sync::RwLock<Database>>,
    path: std::path::PathBuf,
    /// Apply commits whose notices may be out, which every operation waits for.
    gate: Arc<gate::CommitGate>,
}

fn floor_key(origin: &str) -> String {
    format!("floor:{origin}")
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file and its tables.
    ///
    /// # Errors
    /// The file cannot be opened, typically because another process holds it.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        {
            txn.open_table(JOURNAL).map_err(unavailable)?;
            txn.open_table(GROUPS).map_err(unavailable)?;
            txn.open_table(CURSORS).map_err(unavailable)?;
            txn.open_table(APPLIED).map_err(unavailable)?;
            txn.open_table(RESOURCES).map_err(unavailable)?;
            txn.open_table(OUTBOX).map_err(unavailable)?;
            applied_log::open_write(&txn)?;
            txn.open_table(INTAKE_RUNS).map_err(unavailable)?;
            txn.open_table(OWN_AT).map_err(unavailable)?;
            txn.open_table(PEERS).map_err(unavailable)?;
            txn.open_table(OWN_GONE).map_err(unavailable)?;
            txn.open_table(META).map_err(unavailable)?;
            index_known_peers(&txn)?;
            migrate_own_copies(&txn)?;
            build_own_gone(&txn)?;
            migrate_intake_rows(&txn)?;
        }
        txn.commit().map_err(unavailable)?;
        pack_rows_above_floor(&db)?;
        Ok(EmbeddedStore {
            db: Arc::new(std::sync::RwLock::new(db)),
            path: path.to_path_buf(),
            gate: Arc::default(),
        })
    }

    /// Up to `limit` journal values of `origin` from seq `from`, each read by `read(seq, value)`.
    async fn journal_range<T, F>(&self, origin: &str, from: u64, limit: usize, read: F) -> StoreResult<Vec<T>>
    where
        T: Send + 'static,
        F: Fn(u64, &[u8]) -> StoreResult<T> + Send + 'static,
    {
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let rows = txn.open_table(JOURNAL).map_err(unavailable)?;
            let groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let mut out = Vec::new();
            if limit > 0 {
                journal_scan(&rows, &groups, &origin, from, |seq, value| {
                    out.push(read(seq, value)?);
                    Ok(out.len() < limit)
                })?;
            }
            Ok(out)
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> StoreResult<T> + Send + 'static,
    {
        let (db, gate) = (self.db.clone(), self.gate.clone());
        tokio::task::spawn_blocking(move || {
            // What was announced before this operation is visible to it.
            gate.wait_for_earlier();
            let db = db.read().map_err(|_| unavailable("store lock poisoned"))?;
            f(&db)
        })
        .await
        .map_err(unavailable)?
    }
}

/// Fills `PEERS_SEEN` from `PEERS` when it is empty and `PEERS` has `known` rows.
fn index_known_peers(txn: &redb::WriteTransaction) -> StoreResult<()> {
    use redb::ReadableTableMetadata;
    let mut seen = txn.open_table(PEERS_SEEN).map_err(unavailable)?;
    if !seen.is_empty().map_err(unavailable)? {
        return Ok(());
    }
    let peers = txn.open_table(PEERS).map_err(unavailable)?;
    for item in peers.iter().map_err(unavailable)? {
        let (_, v) = item.map_err(unavailable)?;
        let row: PeerRow = serde_json::from_slice(v.value()).map_err(corrupt)?;
        if row.relation == super::Relation::Known {
            seen.insert((row.updated_ms, row.peer_id.as_str()), ())
                .map_err(unavailable)?;
        }
    }
    Ok(())
}

/// Writes `row` (or removes `peer_id` when `None`) and keeps `PEERS_SEEN` in step;
/// returns the row that was there.
fn write_peer(
    txn: &redb::WriteTransaction,
    peer_id: &str,
    row: Option<&PeerRow>,
) -> StoreResult<Option<PeerRow>> {
    let mut peers = txn.open_table(PEERS).map_err(unavailable)?;
    let mut seen = txn.open_table(PEERS_SEEN).map_err(unavailable)?;
    let old: Option<PeerRow> = match peers.get(peer_id).map_err(unavailable)? {
        Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
        None => None,
    };
    if let Some(old) = old.as_ref().filter(|o| o.relation == super::Relation::Known) {
        seen.remove((old.updated_ms, peer_id)).map_err(unavailable)?;
    }
    match row {
        Some(row) => {
            let bytes = serde_json::to_vec(row).map_err(corrupt)?;
            peers.insert(peer_id, bytes.as_slice()).map_err(unavailable)?;
            if row.relation == super::Relation::Known {
                seen.insert((row.updated_ms, peer_id), ()).map_err(unavailable)?;
            }
        }
        None => {
            peers.remove(peer_id).map_err(unavailable)?;
        }
    }
    Ok(old)
}

/// Drops the least recently seen `known` rows beyond `keep`; returns how many.
fn trim_known(txn: &redb::WriteTransaction, keep: usize) -> StoreResult<usize> {
    use redb::ReadableTableMetadata;
    let mut peers = txn.open_table(PEERS).map_err(unavailable)?;
    let mut seen = txn.open_table(PEERS_SEEN).map_err(unavailable)?;
    let count = seen.len().map_err(unavailable)?;
    let excess = count.saturating_sub(u64::try_from(keep).unwrap_or(u64::MAX));
    let mut dropped = 0;
    for _ in 0..excess {
        let Some((k, _)) = seen.pop_first().map_err(unavailable)? else {
            break;
        };
        let peer_id = k.value().1.to_owned();
        drop(k);
        // Only a `known` row is indexed here; check anyway, a partner is never dropped.
        let is_known = match peers.get(peer_id.as_str()).map_err(unavailable)? {
            Some(v) => serde_json::from_slice::<PeerRow>(v.value())
                .map(|r| r.relation == super::Relation::Known)
                .unwrap_or(false),
            None => false,
        };
        if is_known {
            peers.remove(peer_id.as_str()).map_err(unavailable)?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

fn last_seq(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
) -> StoreResult<u64> {
    let mut range = table
        .range((origin, 0u64)..=(origin, u64::MAX))
        .map_err(unavailable)?;
    match range.next_back() {
        Some(item) => Ok(item.map_err(unavailable)?.0.value().1),
        None => Ok(0),
    }
}

/// The last seq of `origin`'s journal: its groups' last, else its rows' (see [`groups`]).
fn journal_last(
    rows: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    groups: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
) -> StoreResult<u64> {
    match groups::last(groups, origin)? {
        Some(seq) => Ok(seq),
        None => last_seq(rows, origin),
    }
}

/// `read(value)` of the journal entry `seq` of `origin`, a row or in a group.
fn journal_get<T>(
    rows: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    groups: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
    seq: u64,
    read: impl FnOnce(&[u8]) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    if let Some(value) = rows.get((origin, seq)).map_err(unavailable)? {
        return read(value.value()).map(Some);
    }
    groups::with_entry(groups, origin, seq, read)
}

/// Calls `each(seq, value)` for the journal entries of `origin` from seq `from` on, in seq
/// order (the rows, then the groups, which follow them), as long as it answers `true`.
fn journal_scan(
    rows: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    groups: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
    from: u64,
    mut each: impl FnMut(u64, &[u8]) -> StoreResult<bool>,
) -> StoreResult<()> {
    for item in rows
        .range((origin, from)..=(origin, u64::MAX))
        .map_err(unavailable)?
    {
        let (k, v) = item.map_err(unavailable)?;
        if !each(k.value().1, v.value())? {
            return Ok(());
        }
    }
    groups::scan(groups, origin, from, each)
}

/// Stores of earlier versions hold every journal entry as a row: the rows above the
/// compaction floor move into groups, at most [`PACK_BYTES`] per commit, once (`journal_groups`
/// in `META` says it is done).
fn pack_rows_above_floor(db: &Database) -> StoreResult<()> {
    const DONE: &str = "journal_groups";
    const PACK_BYTES: usize = 32 << 20;
    loop {
        let txn = db.begin_write().map_err(unavailable)?;
        let moved = {
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            if meta.get(DONE).map_err(unavailable)?.is_some() {
                return Ok(());
            }
            let mut rows = txn.open_table(JOURNAL).map_err(unavailable)?;
            let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let (mut moved, mut bytes) = (0usize, 0usize);
            let mut next = first_origin(&rows, "")?;
            while let Some(origin) = next {
                let floor = read_floor(&meta, &floor_key(&origin))?;
                let mut packer = groups::Packer::new();
                let mut taken = Vec::new();
                for item in rows
                    .range((origin.as_str(), floor.saturating_add(1))..=(origin.as_str(), u64::MAX))
                    .map_err(unavailable)?
                {
                    let (k, v) = item.map_err(unavailable)?;
                    let seq = k.value().1;
                    packer.push(&mut groups, &origin, seq, |out| {
                        out.extend_from_slice(v.value());
                        Ok(())
                    })?;
                    taken.push(seq);
                    bytes = bytes.saturating_add(v.value().len());
                    if bytes >= PACK_BYTES {
                        break;
                    }
                }
                packer.finish(&mut groups, &origin)?;
                for seq in &taken {
                    rows.remove((origin.as_str(), *seq)).map_err(unavailable)?;
                }
                moved = moved.saturating_add(taken.len());
                if bytes >= PACK_BYTES {
                    break;
                }
                next = first_origin(&rows, &format!("{origin}\0"))?;
            }
            if bytes < PACK_BYTES {
                meta.insert(DONE, [1u8].as_slice()).map_err(unavailable)?;
            }
            moved
        };
        txn.commit().map_err(unavailable)?;
        if moved > 0 {
            tracing::info!(
                entries = moved,
                "journal rows above the compaction floor packed into groups"
            );
        }
    }
}

/// The first origin at or after `from` that has journal rows.
fn first_origin(
    rows: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    from: &str,
) -> StoreResult<Option<String>> {
    match rows.range((from, 0u64)..).map_err(unavailable)?.next() {
        Some(item) => Ok(Some(item.map_err(unavailable)?.0.value().0.to_owned())),
        None => Ok(None),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn append_journal_marked(
        &self,
        origin: &str,
        events: Vec<NewEvent>,
        intake_seqs: Vec<u64>,
    ) -> StoreResult<Vec<JournalEntry>> {
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let (first, time_ms) = append_events(db, &origin, &events, &intake_seqs)?;
            // The events move into their entries: nothing is copied.
            Ok((first..)
                .zip(events)
                .map(|(seq, e)| JournalEntry {
                    origin: origin.clone(),
                    seq,
                    action: e.action,
                    data_type: e.data_type,
                    user: e.user,
                    resource: e.resource,
                    time_ms,
                })
                .collect())
        })
        .await
    }

    async fn append_journal_lent(
        &self,
        origin: &str,
        events: Arc<[NewEvent]>,
        intake_seqs: Arc<[u64]>,
    ) -> StoreResult<Vec<u64>> {
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let (first, _) = append_events(db, &origin, &events, &intake_seqs)?;
            Ok((first..).take(events.len()).collect())
        })
        .await
    }

    async fn read_journal(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<JournalEntry>> {
        self.journal_range(origin, from, limit, |_, value| decode_journal(value))
            .await
    }

    async fn read_journal_raw(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<RawEntry>> {
        self.journal_range(origin, from, limit, |seq, value| {
            match split_journal_value(value) {
                (Some(action), json) => Ok(RawEntry {
                    seq,
                    action,
                    json: json.to_vec(),
                }),
                (None, json) => RawEntry::encode(&serde_json::from_slice(json).map_err(corrupt)?),
            }
        })
        .await
    }

    async fn journal_head(&self, origin: &str) -> StoreResult<u64> {
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let rows = txn.open_table(JOURNAL).map_err(unavailable)?;
            let groups = txn.open_table(GROUPS).map_err(unavailable)?;
            journal_last(&rows, &groups, &origin)
        })
        .await
    }

    async fn cursor(&self, peer: &str) -> StoreResult<u64> {
        read_u64(self, CURSORS, peer).await
    }

    async fn set_cursor(&self, peer: &str, seq: u64) -> StoreResult<()> {
        let peer = peer.to_owned();
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            // A cursor lost in a crash only shows an older position: no fsync needed.
            txn.set_durability(Durability::None).map_err(unavailable)?;
            txn.open_table(CURSORS)
                .map_err(unavailable)?
                .insert(peer.as_str(), seq)
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn own_resources(&self, origin: &str, data_type: &str) -> StoreResult<Vec<serde_json::Value>> {
        let (origin, data_type) = (origin.to_owned(), data_type.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let own = txn.open_table(OWN_AT).map_err(unavailable)?;
            let journal = txn.open_table(JOURNAL).map_err(unavailable)?;
            let groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in own.range((data_type.as_str(), "")..).map_err(unavailable)? {
                let (k, seq) = item.map_err(unavailable)?;
                if k.value().0 != data_type {
                    break;
                }
                let Some(entry) = journal_get(&journal, &groups, &origin, seq.value(), decode_journal)?
                else {
                    return Err(corrupt(format!(
                        "own resource points at missing journal seq {}",
                        seq.value()
                    )));
                };
                out.push(entry.resource.to_value());
            }
            Ok(out)
        })
        .await
    }

    async fn own_resources_page(
        &self,
        origin: &str,
        data_type: &str,
        after: Option<String>,
        bounds: PageBounds,
    ) -> StoreResult<OwnPage> {
        use std::ops::Bound;
        let (origin, data_type) = (origin.to_owned(), data_type.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let own = txn.open_table(OWN_AT).map_err(unavailable)?;
            let journal = txn.open_table(JOURNAL).map_err(unavailable)?;
            let groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let start = match &after {
                Some(a) => Bound::Excluded((data_type.as_str(), a.as_str())),
                None => Bound::Included((data_type.as_str(), "")),
            };
            let range = own
                .range::<(&str, &str)>((start, Bound::Unbounded))
                .map_err(unavailable)?;
            // One entry decoded at a time: the page holds JSON text only.
            let items = range
                .map(|item| -> StoreResult<Option<(String, String)>> {
                    let (k, seq) = item.map_err(unavailable)?;
                    let (dt, id) = k.value();
                    if dt != data_type {
                        return Ok(None);
                    }
                    let Some(entry) = journal_get(&journal, &groups, &origin, seq.value(), decode_journal)?
                    else {
                        return Err(corrupt(format!(
                            "own resource points at missing journal seq {}",
                            seq.value()
                        )));
                    };
                    Ok(Some((id.to_owned(), entry.resource.json().to_owned())))
                })
                .map_while(|r| r.transpose());
            OwnPage::fill(items, bounds)
        })
        .await
    }

    async fn journal_floor(&self, origin: &str) -> StoreResult<u64> {
        let key = floor_key(origin);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let meta = txn.open_table(META).map_err(unavailable)?;
            read_floor(&meta, &key)
        })
        .await
    }

    async fn compact_journal(&self, origin: &str, bounds: CompactBounds) -> StoreResult<CompactReport> {
        let origin = origin.to_owned();
        self.blocking(move |db| compact(db, &origin, bounds)).await
    }

    async fn reclaim_space(&self) -> StoreResult<u64> {
        let (db, path) = (self.db.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let before = len();
            let mut db = db.write().map_err(|_| unavailable("store lock poisoned"))?;
            // Each call moves some pages towards the start; the file shrinks at the end.
            while db.compact().map_err(unavailable)? {}
            Ok(before.saturating_sub(len()))
        })
        .await
        .map_err(unavailable)?
    }

    async fn journal_bytes(&self) -> StoreResult<u64> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let mut bytes = 0u64;
            for def in [JOURNAL, GROUPS] {
                let stats = txn
                    .open_table(def)
                    .map_err(unavailable)?
                    .stats()
                    .map_err(unavailable)?;
                bytes = bytes
                    .saturating_add(stats.stored_bytes())
                    .saturating_add(stats.metadata_bytes());
            }
            Ok(bytes)
        })
        .await
    }

    async fn own_count(&self, _origin: &str) -> StoreResult<u64> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            txn.open_table(OWN_AT)
                .map_err(unavailable)?
                .len()
                .map_err(unavailable)
        })
        .await
    }

    async fn snapshot_page(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        max_count: usize,
        max_bytes: usize,
    ) -> StoreResult<SnapshotPage> {
        use std::ops::Bound;
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let own = txn.open_table(OWN_AT).map_err(unavailable)?;
            let journal = txn.open_table(JOURNAL).map_err(unavailable)?;
            let groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let start = match &after {
                Some((dt, id)) => Bound::Excluded((dt.as_str(), id.as_str())),
                None => Bound::Unbounded,
            };
            let mut page = SnapshotPage::default();
            let mut bytes = 0usize;
            for item in own
                .range::<(&str, &str)>((start, Bound::Unbounded))
                .map_err(unavailable)?
            {
                let (k, seq) = item.map_err(unavailable)?;
                let (dt, id) = k.value();
                let seq = seq.value();
                let Some(raw) = journal_get(&journal, &groups, &origin, seq, |v| raw_entry(seq, v))? else {
                    return Err(corrupt(format!(
                        "own resource points at missing journal seq {seq}"
                    )));
                };
                bytes = bytes.saturating_add(raw.json.len());
                page.entries.push(((dt.to_owned(), id.to_owned()), raw));
                if page.entries.len() >= max_count.max(1) || bytes >= max_bytes {
                    page.next = page.entries.last().map(|(k, _)| k.clone());
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    async fn origin_resources(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        upto: Option<ResourceKey>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>> {
        use std::ops::Bound;
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RESOURCES).map_err(unavailable)?;
            let log = applied_log::open_read(&txn)?;
            let start = match &after {
                Some((dt, id)) => Bound::Excluded((dt.as_str(), id.as_str())),
                None => Bound::Unbounded,
            };
            let end = match &upto {
                Some((dt, id)) => Bound::Included((dt.as_str(), id.as_str())),
                None => Bound::Unbounded,
            };
            let mut out = Vec::new();
            for item in table.range::<(&str, &str)>((start, end)).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let holder = decode_holder(k.value(), v.value())?;
                if holder.origin != origin || holder.deleted {
                    continue;
                }
                out.push(decode_resource(&log, k.value(), v.value())?);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let meta = txn.open_table(META).map_err(unavailable)?;
            Ok(meta
                .get(key.as_str())
                .map_err(unavailable)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn set_meta(&self, key: &str, value: Option<Vec<u8>>) -> StoreResult<()> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut meta = txn.open_table(META).map_err(unavailable)?;
                match value {
                    Some(v) => meta.insert(key.as_str(), v.as_slice()).map(|_| ()),
                    None => meta.remove(key.as_str()).map(|_| ()),
                }
                .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn peers(&self) -> StoreResult<Vec<PeerRow>> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(PEERS).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in table.iter().map_err(unavailable)? {
                let (_, v) = item.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_peer(&self, row: PeerRow) -> StoreResult<()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            write_peer(&txn, &row.peer_id, Some(&row))?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn peer(&self, peer_id: &str) -> StoreResult<Option<PeerRow>> {
        let peer_id = peer_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(PEERS).map_err(unavailable)?;
            match table.get(peer_id.as_str()).map_err(unavailable)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn meet_peer(&self, mut row: PeerRow) -> StoreResult<super::Relation> {
        self.blocking(move |db| {
            // Read and write in one transaction: a relation set meanwhile is kept.
            let txn = db.begin_write().map_err(unavailable)?;
            let existing: Option<PeerRow> = {
                let table = txn.open_table(PEERS).map_err(unavailable)?;
                let v = table.get(row.peer_id.as_str()).map_err(unavailable)?;
                match v {
                    Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
                    None => None,
                }
            };
            if let Some(existing) = existing {
                super::keep_relation(&mut row, existing);
            }
            write_peer(&txn, &row.peer_id.clone(), Some(&row))?;
            txn.commit().map_err(unavailable)?;
            Ok(row.relation)
        })
        .await
    }

    async fn remove_peer(&self, peer_id: &str) -> StoreResult<()> {
        let peer_id = peer_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            write_peer(&txn, &peer_id, None)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn trim_known_peers(&self, keep: usize) -> StoreResult<usize> {
        self.blocking(move |db| {
            use redb::ReadableTableMetadata;
            {
                // Most calls find nothing to drop: a read transaction, no commit.
                let txn = db.begin_read().map_err(unavailable)?;
                let seen = txn.open_table(PEERS_SEEN).map_err(unavailable)?;
                if seen.len().map_err(unavailable)? <= u64::try_from(keep).unwrap_or(u64::MAX) {
                    return Ok(0);
                }
            }
            let txn = db.begin_write().map_err(unavailable)?;
            let dropped = trim_known(&txn, keep)?;
            txn.commit().map_err(unavailable)?;
            Ok(dropped)
        })
        .await
    }

    async fn intake_seen(&self, seqs: Vec<u64>) -> StoreResult<Vec<u64>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(INTAKE_RUNS).map_err(unavailable)?;
            let (Some(&low), Some(&high)) = (seqs.iter().min(), seqs.iter().max()) else {
                return Ok(Vec::new());
            };
            // The runs that may hold a queried seq: the one reaching `low` from below, and
            // those starting in [low, high]. Ascending, disjoint.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            if let Some(item) = table.range(..low).map_err(unavailable)?.next_back() {
                let (k, v) = item.map_err(unavailable)?;
                if v.value() >= low {
                    runs.push((k.value(), v.value()));
                }
            }
            for item in table.range(low..=high).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                runs.push((k.value(), v.value()));
            }
            Ok(seqs.into_iter().filter(|&seq| in_runs(&runs, seq)).collect())
        })
        .await
    }

    async fn intake_high(&self) -> StoreResult<u64> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(INTAKE_RUNS).map_err(unavailable)?;
            let high = table.last().map_err(unavailable)?.map(|(_, last)| last.value());
            Ok(high.unwrap_or(0))
        })
        .await
    }

    async fn intake_forget_below(&self, below: u64) -> StoreResult<()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(INTAKE_RUNS).map_err(unavailable)?;
                table
                    .retain_in(..below, |_, last| last >= below)
                    .map_err(unavailable)?;
                // What is left below is the run reaching `below`: it starts there now.
                let straddling = match table.range(..below).map_err(unavailable)?.next_back() {
                    Some(item) => Some(item.map_err(unavailable)?.1.value()),
                    None => None,
                };
                if let Some(last) = straddling {
                    table.retain_in(..below, |_, _| false).map_err(unavailable)?;
                    let at = table.get(below).map_err(unavailable)?.map(|v| v.value());
                    table
                        .insert(below, last.max(at.unwrap_or(0)))
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn applied(&self, origin: &str) -> StoreResult<u64> {
        read_u64(self, APPLIED, origin).await
    }

    async fn apply_batch(
        &self,
        origin: &str,
        up_to: u64,
        entries: Vec<JournalEntry>,
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
        self.apply_batch_clearing(origin, up_to, entries.into(), Vec::new())
            .await
    }

    async fn apply_batch_clearing(
        &self,
        origin: &str,
        up_to: u64,
        entries: Arc<[JournalEntry]>,
        published: Vec<u64>,
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
        let origin = origin.to_owned();
        self.blocking(move |db| {
            let (txn, outcomes, rows) = apply_uncommitted(db, &origin, up_to, &entries, published)?;
            txn.commit().map_err(unavailable)?;
            Ok((outcomes, rows))
        })
        .await
    }

    async fn apply_batch_publishing_early(
        &self,
        origin: &str,
        up_to: u64,
        entries: Arc<[JournalEntry]>,
        published: Vec<u64>,
        rows: tokio::sync::oneshot::Sender<Vec<OutboxRow>>,
    ) -> StoreResult<Vec<ApplyOutcome>> {
        let (origin, gate) = (origin.to_owned(), self.gate.clone());
        self.blocking(move |db| {
            let (txn, outcomes, decided) = apply_uncommitted(db, &origin, up_to, &entries, published)?;
            // Published while the commit below writes its pages and syncs. Every store
            // operation that begins from now on waits for the commit to end (the ticket's
            // drop), so an application that got a notice and asks for its resource finds it.
            let ticket = gate.begin();
            let _ = rows.send(decided);
            let committed = txn.commit().map_err(unavailable);
            drop(ticket);
            committed?;
            Ok(outcomes)
        })
        .await
    }

    async fn trim_applied_log(
        &self,
        older_than_ms: u64,
        keep_rows: u64,
        max_remove: usize,
    ) -> StoreResult<u64> {
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            let removed;
            {
                let mut log = applied_log::open_write(&txn)?;
                let mut resources = txn.open_table(RESOURCES).map_err(unavailable)?;
                removed = log.trim_front(max_remove as u64, |key, last, value| {
                    let rows = last.saturating_sub(key).saturating_add(1);
                    let trims =
                        super::trims_applied_row(rows, keep_rows, older_than_ms, || logged_ms(key, value))?;
                    if trims {
                        inline_before_trim(&mut resources, key, value)?;
                    }
                    Ok(trims)
                })?;
            }
            if removed > 0 {
                // A trim lost in a crash is done again by the next run: no fsync needed.
                txn.set_durability(Durability::None).map_err(unavailable)?;
                txn.commit().map_err(unavailable)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn applied_log(&self, before: u64, limit: usize) -> StoreResult<Vec<AppliedRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let log = applied_log::open_read(&txn)?;
            let mut out = Vec::new();
            log.newest_before(before, |key, value| {
                if out.len() < limit {
                    out.push(decode_logged(key, value)?);
                }
                Ok(out.len() < limit)
            })?;
            Ok(out)
        })
        .await
    }

    async fn outbox(&self, limit: usize) -> StoreResult<Vec<OutboxRow>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(OUTBOX).map_err(unavailable)?;
            let resources = txn.open_table(RESOURCES).map_err(unavailable)?;
            let log = applied_log::open_read(&txn)?;
            let mut out = Vec::new();
            for item in table.range(0u64..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                for row in decode_group(k.value(), v.value())? {
                    out.extend(resolve(row, &resources, &log)?);
                }
                if out.len() >= limit {
                    break;
                }
            }
            out.truncate(limit);
            Ok(out)
        })
        .await
    }

    async fn outbox_remove(&self, ids: Vec<u64>) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            // A removal lost in a crash republishes those rows at start-up (a duplicate the
            // Nats-Msg-Id header absorbs), so it is not worth an fsync on the hot path.
            txn.set_durability(Durability::None).map_err(unavailable)?;
            remove_outbox_rows(&mut txn.open_table(OUTBOX).map_err(unavailable)?, ids)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn resource(&self, data_type: &str, id: &str) -> StoreResult<Option<StoredResource>> {
        let (data_type, id) = (data_type.to_owned(), id.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RESOURCES).map_err(unavailable)?;
            let log = applied_log::open_read(&txn)?;
            let key = (data_type.as_str(), id.as_str());
            match table.get(key).map_err(unavailable)? {
                Some(v) => Ok(Some(decode_resource(&log, key, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn resources(
        &self,
        data_type: &str,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>> {
        let data_type = data_type.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RESOURCES).map_err(unavailable)?;
            let log = applied_log::open_read(&txn)?;
            let start = after.clone().unwrap_or_default();
            let mut out = Vec::new();
            // Keys sort by data_type then id; stop at the first key of another data type.
            for item in table
                .range((data_type.as_str(), start.as_str())..)
                .map_err(unavailable)?
            {
                let (k, v) = item.map_err(unavailable)?;
                let (dt, id) = k.value();
                if dt != data_type || out.len() >= limit {
                    break;
                }
                if after.as_deref() == Some(id) {
                    continue;
                }
                out.push(decode_resource(&log, (dt, id), v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

/// The apply of a batch, up to its commit: the resources by version, the applied log, the
/// outbox rows (those `published` removed) and the applied mark, in `txn`, which the caller
/// commits. Returns each entry's outcome and the outbox rows of the applied ones.
fn apply_uncommitted(
    db: &Database,
    origin: &str,
    up_to: u64,
    entries: &[JournalEntry],
    published: Vec<u64>,
) -> StoreResult<(redb::WriteTransaction, Vec<ApplyOutcome>, Vec<OutboxRow>)> {
    let txn = db.begin_write().map_err(unavailable)?;
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut rows = Vec::new();
    // (data_type, id, version) of each row's resource.
    let mut keys: Vec<(&str, &str, u64)> = Vec::new();
    {
        let mut resources = txn.open_table(RESOURCES).map_err(unavailable)?;
        // This node's own resources: no partner may change them. Read in the same
        // transaction as the journal appends that write it, so none slips between.
        let own = txn.open_table(OWN_AT).map_err(unavailable)?;
        let mut outbox = txn.open_table(OUTBOX).map_err(unavailable)?;
        let mut log = applied_log::open_write(&txn)?;
        // The entries are written straight into the applied log's groups.
        let mut appended = applied_log::Appender::new(&log)?;
        let applied_ms = now_ms();
        // Ids keep growing within the commit: taken before the removals.
        let mut next_id = match outbox.last().map_err(unavailable)? {
            Some((k, _)) => k.value() + 1,
            None => 1,
        };
        remove_outbox_rows(&mut outbox, published)?;
        // Reused for every entry: one allocation per batch, not two per event.
        let mut state_buf = Vec::with_capacity(128);
        for entry in entries.iter() {
            let Some(id) = entry.resource_id() else {
                outcomes.push(ApplyOutcome::Stale);
                continue;
            };
            let key = (entry.data_type.as_str(), id);
            let existing: Option<Holder> = match resources.get(key).map_err(unavailable)? {
                Some(v) => Some(decode_holder(key, v.value())?),
                None => None,
            };
            // Only the node writes `resources`: no site document to consider.
            let local = Local {
                own: own.get(key).map_err(unavailable)?.is_some(),
                document: None,
            };
            let outcome = decide_at(existing.as_ref(), &local, entry);
            if outcome == ApplyOutcome::Applied {
                let row = outbox_row(entry, next_id);
                next_id += 1;
                // The resource is written once, in the applied-log row; the state
                // points at it ([`StateBody::At`]).
                let deleted = entry.action == Action::Delete;
                let log_key =
                    appended.push(&mut log.groups, |out| encode_logged(out, applied_ms, entry, id))?;
                encode_state_at(&mut state_buf, &entry.origin, entry.seq, deleted, log_key);
                resources.insert(key, state_buf.as_slice()).map_err(unavailable)?;
                rows.push(row);
                keys.push((&entry.data_type, id, entry.seq));
            }
            outcomes.push(outcome);
        }
        appended.finish(&mut log.groups)?;
        if let Some(last) = rows.last() {
            outbox
                .insert(last.id, encode_group(&stored_rows(&rows, &keys)).as_slice())
                .map_err(unavailable)?;
        }
        let mut applied = txn.open_table(APPLIED).map_err(unavailable)?;
        let current = applied
            .get(origin)
            .map_err(unavailable)?
            .map(|v| v.value())
            .unwrap_or(0);
        if up_to > current {
            applied.insert(origin, up_to).map_err(unavailable)?;
        }
    }
    Ok((txn, outcomes, rows))
}

/// Appends `events` to `origin`'s journal in one commit, with the runs of `intake_seqs`;
/// returns the seq of the first entry (the others follow it) and the entries' time.
fn append_events(
    db: &Database,
    origin: &str,
    events: &[NewEvent],
    intake_seqs: &[u64],
) -> StoreResult<(u64, u64)> {
    let time_ms = now_ms();
    let txn = db.begin_write().map_err(unavailable)?;
    let first;
    {
        let mut table = txn.open_table(JOURNAL).map_err(unavailable)?;
        let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
        let mut own = txn.open_table(OWN_AT).map_err(unavailable)?;
        let mut gone = txn.open_table(OWN_GONE).map_err(unavailable)?;
        let floor = read_floor(&txn.open_table(META).map_err(unavailable)?, &floor_key(origin))?;
        let mut seq = journal_last(&table, &groups, origin)?;
        first = seq.saturating_add(1);
        // The entries are written straight into the groups' values.
        let mut packer = groups::Packer::new();
        for e in events {
            seq = seq
                .checked_add(1)
                .ok_or_else(|| corrupt("journal seq overflow"))?;
            let entry = EntryRef {
                origin,
                seq,
                action: e.action,
                data_type: &e.data_type,
                user: &e.user,
                resource: &e.resource,
                time_ms,
            };
            packer.push(&mut groups, origin, seq, |out| write_journal_value(out, &entry))?;
            // The own-resources index follows the journal in the same commit.
            let key = (e.data_type.as_str(), e.resource_id.as_str());
            let previous = reindex(&mut own, &mut gone, key, e.action, seq)?;
            // Below the compaction floor only the latest entry of a resource stays: the one
            // this entry supersedes (a row: the floor is below every group) goes in the same
            // commit.
            if let Some(p) = previous.filter(|p| *p <= floor) {
                table.remove((origin, p)).map_err(unavailable)?;
            }
        }
        packer.finish(&mut groups, origin)?;
    }
    if !events.is_empty() {
        record_intake(&txn, intake_seqs)?;
    }
    txn.commit().map_err(unavailable)?;
    Ok((first, time_ms))
}

/// Points the own-resources index (`OWN_AT`) and the tombstone index (`OWN_GONE`) at the
/// entry `seq` of `action` on `key`, as [`index_own`] then [`index_gone`] do, and returns the
/// seq of the entry it supersedes: the live state's, else the tombstone's. The values the
/// insert and the remove hand back are those lookups, which saves two B-tree descents per
/// event.
fn reindex(
    own: &mut redb::Table<(&'static str, &'static str), u64>,
    gone: &mut redb::Table<(&'static str, &'static str), u64>,
    key: (&str, &str),
    action: Action,
    seq: u64,
) -> StoreResult<Option<u64>> {
    let (was_own, was_gone) = if action == Action::Delete {
        let was_own = own.remove(key).map_err(unavailable)?.map(|v| v.value());
        let was_gone = gone.insert(key, seq).map_err(unavailable)?.map(|v| v.value());
        (was_own, was_gone)
    } else {
        let was_own = own.insert(key, seq).map_err(unavailable)?.map(|v| v.value());
        let was_gone = gone.remove(key).map_err(unavailable)?.map(|v| v.value());
        (was_own, was_gone)
    };
    Ok(was_own.or(was_gone))
}

/// A [`JournalEntry`] borrowing from the event it is made of: the same fields in the same
/// order, so the same JSON, without moving or copying the resource.
#[derive(serde::Serialize)]
struct EntryRef<'a> {
    origin: &'a str,
    seq: u64,
    action: Action,
    data_type: &'a str,
    user: &'a str,
    resource: &'a Resource,
    time_ms: u64,
}

/// Records the stream sequences of a journal commit as runs.
fn record_intake(txn: &redb::WriteTransaction, seqs: &[u64]) -> StoreResult<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut table = txn.open_table(INTAKE_RUNS).map_err(unavailable)?;
    let mut run: Option<(u64, u64)> = None;
    for seq in sorted {
        run = match run {
            Some((first, last)) if last.checked_add(1) == Some(seq) => Some((first, seq)),
            Some((first, last)) => {
                add_run(&mut table, first, last)?;
                Some((seq, seq))
            }
            None => Some((seq, seq)),
        };
    }
    if let Some((first, last)) = run {
        add_run(&mut table, first, last)?;
    }
    Ok(())
}

/// Adds the run `first..=last` to `INTAKE_RUNS`, merged with the runs it overlaps or touches.
fn add_run(table: &mut redb::Table<u64, u64>, first: u64, last: u64) -> StoreResult<()> {
    let (mut low, mut high) = (first, last);
    if let Some(item) = table.range(..first).map_err(unavailable)?.next_back() {
        let (k, v) = item.map_err(unavailable)?;
        if v.value().saturating_add(1) >= first {
            low = k.value();
            high = high.max(v.value());
        }
    }
    // Runs starting in [low, high + 1] join; a joining run may take `high` further (not
    // past the next run while runs never touch, but checked again all the same).
    let mut joined: Vec<u64> = Vec::new();
    loop {
        let mut grew = false;
        for item in table.range(low..=high.saturating_add(1)).map_err(unavailable)? {
            let (k, v) = item.map_err(unavailable)?;
            if !joined.contains(&k.value()) {
                joined.push(k.value());
            }
            if v.value() > high {
                high = v.value();
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    for start in joined {
        table.remove(start).map_err(unavailable)?;
    }
    table.insert(low, high).map_err(unavailable)?;
    Ok(())
}

/// Whether `seq` is in one of `runs` (ascending by first seq, disjoint).
fn in_runs(runs: &[(u64, u64)], seq: u64) -> bool {
    let after = runs.partition_point(|&(first, _)| first <= seq);
    after > 0 && runs[after - 1].1 >= seq
}

/// Stores of earlier versions record one `INTAKE` row per stream sequence: moved into
/// `INTAKE_RUNS`, then the table is dropped.
fn migrate_intake_rows(txn: &redb::WriteTransaction) -> StoreResult<()> {
    let seqs: Vec<u64> = {
        let old = txn.open_table(INTAKE).map_err(unavailable)?;
        let mut seqs = Vec::new();
        for item in old.iter().map_err(unavailable)? {
            seqs.push(item.map_err(unavailable)?.0.value());
        }
        seqs
    };
    record_intake(txn, &seqs)?;
    txn.delete_table(INTAKE).map_err(unavailable)?;
    if !seqs.is_empty() {
        tracing::info!(records = seqs.len(), "intake records moved to runs");
    }
    Ok(())
}

/// A journal value: one byte for the action, then the entry's JSON, so a sender learns which
/// stream an entry goes on without parsing it ([`Store::read_journal_raw`]).
fn write_journal_value(out: &mut Vec<u8>, entry: &EntryRef<'_>) -> StoreResult<()> {
    out.push(match entry.action {
        Action::Create => 1,
        Action::Update => 2,
        Action::Delete => 3,
    });
    serde_json::to_writer(&mut *out, entry).map_err(corrupt)
}

/// The action (absent in values of earlier versions, which are the JSON alone) and the JSON.
fn split_journal_value(value: &[u8]) -> (Option<Action>, &[u8]) {
    match value.split_first() {
        Some((1, json)) => (Some(Action::Create), json),
        Some((2, json)) => (Some(Action::Update), json),
        Some((3, json)) => (Some(Action::Delete), json),
        _ => (None, value),
    }
}

fn decode_journal(value: &[u8]) -> StoreResult<JournalEntry> {
    serde_json::from_slice(split_journal_value(value).1).map_err(corrupt)
}

/// A [`StoredResource`] as earlier versions stored it (JSON), still read by
/// [`decode_state`]; tests write it to check that.
#[cfg(test)]
#[derive(serde::Serialize)]
struct StoredRef<'a> {
    data_type: &'a str,
    id: &'a str,
    origin: &'a str,
    version: u64,
    deleted: bool,
    /// Not part of [`StoredResource`]: kept so an outbox row can point at this state
    /// instead of holding a copy of its notice ([`StoredRow::Ref`]).
    user: &'a str,
    resource: &'a crate::contract::Resource,
}

/// What a notice needs of a stored state.
#[derive(serde::Deserialize)]
struct StoredNotice {
    origin: String,
    version: u64,
    #[serde(default)]
    user: String,
    resource: Box<serde_json::value::RawValue>,
}

/// An outbox row as stored: with its payload, or pointing at the state of the resource whose
/// notice it is.
///
/// A row points when its resource is not changed again in its batch: the state stays as it
/// is until a later batch changes it, and a later batch is applied only after this one's
/// notices are confirmed, in a commit that also removes their rows. A resource changed twice
/// in one batch keeps its earlier notices whole. Pointing halves what a receiver writes per
/// event, since the notice holds the resource again (docs/PERFORMANCE.md).
#[derive(Debug, Clone, PartialEq)]
enum StoredRow {
    Full(OutboxRow),
    Ref {
        id: u64,
        subject: String,
        msg_id: String,
        data_type: String,
        resource_id: String,
        version: u64,
    },
}

impl StoredRow {
    fn id(&self) -> u64 {
        match self {
            StoredRow::Full(row) => row.id,
            StoredRow::Ref { id, .. } => *id,
        }
    }
}

/// The stored form of a batch's rows; `keys[i]` is the resource and version of `rows[i]`.
fn stored_rows(rows: &[OutboxRow], keys: &[(&str, &str, u64)]) -> Vec<StoredRow> {
    let mut later: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
    let mut out: Vec<StoredRow> = rows
        .iter()
        .zip(keys)
        .rev()
        .map(|(row, &(data_type, resource_id, version))| {
            if later.insert((data_type, resource_id)) {
                StoredRow::Ref {
                    id: row.id,
                    subject: row.subject.clone(),
                    msg_id: row.msg_id.clone(),
                    data_type: data_type.to_owned(),
                    resource_id: resource_id.to_owned(),
                    version,
                }
            } else {
                StoredRow::Full(row.clone())
            }
        })
        .collect();
    out.reverse();
    out
}

/// The row to publish; `None` (logged) for a row pointing at a state that has changed since,
/// which the rule in [`StoredRow`] rules out: a notice is never rebuilt from another state.
fn resolve(
    row: StoredRow,
    resources: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    log: &Log<impl ReadableTable<u64, &'static [u8]>>,
) -> StoreResult<Option<OutboxRow>> {
    let (id, subject, msg_id, data_type, resource_id, version) = match row {
        StoredRow::Full(row) => return Ok(Some(row)),
        StoredRow::Ref {
            id,
            subject,
            msg_id,
            data_type,
            resource_id,
            version,
        } => (id, subject, msg_id, data_type, resource_id, version),
    };
    let key = (data_type.as_str(), resource_id.as_str());
    let state: Option<StoredNotice> = match resources.get(key).map_err(unavailable)? {
        Some(v) => Some(decode_notice(log, key, v.value())?),
        None => None,
    };
    match state {
        Some(s) if s.version == version => Ok(Some(OutboxRow {
            id,
            subject,
            msg_id,
            payload: ResourceNotice::body(&data_type, &s.user, &s.resource, &s.origin, version),
        })),
        other => {
            tracing::error!(row = id, %msg_id, %data_type, %resource_id, version, stored_version = other.map(|s| s.version), "outbox row points at a state that changed: skipped");
            Ok(None)
        }
    }
}

/// First byte of a stored state in the binary layout of [`encode_state_inline`] (a state of
/// an earlier version is JSON, [`StoredRef`], and starts with `{`).
const STATE_INLINE: u8 = 1;
/// First byte of a stored state whose user and resource are those of the entry in its
/// applied-log row ([`encode_state_at`]).
const STATE_AT: u8 = 2;
/// First byte of an applied-log row in the binary layout of [`encode_logged`] (a row of an
/// earlier version is JSON, [`AppliedRef`], and starts with `{`).
const LOG_BINARY: u8 = 1;

/// A stored state decoded from any layout, borrowing from its bytes where it can.
struct State<'a> {
    origin: std::borrow::Cow<'a, str>,
    version: u64,
    deleted: bool,
    body: StateBody<'a>,
}

/// Where a stored state's user and resource are.
enum StateBody<'a> {
    /// In the state itself: the user and the resource's JSON text.
    Inline { user: &'a str, resource: &'a str },
    /// In the entry of the applied-log row under this key: the state was written with that
    /// row, and a trim that removes the row first copies them into the state
    /// ([`inline_before_trim`]).
    At(u64),
    /// The JSON layout of earlier versions: the whole value.
    Json(&'a [u8]),
}

/// The start of both binary layouts: the tag, u64 LE version, one byte deleted, origin.
fn put_state_head(out: &mut Vec<u8>, tag: u8, origin: &str, version: u64, deleted: bool) {
    out.push(tag);
    out.extend_from_slice(&version.to_le_bytes());
    out.push(u8::from(deleted));
    put_field(out, origin);
}

/// `1, version, deleted, origin, user (a field), the resource's JSON text`.
fn encode_state_inline(
    out: &mut Vec<u8>,
    origin: &str,
    version: u64,
    deleted: bool,
    user: &str,
    resource: &str,
) {
    out.clear();
    put_state_head(out, STATE_INLINE, origin, version, deleted);
    put_field(out, user);
    out.extend_from_slice(resource.as_bytes());
}

/// `2, version, deleted, origin, u64 LE applied-log key`: an apply writes the resource
/// once, in its applied-log row, instead of twice (docs/PERFORMANCE.md).
fn encode_state_at(out: &mut Vec<u8>, origin: &str, version: u64, deleted: bool, log_key: u64) {
    out.clear();
    put_state_head(out, STATE_AT, origin, version, deleted);
    out.extend_from_slice(&log_key.to_le_bytes());
}

/// Reads a stored state of any layout; `key` `(data_type, id)` names it in errors.
fn decode_state<'a>(key: (&str, &str), bytes: &'a [u8]) -> StoreResult<State<'a>> {
    let truncated = || corrupt(format!("stored state {}/{} truncated", key.0, key.1));
    let tag = match bytes.first() {
        Some(&t @ (STATE_INLINE | STATE_AT)) => t,
        _ => {
            let h: Holder = serde_json::from_slice(bytes).map_err(corrupt)?;
            return Ok(State {
                origin: h.origin.into(),
                version: h.version,
                deleted: h.deleted,
                body: StateBody::Json(bytes),
            });
        }
    };
    let (version, rest) = bytes[1..].split_first_chunk::<8>().ok_or_else(truncated)?;
    let (deleted, mut rest) = rest.split_first().ok_or_else(truncated)?;
    let origin = take_str(&mut rest).ok_or_else(truncated)??;
    let body = if tag == STATE_INLINE {
        let user = take_str(&mut rest).ok_or_else(truncated)??;
        let resource = std::str::from_utf8(rest).map_err(corrupt)?;
        StateBody::Inline { user, resource }
    } else {
        let (log_key, _) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
        StateBody::At(u64::from_le_bytes(*log_key))
    };
    Ok(State {
        origin: origin.into(),
        version: u64::from_le_bytes(*version),
        deleted: *deleted != 0,
        body,
    })
}

/// What the version rule reads of a stored state.
fn decode_holder(key: (&str, &str), bytes: &[u8]) -> StoreResult<Holder> {
    let state = decode_state(key, bytes)?;
    Ok(Holder {
        origin: state.origin.into_owned(),
        version: state.version,
        deleted: state.deleted,
    })
}

/// What a state's readers need of an applied entry: its user and resource.
#[derive(serde::Deserialize)]
struct EntryBody {
    #[serde(default)]
    user: String,
    resource: Box<serde_json::value::RawValue>,
}

/// The user and resource of a binary state: its own, or its applied-log row's.
fn state_body(
    log: &Log<impl ReadableTable<u64, &'static [u8]>>,
    key: (&str, &str),
    body: &StateBody<'_>,
) -> StoreResult<EntryBody> {
    match body {
        StateBody::Inline { user, resource } => Ok(EntryBody {
            user: (*user).to_owned(),
            resource: serde_json::value::RawValue::from_string((*resource).to_owned()).map_err(corrupt)?,
        }),
        StateBody::At(log_key) => match log.get(*log_key, |row| logged_body(*log_key, row))? {
            Some(body) => Ok(body),
            None => Err(corrupt(format!(
                "stored state {}/{} points at missing applied-log row {log_key}",
                key.0, key.1
            ))),
        },
        StateBody::Json(bytes) => serde_json::from_slice(bytes).map_err(corrupt),
    }
}

/// A stored state as [`StoredResource`].
fn decode_resource(
    log: &Log<impl ReadableTable<u64, &'static [u8]>>,
    key: (&str, &str),
    bytes: &[u8],
) -> StoreResult<StoredResource> {
    let state = decode_state(key, bytes)?;
    if let StateBody::Json(json) = state.body {
        return serde_json::from_slice(json).map_err(corrupt);
    }
    let body = state_body(log, key, &state.body)?;
    Ok(StoredResource {
        data_type: key.0.to_owned(),
        id: key.1.to_owned(),
        origin: state.origin.into_owned(),
        version: state.version,
        deleted: state.deleted,
        resource: serde_json::from_str(body.resource.get()).map_err(corrupt)?,
    })
}

/// A stored state as [`StoredNotice`].
fn decode_notice(
    log: &Log<impl ReadableTable<u64, &'static [u8]>>,
    key: (&str, &str),
    bytes: &[u8],
) -> StoreResult<StoredNotice> {
    let state = decode_state(key, bytes)?;
    if let StateBody::Json(json) = state.body {
        return serde_json::from_slice(json).map_err(corrupt);
    }
    let body = state_body(log, key, &state.body)?;
    Ok(StoredNotice {
        origin: state.origin.into_owned(),
        version: state.version,
        user: body.user,
        resource: body.resource,
    })
}

/// `1, u64 LE applied_ms, data type and resource id (fields), the entry's JSON`: the key is
/// the table's, the resource's key lets a trim find the state pointing here.
fn encode_logged(
    out: &mut Vec<u8>,
    applied_ms: u64,
    entry: &JournalEntry,
    resource_id: &str,
) -> StoreResult<()> {
    out.push(LOG_BINARY);
    out.extend_from_slice(&applied_ms.to_le_bytes());
    put_field(out, &entry.data_type);
    put_field(out, resource_id);
    serde_json::to_writer(&mut *out, entry).map_err(corrupt)
}

/// The header of a binary applied-log row.
struct LogHead<'a> {
    applied_ms: u64,
    /// `(data_type, id)` of the resource: a trim looks up the state that may point here.
    resource: (&'a str, &'a str),
}

/// A binary applied-log row's header and entry JSON; `None` for a JSON row of an earlier
/// version (the whole [`AppliedRecord`]).
fn split_logged(key: u64, bytes: &[u8]) -> StoreResult<Option<(LogHead<'_>, &[u8])>> {
    let Some((&LOG_BINARY, rest)) = bytes.split_first() else {
        return Ok(None);
    };
    let truncated = || corrupt(format!("applied-log row {key} truncated"));
    let (ms, mut rest) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
    let data_type = take_str(&mut rest).ok_or_else(truncated)??;
    let id = take_str(&mut rest).ok_or_else(truncated)??;
    let head = LogHead {
        applied_ms: u64::from_le_bytes(*ms),
        resource: (data_type, id),
    };
    Ok(Some((head, rest)))
}

/// An applied-log row of either layout as its record.
fn decode_logged(key: u64, bytes: &[u8]) -> StoreResult<AppliedRecord> {
    match split_logged(key, bytes)? {
        Some((head, json)) => Ok(AppliedRecord {
            key,
            applied_ms: head.applied_ms,
            entry: serde_json::from_slice(json).map_err(corrupt)?,
        }),
        None => serde_json::from_slice(bytes).map_err(corrupt),
    }
}

/// The apply time of an applied-log row of either layout, without decoding its entry.
fn logged_ms(key: u64, bytes: &[u8]) -> StoreResult<u64> {
    match split_logged(key, bytes)? {
        Some((head, _)) => Ok(head.applied_ms),
        None => super::applied_ms_of(bytes).map_err(corrupt),
    }
}

/// The user and resource of the entry of an applied-log row of either layout.
fn logged_body(key: u64, bytes: &[u8]) -> StoreResult<EntryBody> {
    #[derive(serde::Deserialize)]
    struct Record {
        entry: EntryBody,
    }
    match split_logged(key, bytes)? {
        Some((_, json)) => serde_json::from_slice(json).map_err(corrupt),
        None => serde_json::from_slice::<Record>(bytes)
            .map(|r| r.entry)
            .map_err(corrupt),
    }
}

/// Before applied-log row `key` (`row`) is trimmed: the stored state still pointing at it
/// takes its user and resource inline, in the same commit, so the state outlives the row.
/// A JSON row of an earlier version has no state pointing at it.
fn inline_before_trim(
    resources: &mut redb::Table<(&'static str, &'static str), &'static [u8]>,
    key: u64,
    row: &[u8],
) -> StoreResult<()> {
    let Some((head, _)) = split_logged(key, row)? else {
        return Ok(());
    };
    let rewrite = match resources.get(head.resource).map_err(unavailable)? {
        Some(v) => {
            let state = decode_state(head.resource, v.value())?;
            match state.body {
                StateBody::At(at) if at == key => {
                    let body = logged_body(key, row)?;
                    let mut out = Vec::new();
                    encode_state_inline(
                        &mut out,
                        &state.origin,
                        state.version,
                        state.deleted,
                        &body.user,
                        body.resource.get(),
                    );
                    Some(out)
                }
                _ => None,
            }
        }
        None => None,
    };
    if let Some(bytes) = rewrite {
        resources
            .insert(head.resource, bytes.as_slice())
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Reads a field written by [`put_field`] off the front of `rest`, borrowed; `None` when
/// `rest` is too short.
fn take_str<'a>(rest: &mut &'a [u8]) -> Option<StoreResult<&'a str>> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    let text = tail.get(..len)?;
    *rest = &tail[len..];
    Some(std::str::from_utf8(text).map_err(corrupt))
}

/// First byte of an outbox row in the binary layout (a JSON row starts with `{`).
const OUTBOX_BINARY: u8 = 1;

/// `1, u32 LE subject length, subject, u32 LE msg-id length, msg id, payload`: the payload
/// is kept as the exact bytes to publish (serde_json would write `Vec<u8>` as an array of
/// numbers, 3.5 times the size and a tenth of the receiver's CPU in the benchmark).
fn encode_outbox(row: &OutboxRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + row.subject.len() + row.msg_id.len() + row.payload.len());
    out.push(OUTBOX_BINARY);
    for field in [&row.subject, &row.msg_id] {
        put_field(&mut out, field);
    }
    out.extend_from_slice(&row.payload);
    out
}

/// First byte of a group of outbox rows.
const OUTBOX_GROUP: u8 = 2;
/// First byte of a row pointing at a resource state ([`StoredRow::Ref`]).
const OUTBOX_REF: u8 = 3;

/// `3, u64 LE version`, then subject, msg id, data type and resource id, each as a u32 LE
/// length and the text.
fn encode_row(row: &StoredRow) -> Vec<u8> {
    let (subject, msg_id, data_type, resource_id, version) = match row {
        StoredRow::Full(full) => return encode_outbox(full),
        StoredRow::Ref {
            subject,
            msg_id,
            data_type,
            resource_id,
            version,
            ..
        } => (subject, msg_id, data_type, resource_id, version),
    };
    let fields = [subject, msg_id, data_type, resource_id];
    let mut out = Vec::with_capacity(9 + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
    out.push(OUTBOX_REF);
    out.extend_from_slice(&version.to_le_bytes());
    for field in fields {
        put_field(&mut out, field);
    }
    out
}

/// Reads a row of any layout: [`encode_row`]'s, [`encode_outbox`]'s, or JSON.
fn decode_row(id: u64, bytes: &[u8]) -> StoreResult<StoredRow> {
    let Some((&OUTBOX_REF, rest)) = bytes.split_first() else {
        return decode_outbox(id, bytes).map(StoredRow::Full);
    };
    let (version, mut rest) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt(format!("outbox row {id} truncated")))?;
    let mut field = || take_field(&mut rest, id);
    Ok(StoredRow::Ref {
        id,
        subject: field()?,
        msg_id: field()?,
        data_type: field()?,
        resource_id: field()?,
        version: u64::from_le_bytes(*version),
    })
}

/// `2`, then per row: u64 LE id, u32 LE length, the row in the layout of [`encode_row`].
fn encode_group(rows: &[StoredRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + rows.len() * 128);
    out.push(OUTBOX_GROUP);
    for row in rows {
        let one = encode_row(row);
        out.extend_from_slice(&row.id().to_le_bytes());
        out.extend_from_slice(&(one.len() as u32).to_le_bytes());
        out.extend_from_slice(&one);
    }
    out
}

/// The rows under one outbox key: a group, or the single row of an earlier version.
fn decode_group(key: u64, bytes: &[u8]) -> StoreResult<Vec<StoredRow>> {
    let Some((&OUTBOX_GROUP, mut rest)) = bytes.split_first() else {
        return Ok(vec![decode_row(key, bytes)?]);
    };
    let truncated = || corrupt(format!("outbox group {key} truncated"));
    let mut rows = Vec::new();
    while !rest.is_empty() {
        let (id, tail) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
        let (len, tail) = tail.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = u32::from_le_bytes(*len) as usize;
        let one = tail.get(..len).ok_or_else(truncated)?;
        rows.push(decode_row(u64::from_le_bytes(*id), one)?);
        rest = &tail[len..];
    }
    Ok(rows)
}

/// The ids of the rows under one outbox key, without decoding the rows.
fn group_ids(key: u64, bytes: &[u8]) -> StoreResult<Vec<u64>> {
    let Some((&OUTBOX_GROUP, mut rest)) = bytes.split_first() else {
        return Ok(vec![decode_row(key, bytes)?.id()]);
    };
    let truncated = || corrupt(format!("outbox group {key} truncated"));
    let mut ids = Vec::new();
    while !rest.is_empty() {
        let (id, tail) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
        let (len, tail) = tail.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = u32::from_le_bytes(*len) as usize;
        rest = tail.get(len..).ok_or_else(truncated)?;
        ids.push(u64::from_le_bytes(*id));
    }
    Ok(ids)
}

/// Removes rows by id. A row lives under the smallest key at or above its id (keys are the
/// highest id of their group); a group losing only some rows is written back without them.
fn remove_outbox_rows(table: &mut redb::Table<u64, &[u8]>, mut ids: Vec<u64>) -> StoreResult<()> {
    ids.sort_unstable();
    ids.dedup();
    let mut i = 0;
    while i < ids.len() {
        let found = table
            .range(ids[i]..)
            .map_err(unavailable)?
            .next()
            .transpose()
            .map_err(unavailable)?
            .map(|(k, v)| (k.value(), v.value().to_vec()));
        let Some((key, value)) = found else { break };
        let upto = ids[i..].partition_point(|id| *id <= key) + i;
        let gone = &ids[i..upto];
        i = upto;
        // The usual case, a whole group published, needs only its ids: its rows are not
        // decoded (each would copy four strings).
        if group_ids(key, &value)?
            .iter()
            .all(|id| gone.binary_search(id).is_ok())
        {
            table.remove(key).map_err(unavailable)?;
            continue;
        }
        let rows = decode_group(key, &value)?;
        let before = rows.len();
        let kept: Vec<StoredRow> = rows
            .into_iter()
            .filter(|r| gone.binary_search(&r.id()).is_err())
            .collect();
        if kept.is_empty() {
            table.remove(key).map_err(unavailable)?;
        } else if kept.len() < before {
            table
                .insert(key, encode_group(&kept).as_slice())
                .map_err(unavailable)?;
        }
    }
    Ok(())
}

/// Appends a u32 LE length and the text: the fields of both row layouts.
fn put_field(out: &mut Vec<u8>, field: &str) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field.as_bytes());
}

/// Reads a field written by [`put_field`] off the front of `rest` (of row `id`).
fn take_field(rest: &mut &[u8], id: u64) -> StoreResult<String> {
    let truncated = || corrupt(format!("outbox row {id} truncated"));
    let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
    let len = u32::from_le_bytes(*len) as usize;
    let text = tail.get(..len).ok_or_else(truncated)?;
    *rest = &tail[len..];
    String::from_utf8(text.to_vec()).map_err(corrupt)
}

/// Reads a row written by [`encode_outbox`], or the JSON rows of earlier versions.
fn decode_outbox(id: u64, bytes: &[u8]) -> StoreResult<OutboxRow> {
    let Some((&OUTBOX_BINARY, mut rest)) = bytes.split_first() else {
        return serde_json::from_slice(bytes).map_err(corrupt);
    };
    let (subject, msg_id) = (take_field(&mut rest, id)?, take_field(&mut rest, id)?);
    Ok(OutboxRow {
        id,
        subject,
        msg_id,
        payload: rest.to_vec(),
    })
}

/// Points the own-resources index at `entry` (or drops the resource, for a delete).
fn index_own(
    own: &mut redb::Table<(&'static str, &'static str), u64>,
    entry: &JournalEntry,
    resource_id: &str,
) -> StoreResult<()> {
    let key = (entry.data_type.as_str(), resource_id);
    if entry.action == Action::Delete {
        own.remove(key).map_err(unavailable)?;
    } else {
        own.insert(key, entry.seq).map_err(unavailable)?;
    }
    Ok(())
}

fn read_floor(meta: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> StoreResult<u64> {
    match meta.get(key).map_err(unavailable)? {
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(corrupt)?;
            Ok(u64::from_be_bytes(bytes))
        }
        None => Ok(0),
    }
}

/// A journal value as a [`RawEntry`].
fn raw_entry(seq: u64, value: &[u8]) -> StoreResult<RawEntry> {
    match split_journal_value(value) {
        (Some(action), json) => Ok(RawEntry {
            seq,
            action,
            json: json.to_vec(),
        }),
        (None, json) => RawEntry::encode(&serde_json::from_slice(json).map_err(corrupt)?),
    }
}

/// [`Store::compact_journal`]: commits of at most [`COMPACT_BATCH`] entries examined, each
/// moving the floor over them: of the entries it passes (all in groups), those no later entry
/// of the same resource supersedes become rows, the others go with their groups; then the
/// tombstones of the compacted range past their retention.
fn compact(db: &Database, origin: &str, bounds: CompactBounds) -> StoreResult<CompactReport> {
    let key = floor_key(origin);
    let mut report = CompactReport::default();
    loop {
        let txn = db.begin_write().map_err(unavailable)?;
        let (done, floor) = {
            let mut journal = txn.open_table(JOURNAL).map_err(unavailable)?;
            let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let own = txn.open_table(OWN_AT).map_err(unavailable)?;
            let mut gone = txn.open_table(OWN_GONE).map_err(unavailable)?;
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            let floor = read_floor(&meta, &key)?;
            // The head entry stays whatever it is: the next seq follows it.
            let head = journal_last(&journal, &groups, origin)?;
            let up_to = bounds.up_to.min(head.saturating_sub(1));
            let room = bounds.max_examined.saturating_sub(report.examined as usize);
            let batch = room.min(COMPACT_BATCH);
            // (seq, action, data type, resource id, time) of each entry examined.
            type Examined = (u64, Option<Action>, String, Option<String>, u64);
            let mut examined: Vec<Examined> = Vec::new();
            let mut done = batch == 0 || floor >= up_to;
            if !done {
                let mut young = false;
                journal_scan(
                    &journal,
                    &groups,
                    origin,
                    floor.saturating_add(1),
                    |seq, value| {
                        if seq > up_to || examined.len() >= batch {
                            return Ok(false);
                        }
                        let entry = decode_journal(value)?;
                        if entry.time_ms > bounds.older_than_ms {
                            young = true;
                            return Ok(false);
                        }
                        let id = entry.resource_id().map(str::to_owned);
                        examined.push((seq, Some(entry.action), entry.data_type, id, entry.time_ms));
                        Ok(true)
                    },
                )?;
                done = young || examined.len() < batch;
            }
            let mut new_floor = floor;
            // The entries that stay, to move from their groups to rows.
            let mut kept: Vec<u64> = Vec::new();
            for (seq, action, data_type, id, time_ms) in &examined {
                report.examined += 1;
                new_floor = *seq;
                let Some(id) = id else {
                    report.removed += 1;
                    continue;
                };
                let k = (data_type.as_str(), id.as_str());
                let latest = if *action == Some(Action::Delete) {
                    gone.get(k).map_err(unavailable)?.map(|v| v.value())
                } else {
                    own.get(k).map_err(unavailable)?.map(|v| v.value())
                };
                if latest != Some(*seq) {
                    report.removed += 1;
                } else if *action == Some(Action::Delete) && *time_ms <= bounds.tombstones_older_than_ms {
                    gone.remove(k).map_err(unavailable)?;
                    report.tombstones_dropped += 1;
                } else {
                    kept.push(*seq);
                }
            }
            for seq in kept {
                groups::with_entry(&groups, origin, seq, |value| {
                    journal.insert((origin, seq), value).map_err(unavailable)?;
                    Ok(())
                })?;
            }
            if new_floor > floor {
                groups::drop_through(&mut groups, origin, new_floor)?;
                meta.insert(key.as_str(), new_floor.to_be_bytes().as_slice())
                    .map_err(unavailable)?;
            }
            (done, new_floor)
        };
        txn.commit().map_err(unavailable)?;
        report.floor = floor;
        if done {
            break;
        }
    }
    report.tombstones_dropped += drop_old_tombstones(db, origin, report.floor, bounds)?;
    Ok(report)
}

/// Drops the tombstones at or below `floor` journaled before the tombstone retention.
fn drop_old_tombstones(db: &Database, origin: &str, floor: u64, bounds: CompactBounds) -> StoreResult<u64> {
    let txn = db.begin_write().map_err(unavailable)?;
    let mut dropped = 0;
    {
        let mut journal = txn.open_table(JOURNAL).map_err(unavailable)?;
        let mut gone = txn.open_table(OWN_GONE).map_err(unavailable)?;
        let mut old: Vec<(String, String, u64)> = Vec::new();
        for item in gone.iter().map_err(unavailable)? {
            let (k, seq) = item.map_err(unavailable)?;
            let seq = seq.value();
            if seq > floor {
                continue;
            }
            let Some(v) = journal.get((origin, seq)).map_err(unavailable)? else {
                continue;
            };
            if decode_journal(v.value())?.time_ms <= bounds.tombstones_older_than_ms {
                let (dt, id) = k.value();
                old.push((dt.to_owned(), id.to_owned(), seq));
            }
        }
        for (dt, id, seq) in old {
            journal.remove((origin, seq)).map_err(unavailable)?;
            gone.remove((dt.as_str(), id.as_str())).map_err(unavailable)?;
            dropped += 1;
        }
    }
    txn.commit().map_err(unavailable)?;
    Ok(dropped)
}

/// Points the tombstone index at a delete entry (or forgets the key, for a create or
/// update).
fn index_gone(
    gone: &mut redb::Table<(&'static str, &'static str), u64>,
    entry: &JournalEntry,
    resource_id: &str,
) -> StoreResult<()> {
    let key = (entry.data_type.as_str(), resource_id);
    if entry.action == Action::Delete {
        gone.insert(key, entry.seq).map_err(unavailable)?;
    } else {
        gone.remove(key).map_err(unavailable)?;
    }
    Ok(())
}

/// Stores of earlier versions have no `OWN_GONE`: build it from the journal once. It runs at
/// open before [`pack_rows_above_floor`], when such a store holds its whole journal as rows.
fn build_own_gone(txn: &redb::WriteTransaction) -> StoreResult<()> {
    let mut meta = txn.open_table(META).map_err(unavailable)?;
    if meta.get("own_gone").map_err(unavailable)?.is_some() {
        return Ok(());
    }
    let journal = txn.open_table(JOURNAL).map_err(unavailable)?;
    let mut gone = txn.open_table(OWN_GONE).map_err(unavailable)?;
    for item in journal.iter().map_err(unavailable)? {
        let (_, v) = item.map_err(unavailable)?;
        let entry = decode_journal(v.value())?;
        let Some(id) = entry.resource_id() else { continue };
        index_gone(&mut gone, &entry, id)?;
    }
    meta.insert("own_gone", [1u8].as_slice()).map_err(unavailable)?;
    Ok(())
}

/// Stores written before the own-resources index became a pointer kept full copies in
/// `OWN_COPIES`: rebuild `OWN_AT` from the journal (which holds only this node's events, all
/// as rows in such a store: this runs before [`pack_rows_above_floor`]), then drop the copies.
fn migrate_own_copies(txn: &redb::WriteTransaction) -> StoreResult<()> {
    let had_copies = match txn.open_table(OWN_COPIES) {
        Ok(copies) => !copies.is_empty().map_err(unavailable)?,
        Err(e) => return Err(unavailable(e)),
    };
    if !had_copies {
        txn.delete_table(OWN_COPIES).map_err(unavailable)?;
        return Ok(());
    }
    let journal = txn.open_table(JOURNAL).map_err(unavailable)?;
    let mut own = txn.open_table(OWN_AT).map_err(unavailable)?;
    let mut moved = 0u64;
    for item in journal.iter().map_err(unavailable)? {
        let (_, v) = item.map_err(unavailable)?;
        let entry = decode_journal(v.value())?;
        let Some(id) = entry.resource_id() else { continue };
        index_own(&mut own, &entry, id)?;
        moved += 1;
    }
    drop((journal, own));
    txn.delete_table(OWN_COPIES).map_err(unavailable)?;
    tracing::info!(entries = moved, "own-resources index rebuilt as journal pointers");
    Ok(())
}

async fn read_u64(
    store: &EmbeddedStore,
    def: TableDefinition<'static, &'static str, u64>,
    key: &str,
) -> StoreResult<u64> {
    let key = key.to_owned();
    store
        .blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(def).map_err(unavailable)?;
            Ok(table
                .get(key.as_str())
                .map_err(unavailable)?
                .map(|v| v.value())
                .unwrap_or(0))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Resource;
    use crate::store::Relation;

    /// Entry `seq` of origin `o` changing resource `D`/`id` (its user and a field say `seq`).
    fn entry(seq: u64, action: Action, id: &str) -> JournalEntry {
        JournalEntry {
            origin: "o".into(),
            seq,
            action,
            data_type: "D".into(),
            user: format!("u{seq}"),
            resource: Resource::from_json(&format!(r#"{{ "id": "{id}", "creator_id": "o", "v": {seq} }}"#))
                .unwrap(),
            time_ms: 1,
        }
    }

    fn row(id: &str, relation: Relation, name: &str) -> PeerRow {
        PeerRow {
            peer_id: id.into(),
            relation,
            addrs: vec![format!("/dns4/{name}/tcp/4001")],
            name: Some(name.into()),
            record: None,
            updated_ms: 1,
        }
    }

    #[test]
    fn outbox_rows_round_trip_and_old_json_rows_still_read() {
        let row = OutboxRow {
            id: 7,
            subject: "CREATE_RESOURCE".into(),
            msg_id: "origin:42".into(),
            payload: br#"{"resource":{"id":"r"}}"#.to_vec(),
        };
        assert_eq!(decode_outbox(7, &encode_outbox(&row)).unwrap(), row);
        let legacy = serde_json::to_vec(&row).unwrap();
        assert_eq!(decode_outbox(7, &legacy).unwrap(), row);
        let cut = &encode_outbox(&row)[..10];
        assert!(matches!(decode_outbox(7, cut), Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn outbox_groups_lose_rows_one_by_one_beside_rows_of_earlier_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let row = |id: u64| OutboxRow {
            id,
            subject: "CREATE_RESOURCE".into(),
            msg_id: format!("o:{id}"),
            payload: format!("{{\"n\":{id}}}").into_bytes(),
        };
        let full = |id: u64| StoredRow::Full(row(id));
        // An earlier version's single row (JSON) under its own id, then two groups.
        let txn = store.db.read().unwrap().begin_write().unwrap();
        {
            let mut t = txn.open_table(OUTBOX).unwrap();
            t.insert(1, serde_json::to_vec(&row(1)).unwrap().as_slice())
                .unwrap();
            t.insert(4, encode_group(&[full(2), full(3), full(4)]).as_slice())
                .unwrap();
            t.insert(6, encode_group(&[full(5), full(6)]).as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let all: Vec<OutboxRow> = (1..=6).map(row).collect();
        assert_eq!(store.outbox(100).await.unwrap(), all);
        assert_eq!(store.outbox(3).await.unwrap(), all[..3].to_vec());
        store.outbox_remove(vec![3, 1, 6, 42]).await.unwrap();
        let left = [row(2), row(4), row(5)];
        assert_eq!(store.outbox(100).await.unwrap(), left);
        store.outbox_remove(vec![2, 4, 5, 5]).await.unwrap();
        assert!(store.outbox(100).await.unwrap().is_empty());
        let cut = &encode_group(&[full(7)])[..12];
        assert!(matches!(decode_group(7, cut), Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn outbox_rows_point_at_the_state_unless_it_changes_again_in_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let batch = vec![
            entry(1, Action::Create, "a"),
            entry(2, Action::Create, "b"),
            entry(3, Action::Update, "a"),
            entry(4, Action::Delete, "b"),
            entry(5, Action::Update, "a"),
        ];
        let (_, rows) = store.apply_batch("o", 5, batch.clone()).await.unwrap();
        assert_eq!(rows.len(), 5);
        for (row, e) in rows.iter().zip(&batch) {
            assert_eq!(row.payload, ResourceNotice::body_of(e), "seq {}", e.seq);
        }
        assert_eq!(store.outbox(100).await.unwrap(), rows, "rebuilt byte for byte");
        let stored = {
            let txn = store.db.read().unwrap().begin_read().unwrap();
            let table = txn.open_table(OUTBOX).unwrap();
            let (k, v) = table.last().unwrap().unwrap();
            decode_group(k.value(), v.value()).unwrap()
        };
        let pointing: Vec<bool> = stored
            .iter()
            .map(|r| matches!(r, StoredRow::Ref { .. }))
            .collect();
        assert_eq!(
            pointing,
            [false, false, false, true, true],
            "only each resource's last change points"
        );

        // A pointer whose state changed (which the apply order rules out) is skipped, not
        // published with another state's resource.
        store
            .outbox_remove(rows.iter().map(|r| r.id).collect())
            .await
            .unwrap();
        let txn = store.db.read().unwrap().begin_write().unwrap();
        {
            let mut t = txn.open_table(OUTBOX).unwrap();
            let stale = StoredRow::Ref {
                id: 40,
                subject: "CREATE_RESOURCE".into(),
                msg_id: "o:3".into(),
                data_type: "D".into(),
                resource_id: "a".into(),
                version: 3,
            };
            t.insert(40, encode_group(&[stale]).as_slice()).unwrap();
        }
        txn.commit().unwrap();
        assert!(store.outbox(100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn states_point_at_their_log_row_until_a_trim_inlines_them_and_old_json_rows_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        // An earlier version's rows: a JSON state of "old" and its JSON log row.
        let legacy = entry(1, Action::Create, "old");
        let txn = store.db.read().unwrap().begin_write().unwrap();
        {
            let state = StoredRef {
                data_type: "D",
                id: "old",
                origin: "o",
                version: 1,
                deleted: false,
                user: "u1",
                resource: &legacy.resource,
            };
            txn.open_table(RESOURCES)
                .unwrap()
                .insert(("D", "old"), serde_json::to_vec(&state).unwrap().as_slice())
                .unwrap();
            let logged = crate::store::AppliedRef {
                key: 1,
                applied_ms: 5,
                entry: &legacy,
            };
            txn.open_table(applied_log::ROWS)
                .unwrap()
                .insert(1, serde_json::to_vec(&logged).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        let batch = vec![
            entry(2, Action::Create, "a"),
            entry(3, Action::Update, "old"),
            entry(4, Action::Create, "b"),
            entry(5, Action::Delete, "b"),
        ];
        let (outcomes, rows) = store.apply_batch("o", 5, batch.clone()).await.unwrap();
        assert!(
            outcomes.iter().all(|o| *o == ApplyOutcome::Applied),
            "{outcomes:?}"
        );
        let (stale, _) = store
            .apply_batch("o", 5, vec![entry(1, Action::Update, "a")])
            .await
            .unwrap();
        assert_eq!(
            stale,
            [ApplyOutcome::Stale],
            "the version rule reads the new layout"
        );
        let resource = |e: &JournalEntry, deleted: bool| StoredResource {
            data_type: "D".into(),
            id: e.resource_id().unwrap().into(),
            origin: "o".into(),
            version: e.seq,
            deleted,
            resource: e.resource.to_value(),
        };
        let want = vec![
            resource(&batch[0], false),
            resource(&batch[3], true),
            resource(&batch[1], false),
        ];
        let log = store.applied_log(u64::MAX, 10).await.unwrap();
        assert_eq!(log.len(), 5);
        assert_eq!(
            (log[4].key, log[4].applied_ms, &log[4].entry),
            (1, 5, &legacy),
            "a JSON row reads"
        );
        for (record, e) in log[..4].iter().rev().zip(&batch) {
            assert_eq!(&record.entry, e);
        }
        assert_eq!(store.resources("D", None, 10).await.unwrap(), want);
        assert_eq!(store.outbox(100).await.unwrap(), rows);

        // Trimming every row but the newest: the states pointing at them take their
        // resource inline first; what the readers return stays the same.
        assert_eq!(store.trim_applied_log(u64::MAX, 1, 100).await.unwrap(), 4);
        assert_eq!(store.resources("D", None, 10).await.unwrap(), want);
        assert_eq!(store.resource("D", "old").await.unwrap().as_ref(), Some(&want[2]));
        assert_eq!(
            store.outbox(100).await.unwrap(),
            rows,
            "notices rebuilt from inline states"
        );
        assert_eq!(
            store.origin_resources("o", None, None, 10).await.unwrap(),
            [want[0].clone(), want[2].clone()]
        );
        let txn = store.db.read().unwrap().begin_read().unwrap();
        let table = txn.open_table(RESOURCES).unwrap();
        let tags: Vec<u8> = ["a", "b", "old"]
            .iter()
            .map(|id| table.get(("D", *id)).unwrap().unwrap().value()[0])
            .collect();
        assert_eq!(
            tags,
            [STATE_INLINE, STATE_AT, STATE_INLINE],
            "b's row is the newest, kept"
        );
        let cut = &table.get(("D", "b")).unwrap().unwrap().value()[..6].to_vec();
        assert!(matches!(
            decode_state(("D", "b"), cut),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn the_applied_log_in_groups_reads_and_trims_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        // 2 KiB resources: about fifteen to a group; two commits of 100.
        let big = |seq: u64| {
            let mut e = entry(seq, Action::Create, &format!("r{seq}"));
            let pad = "x".repeat(2_000);
            e.resource = Resource::from_json(&format!(
                r#"{{ "id": "r{seq}", "creator_id": "o", "pad": "{pad}" }}"#
            ))
            .unwrap();
            e
        };
        let all: Vec<JournalEntry> = (1..=200).map(big).collect();
        for batch in all.chunks(100) {
            let up_to = batch.last().unwrap().seq;
            store.apply_batch("o", up_to, batch.to_vec()).await.unwrap();
        }
        let groups = {
            let txn = store.db.read().unwrap().begin_read().unwrap();
            let log = applied_log::open_read(&txn).unwrap();
            (log.groups.len().unwrap(), log.rows.len().unwrap())
        };
        assert!(groups.0 >= 10 && groups.1 == 0, "{groups:?}");
        let keys = |log: &[AppliedRecord]| log.iter().map(|r| r.key).collect::<Vec<_>>();
        let newest = store.applied_log(u64::MAX, 1_000).await.unwrap();
        assert_eq!(keys(&newest), (1..=200).rev().collect::<Vec<_>>());
        let page = store.applied_log(108, 20).await.unwrap();
        assert_eq!(keys(&page), (88..=107).rev().collect::<Vec<_>>());
        assert_eq!(page[0].entry, all[106]);

        // Three trims of at most 37 stop inside groups; the next keeps the newest 50.
        for _ in 0..3 {
            assert_eq!(store.trim_applied_log(0, 50, 37).await.unwrap(), 37);
        }
        assert_eq!(store.trim_applied_log(0, 50, 1_000).await.unwrap(), 39);
        assert_eq!(store.trim_applied_log(0, 50, 1_000).await.unwrap(), 0);
        let kept = store.applied_log(u64::MAX, 1_000).await.unwrap();
        assert_eq!(keys(&kept), (151..=200).rev().collect::<Vec<_>>());
        for e in [&all[0], &all[111], &all[150], &all[199]] {
            let id = e.resource_id().unwrap();
            let got = store.resource("D", id).await.unwrap().unwrap();
            assert_eq!(got.resource, e.resource.to_value(), "{id}");
        }
        // New keys follow the last one.
        store.apply_batch("o", 201, vec![big(201)]).await.unwrap();
        assert_eq!(store.applied_log(u64::MAX, 1).await.unwrap()[0].key, 201);
    }

    #[tokio::test]
    async fn meeting_a_peer_keeps_its_relation() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        store.put_peer(row("p", Relation::Partner, "old")).await.unwrap();
        let kept = store.meet_peer(row("p", Relation::Known, "new")).await.unwrap();
        assert_eq!(kept, Relation::Partner);
        let p = store.peer("p").await.unwrap().unwrap();
        assert_eq!((p.relation, p.name.as_deref()), (Relation::Partner, Some("new")));
        assert_eq!(
            p.addrs,
            vec!["/dns4/old/tcp/4001"],
            "the partnership's address stays"
        );
        store.meet_peer(row("q", Relation::Known, "q2")).await.unwrap();
        let q = store.peer("q").await.unwrap().unwrap();
        assert_eq!(
            q.addrs,
            vec!["/dns4/q2/tcp/4001"],
            "a known peer's addresses follow its record"
        );
        assert_eq!(
            store.meet_peer(row("q", Relation::Known, "q")).await.unwrap(),
            Relation::Known
        );
        assert!(store.peer("nobody").await.unwrap().is_none());
    }
}

#[cfg(test)]
mod intake_tests {
    use super::*;

    fn event(action: Action, id: &str) -> NewEvent {
        NewEvent {
            action,
            data_type: "dt".into(),
            user: "u".into(),
            from_app: "app".into(),
            resource: serde_json::json!({"id": id, "pad": "x"}).into(),
            resource_id: id.into(),
        }
    }

    fn runs(store: &EmbeddedStore) -> Vec<(u64, u64)> {
        let db = store.db.read().unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(INTAKE_RUNS).unwrap();
        table
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value(), v.value())
            })
            .collect()
    }

    async fn mark(store: &EmbeddedStore, n: &mut usize, seqs: Vec<u64>) {
        *n += 1;
        let id = format!("r{n}");
        store
            .append_journal_lent("o", vec![event(Action::Create, &id)].into(), seqs.into())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn stream_sequences_are_kept_as_runs_with_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let mut n = 0;
        mark(&store, &mut n, vec![12, 10, 11, 15, 16, 11]).await;
        assert_eq!(runs(&store), vec![(10, 12), (15, 16)]);
        assert_eq!(
            store.intake_seen((8..=18).collect()).await.unwrap(),
            vec![10, 11, 12, 15, 16]
        );
        assert_eq!(
            store.intake_seen(vec![16, 9, 10]).await.unwrap(),
            vec![16, 10],
            "in the order asked"
        );
        // The gap filled: one run; the next batch extends it.
        mark(&store, &mut n, vec![13, 14]).await;
        mark(&store, &mut n, vec![17, 18]).await;
        assert_eq!(runs(&store), vec![(10, 18)]);
        mark(&store, &mut n, vec![30]).await;
        mark(&store, &mut n, vec![0, 1, u64::MAX]).await;
        assert_eq!(
            runs(&store),
            vec![(0, 1), (10, 18), (30, 30), (u64::MAX, u64::MAX)]
        );
        assert_eq!(store.intake_high().await.unwrap(), u64::MAX);
        assert_eq!(
            store
                .intake_seen(vec![0, 2, 9, 18, 19, 29, 30, 31, u64::MAX])
                .await
                .unwrap(),
            vec![0, 18, 30, u64::MAX]
        );
        // A run reaching the floor keeps what is at or above it.
        store.intake_forget_below(12).await.unwrap();
        assert_eq!(runs(&store), vec![(12, 18), (30, 30), (u64::MAX, u64::MAX)]);
        assert_eq!(store.intake_seen(vec![11, 12]).await.unwrap(), vec![12]);
        store.intake_forget_below(30).await.unwrap();
        assert_eq!(runs(&store), vec![(30, 30), (u64::MAX, u64::MAX)]);
        store.intake_forget_below(u64::MAX).await.unwrap();
        assert_eq!(runs(&store), vec![(u64::MAX, u64::MAX)]);
        // A commit with no events records nothing; one without sequences neither.
        store
            .append_journal_marked("o", Vec::new(), vec![40])
            .await
            .unwrap();
        store
            .append_journal("o", vec![event(Action::Create, "x")])
            .await
            .unwrap();
        assert_eq!(runs(&store), vec![(u64::MAX, u64::MAX)]);
        assert!(store.intake_seen(Vec::new()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn intake_rows_of_earlier_versions_become_runs_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        {
            // An earlier version's rows: stream seq → journal seq.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(INTAKE).unwrap();
                for (stream, journal) in [(5, 1), (6, 1), (7, 2), (9, 3), (3, 1)] {
                    t.insert(stream, journal).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(runs(&store), vec![(3, 3), (5, 7), (9, 9)]);
        assert_eq!(
            store.intake_seen((2..=10).collect()).await.unwrap(),
            vec![3, 5, 6, 7, 9]
        );
        assert_eq!(store.intake_high().await.unwrap(), 9);
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(runs(&store), vec![(3, 3), (5, 7), (9, 9)], "moved once");
        let db = store.db.read().unwrap();
        let txn = db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_owned())
            .collect();
        assert!(!names.iter().any(|n| n == "intake"), "{names:?}");
    }

    #[test]
    fn a_borrowed_entry_is_the_json_of_its_journal_entry() {
        let e = event(Action::Update, "r1");
        let borrowed = EntryRef {
            origin: "o",
            seq: 7,
            action: e.action,
            data_type: &e.data_type,
            user: &e.user,
            resource: &e.resource,
            time_ms: 99,
        };
        let owned = JournalEntry {
            origin: "o".into(),
            seq: 7,
            action: e.action,
            data_type: e.data_type.clone(),
            user: e.user.clone(),
            resource: e.resource.clone(),
            time_ms: 99,
        };
        let mut value = Vec::new();
        write_journal_value(&mut value, &borrowed).unwrap();
        assert_eq!(value[0], 2);
        assert_eq!(&value[1..], serde_json::to_vec(&owned).unwrap().as_slice());
        assert_eq!(decode_journal(&value).unwrap(), owned);
    }

    /// `reindex` against the lookups and index updates it replaces, over every sequence of
    /// actions on two keys up to a length.
    #[test]
    fn reindexing_finds_and_leaves_what_the_separate_lookups_did() {
        const REF_OWN: TableDefinition<(&str, &str), u64> = TableDefinition::new("ref_own");
        const REF_GONE: TableDefinition<(&str, &str), u64> = TableDefinition::new("ref_gone");
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("s.redb")).unwrap();
        let actions = [Action::Create, Action::Update, Action::Delete];
        // Every sequence of 5 steps over (2 keys × 3 actions): 6^5 = 7 776.
        for code in 0..6u32.pow(5) {
            let txn = db.begin_write().unwrap();
            {
                let mut own = txn.open_table(OWN_AT).unwrap();
                let mut gone = txn.open_table(OWN_GONE).unwrap();
                let mut ref_own = txn.open_table(REF_OWN).unwrap();
                let mut ref_gone = txn.open_table(REF_GONE).unwrap();
                let mut c = code;
                for seq in 1..=5u64 {
                    let step = c % 6;
                    c /= 6;
                    let id = if step < 3 { "a" } else { "b" };
                    let action = actions[(step % 3) as usize];
                    let key = ("dt", id);
                    let expected = match ref_own.get(key).unwrap() {
                        Some(v) => Some(v.value()),
                        None => ref_gone.get(key).unwrap().map(|v| v.value()),
                    };
                    let entry = JournalEntry {
                        origin: "o".into(),
                        seq,
                        action,
                        data_type: "dt".into(),
                        user: String::new(),
                        resource: serde_json::json!({"id": id}).into(),
                        time_ms: 0,
                    };
                    index_own(&mut ref_own, &entry, id).unwrap();
                    index_gone(&mut ref_gone, &entry, id).unwrap();
                    let found = reindex(&mut own, &mut gone, key, action, seq).unwrap();
                    assert_eq!(found, expected, "sequence {code}, step {seq}");
                }
                for id in ["a", "b"] {
                    let key = ("dt", id);
                    let get = |t: &redb::Table<(&str, &str), u64>| t.get(key).unwrap().map(|v| v.value());
                    assert_eq!(get(&own), get(&ref_own), "sequence {code}");
                    assert_eq!(get(&gone), get(&ref_gone), "sequence {code}");
                }
            }
            txn.abort().unwrap();
        }
    }
}

#[cfg(test)]
mod journal_tests {
    use super::*;

    fn event(action: Action, id: &str) -> NewEvent {
        NewEvent {
            action,
            data_type: "dt".into(),
            user: "u".into(),
            from_app: "app".into(),
            resource: serde_json::json!({"id": id, "pad": "x".repeat(300)}).into(),
            resource_id: id.into(),
        }
    }

    async fn seqs(store: &EmbeddedStore, from: u64) -> Vec<u64> {
        let raw = store.read_journal_raw("o", from, 100_000).await.unwrap();
        let entries = store.read_journal("o", from, 100_000).await.unwrap();
        assert_eq!(
            raw.iter().map(|r| r.seq).collect::<Vec<_>>(),
            entries.iter().map(|e| e.seq).collect::<Vec<_>>()
        );
        raw.iter().map(|r| r.seq).collect()
    }

    fn rows_and_groups(store: &EmbeddedStore) -> (Vec<u64>, usize) {
        use redb::ReadableTableMetadata;
        let db = store.db.read().unwrap();
        let txn = db.begin_read().unwrap();
        let rows = txn.open_table(JOURNAL).unwrap();
        let seqs = rows.iter().unwrap().map(|r| r.unwrap().0.value().1).collect();
        let groups = txn.open_table(GROUPS).unwrap().len().unwrap() as usize;
        (seqs, groups)
    }

    /// What the journal should hold: every entry above `floor`, and below it the latest
    /// entry of each resource (`ids[seq - 1]` is the resource of entry `seq`).
    fn expected(ids: &[String], floor: u64) -> Vec<u64> {
        (1..=ids.len() as u64)
            .filter(|&s| s > floor || !ids[s as usize..].contains(&ids[s as usize - 1]))
            .collect()
    }

    async fn append(store: &EmbeddedStore, ids: &mut Vec<String>, new: impl IntoIterator<Item = String>) {
        let new: Vec<String> = new.into_iter().collect();
        let events = new.iter().map(|id| event(Action::Update, id)).collect();
        store.append_journal("o", events).await.unwrap();
        ids.extend(new);
    }

    fn bounds(up_to: u64, max_examined: usize) -> CompactBounds {
        CompactBounds {
            up_to,
            older_than_ms: u64::MAX,
            tombstones_older_than_ms: 0,
            max_examined,
        }
    }

    #[tokio::test]
    async fn compaction_moves_what_stays_into_rows_and_reads_cross_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let mut ids = Vec::new();
        // 50 resources twice, then half of them again: 125 entries in three commits; 400-byte
        // entries make several groups per commit.
        for round in 0..3 {
            let n = if round == 2 { 25 } else { 50 };
            append(&store, &mut ids, (0..n).map(|i| format!("r{i}"))).await;
        }
        assert_eq!(seqs(&store, 0).await, (1..=125).collect::<Vec<_>>());
        assert_eq!(store.journal_head("o").await.unwrap(), 125);
        let (rows, groups) = rows_and_groups(&store);
        assert!(rows.is_empty() && groups >= 3, "{rows:?} {groups}");

        // Compaction in steps of 7 entries: each step's floor falls inside a group.
        let mut floor = 0;
        while floor < 120 {
            let report = store.compact_journal("o", bounds(120, 7)).await.unwrap();
            assert!(report.floor > floor, "{report:?}");
            floor = report.floor;
            assert_eq!(seqs(&store, 0).await, expected(&ids, floor), "floor {floor}");
        }
        assert_eq!(floor, 120);
        let (rows, _) = rows_and_groups(&store);
        assert_eq!(
            rows,
            (76..=120).collect::<Vec<_>>(),
            "r25..r49 then r0..r19 stay, as rows"
        );
        let from_90: Vec<u64> = expected(&ids, 120).into_iter().filter(|&s| s >= 90).collect();
        assert_eq!(seqs(&store, 90).await, from_90);
        assert_eq!(seqs(&store, 121).await, (121..=125).collect::<Vec<_>>());

        // Later entries of resources kept below the floor remove their rows.
        append(&store, &mut ids, (25..35).map(|i| format!("r{i}"))).await;
        assert_eq!(seqs(&store, 0).await, expected(&ids, 120));
        assert_eq!(rows_and_groups(&store).0, (86..=120).collect::<Vec<_>>());
        assert_eq!(store.journal_head("o").await.unwrap(), 135);

        // The own-resources index finds each resource's entry, a row or in a group.
        let own = store.own_resources("o", "dt").await.unwrap();
        assert_eq!(own.len(), 50);
        let page = store.snapshot_page("o", None, 1_000, 1 << 20).await.unwrap();
        let mut at: Vec<u64> = page.entries.iter().map(|(_, raw)| raw.seq).collect();
        at.sort_unstable();
        let mut latest: Vec<u64> = expected(&ids, u64::MAX)
            .into_iter()
            .filter(|&s| !ids[s as usize..].contains(&ids[s as usize - 1]))
            .collect();
        latest.sort_unstable();
        assert_eq!(at, latest);

        // Reopened, all the same; the head entry is never compacted.
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(seqs(&store, 0).await, expected(&ids, 120));
        let report = store
            .compact_journal("o", bounds(u64::MAX, 100_000))
            .await
            .unwrap();
        assert_eq!(report.floor, 134);
        assert_eq!(seqs(&store, 0).await, expected(&ids, 134));
        assert_eq!(store.journal_head("o").await.unwrap(), 135);
        append(&store, &mut ids, ["r0".to_owned()]).await;
        assert_eq!(seqs(&store, 0).await, expected(&ids, 134));
    }

    #[tokio::test]
    async fn rows_of_earlier_versions_above_the_floor_move_into_groups_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        {
            // An earlier version's journal: a row per entry, two origins, a floor at 100 for
            // "o" (below it only some rows remain), a gap above it.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut rows = txn.open_table(JOURNAL).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                meta.remove("journal_groups").unwrap();
                meta.insert(floor_key("o").as_str(), 100u64.to_be_bytes().as_slice())
                    .unwrap();
                let resource: Resource = serde_json::json!({"id": "r", "pad": "x".repeat(1000)}).into();
                let mut value = Vec::new();
                let all = (1..=100)
                    .step_by(10)
                    .chain(101..=300)
                    .chain(302..=310)
                    .map(|s| ("o", s))
                    .chain((1..=5).map(|s| ("p", s)));
                for (origin, seq) in all {
                    value.clear();
                    let entry = EntryRef {
                        origin,
                        seq,
                        action: Action::Update,
                        data_type: "dt",
                        user: "u",
                        resource: &resource,
                        time_ms: 1,
                    };
                    write_journal_value(&mut value, &entry).unwrap();
                    rows.insert((origin, seq), value.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let want: Vec<u64> = (1..=100).step_by(10).chain(101..=300).chain(302..=310).collect();
        assert_eq!(seqs(&store, 0).await, want);
        assert_eq!(seqs(&store, 250).await, want[want.len() - 60..].to_vec());
        assert_eq!(store.journal_head("o").await.unwrap(), 310);
        let (rows, groups) = rows_and_groups(&store);
        assert_eq!(
            rows,
            (1..=100).step_by(10).collect::<Vec<_>>(),
            "only those below the floor stay rows"
        );
        assert!(groups >= 5, "{groups}");
        let p: Vec<u64> = store
            .read_journal_raw("p", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(p, vec![1, 2, 3, 4, 5]);
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(rows_and_groups(&store).1, groups, "packed once");
        let mut ids = Vec::new();
        append(&store, &mut ids, ["x".to_owned()]).await;
        assert_eq!(store.journal_head("o").await.unwrap(), 311);
    }
}
