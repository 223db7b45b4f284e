//! The schema: the bookkeeping collections and their indexes, created by the first
//! operation that reaches MongoDB, the topology check (transactions need a replica set),
//! and the resource collections, made to exist before a transaction writes to them.

use mongodb::bson::{doc, Document};
use mongodb::error::Error as MongoError;
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

use super::error::{server_code, Failure, INDEX_NOT_FOUND, INVALID_NAMESPACE, NAMESPACE_EXISTS};
use super::names::{
    APPLIED, APPLIED_LOG, COUNTERS, CURSORS, GONE, INTAKE, JOURNAL, META, OUTBOX, OWN, PEERS, VERSIONS,
};
use super::MongoStore;
use crate::store::StoreResult;

impl MongoStore {
    /// Creates the bookkeeping collections and their indexes once; retried by the next
    /// call after a failure.
    pub(super) async fn ready(&self) -> StoreResult<()> {
        self.setup
            .get_or_try_init(|| async {
                let r = self.create_schema().await;
                if let Err(e) = &r {
                    tracing::warn!(cause = %e, "mongodb: cannot create collections and indexes yet");
                }
                r
            })
            .await
            .map(|_| ())
            .map_err(|e| self.failed(e))
    }

    pub(super) async fn create_schema(&self) -> Result<(), Failure> {
        self.check_topology().await?;
        for name in [
            JOURNAL,
            CURSORS,
            APPLIED,
            APPLIED_LOG,
            VERSIONS,
            OUTBOX,
            COUNTERS,
            PEERS,
            INTAKE,
            OWN,
            GONE,
            META,
        ] {
            self.create_collection(name).await?;
        }
        let indexes = [
            (JOURNAL, doc! {"origin": 1, "seq": 1}, "origin_seq", true),
            (VERSIONS, doc! {"_id.coll": 1, "_id.id": 1}, "coll_id", false),
            (OWN, doc! {"_id.data_type": 1, "_id.id": 1}, "data_type_id", false),
            (GONE, doc! {"seq": 1}, "seq", false),
            // The runs of journaled stream sequences that reach a batch, the highest one.
            (INTAKE, doc! {"hi": 1}, "hi", false),
            // A snapshot receiver's sweep: one origin's resources in key order.
            (
                VERSIONS,
                doc! {"origin": 1, "data_type": 1, "_id.id": 1},
                "origin_key",
                false,
            ),
            // The groups an entry delivered twice may be in: one key per group.
            (
                OUTBOX,
                doc! {"origin": 1, "hi": 1, "lo": 1},
                "origin_hi_lo",
                false,
            ),
            // Rows of their own, written by versions before the groups.
            (OUTBOX, doc! {"msg_id": 1}, "msg_id", false),
            // `trim_known_peers`: count the known rows, find the least recently seen.
            (
                PEERS,
                doc! {"relation": 1, "updated_ms": 1},
                "relation_seen",
                false,
            ),
        ];
        for (collection, keys, name, unique) in indexes {
            let mut options = IndexOptions::builder().name(name.to_owned()).build();
            // Only the journal's index is unique; the others leave the option unset, as
            // indexes made by earlier versions have it.
            options.unique = unique.then_some(true);
            let index = IndexModel::builder().keys(keys).options(options).build();
            self.coll::<Document>(collection).create_index(index).await?;
        }
        self.intake_runs_from_rows().await?;
        self.outbox_groups_keyed().await?;
        tracing::info!(db = %self.db.name(), "mongodb: collections and indexes ready");
        Ok(())
    }

    /// Outbox groups written before they named their entries (`origin`, `lo`, `hi`) get
    /// them from their first and last rows' `Nats-Msg-Id` (`<origin>:<seq>…`, rows in seq
    /// order); the index on every row's id those groups were found by is dropped.
    pub(super) async fn outbox_groups_keyed(&self) -> Result<(), Failure> {
        let parts = |at: i32| {
            doc! {"$regexFind": {
                "input": {"$arrayElemAt": ["$rows.msg_id", at]},
                "regex": "^([^:]*):([0-9]{1,18})",
            }}
        };
        let capture = |of: &str, at: i32| doc! {"$arrayElemAt": [format!("${of}.captures"), at]};
        let outbox = self.coll::<Document>(OUTBOX);
        outbox
            .update_many(
                doc! {"rows.0": {"$exists": true}, "origin": {"$exists": false}},
                vec![
                    doc! {"$set": {"oc_lo": parts(0), "oc_hi": parts(-1)}},
                    doc! {"$set": {
                        "origin": capture("oc_lo", 0),
                        "lo": {"$toLong": capture("oc_lo", 1)},
                        "hi": {"$toLong": capture("oc_hi", 1)},
                    }},
                    doc! {"$unset": ["oc_lo", "oc_hi"]},
                ],
            )
            .await?;
        match outbox.drop_index("rows_msg_id").await {
            Err(e) if server_code(&e) != Some(INDEX_NOT_FOUND) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Transactions need a replica set member or a mongos; a standalone server would
    /// fail every commit, so it is reported as such instead.
    pub(super) async fn check_topology(&self) -> Result<(), Failure> {
        let hello = self
            .client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await?;
        let replica_set = hello.get_str("setName").is_ok();
        let mongos = hello.get_str("msg") == Ok("isdbgrid");
        if replica_set || mongos {
            Ok(())
        } else {
            Err(Failure::Unsupported(
                "mongodb is a standalone server: the node needs transactions, so a replica set \
                 (one member is enough: start mongod with --replSet and run rs.initiate()) or a \
                 sharded cluster"
                    .to_owned(),
            ))
        }
    }

    /// Creates a collection if missing; `NamespaceExists` is success.
    pub(super) async fn create_collection(&self, name: &str) -> Result<(), MongoError> {
        match self.db.create_collection(name).await {
            Err(e) if server_code(&e) != Some(NAMESPACE_EXISTS) => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes sure a resource collection exists before a transaction writes to it.
    /// `Ok(Err(reason))`: MongoDB refuses the name.
    pub(super) async fn ensure_collection(&self, name: &str) -> StoreResult<Result<(), String>> {
        let known = self
            .collections
            .lock()
            .map(|set| set.contains(name))
            .unwrap_or(false);
        if known {
            return Ok(Ok(()));
        }
        match self.create_collection(name).await {
            Ok(()) => {
                if let Ok(mut set) = self.collections.lock() {
                    set.insert(name.to_owned());
                }
                Ok(Ok(()))
            }
            Err(e) if server_code(&e) == Some(INVALID_NAMESPACE) => {
                Ok(Err(format!("MongoDB refuses collection name {name:?}: {e}")))
            }
            Err(e) => Err(self.failed(e)),
        }
    }
}
