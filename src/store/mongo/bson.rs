//! The BSON shapes: the documents of the `oc_*` collections, the resource document an
//! application reads, and the checks that find what MongoDB would refuse before writing.

use mongodb::bson::{self, doc, Binary, Bson, Document, RawBinaryRef};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::Failure;
use crate::contract::{Action, JournalEntry, Resource};
use crate::store::{OutboxRow, PeerRow, Relation, StoredResource};

/// MongoDB's limit on one document (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// MongoDB's limit on nested documents and arrays.
pub const MAX_NESTING: usize = 100;

pub(super) fn to_i64(n: u64, what: &str) -> Result<i64, Failure> {
    i64::try_from(n).map_err(|_| Failure::Corrupt(format!("{what} {n} exceeds 2^63")))
}

/// A document's `seq` as a journal seq: 64- or 32-bit, not negative.
pub(super) fn seq_of(d: &Document) -> Option<u64> {
    match d.get("seq") {
        Some(Bson::Int64(n)) => u64::try_from(*n).ok(),
        Some(Bson::Int32(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

pub(super) fn to_u64(n: i64, what: &str) -> Result<u64, Failure> {
    u64::try_from(n).map_err(|_| Failure::Corrupt(format!("{what} {n} is negative")))
}

/// `oc_journal`: one document per journal entry.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct JournalDoc {
    /// `<origin>:<seq>`, the entry's `Nats-Msg-Id`.
    #[serde(rename = "_id")]
    pub(super) id: String,
    pub(super) origin: String,
    pub(super) seq: i64,
    pub(super) action: Action,
    pub(super) data_type: String,
    pub(super) user: String,
    /// The resource exactly as accepted, as JSON text: the journal must hold whatever the
    /// intake accepted, including what BSON cannot (`$` keys, integers beyond 2^63).
    pub(super) resource: String,
    pub(super) time_ms: i64,
}

/// A [`JournalDoc`] as written, borrowing the entry's strings.
#[derive(Serialize)]
pub(super) struct NewJournalDoc<'a> {
    #[serde(rename = "_id")]
    id: String,
    origin: &'a str,
    seq: i64,
    action: Action,
    data_type: &'a str,
    user: &'a str,
    resource: &'a str,
    time_ms: i64,
}

impl<'a> NewJournalDoc<'a> {
    pub(super) fn of(e: &'a JournalEntry) -> Result<Self, Failure> {
        Ok(NewJournalDoc {
            id: e.msg_id(),
            origin: &e.origin,
            seq: to_i64(e.seq, "seq")?,
            action: e.action,
            data_type: &e.data_type,
            user: &e.user,
            resource: e.resource.json(),
            time_ms: to_i64(e.time_ms, "time_ms")?,
        })
    }
}

/// A [`JournalDoc`] read in place from the server's bytes, for handing an entry out as
/// JSON ([`crate::store::RawEntry`]) without building a [`JournalEntry`] first.
#[derive(Deserialize)]
pub(super) struct JournalDocRef<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    origin: &'a str,
    seq: i64,
    action: Action,
    data_type: &'a str,
    #[serde(default)]
    user: &'a str,
    resource: &'a str,
    time_ms: i64,
}

/// A journal entry as JSON, the same text `serde_json` makes of a [`JournalEntry`].
#[derive(Serialize)]
struct EntryJson<'a> {
    origin: &'a str,
    seq: u64,
    action: Action,
    data_type: &'a str,
    user: &'a str,
    resource: &'a serde_json::value::RawValue,
    time_ms: u64,
}

impl JournalDocRef<'_> {
    /// The entry as [`crate::store::RawEntry`]: its resource text checked to be JSON on one
    /// line, and written as it is. Text that is not (written by another hand than this
    /// node's) goes through [`JournalDoc::into_entry`], which refuses what is not JSON and
    /// turns line breaks into spaces.
    pub(super) fn raw_entry(&self) -> Result<crate::store::RawEntry, Failure> {
        let seq = to_u64(self.seq, "seq")?;
        let time_ms = to_u64(self.time_ms, "time_ms")?;
        let one_line = memchr::memchr2(b'\n', b'\r', self.resource.as_bytes()).is_none();
        let resource = serde_json::from_str::<&serde_json::value::RawValue>(self.resource)
            .ok()
            .filter(|_| one_line);
        let json = match resource {
            Some(resource) => serde_json::to_vec(&EntryJson {
                origin: self.origin,
                seq,
                action: self.action,
                data_type: self.data_type,
                user: self.user,
                resource,
                time_ms,
            }),
            None => {
                let entry = JournalDoc {
                    id: self.id.to_owned(),
                    origin: self.origin.to_owned(),
                    seq: self.seq,
                    action: self.action,
                    data_type: self.data_type.to_owned(),
                    user: self.user.to_owned(),
                    resource: self.resource.to_owned(),
                    time_ms: self.time_ms,
                }
                .into_entry()?;
                serde_json::to_vec(&entry)
            }
        }
        .map_err(|e| Failure::Corrupt(format!("journal {}: {e}", self.id)))?;
        Ok(crate::store::RawEntry {
            seq,
            action: self.action,
            json,
        })
    }
}

impl JournalDoc {
    pub(super) fn into_entry(self) -> Result<JournalEntry, Failure> {
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
pub(super) struct VersionKey {
    pub(super) coll: String,
    pub(super) id: String,
}

impl VersionKey {
    pub(super) fn to_bson(&self) -> Bson {
        Bson::Document(doc! {"coll": &self.coll, "id": &self.id})
    }
}

/// `oc_versions`: which origin owns a resource and the seq of its last change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct VersionDoc {
    #[serde(rename = "_id")]
    pub(super) key: VersionKey,
    /// The data type as the origin named it.
    pub(super) data_type: String,
    pub(super) origin: String,
    pub(super) version: i64,
    pub(super) deleted: bool,
    /// For a tombstone: the delete event's payload as JSON text (the document itself is
    /// removed from its collection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) tombstone: Option<String>,
}

/// A [`VersionDoc`] as written: the same document, borrowing the entry it records.
#[derive(Serialize)]
pub(super) struct NewVersionDoc<'a> {
    #[serde(rename = "_id")]
    pub(super) key: &'a VersionKey,
    pub(super) data_type: &'a str,
    pub(super) origin: &'a str,
    pub(super) version: i64,
    pub(super) deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tombstone: Option<&'a str>,
}

impl VersionDoc {
    /// The stored state as [`decide`] and callers see it; `resource` is filled by the caller.
    pub(super) fn to_stored(&self, resource: Value) -> Result<StoredResource, Failure> {
        Ok(StoredResource {
            data_type: self.data_type.clone(),
            id: self.key.id.clone(),
            origin: self.origin.clone(),
            version: to_u64(self.version, "version")?,
            deleted: self.deleted,
            resource,
        })
    }

    pub(super) fn tombstone_value(&self) -> Result<Value, Failure> {
        match &self.tombstone {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| Failure::Corrupt(format!("tombstone {:?}: {e}", self.key))),
            None => Ok(Value::Null),
        }
    }
}

/// Most bytes of the rows' payloads (JSON texts) one outbox (applied log) group holds: a row that would take it further
/// starts the next group (a row larger than this is a group of its own), so a group stays far
/// below [`MAX_DOCUMENT_BYTES`] whatever the batch.
pub(super) const GROUP_BYTES: usize = 4 * 1024 * 1024;

/// `oc_outbox`: the publishes one apply commit owes NATS, in one document (a *group*) of
/// consecutive ids: `_id` is the first row's id, `last` the last one's. One document per
/// apply instead of one per row: MongoDB's cost is per document written and removed
/// (docs/PERFORMANCE.md, "MongoDB: fewer documents per event").
#[derive(Debug, Deserialize)]
pub(super) struct OutboxGroupDoc {
    pub(super) rows: Vec<OutboxDoc>,
}

/// An [`OutboxGroupDoc`] as written, borrowing its rows. `origin`, `lo` and `hi` name the
/// entries its rows publish (one origin, seqs `lo..=hi`): what finds the group again for an
/// entry delivered twice, by one index key per group rather than one per row.
#[derive(Serialize)]
pub(super) struct NewOutboxGroup<'a> {
    #[serde(rename = "_id")]
    pub(super) first: i64,
    pub(super) last: i64,
    pub(super) origin: &'a str,
    pub(super) lo: i64,
    pub(super) hi: i64,
    pub(super) rows: Vec<NewOutboxDoc<'a>>,
}

/// A document of `oc_outbox`: a group, or one row as versions before the groups wrote it
/// (still read, so that an upgrade publishes what was owed).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum StoredOutbox {
    Group(OutboxGroupDoc),
    Row(OutboxDoc),
}

impl StoredOutbox {
    /// Its rows, oldest first. A row written without its payload (the notice is made again
    /// from the applied-log row of the same id, [`OutboxDoc::payload`]) comes with an empty
    /// payload and its index in the returned rows pushed on `in_log`, counted from `base`.
    pub(super) fn into_rows(self, base: usize, in_log: &mut Vec<usize>) -> Result<Vec<OutboxRow>, Failure> {
        let docs = match self {
            StoredOutbox::Group(g) => g.rows,
            StoredOutbox::Row(r) => vec![r],
        };
        let mut rows = Vec::with_capacity(docs.len());
        for (i, d) in docs.into_iter().enumerate() {
            if d.payload.is_none() {
                in_log.push(base.saturating_add(i));
            }
            rows.push(d.into_row()?);
        }
        Ok(rows)
    }
}

/// One row of `oc_outbox`: a publish owed to NATS (a row of a group, or, written by versions
/// before the groups, a document of its own).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OutboxDoc {
    #[serde(rename = "_id")]
    pub(super) id: i64,
    pub(super) subject: String,
    pub(super) msg_id: String,
    /// The notice's body. Absent in rows written since 2026-12-04: the applied-log row with
    /// the same id holds the entry it is made from (`ResourceNotice::body_of`), and the
    /// applied log keeps every row the outbox still owes. One copy of the resource fewer
    /// per applied event (docs/PERFORMANCE.md, "MongoDB: fewer documents per event").
    #[serde(default)]
    pub(super) payload: Option<Binary>,
}

impl OutboxDoc {
    /// The row; its payload empty when it is to be made from the applied log.
    pub(super) fn into_row(self) -> Result<OutboxRow, Failure> {
        Ok(OutboxRow {
            id: to_u64(self.id, "outbox id")?,
            subject: self.subject,
            msg_id: self.msg_id,
            payload: self.payload.map(|p| p.bytes).unwrap_or_default(),
        })
    }
}

/// An [`OutboxDoc`] as written: the same document, borrowing its row, so the payload (the
/// notice, with the whole resource) is not copied once more per applied entry.
#[derive(Serialize)]
pub(super) struct NewOutboxDoc<'a> {
    #[serde(rename = "_id")]
    id: i64,
    subject: &'a str,
    msg_id: &'a str,
    /// Generic binary, as [`Binary`] with the generic subtype writes it; left out when the
    /// applied log holds what makes it ([`OutboxDoc::payload`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<RawBinaryRef<'a>>,
}

impl<'a> NewOutboxDoc<'a> {
    /// The row with its payload, as versions before 2026-12-04 wrote every row.
    #[cfg(test)]
    pub(super) fn of(r: &'a OutboxRow) -> Result<Self, Failure> {
        Ok(NewOutboxDoc {
            payload: Some(RawBinaryRef {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: &r.payload,
            }),
            ..NewOutboxDoc::pointing(r)?
        })
    }

    /// The row without its payload, which the applied-log row of the same id (written in
    /// the same transaction) makes again.
    pub(super) fn pointing(r: &'a OutboxRow) -> Result<Self, Failure> {
        Ok(NewOutboxDoc {
            id: to_i64(r.id, "outbox id")?,
            subject: &r.subject,
            msg_id: &r.msg_id,
            payload: None,
        })
    }
}

/// `oc_peers`: a peer this node met and its relation.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PeerDoc {
    #[serde(rename = "_id")]
    pub(super) peer_id: String,
    pub(super) relation: Relation,
    pub(super) addrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) name: Option<String>,
    /// The signed record as JSON text, byte for byte as verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) record: Option<String>,
    pub(super) updated_ms: i64,
}

impl PeerDoc {
    pub(super) fn from_row(r: PeerRow) -> Result<Self, Failure> {
        Ok(PeerDoc {
            updated_ms: to_i64(r.updated_ms, "updated_ms")?,
            record: r.record.map(|v| v.to_string()),
            peer_id: r.peer_id,
            relation: r.relation,
            addrs: r.addrs,
            name: r.name,
        })
    }

    pub(super) fn into_row(self) -> Result<PeerRow, Failure> {
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

/// One applied entry of `oc_applied_log`, kept as the JSON text of an
/// [`crate::store::AppliedRecord`] (a resource MongoDB could not hold as BSON still logs): a
/// row of a group, or, written by versions before the groups, a document of its own.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct AppliedLogDoc {
    #[serde(rename = "_id")]
    pub(super) key: i64,
    pub(super) json: String,
}

/// `oc_applied_log`: the rows one apply commit logs, in one document of ascending keys
/// (`_id` the first row's key, `last` the last one's), as [`NewOutboxGroup`] for the outbox.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct AppliedLogGroup {
    #[serde(rename = "_id")]
    pub(super) first: i64,
    pub(super) last: i64,
    pub(super) rows: Vec<AppliedLogDoc>,
}

/// A document of `oc_applied_log`: a group, or one row as versions before the groups wrote it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum StoredApplied {
    Group(AppliedLogGroup),
    Row(AppliedLogDoc),
}

impl StoredApplied {
    /// Its `_id`: the first row's key.
    pub(super) fn first(&self) -> i64 {
        match self {
            StoredApplied::Group(g) => g.first,
            StoredApplied::Row(r) => r.key,
        }
    }

    /// The key of its newest row (the group's `last`: a trim only removes older rows).
    pub(super) fn last(&self) -> i64 {
        match self {
            StoredApplied::Group(g) => g.last,
            StoredApplied::Row(r) => r.key,
        }
    }

    /// Its rows, oldest first.
    pub(super) fn into_rows(self) -> Vec<AppliedLogDoc> {
        match self {
            StoredApplied::Group(g) => g.rows,
            StoredApplied::Row(r) => vec![r],
        }
    }
}

/// Splits rows, in order, into groups of at most `max_bytes` (by `size`; a row larger than
/// that is a group of its own): the documents one commit writes for them.
pub(super) fn grouped<T>(
    rows: impl IntoIterator<Item = T>,
    size: impl Fn(&T) -> usize,
    max_bytes: usize,
) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0usize;
    for row in rows {
        let n = size(&row);
        match groups.last_mut() {
            Some(g) if bytes.saturating_add(n) <= max_bytes => {
                bytes = bytes.saturating_add(n);
                g.push(row);
            }
            _ => {
                bytes = n;
                groups.push(vec![row]);
            }
        }
    }
    groups
}

/// `oc_cursors` and `oc_applied`: one number per peer.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SeqDoc {
    #[serde(rename = "_id")]
    pub(super) peer: String,
    pub(super) seq: i64,
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
pub(super) fn check_names(v: &Value, depth: usize) -> Result<(), String> {
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
pub(super) fn document_to_json(mut doc: Document) -> Value {
    doc.remove("_id");
    Bson::Document(doc).into_relaxed_extjson()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A journal document read in place gives the JSON of the entry it holds; resource text
    /// with line breaks comes out on one line, text that is not JSON is reported corrupt.
    #[test]
    fn journal_documents_read_in_place_are_their_entries_as_json() {
        let entry = JournalEntry {
            origin: "o".into(),
            seq: 3,
            action: Action::Update,
            data_type: "COMPUTE_RESOURCE".into(),
            user: "u".into(),
            resource: Resource::from_json(r#"{"id":"r","n":[1,2]}"#).unwrap(),
            time_ms: 9,
        };
        let read = |resource: &str| {
            let mut d = bson::to_document(&NewJournalDoc::of(&entry).unwrap()).unwrap();
            d.insert("resource", resource);
            let bytes = bson::to_vec(&d).unwrap();
            bson::from_slice::<JournalDocRef<'_>>(&bytes).unwrap().raw_entry()
        };
        let raw = read(entry.resource.json()).unwrap();
        assert_eq!((raw.seq, raw.action), (3, Action::Update));
        assert_eq!(raw.json, serde_json::to_vec(&entry).unwrap());
        let broken = read("{\"id\":\"r\",\n\"n\":[1,2]}").unwrap();
        let back: JournalEntry = serde_json::from_slice(&broken.json).unwrap();
        assert!(!broken.json.contains(&b'\n'));
        assert_eq!(back.resource.json(), r#"{"id":"r", "n":[1,2]}"#);
        assert!(matches!(read("{\"id\":"), Err(Failure::Corrupt(_))));
    }

    /// The borrowed documents are what the owned ones were: the on-disk format is unchanged.
    #[test]
    fn the_borrowed_documents_write_what_the_owned_ones_read() {
        let row = OutboxRow {
            id: 7,
            subject: "CREATE_RESOURCE".into(),
            msg_id: "origin:7".into(),
            payload: br#"{"resource":{"id":"r1"}}"#.to_vec(),
        };
        let written = bson::to_document(&NewOutboxDoc::of(&row).unwrap()).unwrap();
        let owned = OutboxDoc {
            id: 7,
            subject: row.subject.clone(),
            msg_id: row.msg_id.clone(),
            payload: Some(Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: row.payload.clone(),
            }),
        };
        assert_eq!(written, bson::to_document(&owned).unwrap());
        let read: OutboxDoc = bson::from_document(written.clone()).unwrap();
        assert_eq!(read.into_row().unwrap(), row);
        // A row of its own, as written before the groups, is read as a group of one.
        let stored: StoredOutbox = bson::from_document(written).unwrap();
        let mut in_log = Vec::new();
        assert_eq!(stored.into_rows(0, &mut in_log).unwrap(), vec![row.clone()]);
        assert!(in_log.is_empty());
        let second = OutboxRow {
            id: 8,
            msg_id: "origin:8".into(),
            ..row.clone()
        };
        let group = NewOutboxGroup {
            first: 7,
            last: 8,
            origin: "origin",
            lo: 7,
            hi: 8,
            rows: vec![
                NewOutboxDoc::of(&row).unwrap(),
                NewOutboxDoc::pointing(&second).unwrap(),
            ],
        };
        // A row written without its payload comes back empty, its index counted from `base`.
        let stored: StoredOutbox = bson::from_document(bson::to_document(&group).unwrap()).unwrap();
        let unfilled = OutboxRow {
            payload: Vec::new(),
            ..second
        };
        assert_eq!(
            stored.into_rows(5, &mut in_log).unwrap(),
            vec![row.clone(), unfilled]
        );
        assert_eq!(in_log, vec![6]);

        let key = VersionKey {
            coll: "compute_resource".into(),
            id: "r1".into(),
        };
        for tombstone in [None, Some(r#"{"id":"r1"}"#)] {
            let new = NewVersionDoc {
                key: &key,
                data_type: "COMPUTE_RESOURCE",
                origin: "origin",
                version: 3,
                deleted: tombstone.is_some(),
                tombstone,
            };
            let owned = VersionDoc {
                key: key.clone(),
                data_type: "COMPUTE_RESOURCE".into(),
                origin: "origin".into(),
                version: 3,
                deleted: tombstone.is_some(),
                tombstone: tombstone.map(str::to_owned),
            };
            assert_eq!(
                bson::to_document(&new).unwrap(),
                bson::to_document(&owned).unwrap()
            );
        }
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
}
