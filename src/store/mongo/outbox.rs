//! The outbox's payloads made again from the applied log. An apply writes each outbox row
//! without its notice's body: the applied-log row of the same id, written in the same
//! transaction, holds the entry the body is made from, and trimming the applied log keeps
//! every row the outbox still owes. The body is only needed when a row is read back (after a
//! restart, or for an entry delivered again): the apply hands the rows it writes to the
//! publisher with their bodies.

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};

use super::bson::{to_i64, StoredApplied};
use super::error::Failure;
use super::names::{APPLIED_LOG, OUTBOX};
use super::MongoStore;
use crate::contract::ResourceNotice;
use crate::store::{AppliedRecord, OutboxRow};

impl MongoStore {
    /// Fills the payload of `rows[i]` for each `i` of `in_log` from the applied log.
    pub(super) async fn payloads_from_log(
        &self,
        rows: &mut [OutboxRow],
        in_log: &[usize],
    ) -> Result<(), Failure> {
        let ids: Vec<i64> = in_log
            .iter()
            .filter_map(|&i| rows.get(i))
            .map(|r| to_i64(r.id, "outbox id"))
            .collect::<Result<_, _>>()?;
        let (Some(&low), Some(&high)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(());
        };
        // Groups hold ascending, disjoint key ranges: from the newest one starting at or
        // below `high`, back to the first that ends below `low`; of each, only the rows asked.
        let mut cursor = self
            .coll::<StoredApplied>(APPLIED_LOG)
            .find(doc! {"_id": {"$lte": high}})
            .sort(doc! {"_id": -1})
            .projection(doc! {
                "last": 1, "json": 1,
                "rows": {"$filter": {"input": "$rows", "cond": {"$in": ["$$this._id", &ids]}}},
            })
            .await?;
        let mut json: HashMap<i64, String> = HashMap::with_capacity(ids.len());
        while let Some(group) = cursor.try_next().await? {
            if group.last() < low {
                break;
            }
            for row in group.into_rows() {
                json.insert(row.key, row.json);
            }
        }
        for &i in in_log {
            let Some(row) = rows.get_mut(i) else { continue };
            let key = to_i64(row.id, "outbox id")?;
            let text = json.get(&key).ok_or_else(|| {
                Failure::Corrupt(format!("outbox row {}: its applied-log row is gone", row.id))
            })?;
            let record: AppliedRecord = serde_json::from_str(text)
                .map_err(|e| Failure::Corrupt(format!("applied log row {key}: {e}")))?;
            row.payload = ResourceNotice::body_of(&record.entry);
        }
        Ok(())
    }

    /// The lowest id the outbox may still owe (a group's `_id` is its first row's, which
    /// its removals never lower): the applied log keeps the rows from there on.
    pub(super) async fn oldest_owed(&self) -> Result<Option<i64>, Failure> {
        let oldest = self
            .coll::<Document>(OUTBOX)
            .find_one(doc! {})
            .sort(doc! {"_id": 1})
            .projection(doc! {"_id": 1})
            .await?;
        // An `_id` of another type (written by another hand) keeps the whole log.
        Ok(oldest.map(|d| match d.get("_id") {
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Int32(n)) => i64::from(*n),
            _ => i64::MIN,
        }))
    }
}
