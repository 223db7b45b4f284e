//! Planning an apply: every inbound entry checked and converted before the transaction
//! starts ([`Planned`]), then the whole batch decided in order with the shared version rule
//! ([`decide_batch`], pure: no MongoDB in it) before anything is written.

use std::collections::{HashMap, HashSet};

use mongodb::bson::Document;

use super::bson::{resource_document, to_u64, VersionDoc, VersionKey};
use super::error::Failure;
use super::names::collection_for;
use super::MongoStore;
use crate::contract::{Action, JournalEntry};
use crate::store::{decide_at, ApplyOutcome, Holder, Local, SiteDoc, StoreResult};

/// One inbound entry, checked and converted before the transaction starts.
pub(super) struct Planned<'a> {
    pub(super) entry: &'a JournalEntry,
    /// `None`: no resource id (nothing to apply); `Err`: MongoDB cannot hold it.
    pub(super) target: Option<Result<Target, String>>,
}

pub(super) struct Target {
    pub(super) key: VersionKey,
    /// The document to store; `None` for a delete.
    pub(super) doc: Option<Document>,
}

impl MongoStore {
    /// Checks and converts every entry; makes their collections exist.
    pub(super) async fn plan<'a>(&self, entries: &'a [JournalEntry]) -> StoreResult<Vec<Planned<'a>>> {
        let mut refused_names: HashMap<String, String> = HashMap::new();
        let mut planned = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(id) = entry.resource_id() else {
                planned.push(Planned { entry, target: None });
                continue;
            };
            let target = match collection_for(self.db.name(), &entry.data_type) {
                Err(reason) => Err(reason),
                Ok(coll) => {
                    if !refused_names.contains_key(&coll) {
                        if let Err(reason) = self.ensure_collection(&coll).await? {
                            refused_names.insert(coll.clone(), reason);
                        }
                    }
                    match refused_names.get(&coll) {
                        Some(reason) => Err(reason.clone()),
                        None => self.target(entry, coll, id),
                    }
                }
            };
            planned.push(Planned {
                entry,
                target: Some(target),
            });
        }
        Ok(planned)
    }

    pub(super) fn target(&self, entry: &JournalEntry, coll: String, id: &str) -> Result<Target, String> {
        let doc = match entry.action {
            Action::Delete => None,
            Action::Create | Action::Update => Some(resource_document(id, &entry.resource.to_value())?),
        };
        Ok(Target {
            key: VersionKey {
                coll,
                id: id.to_owned(),
            },
            doc,
        })
    }
}

/// What a batch does, decided before anything is written.
pub(super) struct Decisions {
    pub(super) outcomes: Vec<ApplyOutcome>,
    /// Indexes of the entries that change the store, in order.
    pub(super) changes: Vec<usize>,
    /// Indexes of the entries whose exact version is already stored (a lost answer?).
    pub(super) answered_before: Vec<usize>,
}

/// Ids of this node's own live resources by data type: looked up with borrowed keys.
pub(super) type OwnKeys = HashMap<String, HashSet<String>>;

/// What the site holds under the batch's keys besides the version rows, read before
/// deciding ([`decide_at`]).
pub(super) struct Site {
    /// This node's own live resources among the batch's keys.
    pub(super) own: OwnKeys,
    /// The documents in the collections, whoever wrote them.
    pub(super) documents: HashMap<VersionKey, SiteDoc>,
}

/// Decides every entry in order with the shared rule ([`decide_at`]), each against the
/// state the entries before it in the batch produced.
pub(super) fn decide_batch(
    plan: &[Planned<'_>],
    stored: &HashMap<VersionKey, VersionDoc>,
    mut site: Site,
) -> Result<Decisions, Failure> {
    let mut state: HashMap<&VersionKey, Holder> = HashMap::new();
    for (key, v) in stored {
        let holder = Holder {
            origin: v.origin.clone(),
            version: to_u64(v.version, "version")?,
            deleted: v.deleted,
        };
        state.insert(key, holder);
    }
    let mut d = Decisions {
        outcomes: Vec::with_capacity(plan.len()),
        changes: Vec::new(),
        answered_before: Vec::new(),
    };
    for (i, p) in plan.iter().enumerate() {
        let outcome = match &p.target {
            None => ApplyOutcome::Stale,
            Some(Err(reason)) => ApplyOutcome::Rejected {
                reason: reason.clone(),
            },
            Some(Ok(t)) => {
                let existing = state.get(&t.key);
                // Looked up by reference: deciding an entry copies nothing.
                let local = Local {
                    own: site
                        .own
                        .get(&p.entry.data_type)
                        .is_some_and(|ids| ids.contains(&t.key.id)),
                    document: site.documents.get(&t.key),
                };
                let outcome = decide_at(existing, &local, p.entry);
                if outcome == ApplyOutcome::Applied {
                    let now = Holder {
                        origin: p.entry.origin.clone(),
                        version: p.entry.seq,
                        deleted: t.doc.is_none(),
                    };
                    state.insert(&t.key, now);
                    // The entries after it see the document this one leaves.
                    match &t.doc {
                        Some(_) => site.documents.insert(
                            t.key.clone(),
                            SiteDoc {
                                creator_id: Some(p.entry.origin.clone()),
                            },
                        ),
                        None => site.documents.remove(&t.key),
                    };
                    d.changes.push(i);
                } else if outcome == ApplyOutcome::Stale
                    && existing.is_some_and(|e| e.origin == p.entry.origin && e.version == p.entry.seq)
                {
                    d.answered_before.push(i);
                }
                outcome
            }
        };
        d.outcomes.push(outcome);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Owner;

    const ORIGIN: &str = "12D3KooWorigin";
    const DATA_TYPE: &str = "COMPUTE_RESOURCE";

    fn entry(seq: u64, action: Action) -> JournalEntry {
        JournalEntry {
            origin: ORIGIN.into(),
            seq,
            action,
            data_type: DATA_TYPE.into(),
            user: "u".into(),
            resource: serde_json::json!({"id": "r1", "creator_id": ORIGIN}).into(),
            time_ms: 1,
        }
    }

    fn key() -> VersionKey {
        VersionKey {
            coll: "compute_resource".into(),
            id: "r1".into(),
        }
    }

    fn planned(entry: &JournalEntry) -> Planned<'_> {
        let doc = (entry.action != Action::Delete).then(Document::new);
        Planned {
            entry,
            target: Some(Ok(Target { key: key(), doc })),
        }
    }

    fn empty_site() -> Site {
        Site {
            own: OwnKeys::new(),
            documents: HashMap::new(),
        }
    }

    fn stored(version: i64) -> HashMap<VersionKey, VersionDoc> {
        let v = VersionDoc {
            key: key(),
            data_type: DATA_TYPE.into(),
            origin: ORIGIN.into(),
            version,
            deleted: false,
            tombstone: None,
        };
        HashMap::from([(key(), v)])
    }

    #[test]
    fn each_entry_is_decided_against_the_state_the_ones_before_it_leave() {
        use Action::{Create, Delete, Update};
        let entries = [
            entry(1, Create),
            entry(2, Update),
            entry(2, Update),
            entry(3, Delete),
            entry(4, Update),
        ];
        let plan: Vec<_> = entries.iter().map(planned).collect();
        let d = decide_batch(&plan, &HashMap::new(), empty_site()).unwrap();
        use ApplyOutcome::{Applied, Stale};
        assert_eq!(d.outcomes, [Applied, Applied, Stale, Applied, Applied]);
        assert_eq!(d.changes, [0, 1, 3, 4], "the document the node wrote is its own");
        assert_eq!(
            d.answered_before,
            [2],
            "the exact version is held: a candidate for a lost answer"
        );
    }

    #[test]
    fn stored_versions_own_resources_and_site_documents_are_read() {
        let site_with_node_doc = || Site {
            documents: HashMap::from([(
                key(),
                SiteDoc {
                    creator_id: Some(ORIGIN.into()),
                },
            )]),
            ..empty_site()
        };
        let again = entry(5, Action::Update);
        let d = decide_batch(&[planned(&again)], &stored(5), site_with_node_doc()).unwrap();
        assert_eq!(
            (d.outcomes, d.answered_before),
            (vec![ApplyOutcome::Stale], vec![0])
        );
        let newer = entry(6, Action::Update);
        let d = decide_batch(&[planned(&newer)], &stored(5), site_with_node_doc()).unwrap();
        assert_eq!((d.outcomes, d.changes), (vec![ApplyOutcome::Applied], vec![0]));

        let d = decide_batch(&[planned(&newer)], &HashMap::new(), site_with_node_doc()).unwrap();
        let site_document = ApplyOutcome::Conflict {
            owner: Owner::SiteDocument,
        };
        assert_eq!(
            d.outcomes,
            [site_document],
            "a document without a version row is the site's"
        );

        let mut own = empty_site();
        own.own.entry(DATA_TYPE.into()).or_default().insert("r1".into());
        let d = decide_batch(&[planned(&newer)], &HashMap::new(), own).unwrap();
        let this_node = ApplyOutcome::Conflict {
            owner: Owner::ThisNode,
        };
        assert_eq!((d.outcomes, d.changes.len()), (vec![this_node], 0));
    }

    #[test]
    fn entries_without_an_id_or_a_storable_document_change_nothing() {
        let e = entry(1, Action::Create);
        let plan = [
            Planned {
                entry: &e,
                target: None,
            },
            Planned {
                entry: &e,
                target: Some(Err("refused".into())),
            },
        ];
        let d = decide_batch(&plan, &HashMap::new(), empty_site()).unwrap();
        let rejected = ApplyOutcome::Rejected {
            reason: "refused".into(),
        };
        assert_eq!(d.outcomes, [ApplyOutcome::Stale, rejected]);
        assert!(d.changes.is_empty());
    }
}
