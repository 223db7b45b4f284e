//! `oc_own` read back: this node's own resources, as its journal leaves them, for search
//! answers. A document points at the resource's latest journal entry (`seq`); documents
//! written before 2026-12-04 also hold the resource's text, which is used as it is. One copy
//! of each resource fewer per journaled event: `mongod`'s cost follows the bytes it writes
//! (docs/PERFORMANCE.md, "MongoDB: fewer documents per event").

use std::collections::HashMap;

use mongodb::bson::{doc, Document};

use super::bson::seq_of;
use super::error::Failure;
use super::names::{JOURNAL, OWN};
use super::MongoStore;
use crate::store::StoreResult;

/// One own resource: its id and its JSON text.
pub(super) type OwnText = (String, String);

/// What an `oc_own` document says of its resource.
enum Held {
    Text(String),
    At(u64),
}

fn read(d: &Document) -> Result<(String, Held), Failure> {
    let corrupt = |e: mongodb::bson::document::ValueAccessError| Failure::Corrupt(format!("oc_own: {e}"));
    let id = d
        .get_document("_id")
        .and_then(|k| k.get_str("id"))
        .map_err(corrupt)?;
    if let Ok(text) = d.get_str("resource") {
        return Ok((id.to_owned(), Held::Text(text.to_owned())));
    }
    let seq = seq_of(d).ok_or_else(|| Failure::Corrupt(format!("oc_own {id}: neither resource nor seq")))?;
    Ok((id.to_owned(), Held::At(seq)))
}

impl MongoStore {
    /// The texts of `docs` (of `oc_own`, one data type, in key order), in their order: read
    /// from the journal entries they point at, one query for all. A resource whose entry is
    /// gone was changed or removed meanwhile (compaction deletes the entries a newer one
    /// supersedes): its document is read again, and a resource removed meanwhile is left out.
    pub(super) async fn own_texts(
        &self,
        origin: &str,
        data_type: &str,
        docs: &[Document],
    ) -> StoreResult<Vec<OwnText>> {
        let mut held = docs
            .iter()
            .map(read)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.failed(e))?;
        for _ in 0..2 {
            let wanted: Vec<u64> = held
                .iter()
                .filter_map(|(_, h)| match h {
                    Held::At(seq) => Some(*seq),
                    Held::Text(_) => None,
                })
                .collect();
            if wanted.is_empty() {
                break;
            }
            let mut found = self.journal_texts(origin, &wanted).await?;
            let mut missing = Vec::new();
            for (i, (_, h)) in held.iter_mut().enumerate() {
                if let Held::At(seq) = h {
                    match found.remove(seq) {
                        Some(text) => *h = Held::Text(text),
                        None => missing.push(i),
                    }
                }
            }
            // Read again the documents whose entry was not there.
            for i in missing.into_iter().rev() {
                let key = doc! {"data_type": data_type, "id": &held[i].0};
                let again = self
                    .coll::<Document>(OWN)
                    .find_one(doc! {"_id": key})
                    .await
                    .map_err(|e| self.failed(e))?;
                match again.as_ref().map(read).transpose().map_err(|e| self.failed(e))? {
                    Some((_, Held::At(seq))) if matches!(held[i].1, Held::At(s) if s == seq) => {
                        return Err(self.failed(Failure::Corrupt(format!(
                            "oc_own points at missing journal seq {seq}"
                        ))));
                    }
                    Some((_, now)) => held[i].1 = now,
                    None => {
                        held.remove(i);
                    }
                }
            }
        }
        held.into_iter()
            .map(|(id, h)| match h {
                Held::Text(text) => Ok((id, text)),
                Held::At(seq) => Err(self.failed(Failure::Corrupt(format!(
                    "oc_own {id}: journal seq {seq} changed twice while read"
                )))),
            })
            .collect()
    }

    /// The resource texts of `origin`'s journal entries `seqs`, by seq.
    async fn journal_texts(&self, origin: &str, seqs: &[u64]) -> StoreResult<HashMap<u64, String>> {
        let ids: Vec<String> = seqs.iter().map(|seq| format!("{origin}:{seq}")).collect();
        let docs: Vec<Document> = self
            .collect(
                self.coll::<Document>(JOURNAL)
                    .find(doc! {"_id": {"$in": ids}})
                    .projection(doc! {"seq": 1, "resource": 1}),
            )
            .await?;
        let mut out = HashMap::with_capacity(docs.len());
        for d in docs {
            let seq = seq_of(&d);
            let (Some(seq), Ok(text)) = (seq, d.get_str("resource")) else {
                return Err(self.failed(Failure::Corrupt(format!(
                    "oc_journal: {d:?} has no seq or resource"
                ))));
            };
            out.insert(seq, text.to_owned());
        }
        Ok(out)
    }
}
