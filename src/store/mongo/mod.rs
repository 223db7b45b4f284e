//! The MongoDB store: resources where the site's applications read them, one collection
//! per data type, and the node's bookkeeping in `oc_*` collections beside them.
//!
//! The document shapes, indexes and the reasons for the transaction settings are in
//! `docs/MONGODB.md`. In short:
//! - `append_journal` and `apply_batch` each run as ONE multi-document transaction with
//!   write concern `majority` + journaled, so an acknowledgement is never sent for
//!   something MongoDB could still lose, and an apply is all-or-nothing;
//! - one writer at a time inside this process (like redb), so our own transactions never
//!   conflict with each other and outbox ids are allocated without races;
//! - a resource MongoDB would refuse is found before writing (and, failing that, by
//!   applying the batch entry by entry) and becomes [`ApplyOutcome::Rejected`];
//! - nothing connects at construction: MongoDB may be down when the node starts. Indexes
//!   are created by the first operation that reaches it, and every failure to reach it is
//!   [`StoreError::Unavailable`], which callers retry.
//!
//! One concern per file: `names` (collections, data type → collection), `bson` (document
//! shapes and pre-write checks), `error` (retried, refused, corrupt), `schema`
//! (collections and indexes), `txn` (durable transactions and their retries), `journal`
//! (the journal commit), `plan` (checking and deciding a batch, pure), `apply` (the apply
//! commit), `peers` (meeting a peer); this file: the settings, the client and the
//! [`Store`] implementation over them.

mod apply;
mod bson;
mod error;
mod intake;
mod journal;
mod names;
mod outbox;
mod own;
mod peers;
mod plan;
mod retention;
mod schema;
mod txn;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document, RawDocumentBuf};
use mongodb::options::{Acknowledgment, ClientOptions, CollectionOptions, DatabaseOptions, WriteConcern};
use mongodb::{Client, Collection, Database};
use serde_json::Value;
use tokio::sync::{Mutex, OnceCell};

pub use self::bson::{resource_document, MAX_DOCUMENT_BYTES, MAX_NESTING};
pub use self::error::OpenError;
pub use self::names::{collection_for, DEFAULT_DB};

use self::bson::{
    document_to_json, to_i64, to_u64, JournalDoc, JournalDocRef, PeerDoc, SeqDoc, StoredApplied,
    StoredOutbox, VersionDoc, VersionKey,
};
use self::error::Failure;
use self::names::{
    check_database_name, APPLIED, APPLIED_LOG, CURSORS, JOURNAL, OUTBOX, OWN, PEERS, VERSIONS,
};
use self::txn::durable;
use super::{
    AppliedRecord, ApplyOutcome, CompactBounds, CompactReport, OutboxRow, OwnPage, PageBounds, PeerRow,
    RawEntry, Relation, ResourceKey, SnapshotPage, Store, StoreError, StoreResult, StoredResource,
};
use crate::contract::{JournalEntry, NewEvent};

/// Most `known` rows one round of `trim_known_peers` deletes.
const TRIM_CHUNK: u64 = 1000;
/// `oc_own` documents whose texts one journal query reads ([`MongoStore::own_texts`]).
const OWN_TEXTS_AT_ONCE: usize = 1000;

/// Connection and retry settings; the defaults suit one node writing in batches.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// Connections kept per server: the single writer uses one, reads (partner links,
    /// admin API) the rest.
    pub max_pool_size: u32,
    pub min_pool_size: u32,
    /// How long one operation waits for a usable server before failing as unavailable.
    pub server_selection_timeout: Duration,
    pub connect_timeout: Duration,
    /// Bound on waiting for the majority to acknowledge a commit.
    pub write_timeout: Duration,
    /// `GET /healthz` waits this long for a ping.
    pub health_timeout: Duration,
    /// Whole-transaction attempts on a transient error before reporting unavailable.
    pub transaction_attempts: u32,
    /// Commit attempts when MongoDB could not say whether a commit happened.
    pub commit_attempts: u32,
}

impl Default for MongoSettings {
    fn default() -> Self {
        MongoSettings {
            max_pool_size: 16,
            min_pool_size: 1,
            server_selection_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            health_timeout: Duration::from_secs(3),
            transaction_attempts: 5,
            commit_attempts: 5,
        }
    }
}

pub struct MongoStore {
    client: Client,
    db: Database,
    settings: MongoSettings,
    /// Collections and indexes, created by the first operation that reaches MongoDB.
    setup: OnceCell<()>,
    /// Resource collections known to exist: DDL stays out of transactions.
    collections: StdMutex<HashSet<String>>,
    /// One writing transaction at a time (see the module comment).
    writer: Mutex<()>,
    /// The last error an operation met, quoted by [`Store::health`].
    last_error: StdMutex<Option<String>>,
}

impl MongoStore {
    /// Prepares a client for `uri` and database `db` without contacting MongoDB, so the
    /// node starts whether or not MongoDB is up.
    ///
    /// # Errors
    /// A URI that does not parse (or whose SRV record cannot be resolved), or a database
    /// name MongoDB does not accept.
    pub async fn connect(uri: &str, db: &str, settings: MongoSettings) -> Result<Self, OpenError> {
        check_database_name(db)?;
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| OpenError::Uri(e.to_string()))?;
        // What the URI sets (maxPoolSize=, serverSelectionTimeoutMS=, ...) wins.
        options.app_name.get_or_insert_with(|| "oc-discovery".to_owned());
        options.max_pool_size.get_or_insert(settings.max_pool_size);
        options.min_pool_size.get_or_insert(settings.min_pool_size);
        options
            .server_selection_timeout
            .get_or_insert(settings.server_selection_timeout);
        options.connect_timeout.get_or_insert(settings.connect_timeout);
        let client = Client::with_options(options).map_err(|e| OpenError::Uri(e.to_string()))?;
        let mut db_options = DatabaseOptions::default();
        // Writes outside transactions (partnerships) are as durable as commits, except the
        // few that use `relaxed` on purpose.
        db_options.write_concern = Some(durable(&settings));
        let database = client.database_with_options(db, db_options);
        Ok(MongoStore {
            client,
            db: database,
            settings,
            setup: OnceCell::new(),
            collections: StdMutex::new(HashSet::new()),
            writer: Mutex::new(()),
            last_error: StdMutex::new(None),
        })
    }

    /// Runs a `find` and collects every document, mapping driver errors the store's way.
    async fn collect<T, F>(&self, find: F) -> StoreResult<Vec<T>>
    where
        F: std::future::IntoFuture<Output = mongodb::error::Result<mongodb::Cursor<T>>>,
        T: serde::de::DeserializeOwned + Send + Sync + Unpin,
    {
        let cursor = find.await.map_err(|e| self.failed(e))?;
        cursor.try_collect().await.map_err(|e| self.failed(e))
    }

    /// Up to `limit` documents of `origin`'s journal from seq `from` on, in seq order, read
    /// as `T` (decoded, or the server's bytes as they are).
    async fn journal_docs<T>(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<T>>
    where
        T: serde::de::DeserializeOwned + Send + Sync + Unpin,
    {
        self.ready().await?;
        let from = to_i64(from, "seq").map_err(|e| self.failed(e))?;
        self.collect(
            self.coll::<T>(JOURNAL)
                .find(doc! {"origin": origin, "seq": {"$gte": from}})
                .sort(doc! {"seq": 1})
                .limit(i64::try_from(limit).unwrap_or(i64::MAX)),
        )
        .await
    }

    fn coll<T: Send + Sync>(&self, name: &str) -> Collection<T> {
        self.db.collection(name)
    }

    /// A collection whose writes wait for the primary only, not the majority's journals:
    /// for writes whose loss in a crash or failover costs a resend or a duplicate notice
    /// at most (cursors, outbox removals, intake pruning), like the embedded store's
    /// unsynced commits for the same writes.
    fn relaxed(&self, name: &str) -> Collection<Document> {
        let options = CollectionOptions::builder()
            .write_concern(
                WriteConcern::builder()
                    .w(Acknowledgment::Nodes(1))
                    .journal(false)
                    .build(),
            )
            .build();
        self.db.collection_with_options(name, options)
    }

    /// Remembers an error for `/healthz` and turns it into a [`StoreError`].
    fn failed(&self, f: impl Into<Failure>) -> StoreError {
        let e: StoreError = f.into().into();
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
        e
    }

    async fn read_seq(&self, coll: &str, key: &str) -> StoreResult<u64> {
        self.ready().await?;
        let doc = self
            .coll::<SeqDoc>(coll)
            .find_one(doc! {"_id": key})
            .await
            .map_err(|e| self.failed(e))?;
        match doc {
            Some(d) => to_u64(d.seq, coll).map_err(|e| self.failed(e)),
            None => Ok(0),
        }
    }

    /// Live documents of a collection by id.
    async fn documents(&self, coll: &str, ids: Vec<&str>) -> StoreResult<HashMap<String, Value>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let docs: Vec<Document> = self
            .collect(self.coll::<Document>(coll).find(doc! {"_id": {"$in": ids}}))
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let id = d.get_str("_id").ok()?.to_owned();
                Some((id, document_to_json(d)))
            })
            .collect())
    }

    fn stored(&self, v: &VersionDoc, live: &mut HashMap<String, Value>) -> StoreResult<StoredResource> {
        let resource = if v.deleted {
            v.tombstone_value().map_err(|e| self.failed(e))?
        } else {
            // Null when an application removed the document behind the node's back.
            live.remove(&v.key.id).unwrap_or(Value::Null)
        };
        v.to_stored(resource).map_err(|e| self.failed(e))
    }
}

#[async_trait]
impl Store for MongoStore {
    async fn append_journal_marked(
        &self,
        origin: &str,
        events: Vec<NewEvent>,
        intake_seqs: Vec<u64>,
    ) -> StoreResult<Vec<JournalEntry>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.ready().await?;
        let _writer = self.writer.lock().await;
        let mut attempt = 1;
        loop {
            let mut session = self.begin().await.map_err(|e| self.failed(e))?;
            let body = self.append_txn(&mut session, origin, &events, &intake_seqs).await;
            match self.finish(session, body, attempt).await {
                Ok(Some(entries)) => return Ok(entries),
                Ok(None) => attempt += 1,
                Err(e) => return Err(self.failed(e)),
            }
        }
    }

    async fn intake_seen(&self, seqs: Vec<u64>) -> StoreResult<Vec<u64>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.ready().await?;
        self.intake_recorded(&seqs).await.map_err(|e| self.failed(e))
    }

    async fn intake_high(&self) -> StoreResult<u64> {
        self.ready().await?;
        self.intake_highest().await.map_err(|e| self.failed(e))
    }

    async fn intake_forget_below(&self, below: u64) -> StoreResult<()> {
        self.ready().await?;
        self.intake_forget(below).await.map_err(|e| self.failed(e))
    }

    async fn read_journal(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<JournalEntry>> {
        let docs: Vec<JournalDoc> = self.journal_docs(origin, from, limit).await?;
        docs.into_iter()
            .map(|d| d.into_entry().map_err(|e| self.failed(e)))
            .collect()
    }

    async fn read_journal_raw(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<RawEntry>> {
        let docs: Vec<RawDocumentBuf> = self.journal_docs(origin, from, limit).await?;
        docs.iter()
            .map(|d| {
                mongodb::bson::from_slice::<JournalDocRef<'_>>(d.as_bytes())
                    .map_err(|e| Failure::Corrupt(format!("journal: {e}")))
                    .and_then(|d| d.raw_entry())
                    .map_err(|e| self.failed(e))
            })
            .collect()
    }

    async fn journal_head(&self, origin: &str) -> StoreResult<u64> {
        self.ready().await?;
        let last = self
            .coll::<JournalDoc>(JOURNAL)
            .find_one(doc! {"origin": origin})
            .sort(doc! {"seq": -1})
            .await
            .map_err(|e| self.failed(e))?;
        match last {
            Some(d) => to_u64(d.seq, "seq").map_err(|e| self.failed(e)),
            None => Ok(0),
        }
    }

    async fn journal_floor(&self, origin: &str) -> StoreResult<u64> {
        self.floor(origin).await
    }

    async fn compact_journal(&self, origin: &str, bounds: CompactBounds) -> StoreResult<CompactReport> {
        self.compact(origin, bounds).await
    }

    async fn reclaim_space(&self) -> StoreResult<u64> {
        self.reclaim().await
    }

    async fn journal_bytes(&self) -> StoreResult<u64> {
        self.journal_storage().await
    }

    async fn own_count(&self, _origin: &str) -> StoreResult<u64> {
        self.count_own().await
    }

    async fn snapshot_page(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        max_count: usize,
        max_bytes: usize,
    ) -> StoreResult<SnapshotPage> {
        self.snapshot(origin, after, max_count, max_bytes).await
    }

    async fn origin_resources(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        upto: Option<ResourceKey>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>> {
        self.of_origin(origin, after, upto, limit).await
    }

    async fn meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.meta_get(key).await
    }

    async fn set_meta(&self, key: &str, value: Option<Vec<u8>>) -> StoreResult<()> {
        self.meta_set(key, value).await
    }

    async fn cursor(&self, peer: &str) -> StoreResult<u64> {
        self.read_seq(CURSORS, peer).await
    }

    async fn set_cursor(&self, peer: &str, seq: u64) -> StoreResult<()> {
        self.ready().await?;
        let seq = to_i64(seq, "cursor").map_err(|e| self.failed(e))?;
        self.relaxed(CURSORS)
            .update_one(doc! {"_id": peer}, doc! {"$set": {"seq": seq}})
            .upsert(true)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn applied(&self, origin: &str) -> StoreResult<u64> {
        self.read_seq(APPLIED, origin).await
    }

    async fn apply_batch(
        &self,
        origin: &str,
        up_to: u64,
        entries: Vec<JournalEntry>,
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
        self.apply_entries(origin, up_to, &entries).await
    }

    async fn apply_batch_clearing(
        &self,
        origin: &str,
        up_to: u64,
        entries: std::sync::Arc<[JournalEntry]>,
        published: Vec<u64>,
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
        // One `delete_many` before the batch's transaction, outside it: a removal lost in a
        // crash only republishes those rows.
        self.outbox_remove(published).await?;
        self.apply_entries(origin, up_to, &entries).await
    }

    async fn trim_applied_log(
        &self,
        older_than_ms: u64,
        keep_rows: u64,
        max_remove: usize,
    ) -> StoreResult<u64> {
        self.ready().await?;
        let log = self.coll::<StoredApplied>(APPLIED_LOG);
        let newest = log
            .find_one(doc! {})
            .sort(doc! {"_id": -1})
            .await
            .map_err(|e| self.failed(e))?;
        let Some(last) = newest.map(|d| d.last()) else {
            return Ok(0);
        };
        // The oldest rows, group by group, up to the most one call removes: the first one
        // kept ends the cut. Whole groups are deleted; of the group the cut ends in, the
        // rows before it are pulled.
        let mut cursor = log
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .await
            .map_err(|e| self.failed(e))?;
        // Rows the outbox still owes make its payloads (`outbox.rs`): they stay.
        let owed = self.oldest_owed().await.map_err(|e| self.failed(e))?;
        let mut whole: Vec<i64> = Vec::new();
        let mut partly: Option<(i64, Vec<i64>)> = None;
        let mut removed = 0u64;
        let max_remove = u64::try_from(max_remove).unwrap_or(u64::MAX);
        while partly.is_none() && removed < max_remove {
            let Some(group) = cursor.try_next().await.map_err(|e| self.failed(e))? else {
                break;
            };
            let first = group.first();
            let rows = group.into_rows();
            let mut cut: Vec<i64> = Vec::new();
            for d in &rows {
                if removed >= max_remove || owed.is_some_and(|owed| d.key >= owed) {
                    break;
                }
                let left = u64::try_from(last.saturating_sub(d.key))
                    .unwrap_or(0)
                    .saturating_add(1);
                let trims = super::trims_applied_row(left, keep_rows, older_than_ms, || {
                    super::applied_ms_of(d.json.as_bytes())
                        .map_err(|e| self.failed(Failure::Corrupt(format!("applied log row {}: {e}", d.key))))
                })?;
                if !trims {
                    break;
                }
                cut.push(d.key);
                removed += 1;
            }
            if cut.len() == rows.len() {
                whole.push(first);
            } else {
                partly = Some((first, cut));
            }
        }
        let log = self.coll::<Document>(APPLIED_LOG);
        if !whole.is_empty() {
            log.delete_many(doc! {"_id": {"$in": whole}})
                .await
                .map_err(|e| self.failed(e))?;
        }
        if let Some((first, keys)) = partly.filter(|(_, keys)| !keys.is_empty()) {
            log.update_one(
                doc! {"_id": first},
                doc! {"$pull": {"rows": {"_id": {"$in": keys}}}},
            )
            .await
            .map_err(|e| self.failed(e))?;
        }
        Ok(removed)
    }

    async fn applied_log(&self, before: u64, limit: usize) -> StoreResult<Vec<AppliedRecord>> {
        self.ready().await?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        // Groups newest first: each one whose first key is below `before` holds at least one
        // row to give, so `limit` groups are enough.
        let mut cursor = self
            .coll::<StoredApplied>(APPLIED_LOG)
            .find(doc! {"_id": {"$lt": before}})
            .sort(doc! {"_id": -1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(|e| self.failed(e))?;
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(group) = cursor.try_next().await.map_err(|e| self.failed(e))? else {
                break;
            };
            for d in group.into_rows().iter().rev().filter(|d| d.key < before) {
                if out.len() == limit {
                    break;
                }
                let record: AppliedRecord = serde_json::from_str(&d.json)
                    .map_err(|e| self.failed(Failure::Corrupt(format!("applied log row {}: {e}", d.key))))?;
                out.push(record);
            }
        }
        Ok(out)
    }

    async fn outbox(&self, limit: usize) -> StoreResult<Vec<OutboxRow>> {
        self.ready().await?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Groups in id order until `limit` rows are held: each group holds at least one row.
        let mut cursor = self
            .coll::<StoredOutbox>(OUTBOX)
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(|e| self.failed(e))?;
        let mut rows = Vec::new();
        let mut in_log = Vec::new();
        while rows.len() < limit {
            let Some(stored) = cursor.try_next().await.map_err(|e| self.failed(e))? else {
                break;
            };
            let base = rows.len();
            rows.extend(stored.into_rows(base, &mut in_log).map_err(|e| self.failed(e))?);
        }
        rows.truncate(limit);
        in_log.retain(|&i| i < limit);
        self.payloads_from_log(&mut rows, &in_log)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(rows)
    }

    async fn outbox_remove(&self, ids: Vec<u64>) -> StoreResult<()> {
        let (Some(&low), Some(&high)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(());
        };
        self.ready().await?;
        let low = to_i64(low, "outbox id").map_err(|e| self.failed(e))?;
        let high = to_i64(high, "outbox id").map_err(|e| self.failed(e))?;
        let removed = ids
            .into_iter()
            .map(|id| to_i64(id, "outbox id"))
            .collect::<Result<HashSet<i64>, _>>()
            .map_err(|e| self.failed(e))?;
        // The groups that may hold one of them: a group's rows lie in `_id..=last`. Only
        // the ids of their rows are read.
        let found: Vec<Document> = self
            .collect(
                self.coll::<Document>(OUTBOX)
                    .find(doc! {"_id": {"$lte": high}, "$or": [
                        {"last": {"$gte": low}},
                        {"last": {"$exists": false}, "_id": {"$gte": low}},
                    ]})
                    .projection(doc! {"_id": 1, "rows._id": 1}),
            )
            .await?;
        let mut whole: Vec<i64> = Vec::new();
        let mut partly: Vec<i64> = Vec::new();
        for d in &found {
            let Ok(first) = d.get_i64("_id") else { continue };
            let held: Vec<i64> = match d.get_array("rows") {
                Ok(rows) => rows
                    .iter()
                    .filter_map(|r| r.as_document()?.get_i64("_id").ok())
                    .collect(),
                // A row of its own (written before the groups).
                Err(_) => vec![first],
            };
            let gone = held.iter().filter(|id| removed.contains(id)).count();
            if gone == held.len() {
                whole.push(first);
            } else if gone > 0 {
                partly.push(first);
            }
        }
        let outbox = self.relaxed(OUTBOX);
        if !whole.is_empty() {
            outbox
                .delete_many(doc! {"_id": {"$in": whole}})
                .await
                .map_err(|e| self.failed(e))?;
        }
        if !partly.is_empty() {
            let pulled: Vec<i64> = removed.into_iter().collect();
            outbox
                .update_many(
                    doc! {"_id": {"$in": partly}},
                    doc! {"$pull": {"rows": {"_id": {"$in": pulled}}}},
                )
                .await
                .map_err(|e| self.failed(e))?;
        }
        Ok(())
    }

    async fn resource(&self, data_type: &str, id: &str) -> StoreResult<Option<StoredResource>> {
        self.ready().await?;
        let Ok(coll) = collection_for(self.db.name(), data_type) else {
            return Ok(None);
        };
        let key = VersionKey {
            coll,
            id: id.to_owned(),
        };
        let version = self
            .coll::<VersionDoc>(VERSIONS)
            .find_one(doc! {"_id": key.to_bson()})
            .await
            .map_err(|e| self.failed(e))?;
        let Some(v) = version else {
            return Ok(None);
        };
        let ids = if v.deleted { vec![] } else { vec![id] };
        let mut live = self.documents(&key.coll, ids).await?;
        self.stored(&v, &mut live).map(Some)
    }

    async fn resources(
        &self,
        data_type: &str,
        after: Option<String>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>> {
        self.ready().await?;
        let Ok(coll) = collection_for(self.db.name(), data_type) else {
            return Ok(Vec::new());
        };
        let mut filter = doc! {"_id.coll": &coll};
        if let Some(after) = &after {
            filter.insert("_id.id", doc! {"$gt": after});
        }
        let versions: Vec<VersionDoc> = self
            .collect(
                self.coll::<VersionDoc>(VERSIONS)
                    .find(filter)
                    .sort(doc! {"_id.coll": 1, "_id.id": 1})
                    .limit(i64::try_from(limit).unwrap_or(i64::MAX)),
            )
            .await?;
        let live_ids = versions
            .iter()
            .filter(|v| !v.deleted)
            .map(|v| v.key.id.as_str())
            .collect();
        let mut live = self.documents(&coll, live_ids).await?;
        versions.iter().map(|v| self.stored(v, &mut live)).collect()
    }

    async fn own_resources(&self, origin: &str, data_type: &str) -> StoreResult<Vec<Value>> {
        self.ready().await?;
        let docs: Vec<Document> = self
            .collect(
                self.coll::<Document>(OWN)
                    .find(doc! {"_id.data_type": data_type})
                    .sort(doc! {"_id.data_type": 1, "_id.id": 1}),
            )
            .await?;
        let mut out = Vec::with_capacity(docs.len());
        for chunk in docs.chunks(OWN_TEXTS_AT_ONCE) {
            for (_, text) in self.own_texts(origin, data_type, chunk).await? {
                out.push(
                    serde_json::from_str(&text)
                        .map_err(|e| self.failed(Failure::Corrupt(format!("oc_own: {e}"))))?,
                );
            }
        }
        Ok(out)
    }

    async fn own_resources_page(
        &self,
        origin: &str,
        data_type: &str,
        after: Option<String>,
        bounds: PageBounds,
    ) -> StoreResult<OwnPage> {
        self.ready().await?;
        let mut filter = doc! {"_id.data_type": data_type};
        if let Some(after) = &after {
            filter.insert("_id.id", doc! {"$gt": after});
        }
        let limit = i64::try_from(bounds.max_count.max(1)).unwrap_or(i64::MAX);
        let mut cursor = self
            .coll::<Document>(OWN)
            .find(filter)
            .sort(doc! {"_id.data_type": 1, "_id.id": 1})
            .limit(limit)
            .batch_size(16)
            .await
            .map_err(|e| self.failed(e))?;
        // Documents are taken from the cursor 16 at a time, their texts read, and kept as
        // JSON text only; the page stops at its byte bound, leaving the rest unread.
        let mut docs = Vec::new();
        let mut bytes = 0usize;
        let mut pending = Vec::with_capacity(16);
        // Documents taken from the cursor: a resource removed while the page is read is
        // left out of it, and the page still counts as full.
        let (mut taken, mut last_taken) = (0usize, None);
        'page: loop {
            let more = cursor.try_next().await.map_err(|e| self.failed(e))?;
            let last = more.is_none();
            if let Some(d) = &more {
                taken += 1;
                last_taken = d
                    .get_document("_id")
                    .and_then(|k| k.get_str("id"))
                    .ok()
                    .map(str::to_owned);
            }
            pending.extend(more);
            if pending.len() < 16 && !last {
                continue;
            }
            for (id, text) in self.own_texts(origin, data_type, &pending).await? {
                bytes = bytes.saturating_add(text.len()).saturating_add(id.len());
                docs.push((id, text));
                if bytes >= bounds.max_bytes {
                    break 'page;
                }
            }
            pending.clear();
            if last {
                break;
            }
        }
        let next = if bytes >= bounds.max_bytes {
            docs.last().map(|(id, _)| id.clone())
        } else if taken >= bounds.max_count.max(1) {
            last_taken
        } else {
            None
        };
        Ok(OwnPage { items: docs, next })
    }

    async fn peer(&self, peer_id: &str) -> StoreResult<Option<PeerRow>> {
        self.ready().await?;
        let doc = self
            .coll::<PeerDoc>(PEERS)
            .find_one(doc! {"_id": peer_id})
            .await
            .map_err(|e| self.failed(e))?;
        doc.map(|d| d.into_row().map_err(|e| self.failed(e))).transpose()
    }

    /// Read and write in one transaction, so a relation set meanwhile is kept.
    async fn meet_peer(&self, row: PeerRow) -> StoreResult<Relation> {
        self.ready().await?;
        let _writer = self.writer.lock().await;
        let mut attempt = 1;
        loop {
            let mut session = self.begin().await.map_err(|e| self.failed(e))?;
            let body = self.meet_txn(&mut session, row.clone()).await;
            match self.finish(session, body, attempt).await {
                Ok(Some(relation)) => return Ok(relation),
                Ok(None) => attempt += 1,
                Err(e) => return Err(self.failed(e)),
            }
        }
    }

    async fn peers(&self) -> StoreResult<Vec<PeerRow>> {
        self.ready().await?;
        let docs: Vec<PeerDoc> = self
            .collect(self.coll::<PeerDoc>(PEERS).find(doc! {}).sort(doc! {"_id": 1}))
            .await?;
        docs.into_iter()
            .map(|d| d.into_row().map_err(|e| self.failed(e)))
            .collect()
    }

    async fn put_peer(&self, row: PeerRow) -> StoreResult<()> {
        self.ready().await?;
        let doc = PeerDoc::from_row(row).map_err(|e| self.failed(e))?;
        self.coll::<PeerDoc>(PEERS)
            .replace_one(doc! {"_id": &doc.peer_id}, &doc)
            .upsert(true)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn remove_peer(&self, peer_id: &str) -> StoreResult<()> {
        self.ready().await?;
        self.coll::<PeerDoc>(PEERS)
            .delete_one(doc! {"_id": peer_id})
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Counts the `known` rows (index `relation_seen`), then deletes the least recently
    /// seen beyond `keep`, at most [`TRIM_CHUNK`] per round; the delete names the relation
    /// again, so a row made a partner meanwhile stays.
    async fn trim_known_peers(&self, keep: usize) -> StoreResult<usize> {
        self.ready().await?;
        let peers = self.coll::<Document>(PEERS);
        let known = doc! {"relation": "known"};
        let mut dropped = 0usize;
        loop {
            let count = peers
                .count_documents(known.clone())
                .await
                .map_err(|e| self.failed(e))?;
            let excess = count.saturating_sub(u64::try_from(keep).unwrap_or(u64::MAX));
            if excess == 0 {
                return Ok(dropped);
            }
            let limit = i64::try_from(excess.min(TRIM_CHUNK)).unwrap_or(1);
            let oldest: Vec<Document> = self
                .collect(
                    peers
                        .find(known.clone())
                        .sort(doc! {"updated_ms": 1})
                        .limit(limit)
                        .projection(doc! {"_id": 1}),
                )
                .await?;
            let ids: Vec<mongodb::bson::Bson> =
                oldest.into_iter().filter_map(|d| d.get("_id").cloned()).collect();
            if ids.is_empty() {
                return Ok(dropped);
            }
            let deleted = peers
                .delete_many(doc! {"_id": {"$in": ids}, "relation": "known"})
                .await
                .map_err(|e| self.failed(e))?
                .deleted_count;
            dropped = dropped.saturating_add(usize::try_from(deleted).unwrap_or(usize::MAX));
            if deleted == 0 {
                return Ok(dropped);
            }
        }
    }

    async fn health(&self) -> StoreResult<()> {
        let timeout = self.settings.health_timeout;
        let check = async {
            self.ready().await?;
            self.db
                .run_command(doc! {"ping": 1})
                .await
                .map_err(|e| self.failed(e))?;
            Ok(())
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(result) => result,
            Err(_) => {
                let last = self
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|l| l.clone())
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                Err(StoreError::Unavailable(format!(
                    "mongodb did not answer a ping within {timeout:?}{last}"
                )))
            }
        }
    }
}
