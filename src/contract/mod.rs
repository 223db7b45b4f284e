//! Wire types shared by every part of the node: the application's `PROPALGATION_EVENT`,
//! journal entries, the messages the node publishes on NATS, and the error codes.
//!
//! Decoding is deliberately forgiving about the *shape of keys* (Go producers send
//! `DataType`, others `data_type`) and strict about *values*: every refusal names the
//! field and carries a stable error code that applications can branch on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// NATS subject applications publish resource changes on (typo kept: it is the wire name).
pub const SUBJECT_PROPAGATION: &str = "PROPALGATION_EVENT";
/// NATS subject every refused event is reported on.
pub const SUBJECT_ERROR: &str = "PROPALGATION_ERROR";
/// NATS subject the node publishes partners' creations and updates on.
pub const SUBJECT_CREATE: &str = "CREATE_RESOURCE";
/// NATS subject the node publishes partners' deletions on.
pub const SUBJECT_REMOVE: &str = "REMOVE_RESOURCE";
/// `from_app` value marking the node's own publishes; such events are never re-ingested.
pub const OWN_APP: &str = "oc-discovery";
/// Offending messages are echoed on `PROPALGATION_ERROR` cut at this size.
pub const ERROR_ECHO_BYTES: usize = 4096;
/// Most peers one `PB_CONSIDERS` (or `PB_PLANNER`) names in `payload.peer_ids`: each
/// listed peer costs a dial and a stream, so an application cannot make the node fan out
/// without bound (protocols/nats-propagation-event.md).
pub const MAX_COMMAND_PEERS: usize = 256;

/// What an application asks the node to do with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum Action {
    #[serde(rename = "PB_CREATE")]
    Create,
    #[serde(rename = "PB_UPDATE")]
    Update,
    #[serde(rename = "PB_DELETE")]
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "PB_CREATE",
            Action::Update => "PB_UPDATE",
            Action::Delete => "PB_DELETE",
        }
    }
}

/// Application requests that are not journaled: searches and messages to chosen peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandAction {
    Search,
    Considers,
    Planner,
    ClosePlanner,
}

impl CommandAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandAction::Search => "PB_SEARCH",
            CommandAction::Considers => "PB_CONSIDERS",
            CommandAction::Planner => "PB_PLANNER",
            CommandAction::ClosePlanner => "PB_CLOSE_PLANNER",
        }
    }
}

/// A validated command from the local application.
#[derive(Debug, Clone, PartialEq)]
pub struct AppCommand {
    pub action: CommandAction,
    pub data_type: String,
    pub user: String,
    pub payload: Value,
}

/// Stable error codes: a public contract (README, protocols/nats-subjects.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    InvalidJson,
    MissingField,
    InvalidField,
    UnsupportedAction,
    NotCreator,
    PayloadTooLarge,
    StoreUnavailable,
    /// Inbound only: the sending peer is not a configured partner.
    NotPartner,
    /// Inbound only: the event's origin is not the peer that sent it.
    ForgedOrigin,
    /// Inbound only: the resource exists with another creator.
    Conflict,
    /// A peer named by a command could not be reached.
    Unreachable,
    /// A bounded queue is full; retry later.
    Busy,
    /// The receiving node could not republish on its NATS.
    NatsUnavailable,
    /// Inbound only: the receiver's store cannot hold the resource as it is (MongoDB: a
    /// field name starting with `$`, a document over 16 MiB, a number beyond 64 bits).
    InvalidDocument,
    /// A peer sent more than its rate allows (forwarded commands); retry later.
    RateLimited,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::InvalidJson,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::UnsupportedAction,
        ErrorCode::NotCreator,
        ErrorCode::PayloadTooLarge,
        ErrorCode::StoreUnavailable,
        ErrorCode::NotPartner,
        ErrorCode::ForgedOrigin,
        ErrorCode::Conflict,
        ErrorCode::Unreachable,
        ErrorCode::Busy,
        ErrorCode::NatsUnavailable,
        ErrorCode::InvalidDocument,
        ErrorCode::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnsupportedAction => "unsupported_action",
            ErrorCode::NotCreator => "not_creator",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::NotPartner => "not_partner",
            ErrorCode::ForgedOrigin => "forged_origin",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::Busy => "busy",
            ErrorCode::NatsUnavailable => "nats_unavailable",
            ErrorCode::InvalidDocument => "invalid_document",
            ErrorCode::RateLimited => "rate_limited",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A refusal: a code plus a sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// `{"code": "...", "message": "..."}` as used in replies and error events.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

/// A validated resource change from the local application, not yet journaled.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub action: Action,
    pub data_type: String,
    pub user: String,
    pub from_app: String,
    pub resource: Resource,
    pub resource_id: String,
}

/// What decoding a `PROPALGATION_EVENT` yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A change to journal and propagate.
    Accept(NewEvent),
    /// A search or a message to chosen peers.
    Command(AppCommand),
    /// The node's own publish coming back: ignored without a reply.
    OwnEcho,
}

/// Decodes and validates one `PROPALGATION_EVENT` message body.
///
/// `own_peer_id` is the only creator whose resources this node propagates.
///
/// # Errors
/// A [`Refusal`] with the code the application receives.
pub fn decode_intake(body: &[u8], own_peer_id: &str, max_bytes: usize) -> Result<Decoded, Refusal> {
    if body.len() > max_bytes {
        return Err(Refusal::new(
            ErrorCode::PayloadTooLarge,
            format!("event is {} bytes, the limit is {max_bytes}", body.len()),
        ));
    }
    // The top level only: each value stays the text it was, so the payload (most of the
    // event) is never built into a tree.
    let raw: BTreeMap<String, &RawValue> = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            Refusal::new(ErrorCode::InvalidJson, "the event must be a JSON object")
        }
        _ => Refusal::new(ErrorCode::InvalidJson, format!("not valid JSON: {e}")),
    })?;
    let mut fields = normalize_keys(raw);

    let from_app = optional_string(&fields, "from_app")?.unwrap_or_default();
    if from_app == OWN_APP {
        return Ok(Decoded::OwnEcho);
    }
    let action = required_string(&fields, "action")?;
    let action = match action.to_ascii_uppercase().as_str() {
        "PB_CREATE" => Ok(Action::Create),
        "PB_UPDATE" => Ok(Action::Update),
        "PB_DELETE" => Ok(Action::Delete),
        "PB_SEARCH" => Err(CommandAction::Search),
        "PB_CONSIDERS" => Err(CommandAction::Considers),
        "PB_PLANNER" => Err(CommandAction::Planner),
        "PB_CLOSE_PLANNER" => Err(CommandAction::ClosePlanner),
        other => {
            return Err(Refusal::new(
                ErrorCode::UnsupportedAction,
                format!(
                    "unknown action {other:?}; expected PB_CREATE, PB_UPDATE, PB_DELETE, PB_SEARCH, \
                     PB_CONSIDERS, PB_PLANNER or PB_CLOSE_PLANNER"
                ),
            ))
        }
    };
    let data_type = required_string(&fields, "data_type")?;
    if data_type.is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            "data_type must not be empty",
        ));
    }
    let user = optional_string(&fields, "user")?.unwrap_or_default();
    let payload = payload_object(fields.remove("payload"))?;
    let action = match action {
        Ok(action) => action,
        Err(command) => {
            // Commands read their payload's fields: a tree, built only for them.
            let payload = serde_json::from_str(payload.get()).map_err(|e| {
                Refusal::new(ErrorCode::InvalidJson, format!("payload is not valid JSON: {e}"))
            })?;
            check_command_peers(command, &payload)?;
            return Ok(Decoded::Command(AppCommand {
                action: command,
                data_type,
                user,
                payload,
            }));
        }
    };
    let resource = Resource::from_raw(payload);
    // The text passed serde_json's validation for raw values, which neither limits nesting
    // nor reads numbers or `\u` escapes; search and the stores read the resource as a tree,
    // so what could not become one is refused here rather than turning into `null` there.
    if let Err(e) = check_tree(resource.json()) {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            format!(
                "payload is not a JSON tree the node can read ({e}): nested deeper than 128 \
                 levels, a number out of range or an invalid \\u escape"
            ),
        ));
    }
    let resource_id = resource.id.required("id")?.to_owned();
    if resource_id.is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            "payload.id must not be empty",
        ));
    }
    let creator = resource.creator_id.required("creator_id")?;
    if creator != own_peer_id {
        return Err(Refusal::new(
            ErrorCode::NotCreator,
            format!(
                "payload.creator_id {creator:?} is not this node ({own_peer_id}); only a node's own resources propagate"
            ),
        ));
    }
    Ok(Decoded::Accept(NewEvent {
        action,
        data_type,
        user,
        from_app,
        resource,
        resource_id,
    }))
}

/// `payload.peer_ids` of `PB_CONSIDERS` (required) and `PB_PLANNER` (optional, carried
/// along): an array of at most [`MAX_COMMAND_PEERS`] entries.
fn check_command_peers(command: CommandAction, payload: &Value) -> Result<(), Refusal> {
    let required = match command {
        CommandAction::Considers => true,
        CommandAction::Planner => false,
        CommandAction::Search | CommandAction::ClosePlanner => return Ok(()),
    };
    match payload.get("peer_ids") {
        None if required => Err(Refusal::new(
            ErrorCode::MissingField,
            "missing array field payload.peer_ids",
        )),
        None => Ok(()),
        Some(Value::Array(list)) if list.len() > MAX_COMMAND_PEERS => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!(
                "payload.peer_ids names {} peers, the limit is {MAX_COMMAND_PEERS}",
                list.len()
            ),
        )),
        Some(Value::Array(_)) => Ok(()),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidField,
            "payload.peer_ids must be an array of peer ids",
        )),
    }
}

/// `payload` as the JSON text of an object; Go producers send it as a string holding the JSON.
fn payload_object(payload: Option<&RawValue>) -> Result<Box<RawValue>, Refusal> {
    let not_object = || {
        Refusal::new(
            ErrorCode::InvalidField,
            "payload must be a JSON object (or a string holding one)",
        )
    };
    let Some(raw) = payload else {
        return Err(Refusal::new(ErrorCode::MissingField, "missing field payload"));
    };
    match raw.get().as_bytes().first() {
        Some(b'{') => Ok(raw.to_owned()),
        Some(b'"') => {
            let text: String = serde_json::from_str(raw.get()).map_err(|_| not_object())?;
            let inner = RawValue::from_string(text.trim().to_owned()).map_err(|_| not_object())?;
            match inner.get().as_bytes().first() {
                Some(b'{') => Ok(inner),
                _ => Err(not_object()),
            }
        }
        Some(b'n') => Err(Refusal::new(ErrorCode::MissingField, "missing field payload")),
        _ => Err(Refusal::new(
            ErrorCode::InvalidField,
            "payload must be a JSON object",
        )),
    }
}

/// Lower-cases top-level keys and folds the `datatype` spelling into `data_type`,
/// `fromapp` into `from_app`, so `DataType`, `dataType` and `data_type` are all accepted.
fn normalize_keys<V>(raw: BTreeMap<String, V>) -> BTreeMap<String, V> {
    raw.into_iter()
        .map(|(k, v)| {
            let lower = k.to_ascii_lowercase();
            let key = match lower.as_str() {
                "datatype" => "data_type".to_owned(),
                "fromapp" => "from_app".to_owned(),
                _ => lower,
            };
            (key, v)
        })
        .collect()
}

fn required_string(fields: &BTreeMap<String, &RawValue>, name: &str) -> Result<String, Refusal> {
    optional_string(fields, name)?
        .ok_or_else(|| Refusal::new(ErrorCode::MissingField, format!("missing field {name}")))
}

fn optional_string(fields: &BTreeMap<String, &RawValue>, name: &str) -> Result<Option<String>, Refusal> {
    match fields.get(name) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Option<String>>(raw.get())
            .map_err(|_| Refusal::new(ErrorCode::InvalidField, format!("field {name} must be a string"))),
    }
}

/// Reads JSON text through without building anything, under the limits a
/// `serde_json::Value` has (nesting depth, number range, valid escapes).
fn check_tree(json: &str) -> Result<(), serde_json::Error> {
    use serde::de::{MapAccess, SeqAccess, Visitor};

    struct Checked;
    impl<'de> Deserialize<'de> for Checked {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
            struct Any;
            impl<'de> Visitor<'de> for Any {
                type Value = Checked;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<Checked, E> {
                    Ok(Checked)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
                    while seq.next_element::<Checked>()?.is_some() {}
                    Ok(Checked)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                    while map.next_entry::<Checked, Checked>()?.is_some() {}
                    Ok(Checked)
                }
            }
            d.deserialize_any(Any)
        }
    }
    serde_json::from_str::<Checked>(json).map(|_| ())
}

/// One durable journal entry: an accepted change with its origin and sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub origin: String,
    pub seq: u64,
    pub action: Action,
    pub data_type: String,
    #[serde(default)]
    pub user: String,
    pub resource: Resource,
    /// Milliseconds since the Unix epoch at which the origin accepted the event.
    pub time_ms: u64,
}

impl JournalEntry {
    pub fn resource_id(&self) -> Option<&str> {
        self.resource.id()
    }

    pub fn creator_id(&self) -> Option<&str> {
        self.resource.creator_id()
    }

    /// `<origin>:<seq>`: the `Nats-Msg-Id` of every publish this entry causes.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.origin, self.seq)
    }
}

/// A resource as JSON text, exactly as the application sent it, with its `id` and
/// `creator_id` read once.
///
/// The node never needs the resource's other fields: it journals, forwards, stores and
/// republishes the text as it came. Keeping the text instead of a `serde_json::Value` tree
/// spares each event a tree's allocations, its serialization and its freeing on both the
/// source and every partner (docs/PERFORMANCE.md). Serialized through serde_json, it is
/// written as the JSON it holds; it deserializes only from serde_json (a frame, a journal
/// line, a stored value, or a [`Value`]).
#[derive(Clone)]
pub struct Resource {
    raw: Box<RawValue>,
    id: Field,
    creator_id: Field,
}

/// A string field of a resource as found at the top level of its JSON.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    /// Absent, `null`, or the resource is not an object.
    Missing,
    Text(Box<str>),
    /// Present, but not a string.
    NotText,
}

impl Field {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Text(s) => Some(s),
            Field::Missing | Field::NotText => None,
        }
    }

    /// The field as [`decode_intake`] requires it: a string, else the refusal naming it.
    fn required(&self, name: &str) -> Result<&str, Refusal> {
        match self {
            Field::Text(s) => Ok(s),
            Field::Missing => Err(Refusal::new(
                ErrorCode::MissingField,
                format!("missing field payload.{name}"),
            )),
            Field::NotText => Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("field payload.{name} must be a string"),
            )),
        }
    }
}

impl Resource {
    /// Wraps JSON text already known to be valid (its `id` and `creator_id` are read here).
    ///
    /// Line breaks become spaces: journal sync carries entries as JSON lines, so an entry's
    /// JSON must hold none. Valid JSON has line breaks only between tokens (inside strings
    /// they are escaped), where a space means the same.
    pub fn from_raw(raw: Box<RawValue>) -> Resource {
        let raw = if raw.get().contains(['\n', '\r']) {
            let flat = raw.get().replace(['\n', '\r'], " ");
            RawValue::from_string(flat).unwrap_or(raw)
        } else {
            raw
        };
        let (id, creator_id) = read_keys(raw.get());
        Resource { raw, id, creator_id }
    }

    /// # Errors
    /// `text` is not valid JSON.
    pub fn from_json(text: &str) -> Result<Resource, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Resource::from_raw)
    }

    /// The JSON text of a value (for tests and for callers that built a tree).
    pub fn from_value(value: &Value) -> Resource {
        // A Value always serializes, and to valid JSON.
        let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
        Resource::from_json(&text).unwrap_or_else(|_| Resource::from_raw(RawValue::NULL.to_owned()))
    }

    /// The JSON text, as received.
    pub fn json(&self) -> &str {
        self.raw.get()
    }

    pub fn raw(&self) -> &RawValue {
        &self.raw
    }

    /// The resource as a tree, for the rare readers of its other fields.
    pub fn to_value(&self) -> Value {
        // The text was valid JSON when wrapped; a tree of it cannot fail but past
        // serde_json's recursion limit, which the text passed already.
        serde_json::from_str(self.raw.get()).unwrap_or(Value::Null)
    }

    /// The top-level `id`, when it is a string.
    pub fn id(&self) -> Option<&str> {
        self.id.as_str()
    }

    /// The top-level `creator_id`, when it is a string.
    pub fn creator_id(&self) -> Option<&str> {
        self.creator_id.as_str()
    }
}

impl From<Value> for Resource {
    fn from(value: Value) -> Resource {
        Resource::from_value(&value)
    }
}

impl PartialEq for Resource {
    fn eq(&self, other: &Resource) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.raw.get())
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.raw.get())
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Resource, D::Error> {
        Box::<RawValue>::deserialize(d).map(Resource::from_raw)
    }
}

/// The top-level `id` and `creator_id` of JSON text, in one pass that builds nothing else.
/// Like `serde_json::Value`, the last of duplicate keys wins.
fn read_keys(json: &str) -> (Field, Field) {
    use serde::de::{IgnoredAny, MapAccess, Visitor};

    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = (Field, Field);
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(Field, Field), A::Error> {
            let (mut id, mut creator) = (Field::Missing, Field::Missing);
            while let Some(key) = map.next_key::<KeyName>()? {
                match key {
                    KeyName::Id => id = map.next_value::<FieldValue>()?.0,
                    KeyName::CreatorId => creator = map.next_value::<FieldValue>()?.0,
                    KeyName::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok((id, creator))
        }
    }

    let mut de = serde_json::Deserializer::from_str(json);
    serde::Deserializer::deserialize_map(&mut de, Keys).unwrap_or((Field::Missing, Field::Missing))
}

/// A key of a resource's top level, compared without being copied.
enum KeyName {
    Id,
    CreatorId,
    Other,
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyName, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = KeyName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<KeyName, E> {
                Ok(match key {
                    "id" => KeyName::Id,
                    "creator_id" => KeyName::CreatorId,
                    _ => KeyName::Other,
                })
            }
        }
        d.deserialize_str(Name)
    }
}

/// The value of `id` or `creator_id`: its text when a string, else only whether it is set.
struct FieldValue(Field);

impl<'de> Deserialize<'de> for FieldValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FieldValue, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess};

        struct Any;
        impl<'de> serde::de::Visitor<'de> for Any {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(Field::Text(v.into()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Field, E> {
                Ok(Field::Missing)
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Field, E> {
                Ok(Field::NotText)
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Field, E> {
                Ok(Field::NotText)
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Field, E> {
                Ok(Field::NotText)
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Field, E> {
                Ok(Field::NotText)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::NotText)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::NotText)
            }
        }
        d.deserialize_any(Any).map(FieldValue)
    }
}

/// Body of `CREATE_RESOURCE` / `REMOVE_RESOURCE` as the node publishes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceNotice {
    pub data_type: String,
    pub user: String,
    pub resource: Value,
    pub from_peer: String,
    pub origin_seq: u64,
    /// Always `oc-discovery`: marks the node's own publishes for every reader.
    #[serde(default)]
    pub from_app: String,
}

/// [`ResourceNotice`] borrowing from its entry: the same JSON, without copying the resource.
#[derive(Serialize)]
struct NoticeRef<'a> {
    data_type: &'a str,
    user: &'a str,
    resource: &'a RawValue,
    from_peer: &'a str,
    origin_seq: u64,
    from_app: &'a str,
}

impl ResourceNotice {
    /// The JSON body of the notice for `e`: a [`ResourceNotice`] written from the entry
    /// without copying it.
    pub fn body_of(e: &JournalEntry) -> Vec<u8> {
        ResourceNotice::body(&e.data_type, &e.user, e.resource.raw(), &e.origin, e.seq)
    }

    /// The JSON body of a notice from its parts; the same bytes as [`Self::body_of`] for
    /// the entry they come from.
    pub fn body(
        data_type: &str,
        user: &str,
        resource: &RawValue,
        from_peer: &str,
        origin_seq: u64,
    ) -> Vec<u8> {
        let notice = NoticeRef {
            data_type,
            user,
            resource,
            from_peer,
            origin_seq,
            from_app: OWN_APP,
        };
        // Serializing strings and a JSON text into a Vec cannot fail.
        serde_json::to_vec(&notice).unwrap_or_default()
    }

    pub fn subject(action: Action) -> &'static str {
        match action {
            Action::Create | Action::Update => SUBJECT_CREATE,
            Action::Delete => SUBJECT_REMOVE,
        }
    }
}

/// The `PROPALGATION_ERROR` body for a refused message.
pub fn error_event(refusal: &Refusal, subject: &str, body: &[u8]) -> Value {
    let cut = &body[..body.len().min(ERROR_ECHO_BYTES)];
    serde_json::json!({
        "error": refusal.to_json(),
        "subject": subject,
        "event": String::from_utf8_lossy(cut),
    })
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "12D3KooWme";

    fn decode(v: &str) -> Result<Decoded, Refusal> {
        decode_intake(v.as_bytes(), ME, 1024)
    }

    fn code(v: &str) -> ErrorCode {
        decode(v).expect_err("must be refused").code
    }

    #[test]
    fn accepts_go_style_keys() {
        let d = decode(r#"{"Action":"pb_create","DataType":"COMPUTE_RESOURCE","User":"u","Payload":{"id":"r1","creator_id":"12D3KooWme"}}"#).unwrap();
        let Decoded::Accept(e) = d else {
            panic!("not accepted")
        };
        assert_eq!(e.action, Action::Create);
        assert_eq!(e.data_type, "COMPUTE_RESOURCE");
        assert_eq!(e.resource_id, "r1");
    }

    #[test]
    fn considers_name_at_most_the_peer_cap() {
        let body = |n: usize, action: &str| {
            let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            serde_json::json!({"action": action, "data_type": "X", "payload": {"peer_ids": ids}}).to_string()
        };
        let big = 1 << 20;
        let decode_big = |v: &str| decode_intake(v.as_bytes(), ME, big);
        assert!(matches!(
            decode_big(&body(MAX_COMMAND_PEERS, "PB_CONSIDERS")),
            Ok(Decoded::Command(_))
        ));
        for action in ["PB_CONSIDERS", "PB_PLANNER"] {
            let refused = decode_big(&body(MAX_COMMAND_PEERS + 1, action)).expect_err(action);
            assert_eq!(refused.code, ErrorCode::InvalidField, "{action}");
            assert!(refused.message.contains("257"), "{}", refused.message);
        }
        assert_eq!(
            code(r#"{"action":"PB_CONSIDERS","data_type":"X","payload":{}}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"action":"PB_CONSIDERS","data_type":"X","payload":{"peer_ids":"p1"}}"#),
            ErrorCode::InvalidField
        );
        assert!(matches!(
            decode(r#"{"action":"PB_PLANNER","data_type":"X","payload":{"peer_id":"p1"}}"#),
            Ok(Decoded::Command(_))
        ));
    }

    #[test]
    fn refusals_carry_codes() {
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"data_type":"X","payload":{}}"#), ErrorCode::MissingField);
        assert!(matches!(
            decode(r#"{"action":"PB_SEARCH","data_type":"X","payload":{}}"#),
            Ok(Decoded::Command(AppCommand {
                action: CommandAction::Search,
                ..
            }))
        ));
        assert_eq!(
            code(r#"{"action":"PB_FLY","data_type":"X","payload":{}}"#),
            ErrorCode::UnsupportedAction
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":[]}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":{"id":1,"creator_id":"12D3KooWme"}}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":{"id":"a"}}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":{"id":"a","creator_id":"other"}}"#),
            ErrorCode::NotCreator
        );
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
        assert_eq!(code(&big), ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn the_payload_is_journaled_as_sent() {
        let d = decode(
            r#"{"action":"PB_CREATE","data_type":"X","payload": {"z": 1, "id":"r1", "creator_id":"12D3KooWme"} }"#,
        );
        let Ok(Decoded::Accept(e)) = d else {
            panic!("not accepted")
        };
        assert_eq!(
            e.resource.json(),
            r#"{"z": 1, "id":"r1", "creator_id":"12D3KooWme"}"#
        );
        // Go producers send the payload as a string holding the JSON.
        let d = decode(
            r#"{"action":"PB_CREATE","data_type":"X","payload":" {\"id\":\"r2\",\"creator_id\":\"12D3KooWme\"} "}"#,
        );
        let Ok(Decoded::Accept(e)) = d else {
            panic!("string payload not accepted")
        };
        assert_eq!(
            (e.resource_id.as_str(), e.resource.json()),
            ("r2", r#"{"id":"r2","creator_id":"12D3KooWme"}"#)
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":"[1]"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":"{nope"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":null}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"action":7,"data_type":"X","payload":{}}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"X","payload":{"id":"a","creator_id":"#),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn a_resource_reads_its_top_level_id_and_creator_only() {
        let r = |text: &str| Resource::from_json(text).unwrap();
        let nested = r(r#"{"spec": {"id": "inner", "creator_id": "x"}, "id": "outer"}"#);
        assert_eq!((nested.id(), nested.creator_id()), (Some("outer"), None));
        let escaped = r(r#"{"i\u0064": "r\"1", "creator_id": "c"}"#);
        assert_eq!((escaped.id(), escaped.creator_id()), (Some("r\"1"), Some("c")));
        let last_wins = r(r#"{"id": "a", "id": "b"}"#);
        assert_eq!(last_wins.id(), Some("b"));
        let typed = r(r#"{"id": 7, "creator_id": null}"#);
        assert_eq!((typed.id, typed.creator_id), (Field::NotText, Field::Missing));
        for not_object in ["[1]", "\"id\"", "3", "null"] {
            assert_eq!(r(not_object).id(), None, "{not_object}");
        }
        let pretty = r("{\n  \"id\": \"p\",\r\n  \"note\": \"two\\nlines\"\n}");
        assert!(
            !pretty.json().contains('\n') && !pretty.json().contains('\r'),
            "one JSON line"
        );
        assert_eq!(pretty.to_value()["note"], "two\nlines", "escaped breaks stay");
        assert_eq!(pretty.id(), Some("p"));
        let from_tree = Resource::from(serde_json::json!({"id": "t", "n": [1, 2]}));
        assert_eq!(from_tree.id(), Some("t"));
        assert_eq!(from_tree.to_value()["n"][1], 2);
        assert_eq!(serde_json::to_string(&from_tree).unwrap(), from_tree.json());
    }

    #[test]
    fn own_echo_is_ignored() {
        assert_eq!(
            decode(r#"{"from_app":"oc-discovery","action":"PB_CREATE"}"#),
            Ok(Decoded::OwnEcho)
        );
    }

    #[test]
    fn error_event_cuts_the_echo() {
        let body = vec![b'a'; 10_000];
        let v = error_event(
            &Refusal::new(ErrorCode::InvalidJson, "x"),
            SUBJECT_PROPAGATION,
            &body,
        );
        assert_eq!(v["event"].as_str().unwrap().len(), ERROR_ECHO_BYTES);
        assert_eq!(v["error"]["code"], "invalid_json");
    }
}
