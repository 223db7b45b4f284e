//! Wire types shared by every part of the node: the application's `PROPALGATION_EVENT`,
//! journal entries, the messages the node publishes on NATS, and the error codes.
//!
//! Decoding is deliberately forgiving about the *shape of keys* (Go producers send
//! `DataType`, others `data_type`) and strict about *values*: every refusal names the
//! field and carries a stable error code that applications can branch on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
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
    pub resource: Value,
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
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::new(ErrorCode::InvalidJson, format!("not valid JSON: {e}")))?;
    let Value::Object(raw) = value else {
        return Err(Refusal::new(
            ErrorCode::InvalidJson,
            "the event must be a JSON object",
        ));
    };
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
    // Moved out, not copied: the payload is most of the event.
    let resource = payload_object(fields.remove("payload"))?;
    let action = match action {
        Ok(action) => action,
        Err(command) => {
            return Ok(Decoded::Command(AppCommand {
                action: command,
                data_type,
                user,
                payload: resource,
            }))
        }
    };
    let resource_id = payload_string(&resource, "id")?;
    if resource_id.is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            "payload.id must not be empty",
        ));
    }
    let creator = payload_string(&resource, "creator_id")?;
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

/// `payload` as an object; Go producers send it as a string holding the JSON.
fn payload_object(payload: Option<Value>) -> Result<Value, Refusal> {
    match payload {
        None | Some(Value::Null) => Err(Refusal::new(ErrorCode::MissingField, "missing field payload")),
        Some(Value::Object(o)) => Ok(Value::Object(o)),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
            Ok(Value::Object(o)) => Ok(Value::Object(o)),
            _ => Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload must be a JSON object (or a string holding one)",
            )),
        },
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidField,
            "payload must be a JSON object",
        )),
    }
}

/// Lower-cases top-level keys and folds the `datatype` spelling into `data_type`,
/// `fromapp` into `from_app`, so `DataType`, `dataType` and `data_type` are all accepted.
fn normalize_keys(raw: Map<String, Value>) -> Map<String, Value> {
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

fn required_string(fields: &Map<String, Value>, name: &str) -> Result<String, Refusal> {
    optional_string(fields, name)?
        .ok_or_else(|| Refusal::new(ErrorCode::MissingField, format!("missing field {name}")))
}

fn optional_string(fields: &Map<String, Value>, name: &str) -> Result<Option<String>, Refusal> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("field {name} must be a string"),
        )),
    }
}

fn payload_string(resource: &Value, name: &str) -> Result<String, Refusal> {
    match resource.get(name) {
        None | Some(Value::Null) => Err(Refusal::new(
            ErrorCode::MissingField,
            format!("missing field payload.{name}"),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("field payload.{name} must be a string"),
        )),
    }
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
    pub resource: Value,
    /// Milliseconds since the Unix epoch at which the origin accepted the event.
    pub time_ms: u64,
}

impl JournalEntry {
    pub fn resource_id(&self) -> Option<&str> {
        self.resource.get("id").and_then(Value::as_str)
    }

    pub fn creator_id(&self) -> Option<&str> {
        self.resource.get("creator_id").and_then(Value::as_str)
    }

    /// `<origin>:<seq>`: the `Nats-Msg-Id` of every publish this entry causes.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.origin, self.seq)
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
    resource: &'a Value,
    from_peer: &'a str,
    origin_seq: u64,
    from_app: &'a str,
}

impl ResourceNotice {
    /// The JSON body of the notice for `e`: a [`ResourceNotice`] written from the entry
    /// without copying it.
    pub fn body_of(e: &JournalEntry) -> Vec<u8> {
        let notice = NoticeRef {
            data_type: &e.data_type,
            user: &e.user,
            resource: &e.resource,
            from_peer: &e.origin,
            origin_seq: e.seq,
            from_app: OWN_APP,
        };
        // Serializing strings and a JSON value into a Vec cannot fail.
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
