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

use std::collections::{HashMap, HashSet};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{self, doc, Binary, Bson, Document};
use mongodb::error::{
    Error as MongoError, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT,
};
use mongodb::options::{
    Acknowledgment, ClientOptions, CollectionOptions, DatabaseOptions, IndexOptions, ReadConcern,
    ReturnDocument, WriteConcern,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Mutex, OnceCell};

use super::{
    decide_at, outbox_row, ApplyOutcome, Holder, Local, OutboxRow, OwnPage, PageBounds, PeerRow, Relation,
    SiteDoc, Store, StoreError, StoreResult, StoredResource,
};
use crate::contract::{now_ms, Action, JournalEntry, NewEvent, Resource};

pub const DEFAULT_DB: &str = "opencloud";

/// Bookkeeping collections; every name starts with [`RESERVED_PREFIX`].
const JOURNAL: &str = "oc_journal";
const CURSORS: &str = "oc_cursors";
const APPLIED: &str = "oc_applied";
const VERSIONS: &str = "oc_versions";
const OUTBOX: &str = "oc_outbox";
const COUNTERS: &str = "oc_counters";
const PEERS: &str = "oc_peers";
/// Most `known` rows one round of `trim_known_peers` deletes.
const TRIM_CHUNK: u64 = 1000;
const INTAKE: &str = "oc_intake";
const OWN: &str = "oc_own";
/// No data type may map to a collection with this prefix.
const RESERVED_PREFIX: &str = "oc_";
/// `oc_counters` document holding the last outbox id handed out.
const OUTBOX_COUNTER: &str = "outbox";

/// MongoDB's limit on one document (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// MongoDB's limit on nested documents and arrays.
pub const MAX_NESTING: usize = 100;
/// MongoDB's limit on `<database>.<collection>`.
const MAX_NAMESPACE_BYTES: usize = 255;

/// Server error codes that mean "this document cannot be stored", not "try again":
/// BadValue, DollarPrefixedFieldName, InvalidDBRef, EmptyFieldName, DottedFieldName,
/// DocumentValidationFailure (a validator the site put on a collection), BSONObjectTooLarge,
/// KeyTooLong, and the update size limit.
const REFUSED_DOCUMENT_CODES: [i32; 9] = [2, 52, 55, 56, 57, 121, 10334, 17280, 17419];
/// InvalidNamespace: the collection name is not acceptable to MongoDB.
const INVALID_NAMESPACE: i32 = 73;
/// NamespaceExists: `create` on a collection that is already there.
const NAMESPACE_EXISTS: i32 = 48;

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

/// Why a MongoDB store cannot even be set up (a configuration error, not an outage).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("invalid MongoDB URI: {0}")]
    Uri(String),
    #[error("invalid MongoDB database name {name:?}: {reason}")]
    Database { name: String, reason: &'static str },
}

/// What a transaction body can fail with, before it becomes a [`StoreError`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error("{0}")]
    Corrupt(String),
    /// The server cannot give the guarantees (a standalone server has no transactions).
    #[error("{0}")]
    Unsupported(String),
}

impl Failure {
    fn is_transient(&self) -> bool {
        matches!(self, Failure::Mongo(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR))
    }

    fn refused_document(&self) -> Option<String> {
        match self {
            Failure::Mongo(e) => refused_document(e),
            Failure::Corrupt(_) | Failure::Unsupported(_) => None,
        }
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Mongo(e) => classify(e),
            Failure::Corrupt(m) => StoreError::Corrupt(m),
            // Retried like an outage: the operator can convert the server in place.
            Failure::Unsupported(m) => StoreError::Unavailable(m),
        }
    }
}

/// Everything is retryable except documents of ours that do not decode.
fn classify(e: MongoError) -> StoreError {
    match *e.kind {
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(format!("mongodb: {e}")),
    }
}

/// The server error code, wherever the driver put it.
fn server_code(e: &MongoError) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .map(|w| w.code)
            .or_else(|| m.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

/// `Some(reason)` when MongoDB refused a document as such (not an outage).
fn refused_document(e: &MongoError) -> Option<String> {
    let code = server_code(e)?;
    if !REFUSED_DOCUMENT_CODES.contains(&code) {
        return None;
    }
    let message = match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.message.clone(),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .map(|w| w.message.clone())
            .unwrap_or_default(),
        ErrorKind::Command(c) => c.message.clone(),
        _ => e.to_string(),
    };
    Some(format!("MongoDB refused the document (code {code}): {message}"))
}

fn to_i64(n: u64, what: &str) -> Result<i64, Failure> {
    i64::try_from(n).map_err(|_| Failure::Corrupt(format!("{what} {n} exceeds 2^63")))
}

fn to_u64(n: i64, what: &str) -> Result<u64, Failure> {
    u64::try_from(n).map_err(|_| Failure::Corrupt(format!("{what} {n} is negative")))
}

/// `oc_journal`: one document per journal entry.
#[derive(Debug, Serialize, Deserialize)]
struct JournalDoc {
    /// `<origin>:<seq>`, the entry's `Nats-Msg-Id`.
    #[serde(rename = "_id")]
    id: String,
    origin: String,
    seq: i64,
    action: Action,
    data_type: String,
    user: String,
    /// The resource exactly as accepted, as JSON text: the journal must hold whatever the
    /// intake accepted, including what BSON cannot (`$` keys, integers beyond 2^63).
    resource: String,
    time_ms: i64,
}

impl JournalDoc {
    fn from_entry(e: &JournalEntry) -> Result<Self, Failure> {
        Ok(JournalDoc {
            id: e.msg_id(),
            origin: e.origin.clone(),
            seq: to_i64(e.seq, "seq")?,
            action: e.action,
            data_type: e.data_type.clone(),
            user: e.user.clone(),
            resource: e.resource.json().to_owned(),
            time_ms: to_i64(e.time_ms, "time_ms")?,
        })
    }

    fn into_entry(self) -> Result<JournalEntry, Failure> {
        let resource = Resource::from_json(&self.resource)
            .map_err(|e| Failure::Corrupt(format!("journal {}: resource: {e}", self.id)))?;
        Ok(JournalEntry {
            origin: self.origin,
            seq: to_u64(self.seq, "seq")?,
            action: self.action,
            data_type: self.data_type,
            user: self.user,
            resource,
            time_ms: to_u64(self.time_ms, "time_ms")?,
        })
    }
}

/// `oc_versions` key: the resource's collection and id. Keyed by collection rather than
/// data type because the collection is what holds the document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct VersionKey {
    coll: String,
    id: String,
}

impl VersionKey {
    fn to_bson(&self) -> Bson {
        Bson::Document(doc! {"coll": &self.coll, "id": &self.id})
    }
}

/// `oc_versions`: which origin owns a resource and the seq of its last change.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VersionDoc {
    #[serde(rename = "_id")]
    key: VersionKey,
    /// The data type as the origin named it.
    data_type: String,
    origin: String,
    version: i64,
    deleted: bool,
    /// For a tombstone: the delete event's payload as JSON text (the document itself is
    /// removed from its collection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tombstone: Option<String>,
}

impl VersionDoc {
    /// The stored state as [`decide`] and callers see it; `resource` is filled by the caller.
    fn to_stored(&self, resource: Value) -> Result<StoredResource, Failure> {
        Ok(StoredResource {
            data_type: self.data_type.clone(),
            id: self.key.id.clone(),
            origin: self.origin.clone(),
            version: to_u64(self.version, "version")?,
            deleted: self.deleted,
            resource,
        })
    }

    fn tombstone_value(&self) -> Result<Value, Failure> {
        match &self.tombstone {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| Failure::Corrupt(format!("tombstone {:?}: {e}", self.key))),
            None => Ok(Value::Null),
        }
    }
}

/// `oc_outbox`: a publish owed to NATS.
#[derive(Debug, Serialize, Deserialize)]
struct OutboxDoc {
    #[serde(rename = "_id")]
    id: i64,
    subject: String,
    msg_id: String,
    payload: Binary,
}

impl OutboxDoc {
    fn from_row(r: &OutboxRow) -> Result<Self, Failure> {
        Ok(OutboxDoc {
            id: to_i64(r.id, "outbox id")?,
            subject: r.subject.clone(),
            msg_id: r.msg_id.clone(),
            payload: Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: r.payload.clone(),
            },
        })
    }

    fn into_row(self) -> Result<OutboxRow, Failure> {
        Ok(OutboxRow {
            id: to_u64(self.id, "outbox id")?,
            subject: self.subject,
            msg_id: self.msg_id,
            payload: self.payload.bytes,
        })
    }
}

/// `oc_peers`: a peer this node met and its relation.
#[derive(Debug, Serialize, Deserialize)]
struct PeerDoc {
    #[serde(rename = "_id")]
    peer_id: String,
    relation: Relation,
    addrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// The signed record as JSON text, byte for byte as verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<String>,
    updated_ms: i64,
}

impl PeerDoc {
    fn from_row(r: PeerRow) -> Result<Self, Failure> {
        Ok(PeerDoc {
            updated_ms: to_i64(r.updated_ms, "updated_ms")?,
            record: r.record.map(|v| v.to_string()),
            peer_id: r.peer_id,
            relation: r.relation,
            addrs: r.addrs,
            name: r.name,
        })
    }

    fn into_row(self) -> Result<PeerRow, Failure> {
        let record = match self.record {
            Some(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| Failure::Corrupt(format!("peer {}: record: {e}", self.peer_id)))?,
            ),
            None => None,
        };
        Ok(PeerRow {
            updated_ms: to_u64(self.updated_ms, "updated_ms")?,
            record,
            peer_id: self.peer_id,
            relation: self.relation,
            addrs: self.addrs,
            name: self.name,
        })
    }
}

/// `oc_cursors` and `oc_applied`: one number per peer.
#[derive(Debug, Serialize, Deserialize)]
struct SeqDoc {
    #[serde(rename = "_id")]
    peer: String,
    seq: i64,
}

/// The collection a data type's resources live in: its name in lower case.
///
/// # Errors
/// A sentence saying why MongoDB (or the `oc_` reservation) does not allow that name.
pub fn collection_for(db: &str, data_type: &str) -> Result<String, String> {
    let name = data_type.to_lowercase();
    if name.is_empty() {
        return Err("empty data type".to_owned());
    }
    if name.contains('$') || name.contains('\0') {
        return Err(format!(
            "data type {data_type:?} is not a valid collection name ('$' or NUL)"
        ));
    }
    if name.starts_with("system.") || name.starts_with('.') || name.ends_with('.') {
        return Err(format!("data type {data_type:?} is not a valid collection name"));
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "data type {data_type:?} maps to {name}, reserved for the node's bookkeeping"
        ));
    }
    if db.len() + 1 + name.len() > MAX_NAMESPACE_BYTES {
        return Err(format!(
            "data type {data_type:?} is too long for a MongoDB namespace"
        ));
    }
    Ok(name)
}

/// The document an application reads: `_id` = the resource id, then the resource's own
/// fields at top level.
///
/// # Errors
/// Why MongoDB would refuse it: not an object, a field name starting with `$` or holding
/// NUL, nesting beyond [`MAX_NESTING`], an integer beyond 2^63, an `_id` other than the
/// id, or more than [`MAX_DOCUMENT_BYTES`] once encoded.
pub fn resource_document(id: &str, resource: &Value) -> Result<Document, String> {
    let Value::Object(fields) = resource else {
        return Err("the resource is not a JSON object".to_owned());
    };
    check_names(resource, 1)?;
    if let Some(own) = fields.get("_id") {
        if own.as_str() != Some(id) {
            return Err(format!("field _id {own} differs from the resource id"));
        }
    }
    let body = bson::to_document(resource).map_err(|e| format!("not representable in BSON: {e}"))?;
    let mut doc = Document::new();
    doc.insert("_id", id);
    for (k, v) in body {
        if k != "_id" {
            doc.insert(k, v);
        }
    }
    let size = bson::to_vec(&doc)
        .map_err(|e| format!("not representable in BSON: {e}"))?
        .len();
    if size > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "the document is {size} bytes, MongoDB's limit is {MAX_DOCUMENT_BYTES}"
        ));
    }
    Ok(doc)
}

/// Field names MongoDB refuses or misreads, at any depth.
fn check_names(v: &Value, depth: usize) -> Result<(), String> {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Object(m) => {
            for k in m.keys() {
                if k.starts_with('$') {
                    return Err(format!("field name {k:?} starts with '$'"));
                }
                if k.contains('\0') {
                    return Err(format!("field name {k:?} contains NUL"));
                }
            }
            Box::new(m.values())
        }
        Value::Array(a) => Box::new(a.iter()),
        _ => return Ok(()),
    };
    if depth > MAX_NESTING {
        return Err(format!("nested deeper than {MAX_NESTING} levels"));
    }
    for child in children {
        check_names(child, depth + 1)?;
    }
    Ok(())
}

/// The resource document as JSON, without the `_id` the node added.
fn document_to_json(mut doc: Document) -> Value {
    doc.remove("_id");
    Bson::Document(doc).into_relaxed_extjson()
}

/// One inbound entry, checked and converted before the transaction starts.
struct Planned<'a> {
    entry: &'a JournalEntry,
    /// `None`: no resource id (nothing to apply); `Err`: MongoDB cannot hold it.
    target: Option<Result<Target, String>>,
}

struct Target {
    key: VersionKey,
    /// The document to store; `None` for a delete.
    doc: Option<Document>,
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
    /// [`Store::apply_batch`] on borrowed entries.
    async fn apply_entries(
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

    pub fn database(&self) -> &Database {
        &self.db
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

    /// Creates the bookkeeping collections and their indexes once; retried by the next
    /// call after a failure.
    async fn ready(&self) -> StoreResult<()> {
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

    async fn create_schema(&self) -> Result<(), Failure> {
        self.check_topology().await?;
        for name in [
            JOURNAL, CURSORS, APPLIED, VERSIONS, OUTBOX, COUNTERS, PEERS, INTAKE, OWN,
        ] {
            self.create_collection(name).await?;
        }
        let indexes = [
            (JOURNAL, doc! {"origin": 1, "seq": 1}, "origin_seq", true),
            (VERSIONS, doc! {"_id.coll": 1, "_id.id": 1}, "coll_id", false),
            (OWN, doc! {"_id.data_type": 1, "_id.id": 1}, "data_type_id", false),
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
        tracing::info!(db = %self.db.name(), "mongodb: collections and indexes ready");
        Ok(())
    }

    /// Transactions need a replica set member or a mongos; a standalone server would
    /// fail every commit, so it is reported as such instead.
    async fn check_topology(&self) -> Result<(), Failure> {
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
    async fn create_collection(&self, name: &str) -> Result<(), MongoError> {
        match self.db.create_collection(name).await {
            Err(e) if server_code(&e) != Some(NAMESPACE_EXISTS) => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes sure a resource collection exists before a transaction writes to it.
    /// `Ok(Err(reason))`: MongoDB refuses the name.
    async fn ensure_collection(&self, name: &str) -> StoreResult<Result<(), String>> {
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

    /// Checks and converts every entry; makes their collections exist.
    async fn plan<'a>(&self, entries: &'a [JournalEntry]) -> StoreResult<Vec<Planned<'a>>> {
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

    fn target(&self, entry: &JournalEntry, coll: String, id: &str) -> Result<Target, String> {
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

    /// Starts a session with a transaction that commits durably.
    async fn begin(&self) -> Result<ClientSession, MongoError> {
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .read_concern(ReadConcern::local())
            .write_concern(durable(&self.settings))
            .await?;
        Ok(session)
    }

    /// Commits, retrying while MongoDB cannot tell whether the commit happened (the
    /// driver's documented procedure: a retried commit of a committed transaction is
    /// a success).
    async fn commit(&self, session: &mut ClientSession) -> Result<(), MongoError> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                        && attempt < self.settings.commit_attempts =>
                {
                    tracing::warn!(attempt, cause = %e, retry_in = ?delay, "mongodb: commit outcome unknown, committing again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What to do after a transaction body ran: commit it, or tell the caller to run
    /// the whole transaction again (a transient error), or give up.
    async fn finish<T>(
        &self,
        mut session: ClientSession,
        body: Result<T, Failure>,
        attempt: u32,
    ) -> Result<Option<T>, Failure> {
        let result = match body {
            Ok(v) => self.commit(&mut session).await.map(|()| v).map_err(Failure::from),
            // Dropping the session aborts the transaction.
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_transient() && attempt < self.settings.transaction_attempts => {
                tracing::debug!(attempt, cause = %e, "mongodb: transient transaction error, running it again");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn append_txn(
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
            .map(JournalDoc::from_entry)
            .collect::<Result<Vec<_>, _>>()?;
        journal.insert_many(docs).session(&mut *session).await?;
        self.index_own(session, &entries).await?;
        if let (Some(last), false) = (entries.last(), intake_seqs.is_empty()) {
            self.mark_intake(session, intake_seqs, last.seq).await?;
        }
        Ok(entries)
    }

    /// Keeps `oc_own` (this node's resources as its journal leaves them, for search
    /// answers) in step with the journal, in the same transaction.
    async fn index_own(&self, s: &mut ClientSession, entries: &[JournalEntry]) -> Result<(), Failure> {
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
        let live: Vec<Document> = last
            .iter()
            .filter(|(_, e)| e.action != Action::Delete)
            .map(|((dt, id), e)| {
                doc! {"_id": {"data_type": *dt, "id": *id}, "resource": e.resource.json()}
            })
            .collect();
        let own = self.coll::<Document>(OWN);
        own.delete_many(doc! {"_id": {"$in": keys}})
            .session(&mut *s)
            .await?;
        if !live.is_empty() {
            own.insert_many(live).session(&mut *s).await?;
        }
        Ok(())
    }

    /// Records which JetStream messages this journal commit holds; a record already there
    /// (a redelivery journaled anyway) is replaced.
    async fn mark_intake(&self, s: &mut ClientSession, stream_seqs: &[u64], seq: u64) -> Result<(), Failure> {
        let seq = to_i64(seq, "seq")?;
        let ids = stream_seqs
            .iter()
            .map(|&n| to_i64(n, "stream seq"))
            .collect::<Result<Vec<_>, _>>()?;
        let intake = self.coll::<Document>(INTAKE);
        intake
            .delete_many(doc! {"_id": {"$in": &ids}})
            .session(&mut *s)
            .await?;
        let docs: Vec<Document> = ids.iter().map(|id| doc! {"_id": id, "seq": seq}).collect();
        intake.insert_many(docs).session(&mut *s).await?;
        Ok(())
    }

    async fn meet_txn(&self, s: &mut ClientSession, mut row: PeerRow) -> Result<Relation, Failure> {
        let peers = self.coll::<PeerDoc>(PEERS);
        if let Some(existing) = peers
            .find_one(doc! {"_id": &row.peer_id})
            .session(&mut *s)
            .await?
        {
            super::keep_relation(&mut row, existing.into_row()?);
        }
        let relation = row.relation;
        let doc = PeerDoc::from_row(row)?;
        peers
            .replace_one(doc! {"_id": &doc.peer_id}, &doc)
            .upsert(true)
            .session(&mut *s)
            .await?;
        Ok(relation)
    }

    /// Runs [`Self::apply_txn`] as a transaction, again on transient errors.
    async fn apply_transaction(
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
    async fn apply_txn(
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
        let site = Site {
            own: self.load_own(s, plan).await?,
            documents: self.load_documents(s, &keys).await?,
        };
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
        self.write_changes(s, plan, &changes, &stored).await?;
        self.insert_outbox(s, &new_rows).await?;
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

    async fn insert_outbox(&self, s: &mut ClientSession, rows: &[(usize, OutboxRow)]) -> Result<(), Failure> {
        if rows.is_empty() {
            return Ok(());
        }
        let docs = rows
            .iter()
            .map(|(_, r)| OutboxDoc::from_row(r))
            .collect::<Result<Vec<_>, _>>()?;
        self.coll::<OutboxDoc>(OUTBOX)
            .insert_many(docs)
            .session(&mut *s)
            .await?;
        Ok(())
    }

    async fn load_versions(
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
    async fn load_own(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
    ) -> Result<HashSet<(String, String)>, Failure> {
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
        let mut own = HashSet::new();
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
            let key = d.get_document("_id").ok().and_then(|k| {
                Some((
                    k.get_str("data_type").ok()?.to_owned(),
                    k.get_str("id").ok()?.to_owned(),
                ))
            });
            if let Some(key) = key {
                own.insert(key);
            }
        }
        Ok(own)
    }

    /// The documents under the batch's ids in their collections, whoever wrote them, by
    /// their `creator_id` (one `find` per collection, only `creator_id` fetched).
    async fn load_documents(
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
    async fn recover_rows(
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
        let mut cursor = self
            .coll::<OutboxDoc>(OUTBOX)
            .find(doc! {"msg_id": {"$in": &msg_ids}})
            .session(&mut *s)
            .await?;
        let mut pending: HashMap<String, OutboxRow> = HashMap::new();
        while let Some(d) = cursor.next(&mut *s).await.transpose()? {
            let row = d.into_row()?;
            pending.insert(row.msg_id.clone(), row);
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
    async fn allocate_outbox_ids(&self, s: &mut ClientSession, n: usize) -> Result<u64, Failure> {
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
    /// trips per batch whatever its size.
    async fn write_changes(
        &self,
        s: &mut ClientSession,
        plan: &[Planned<'_>],
        changes: &[usize],
        stored: &HashMap<VersionKey, VersionDoc>,
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
            ids_by_coll.entry(&t.key.coll).or_default().push(&t.key.id);
            if let Some(d) = &t.doc {
                docs_by_coll.entry(&t.key.coll).or_default().push(d);
            }
            // Only versions that exist need replacing: nothing else writes them.
            if stored.contains_key(&t.key) {
                version_ids.push(t.key.to_bson());
            }
            versions.push(VersionDoc {
                key: t.key.clone(),
                data_type: entry.data_type.clone(),
                origin: entry.origin.clone(),
                version: to_i64(entry.seq, "seq")?,
                deleted: t.doc.is_none(),
                tombstone: t.doc.is_none().then(|| entry.resource.json().to_owned()),
            });
        }
        for (coll, ids) in &ids_by_coll {
            let resources = self.coll::<Document>(coll);
            resources
                .delete_many(doc! {"_id": {"$in": ids}})
                .session(&mut *s)
                .await?;
            if let Some(docs) = docs_by_coll.get(coll) {
                resources
                    .insert_many(docs.iter().copied())
                    .session(&mut *s)
                    .await?;
            }
        }
        if !versions.is_empty() {
            let coll = self.coll::<VersionDoc>(VERSIONS);
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
    async fn apply_isolating(
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

/// What a batch does, decided before anything is written.
struct Decisions {
    outcomes: Vec<ApplyOutcome>,
    /// Indexes of the entries that change the store, in order.
    changes: Vec<usize>,
    /// Indexes of the entries whose exact version is already stored (a lost answer?).
    answered_before: Vec<usize>,
}

/// What the site holds under the batch's keys besides the version rows, read before
/// deciding ([`decide_at`]).
struct Site {
    /// (data type, id) of this node's own live resources.
    own: HashSet<(String, String)>,
    /// The documents in the collections, whoever wrote them.
    documents: HashMap<VersionKey, SiteDoc>,
}

/// Decides every entry in order with the shared rule ([`decide_at`]), each against the
/// state the entries before it in the batch produced.
fn decide_batch(
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
                let local = Local {
                    own: site.own.contains(&(p.entry.data_type.clone(), t.key.id.clone())),
                    document: site.documents.get(&t.key).cloned(),
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

/// Write concern of every commit: acknowledged by a majority and in their on-disk
/// journals, bounded in time.
fn durable(settings: &MongoSettings) -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(settings.write_timeout)
        .build()
}

fn check_database_name(name: &str) -> Result<(), OpenError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= 64 {
        Some("64 bytes or more")
    } else if name
        .chars()
        .any(|c| matches!(c, '/' | '\\' | '.' | ' ' | '"' | '$' | '\0'))
    {
        Some("contains one of / \\ . space \" $ NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(OpenError::Database {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[async_trait]
impl Store for MongoStore {
    async fn append_journal(&self, origin: &str, events: Vec<NewEvent>) -> StoreResult<Vec<JournalEntry>> {
        self.append_journal_marked(origin, events, Vec::new()).await
    }

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
        let ids = seqs
            .iter()
            .map(|&n| to_i64(n, "stream seq"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.failed(e))?;
        let found: Vec<Document> = self
            .collect(
                self.coll::<Document>(INTAKE)
                    .find(doc! {"_id": {"$in": ids}})
                    .projection(doc! {"_id": 1}),
            )
            .await?;
        let found: HashSet<i64> = found.iter().filter_map(|d| d.get_i64("_id").ok()).collect();
        Ok(seqs
            .into_iter()
            .filter(|&n| i64::try_from(n).is_ok_and(|n| found.contains(&n)))
            .collect())
    }

    async fn intake_high(&self) -> StoreResult<u64> {
        self.ready().await?;
        let last = self
            .coll::<Document>(INTAKE)
            .find_one(doc! {})
            .sort(doc! {"_id": -1})
            .projection(doc! {"_id": 1})
            .await
            .map_err(|e| self.failed(e))?;
        Ok(last
            .and_then(|d| d.get_i64("_id").ok())
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0))
    }

    async fn intake_forget_below(&self, below: u64) -> StoreResult<()> {
        self.ready().await?;
        let below = i64::try_from(below).unwrap_or(i64::MAX);
        self.relaxed(INTAKE)
            .delete_many(doc! {"_id": {"$lt": below}})
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn read_journal(&self, origin: &str, from: u64, limit: usize) -> StoreResult<Vec<JournalEntry>> {
        self.ready().await?;
        let from = to_i64(from, "seq").map_err(|e| self.failed(e))?;
        let docs: Vec<JournalDoc> = self
            .collect(
                self.coll::<JournalDoc>(JOURNAL)
                    .find(doc! {"origin": origin, "seq": {"$gte": from}})
                    .sort(doc! {"seq": 1})
                    .limit(i64::try_from(limit).unwrap_or(i64::MAX)),
            )
            .await?;
        docs.into_iter()
            .map(|d| d.into_entry().map_err(|e| self.failed(e)))
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

    async fn outbox(&self, limit: usize) -> StoreResult<Vec<OutboxRow>> {
        self.ready().await?;
        let docs: Vec<OutboxDoc> = self
            .collect(
                self.coll::<OutboxDoc>(OUTBOX)
                    .find(doc! {})
                    .sort(doc! {"_id": 1})
                    .limit(i64::try_from(limit).unwrap_or(i64::MAX)),
            )
            .await?;
        docs.into_iter()
            .map(|d| d.into_row().map_err(|e| self.failed(e)))
            .collect()
    }

    async fn outbox_remove(&self, ids: Vec<u64>) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.ready().await?;
        let ids = ids
            .into_iter()
            .map(|id| to_i64(id, "outbox id"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.failed(e))?;
        self.relaxed(OUTBOX)
            .delete_many(doc! {"_id": {"$in": ids}})
            .await
            .map_err(|e| self.failed(e))?;
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

    async fn own_resources(&self, _origin: &str, data_type: &str) -> StoreResult<Vec<Value>> {
        self.ready().await?;
        let docs: Vec<Document> = self
            .collect(
                self.coll::<Document>(OWN)
                    .find(doc! {"_id.data_type": data_type})
                    .sort(doc! {"_id.data_type": 1, "_id.id": 1}),
            )
            .await?;
        docs.iter()
            .map(|d| {
                let text = d
                    .get_str("resource")
                    .map_err(|e| self.failed(Failure::Corrupt(format!("oc_own: {e}"))))?;
                serde_json::from_str(text).map_err(|e| self.failed(Failure::Corrupt(format!("oc_own: {e}"))))
            })
            .collect()
    }

    async fn own_resources_page(
        &self,
        _origin: &str,
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
        // Documents are taken from the cursor one at a time and kept as JSON text only;
        // the page stops at its byte bound, leaving the rest of the batch unread.
        let mut docs = Vec::new();
        let mut bytes = 0usize;
        while let Some(d) = cursor.try_next().await.map_err(|e| self.failed(e))? {
            let corrupt =
                |e: bson::document::ValueAccessError| self.failed(Failure::Corrupt(format!("oc_own: {e}")));
            let id = d
                .get_document("_id")
                .and_then(|k| k.get_str("id"))
                .map_err(corrupt)?;
            let text = d.get_str("resource").map_err(corrupt)?;
            bytes = bytes.saturating_add(text.len()).saturating_add(id.len());
            docs.push((id.to_owned(), text.to_owned()));
            if bytes >= bounds.max_bytes {
                break;
            }
        }
        let full = docs.len() >= bounds.max_count.max(1) || bytes >= bounds.max_bytes;
        let next = if full {
            docs.last().map(|(id, _)| id.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn collection_names() {
        assert_eq!(
            collection_for("opencloud", "COMPUTE_RESOURCE").unwrap(),
            "compute_resource"
        );
        assert!(collection_for("opencloud", "").is_err());
        assert!(collection_for("opencloud", "OC_JOURNAL").is_err());
        assert!(collection_for("opencloud", "a$b").is_err());
        assert!(collection_for("opencloud", "system.users").is_err());
        assert!(collection_for("opencloud", &"X".repeat(300)).is_err());
    }

    #[test]
    fn documents_refused_before_writing() {
        let ok = resource_document("r1", &json!({"id": "r1", "n": 1, "a": [{"b": 2}]})).unwrap();
        assert_eq!(ok.get_str("_id").unwrap(), "r1");
        assert_eq!(ok.get_i64("n").unwrap(), 1);
        for bad in [
            json!({"id": "r1", "$where": 1}),
            json!({"id": "r1", "nested": {"$set": 1}}),
            json!({"id": "r1", "list": [{"$oid": "x"}]}),
            json!({"id": "r1", "big": u64::MAX}),
            json!({"id": "r1", "_id": "other"}),
            json!(["not", "an", "object"]),
        ] {
            assert!(resource_document("r1", &bad).is_err(), "{bad}");
        }
        let mut deep = json!(1);
        for _ in 0..120 {
            deep = json!({"d": deep});
        }
        assert!(resource_document("r1", &deep).is_err());
        let huge = json!({"id": "r1", "blob": "x".repeat(MAX_DOCUMENT_BYTES)});
        assert!(resource_document("r1", &huge).is_err());
    }

    #[test]
    fn database_names() {
        assert!(check_database_name("opencloud").is_ok());
        assert!(check_database_name("").is_err());
        assert!(check_database_name("a.b").is_err());
    }
}
