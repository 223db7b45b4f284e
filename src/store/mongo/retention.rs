//! Journal compaction, snapshot reads and the small bookkeeping values (`oc_meta`) of the
//! MongoDB store.
//!
//! Compaction needs no transaction: it removes only entries a later entry of the same
//! resource supersedes (`oc_own` / `oc_gone` point at the latest), and an index read
//! before a concurrent append can only make it keep an entry it could have removed. An
//! index document without a seq (written by an earlier version) keeps its entries.

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};

use super::bson::{seq_of, to_i64, to_u64, JournalDoc, VersionDoc};
use super::error::Failure;
use super::names::{GONE, JOURNAL, META, OWN, VERSIONS};
use super::MongoStore;
use crate::contract::Action;
use crate::store::{
    CompactBounds, CompactReport, RawEntry, ResourceKey, SnapshotPage, StoreResult, StoredResource,
};

/// Journal documents examined per compaction batch.
const COMPACT_BATCH: i64 = 4096;

fn floor_key(origin: &str) -> String {
    format!("floor:{origin}")
}

/// `{data_type, id}` keys of `oc_own` / `oc_gone` after `after` (exclusive) in key order.
fn after_filter(after: &Option<ResourceKey>, dt_field: &str, id_field: &str) -> Document {
    match after {
        None => doc! {},
        Some((dt, id)) => doc! {"$or": [
            {dt_field: {"$gt": dt}},
            {dt_field: dt, id_field: {"$gt": id}},
        ]},
    }
}

fn upto_filter(upto: &Option<ResourceKey>, dt_field: &str, id_field: &str) -> Document {
    match upto {
        None => doc! {},
        Some((dt, id)) => doc! {"$or": [
            {dt_field: {"$lt": dt}},
            {dt_field: dt, id_field: {"$lte": id}},
        ]},
    }
}

fn key_of(d: &Document) -> Option<(String, String)> {
    let k = d.get_document("_id").ok()?;
    Some((
        k.get_str("data_type").ok()?.to_owned(),
        k.get_str("id").ok()?.to_owned(),
    ))
}

impl MongoStore {
    pub(super) async fn meta_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.ready().await?;
        let d = self
            .coll::<Document>(META)
            .find_one(doc! {"_id": key})
            .await
            .map_err(|e| self.failed(e))?;
        Ok(d.and_then(|d| d.get_binary_generic("value").ok().cloned()))
    }

    pub(super) async fn meta_set(&self, key: &str, value: Option<Vec<u8>>) -> StoreResult<()> {
        self.ready().await?;
        let coll = self.coll::<Document>(META);
        match value {
            Some(v) => {
                let bin = Bson::Binary(mongodb::bson::Binary {
                    subtype: mongodb::bson::spec::BinarySubtype::Generic,
                    bytes: v,
                });
                coll.update_one(doc! {"_id": key}, doc! {"$set": {"value": bin}})
                    .upsert(true)
                    .await
                    .map_err(|e| self.failed(e))?;
            }
            None => {
                coll.delete_one(doc! {"_id": key})
                    .await
                    .map_err(|e| self.failed(e))?;
            }
        }
        Ok(())
    }

    pub(super) async fn floor(&self, origin: &str) -> StoreResult<u64> {
        Ok(match self.meta_get(&floor_key(origin)).await? {
            Some(v) => u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| self.failed(Failure::Corrupt("oc_meta: floor".into())))?,
            ),
            None => 0,
        })
    }

    /// The latest seq `oc_own` (`live`) or `oc_gone` records for each key; `None` inside
    /// when the document has no seq (written by an earlier version).
    async fn latest(
        &self,
        coll: &str,
        keys: &[(String, String)],
    ) -> StoreResult<HashMap<(String, String), Option<u64>>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Bson> = keys
            .iter()
            .map(|(dt, id)| Bson::Document(doc! {"data_type": dt, "id": id}))
            .collect();
        let docs: Vec<Document> = self
            .collect(
                self.coll::<Document>(coll)
                    .find(doc! {"_id": {"$in": ids}})
                    .projection(doc! {"_id": 1, "seq": 1}),
            )
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| Some((key_of(d)?, seq_of(d))))
            .collect())
    }

    pub(super) async fn compact(&self, origin: &str, bounds: CompactBounds) -> StoreResult<CompactReport> {
        let head = crate::store::Store::journal_head(self, origin).await?;
        let up_to = bounds.up_to.min(head.saturating_sub(1));
        let mut report = CompactReport {
            floor: self.floor(origin).await?,
            ..CompactReport::default()
        };
        let journal = self.coll::<JournalDoc>(JOURNAL);
        loop {
            let left = bounds.max_examined.saturating_sub(report.examined as usize);
            if left == 0 || report.floor >= up_to {
                break;
            }
            let limit = COMPACT_BATCH.min(i64::try_from(left).unwrap_or(i64::MAX));
            let from = to_i64(report.floor, "floor").map_err(|e| self.failed(e))?;
            let until = to_i64(up_to, "seq").map_err(|e| self.failed(e))?;
            let docs: Vec<JournalDoc> = self
                .collect(
                    journal
                        .find(doc! {"origin": origin, "seq": {"$gt": from, "$lte": until}})
                        .sort(doc! {"seq": 1})
                        .limit(limit),
                )
                .await?;
            let full = docs.len() as i64 == limit;
            let mut batch = Vec::with_capacity(docs.len());
            let mut too_new = false;
            for d in docs {
                let id = d.id.clone();
                let e = d.into_entry().map_err(|e| self.failed(e))?;
                if e.time_ms > bounds.older_than_ms {
                    too_new = true;
                    break;
                }
                let key = e.resource_id().map(|r| (e.data_type.clone(), r.to_owned()));
                batch.push((id, e.seq, e.action, key, e.time_ms));
            }
            let keys: Vec<(String, String)> = batch.iter().filter_map(|b| b.3.clone()).collect();
            let own = self.latest(OWN, &keys).await?;
            let gone = self.latest(GONE, &keys).await?;
            let mut remove: Vec<String> = Vec::new();
            let mut drop_gone: Vec<Bson> = Vec::new();
            for (id, seq, action, key, time_ms) in &batch {
                report.examined += 1;
                report.floor = *seq;
                let Some(key) = key else {
                    remove.push(id.clone());
                    report.removed += 1;
                    continue;
                };
                let (in_own, in_gone) = (own.get(key), gone.get(key));
                let superseded = if *action == Action::Delete {
                    match in_gone {
                        Some(Some(s)) => s != seq,
                        Some(None) => false,
                        // Re-created since, or a store without `oc_gone` yet: only the
                        // first is certain.
                        None => in_own.is_some(),
                    }
                } else {
                    match in_own {
                        Some(Some(s)) => s != seq,
                        Some(None) => false,
                        None => true,
                    }
                };
                if superseded {
                    remove.push(id.clone());
                    report.removed += 1;
                } else if *action == Action::Delete
                    && *time_ms <= bounds.tombstones_older_than_ms
                    && in_gone == Some(&Some(*seq))
                {
                    remove.push(id.clone());
                    drop_gone.push(Bson::Document(doc! {"data_type": &key.0, "id": &key.1}));
                    report.tombstones_dropped += 1;
                }
            }
            if !remove.is_empty() {
                journal
                    .delete_many(doc! {"_id": {"$in": remove}})
                    .await
                    .map_err(|e| self.failed(e))?;
            }
            if !drop_gone.is_empty() {
                self.coll::<Document>(GONE)
                    .delete_many(doc! {"_id": {"$in": drop_gone}})
                    .await
                    .map_err(|e| self.failed(e))?;
            }
            self.meta_set(&floor_key(origin), Some(report.floor.to_be_bytes().to_vec()))
                .await?;
            if too_new || !full {
                break;
            }
        }
        report.tombstones_dropped += self.drop_old_tombstones(origin, report.floor, bounds).await?;
        Ok(report)
    }

    async fn drop_old_tombstones(&self, origin: &str, floor: u64, bounds: CompactBounds) -> StoreResult<u64> {
        let floor = to_i64(floor, "floor").map_err(|e| self.failed(e))?;
        let mut cursor = self
            .coll::<Document>(GONE)
            .find(doc! {"seq": {"$lte": floor}})
            .await
            .map_err(|e| self.failed(e))?;
        let journal = self.coll::<JournalDoc>(JOURNAL);
        let mut dropped = 0;
        while let Some(d) = cursor.try_next().await.map_err(|e| self.failed(e))? {
            let (Some(key), Some(seq)) = (key_of(&d), seq_of(&d)) else {
                continue;
            };
            let id = format!("{origin}:{seq}");
            let Some(entry) = journal
                .find_one(doc! {"_id": &id})
                .await
                .map_err(|e| self.failed(e))?
            else {
                continue;
            };
            if to_u64(entry.time_ms, "time_ms").map_err(|e| self.failed(e))? > bounds.tombstones_older_than_ms
            {
                continue;
            }
            journal
                .delete_one(doc! {"_id": &id})
                .await
                .map_err(|e| self.failed(e))?;
            self.coll::<Document>(GONE)
                .delete_one(doc! {"_id": {"data_type": &key.0, "id": &key.1}})
                .await
                .map_err(|e| self.failed(e))?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// WiredTiger keeps the pages of removed documents for reuse; `compact` gives them
    /// back to the file system (MongoDB 6.0 needs `force` on a primary). Pages of documents
    /// removed within the snapshot history window (5 s by default) are not free yet: they
    /// come back at the next run. Returns the command's `bytesFreed`.
    pub(super) async fn reclaim(&self) -> StoreResult<u64> {
        self.ready().await?;
        // Pages of removed documents are free for `compact` only after a checkpoint.
        if let Err(e) = self.client.database("admin").run_command(doc! {"fsync": 1}).await {
            tracing::debug!(cause = %e, "mongodb: fsync refused; compact waits for the next checkpoint");
        }
        let reply = match self.db.run_command(doc! {"compact": JOURNAL}).await {
            Ok(reply) => reply,
            Err(first) => match self
                .db
                .run_command(doc! {"compact": JOURNAL, "force": true})
                .await
            {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::warn!(cause = %first, retry_cause = %e, "mongodb: compact refused; freed journal space is reused by later writes but not given back");
                    return Ok(0);
                }
            },
        };
        Ok(match reply.get("bytesFreed") {
            Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Double(f)) if *f > 0.0 => *f as u64,
            _ => 0,
        })
    }

    pub(super) async fn journal_storage(&self) -> StoreResult<u64> {
        self.ready().await?;
        let stats = self
            .db
            .run_command(doc! {"collStats": JOURNAL})
            .await
            .map_err(|e| self.failed(e))?;
        let n = |k: &str| match stats.get(k) {
            Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Double(f)) if *f >= 0.0 => *f as u64,
            _ => 0,
        };
        Ok(n("storageSize"))
    }

    pub(super) async fn count_own(&self) -> StoreResult<u64> {
        self.ready().await?;
        self.coll::<Document>(OWN)
            .count_documents(doc! {})
            .await
            .map_err(|e| self.failed(e))
    }

    pub(super) async fn snapshot(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        max_count: usize,
        max_bytes: usize,
    ) -> StoreResult<SnapshotPage> {
        self.ready().await?;
        let limit = i64::try_from(max_count.max(1)).unwrap_or(i64::MAX);
        let mut cursor = self
            .coll::<Document>(OWN)
            .find(after_filter(&after, "_id.data_type", "_id.id"))
            .sort(doc! {"_id.data_type": 1, "_id.id": 1})
            .projection(doc! {"_id": 1, "seq": 1})
            .limit(limit)
            .batch_size(256)
            .await
            .map_err(|e| self.failed(e))?;
        let journal = self.coll::<JournalDoc>(JOURNAL);
        let mut page = SnapshotPage::default();
        let mut bytes = 0usize;
        let mut full = false;
        while let Some(d) = cursor.try_next().await.map_err(|e| self.failed(e))? {
            let Some(key) = key_of(&d) else { continue };
            let raw = match seq_of(&d) {
                Some(seq) => {
                    let Some(doc) = journal
                        .find_one(doc! {"_id": format!("{origin}:{seq}")})
                        .await
                        .map_err(|e| self.failed(e))?
                    else {
                        return Err(self.failed(Failure::Corrupt(format!(
                            "oc_own points at missing journal seq {seq}"
                        ))));
                    };
                    RawEntry::encode(&doc.into_entry().map_err(|e| self.failed(e))?)?
                }
                // Indexed by an earlier version: its latest entry is the last one journaled
                // for the resource.
                None => match self.last_entry_of(origin, &key).await? {
                    Some(raw) => raw,
                    None => continue,
                },
            };
            bytes = bytes.saturating_add(raw.json.len());
            page.entries.push((key, raw));
            if page.entries.len() as i64 >= limit || bytes >= max_bytes {
                full = true;
                break;
            }
        }
        if full {
            page.next = page.entries.last().map(|(k, _)| k.clone());
        }
        Ok(page)
    }

    async fn last_entry_of(&self, origin: &str, key: &ResourceKey) -> StoreResult<Option<RawEntry>> {
        let mut cursor = self
            .coll::<JournalDoc>(JOURNAL)
            .find(doc! {"origin": origin, "data_type": &key.0})
            .sort(doc! {"seq": -1})
            .await
            .map_err(|e| self.failed(e))?;
        while let Some(d) = cursor.try_next().await.map_err(|e| self.failed(e))? {
            let e = d.into_entry().map_err(|e| self.failed(e))?;
            if e.resource_id() == Some(key.1.as_str()) {
                return Ok(Some(RawEntry::encode(&e)?));
            }
        }
        Ok(None)
    }

    pub(super) async fn of_origin(
        &self,
        origin: &str,
        after: Option<ResourceKey>,
        upto: Option<ResourceKey>,
        limit: usize,
    ) -> StoreResult<Vec<StoredResource>> {
        self.ready().await?;
        let filter = doc! {"$and": [
            {"origin": origin, "deleted": false},
            after_filter(&after, "data_type", "_id.id"),
            upto_filter(&upto, "data_type", "_id.id"),
        ]};
        let versions: Vec<VersionDoc> = self
            .collect(
                self.coll::<VersionDoc>(VERSIONS)
                    .find(filter)
                    .sort(doc! {"origin": 1, "data_type": 1, "_id.id": 1})
                    .limit(i64::try_from(limit.max(1)).unwrap_or(i64::MAX)),
            )
            .await?;
        let mut by_coll: HashMap<&str, Vec<&str>> = HashMap::new();
        for v in &versions {
            by_coll
                .entry(v.key.coll.as_str())
                .or_default()
                .push(v.key.id.as_str());
        }
        let mut live = HashMap::new();
        for (coll, ids) in by_coll {
            for (id, value) in self.documents(coll, ids).await? {
                live.insert((coll.to_owned(), id), value);
            }
        }
        versions
            .iter()
            .map(|v| {
                let mut one: HashMap<String, serde_json::Value> = HashMap::new();
                if let Some(value) = live.remove(&(v.key.coll.clone(), v.key.id.clone())) {
                    one.insert(v.key.id.clone(), value);
                }
                self.stored(v, &mut one)
            })
            .collect()
    }
}
