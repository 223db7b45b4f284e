//! The apply commit: a partner's batch read, decided and written in one transaction (the
//! resources, their versions, the outbox rows and the applied mark), and entry by entry when
//! MongoDB refuses a document the checks did not foresee.

use std::collections::{HashMap, HashSet};

use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use mongodb::ClientSession;

use super::bson::{
    grouped, to_i64, to_u64, AppliedLogDoc, AppliedLogGroup, NewOutboxDoc, NewOutboxGroup, NewVersionDoc,
    StoredOutbox, VersionDoc, VersionKey, GROUP_BYTES,
};
use super::error::Failure;
use super::names::{APPLIED, APPLIED_LOG, COUNTERS, OUTBOX, OUTBOX_COUNTER, OWN, VERSIONS};
use super::plan::{decide_batch, Decisions, OwnKeys, Planned, Site};
use super::MongoStore;
use crate::contract::JournalEntry;
use crate::store::{outbox_row, AppliedRef, ApplyOutcome, OutboxRow, SiteDoc, StoreResult};

impl MongoStore {
    /// [`Store::apply_batch`] on borrowed entries.
    pub(super) async fn apply_entries(
        &self,
        origin: &str,
        up_to: u64,
        entries: &[JournalEntry],
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
        self.ready().await?;
        let plan = self.plan(entries).await?;
        let _writer = self.writer.lock().await;
        self.apply_isolating(origin, up_to, &plan).await
    }

    /// Runs [`Self::apply_txn`] as a transaction, again on transient errors.
    pub(super) async fn apply_transaction(
        &self,
        origin: &str,
        up_to: u64,
        plan: &[Planned<'_>],
    ) -> Result<(Vec<ApplyOutcome>, Vec<OutboxRow>), Failure> {
        let mut attempt = 1;
        loop {
            let mut session = self.begin().await?;
            let body = self.apply_txn(&mut session, origin, up_to, plan).await;
            if let Some(done) = self.finish(session, body, attempt).await? {
                return Ok(done);
            }
            attempt += 1;
        }
    }

    /// The body of one apply: read the versions the batch touches, decide each entry in
    /// order with the shared rule, then write the final state of each resource, the
    /// versions, the outbox rows and the applied mark.
    pub(super) async fn apply_txn(
        &self,
        s: &mut ClientSession,
        origin: &str,
        up_to: u64,
        plan: &[Planned<'_>],
    ) -> Result<(Vec<ApplyOutcome>, Vec<OutboxRow>), Failure> {
        let keys: Vec<&VersionKey> = plan
            .iter()
            .filter_map(|p| p.target.as_ref()?.as_ref().ok().map(|t| &t.key))
            .collect();
        let stored = self.load_versions(s, &keys).await?;
        let own = self.load_own(s, plan).await?;
        let documents = self.load_documents(s, &keys).await?;
        // The documents there are to replace or remove; an id without one needs no delete.
        let present: HashSet<VersionKey> = documents.keys().cloned().collect();
        let site = Site { own, documents };
        let Decisions {
            mut outcomes,
            changes,
            answered_before,
        } = decide_batch(plan, &stored, site)?;
        let mut rows = self
            .recover_rows(s, plan, &answered_before, &mut outcomes)
            .await?;
        let first_id = self.allocate_outbox_ids(s, changes.len()).await?;
        let new_rows: Vec<(usize, OutboxRow)> = changes
            .iter()
            .zip(first_id..)
            .filter_map(|(&i, id)| {
                // Only entries with a document to write get a row.
                plan[i].target.as_ref()?.as_ref().ok()?;
                Some((i, outbox_row(plan[i].entry, id)))
            })
            .collect();
        self.write_changes(s, plan, &changes, &stored, &present).await?;
        self.insert_outbox(s, plan, &new_rows).await?;
        self.insert_applied_log(s, plan, &new_rows).await?;
        rows.extend(new_rows);
        rows.sort_by_key(|(i, _)| *i);
        self.coll::<Document>(APPLIED)
            .update_one(
                doc! {"_id": origin},
                doc! {"$max": {"seq": to_i64(up_to, "applied seq")?}},
            )
            .upsert(true)
            .session(&mut *s)
            .await?;
        Ok((outcomes, rows.into_iter().map(|(_, r)| r).collect()))
    }

    /// Writes the rows of one apply as outbox groups ([`NewOutboxGroup`]): one document for
    /// the batch, more only when its payloads exceed [`GROUP_BYTES`] (or, against the
    /// contract of [`crate::store::Store::apply_batch`], its entries come from more than one
    /// origin: a group names one).
    pub(super) async fn insert_outbox(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
        rows: &[(usize, OutboxRow)],
    ) -> Result<(), Failure> {
        let mut groups = Vec::new();
        let same_origin = |(a, _): &(usize, OutboxRow), (b, _): &(usize, OutboxRow)| {
            plan[*a].entry.origin == plan[*b].entry.origin
        };
        for run in rows.chunk_by(same_origin) {
            for rows in grouped(
                run,
                |(_, r)| r.payload.len().saturating_add(r.msg_id.len()),
                GROUP_BYTES,
            ) {
                let (Some((i, first)), Some((_, last))) = (rows.first(), rows.last()) else {
                    continue;
                };
                let seqs = rows.iter().map(|(i, _)| plan[*i].entry.seq);
                let (lo, hi) = (seqs.clone().min().unwrap_or(0), seqs.max().unwrap_or(0));
                groups.push(NewOutboxGroup {
                    first: to_i64(first.id, "outbox id")?,
                    last: to_i64(last.id, "outbox id")?,
                    origin: &plan[*i].entry.origin,
                    lo: to_i64(lo, "seq")?,
                    hi: to_i64(hi, "seq")?,
                    // The applied-log row of the same id makes the payload again.
                    rows: rows
                        .iter()
                        .map(|(_, r)| NewOutboxDoc::pointing(r))
                        .collect::<Result<Vec<_>, _>>()?,
                });
            }
        }
        if groups.is_empty() {
            return Ok(());
        }
        self.coll::<NewOutboxGroup<'_>>(OUTBOX)
            .insert_many(groups)
            .session(&mut *s)
            .await?;
        Ok(())
    }

    /// One applied-log row per new outbox row, keyed by its id, in the apply's transaction:
    /// one group document for the batch ([`AppliedLogGroup`]), more beyond [`GROUP_BYTES`].
    async fn insert_applied_log(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
        rows: &[(usize, OutboxRow)],
    ) -> Result<(), Failure> {
        if rows.is_empty() {
            return Ok(());
        }
        let applied_ms = crate::contract::now_ms();
        let mut docs = Vec::with_capacity(rows.len());
        for (i, row) in rows {
            let logged = AppliedRef {
                key: row.id,
                applied_ms,
                entry: plan[*i].entry,
            };
            let json = serde_json::to_string(&logged).map_err(|e| Failure::Corrupt(e.to_string()))?;
            docs.push(AppliedLogDoc {
                key: to_i64(row.id, "applied log key")?,
                json,
            });
        }
        let mut groups = Vec::new();
        for rows in grouped(docs, |d| d.json.len(), GROUP_BYTES) {
            let (Some(first), Some(last)) = (rows.first().map(|d| d.key), rows.last().map(|d| d.key)) else {
                continue;
            };
            groups.push(AppliedLogGroup { first, last, rows });
        }
        self.coll::<AppliedLogGroup>(APPLIED_LOG)
            .insert_many(groups)
            .session(&mut *s)
            .await?;
        Ok(())
    }

    pub(super) async fn load_versions(
        &self,
        s: &mut ClientSession,
        keys: &[&VersionKey],
    ) -> Result<HashMap<VersionKey, VersionDoc>, Failure> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Bson> = keys.iter().map(|k| k.to_bson()).collect();
        let mut cursor = self
            .coll::<VersionDoc>(VERSIONS)
            .find(doc! {"_id": {"$in": ids}})
            .session(&mut *s)
            .await?;
        let mut out = HashMap::new();
        while let Some(v) = cursor.next(&mut *s).await.transpose()? {
            out.insert(v.key.clone(), v);
        }
        Ok(out)
    }

    /// Which of the batch's (data type, id) are this node's own live resources (`oc_own`):
    /// read in the apply transaction, and appends take the same writer lock, so none slips
    /// between the read and the commit.
    pub(super) async fn load_own(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
    ) -> Result<OwnKeys, Failure> {
        let mut keys: Vec<Bson> = Vec::new();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        for p in plan {
            let Some(Ok(t)) = &p.target else { continue };
            if seen.insert((p.entry.data_type.as_str(), t.key.id.as_str())) {
                // Field order as `index_own` writes the `_id`: an `_id` matches exactly.
                keys.push(Bson::Document(
                    doc! {"data_type": &p.entry.data_type, "id": &t.key.id},
                ));
            }
        }
        let mut own = OwnKeys::new();
        if keys.is_empty() {
            return Ok(own);
        }
        let mut cursor = self
            .coll::<Document>(OWN)
            .find(doc! {"_id": {"$in": keys}})
            .projection(doc! {"_id": 1})
            .session(&mut *s)
            .await?;
        while let Some(d) = cursor.next(&mut *s).await.transpose()? {
            let key = d
                .get_document("_id")
                .ok()
                .and_then(|k| Some((k.get_str("data_type").ok()?, k.get_str("id").ok()?)));
            if let Some((data_type, id)) = key {
                own.entry(data_type.to_owned()).or_default().insert(id.to_owned());
            }
        }
        Ok(own)
    }

    /// The documents under the batch's ids in their collections, whoever wrote them, by
    /// their `creator_id` (one `find` per collection, only `creator_id` fetched).
    pub(super) async fn load_documents(
        &self,
        s: &mut ClientSession,
        keys: &[&VersionKey],
    ) -> Result<HashMap<VersionKey, SiteDoc>, Failure> {
        let mut by_coll: HashMap<&str, Vec<&str>> = HashMap::new();
        for k in keys {
            by_coll.entry(&k.coll).or_default().push(&k.id);
        }
        let mut out = HashMap::new();
        for (coll, ids) in by_coll {
            let mut cursor = self
                .coll::<Document>(coll)
                .find(doc! {"_id": {"$in": ids}})
                .projection(doc! {"creator_id": 1})
                .session(&mut *s)
                .await?;
            while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                // Only string `_id`s can match the `$in` of string ids.
                let Ok(id) = d.get_str("_id") else { continue };
                let key = VersionKey {
                    coll: coll.to_owned(),
                    id: id.to_owned(),
                };
                let creator_id = d.get_str("creator_id").ok().map(str::to_owned);
                out.insert(key, SiteDoc { creator_id });
            }
        }
        Ok(out)
    }

    /// An entry whose exact version is stored and whose outbox row is still pending was
    /// applied by an earlier attempt whose answer was lost (a commit reported failed, or
    /// MongoDB restarting mid-commit): it is reported applied again, with that row, so
    /// it is published and counted once.
    pub(super) async fn recover_rows(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
        candidates: &[usize],
        outcomes: &mut [ApplyOutcome],
    ) -> Result<Vec<(usize, OutboxRow)>, Failure> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let msg_ids: Vec<String> = candidates.iter().map(|&i| plan[i].entry.msg_id()).collect();
        // Groups of their origin whose seqs reach theirs (`origin_hi_lo`), and rows of their
        // own written by versions before the groups (`msg_id`).
        let mut reach: HashMap<&str, (u64, u64)> = HashMap::new();
        for &i in candidates {
            let e = plan[i].entry;
            let r = reach.entry(e.origin.as_str()).or_insert((e.seq, e.seq));
            *r = (r.0.min(e.seq), r.1.max(e.seq));
        }
        let mut any: Vec<Document> = Vec::with_capacity(reach.len() + 1);
        for (origin, (lo, hi)) in reach {
            any.push(doc! {"origin": origin, "hi": {"$gte": to_i64(lo, "seq")?}, "lo": {"$lte": to_i64(hi, "seq")?}});
        }
        any.push(doc! {"msg_id": {"$in": &msg_ids}});
        let mut cursor = self
            .coll::<StoredOutbox>(OUTBOX)
            .find(doc! {"$or": any})
            // Of a group only the rows asked for come back, not the whole apply's.
            .projection(doc! {
                "rows": {"$filter": {"input": "$rows", "cond": {"$in": ["$$this.msg_id", &msg_ids]}}},
                "subject": 1, "msg_id": 1, "payload": 1,
            })
            .session(&mut *s)
            .await?;
        let wanted: HashSet<&str> = msg_ids.iter().map(String::as_str).collect();
        let (mut found, mut in_log) = (Vec::new(), Vec::new());
        while let Some(d) = cursor.next(&mut *s).await.transpose()? {
            let base = found.len();
            found.extend(d.into_rows(base, &mut in_log)?);
        }
        // Committed by the earlier attempt, so readable outside this transaction.
        self.payloads_from_log(&mut found, &in_log).await?;
        let mut pending: HashMap<String, OutboxRow> = HashMap::new();
        for row in found {
            if wanted.contains(row.msg_id.as_str()) {
                pending.insert(row.msg_id.clone(), row);
            }
        }
        let mut rows = Vec::new();
        for (&i, msg_id) in candidates.iter().zip(&msg_ids) {
            if let Some(row) = pending.remove(msg_id) {
                tracing::info!(%msg_id, "mongodb: entry was stored by an attempt whose answer was lost");
                outcomes[i] = ApplyOutcome::Applied;
                rows.push((i, row));
            }
        }
        Ok(rows)
    }

    /// Reserves `n` consecutive outbox ids and returns the first. Ids only grow, so a row
    /// removed after publishing is never confused with a newer one.
    pub(super) async fn allocate_outbox_ids(&self, s: &mut ClientSession, n: usize) -> Result<u64, Failure> {
        if n == 0 {
            return Ok(0);
        }
        let counter = self
            .coll::<Document>(COUNTERS)
            .find_one_and_update(
                doc! {"_id": OUTBOX_COUNTER},
                doc! {"$inc": {"last": to_i64(n as u64, "outbox count")?}},
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .session(&mut *s)
            .await?
            .ok_or_else(|| Failure::Corrupt("outbox counter missing after upsert".to_owned()))?;
        let last = counter
            .get_i64("last")
            .map_err(|e| Failure::Corrupt(format!("outbox counter: {e}")))?;
        Ok(to_u64(last, "outbox counter")? + 1 - n as u64)
    }

    /// Writes the final state of every resource the batch changed: its document replaced
    /// (or removed for a delete) and its version. Batched per collection: a few round
    /// trips per batch whatever its size. `present` are the documents the transaction read
    /// under the batch's keys: only those are deleted before the inserts (a `$in` delete of
    /// ids that hold nothing still costs the server a lookup each).
    pub(super) async fn write_changes(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
        changes: &[usize],
        stored: &HashMap<VersionKey, VersionDoc>,
        present: &HashSet<VersionKey>,
    ) -> Result<(), Failure> {
        // The last change of each resource wins; earlier ones in the batch were
        // superseded before anyone could read them.
        let mut last: HashMap<&VersionKey, usize> = HashMap::new();
        for &i in changes {
            if let Some(Ok(t)) = &plan[i].target {
                last.insert(&t.key, i);
            }
        }
        let mut finals: Vec<usize> = last.into_values().collect();
        finals.sort_unstable();
        let mut ids_by_coll: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut docs_by_coll: HashMap<&str, Vec<&Document>> = HashMap::new();
        let mut version_ids = Vec::with_capacity(finals.len());
        let mut versions = Vec::with_capacity(finals.len());
        for &i in &finals {
            let Some(Ok(t)) = &plan[i].target else {
                continue;
            };
            let entry = plan[i].entry;
            if present.contains(&t.key) {
                ids_by_coll.entry(&t.key.coll).or_default().push(&t.key.id);
            }
            if let Some(d) = &t.doc {
                docs_by_coll.entry(&t.key.coll).or_default().push(d);
            }
            // Only versions that exist need replacing: nothing else writes them.
            if stored.contains_key(&t.key) {
                version_ids.push(t.key.to_bson());
            }
            versions.push(NewVersionDoc {
                key: &t.key,
                data_type: &entry.data_type,
                origin: &entry.origin,
                version: to_i64(entry.seq, "seq")?,
                deleted: t.doc.is_none(),
                tombstone: t.doc.is_none().then(|| entry.resource.json()),
            });
        }
        for (coll, ids) in &ids_by_coll {
            self.coll::<Document>(coll)
                .delete_many(doc! {"_id": {"$in": ids}})
                .session(&mut *s)
                .await?;
        }
        for (coll, docs) in &docs_by_coll {
            self.coll::<Document>(coll)
                .insert_many(docs.iter().copied())
                .session(&mut *s)
                .await?;
        }
        if !versions.is_empty() {
            let coll = self.coll::<NewVersionDoc<'_>>(VERSIONS);
            if !version_ids.is_empty() {
                coll.delete_many(doc! {"_id": {"$in": version_ids}})
                    .session(&mut *s)
                    .await?;
            }
            coll.insert_many(&versions).session(&mut *s).await?;
        }
        Ok(())
    }

    /// Applies a batch in one transaction; if MongoDB refuses one of its documents in a
    /// way the checks did not foresee, applies it entry by entry so that only the refused
    /// entry is rejected.
    pub(super) async fn apply_isolating(
        &self,
        origin: &str,
        up_to: u64,
        plan: &[Planned<'_>],
    ) -> StoreResult<(Vec<ApplyOutcome>, Vec<OutboxRow>)> {
        let err = match self.apply_transaction(origin, up_to, plan).await {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        let Some(reason) = err.refused_document() else {
            return Err(self.failed(err));
        };
        tracing::warn!(%origin, entries = plan.len(), %reason, "mongodb refused a document of the batch; applying it entry by entry");
        let mut outcomes = Vec::with_capacity(plan.len());
        let mut rows = Vec::new();
        for p in plan {
            match self
                .apply_transaction(origin, p.entry.seq, std::slice::from_ref(p))
                .await
            {
                Ok((o, r)) => {
                    outcomes.extend(o);
                    rows.extend(r);
                }
                Err(e) => match e.refused_document() {
                    Some(reason) => outcomes.push(ApplyOutcome::Rejected { reason }),
                    None => return Err(self.failed(e)),
                },
            }
        }
        // The applied mark covers the whole batch, rejected entries included.
        self.apply_transaction(origin, up_to, &[])
            .await
            .map_err(|e| self.failed(e))?;
        Ok((outcomes, rows))
    }
}
