//! The journal commit: this node's own events appended with the next seqs, `oc_own` kept in
//! step for search answers, and the JetStream intake sequences recorded, in one transaction.

use std::collections::HashMap;

use mongodb::bson::{doc, Bson, Document};
use mongodb::ClientSession;
use serde::Serialize;

use super::bson::{seq_of, to_i64, to_u64, JournalDoc, NewJournalDoc};
use super::error::Failure;
use super::names::{GONE, JOURNAL, META, OWN};
use super::MongoStore;

/// An `oc_own` document as written: `_id` is `{data_type, id}`, in that order (what its
/// index and every reader compare), `seq` the resource's latest journal entry, which holds
/// its text (`own.rs` reads it there).
#[derive(Serialize)]
struct NewOwnDoc<'a> {
    #[serde(rename = "_id")]
    key: OwnKey<'a>,
    seq: i64,
}

#[derive(Serialize)]
struct OwnKey<'a> {
    data_type: &'a str,
    id: &'a str,
}
use crate::contract::{now_ms, Action, JournalEntry, NewEvent};

impl MongoStore {
    pub(super) async fn append_txn(
        &self,
        session: &mut ClientSession,
        origin: &str,
        events: &[NewEvent],
        intake_seqs: &[u64],
    ) -> Result<Vec<JournalEntry>, Failure> {
        let journal = self.coll::<JournalDoc>(JOURNAL);
        let head = journal
            .find_one(doc! {"origin": origin})
            .sort(doc! {"seq": -1})
            .session(&mut *session)
            .await?
            .map(|d| to_u64(d.seq, "seq"))
            .transpose()?
            .unwrap_or(0);
        let time_ms = now_ms();
        let entries: Vec<JournalEntry> = events
            .iter()
            .zip(head + 1..)
            .map(|(e, seq)| JournalEntry {
                origin: origin.to_owned(),
                seq,
                action: e.action,
                data_type: e.data_type.clone(),
                user: e.user.clone(),
                resource: e.resource.clone(),
                time_ms,
            })
            .collect();
        let docs = entries
            .iter()
            .map(NewJournalDoc::of)
            .collect::<Result<Vec<_>, _>>()?;
        self.coll::<NewJournalDoc<'_>>(JOURNAL)
            .insert_many(docs)
            .session(&mut *session)
            .await?;
        self.index_own(session, &entries).await?;
        if let (Some(last), false) = (entries.last(), intake_seqs.is_empty()) {
            self.mark_intake(session, intake_seqs, last.seq).await?;
        }
        Ok(entries)
    }

    /// Keeps `oc_own` (this node's resources as its journal leaves them, for search
    /// answers) in step with the journal, in the same transaction.
    pub(super) async fn index_own(
        &self,
        s: &mut ClientSession,
        entries: &[JournalEntry],
    ) -> Result<(), Failure> {
        // The last change of each resource in the batch wins.
        let mut last: HashMap<(&str, &str), &JournalEntry> = HashMap::new();
        for e in entries {
            if let Some(id) = e.resource_id() {
                last.insert((e.data_type.as_str(), id), e);
            }
        }
        if last.is_empty() {
            return Ok(());
        }
        let keys: Vec<Bson> = last
            .keys()
            .map(|(dt, id)| Bson::Document(doc! {"data_type": *dt, "id": *id}))
            .collect();
        let mut live: Vec<NewOwnDoc<'_>> = Vec::new();
        let mut gone: Vec<Document> = Vec::new();
        for ((dt, id), e) in &last {
            let seq = to_i64(e.seq, "seq")?;
            if e.action == Action::Delete {
                gone.push(doc! {"_id": {"data_type": *dt, "id": *id}, "seq": seq});
            } else {
                live.push(NewOwnDoc {
                    key: OwnKey { data_type: dt, id },
                    seq,
                });
            }
        }
        // Below the compaction floor only the latest entry of a resource stays: the ones
        // these entries supersede go in the same transaction.
        let origin = entries.first().map_or("", |e| e.origin.as_str());
        let floor = self
            .coll::<Document>(META)
            .find_one(doc! {"_id": format!("floor:{origin}")})
            .session(&mut *s)
            .await?
            .and_then(|d| d.get_binary_generic("value").ok().cloned())
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        if floor > 0 {
            let mut superseded: Vec<String> = Vec::new();
            for coll in [OWN, GONE] {
                let mut cursor = self
                    .coll::<Document>(coll)
                    .find(doc! {"_id": {"$in": keys.clone()}})
                    .projection(doc! {"seq": 1})
                    .session(&mut *s)
                    .await?;
                while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                    if let (Some(seq), Some(e)) = (seq_of(&d), entries.first()) {
                        if seq <= floor {
                            superseded.push(format!("{}:{seq}", e.origin));
                        }
                    }
                }
            }
            if !superseded.is_empty() {
                self.coll::<Document>(JOURNAL)
                    .delete_many(doc! {"_id": {"$in": superseded}})
                    .session(&mut *s)
                    .await?;
            }
        }
        self.coll::<Document>(OWN)
            .delete_many(doc! {"_id": {"$in": keys.clone()}})
            .session(&mut *s)
            .await?;
        if !live.is_empty() {
            self.coll::<NewOwnDoc<'_>>(OWN)
                .insert_many(live)
                .session(&mut *s)
                .await?;
        }
        let tombstones = self.coll::<Document>(GONE);
        tombstones
            .delete_many(doc! {"_id": {"$in": keys}})
            .session(&mut *s)
            .await?;
        if !gone.is_empty() {
            tombstones.insert_many(gone).session(&mut *s).await?;
        }
        Ok(())
    }
}
