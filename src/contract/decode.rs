//! Decoding and validating one `PROPALGATION_EVENT` body into a change to journal, a
//! command, or a refusal.
//!
//! Decoding is deliberately forgiving about the *shape of keys* (Go producers send
//! `DataType`, others `data_type`) and strict about *values*: every refusal names the
//! field and carries a stable error code that applications can branch on.

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Action, CommandAction, ErrorCode, Refusal, Resource, OWN_APP};

/// Most peers one `PB_CONSIDERS` (or `PB_PLANNER`) names in `payload.peer_ids`: each
/// listed peer costs a dial and a stream, so an application cannot make the node fan out
/// without bound (protocols/nats-propagation-event.md).
pub const MAX_COMMAND_PEERS: usize = 256;

/// A validated command from the local application.
#[derive(Debug, Clone, PartialEq)]
pub struct AppCommand {
    pub action: CommandAction,
    pub data_type: String,
    pub user: String,
    pub payload: Value,
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
    // event) is never built into a tree, and no key or map is allocated.
    let mut fields: Envelope = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            Refusal::new(ErrorCode::InvalidJson, "the event must be a JSON object")
        }
        _ => Refusal::new(ErrorCode::InvalidJson, format!("not valid JSON: {e}")),
    })?;

    let from_app = optional_string(fields.from_app, "from_app")?.unwrap_or_default();
    if from_app == OWN_APP {
        return Ok(Decoded::OwnEcho);
    }
    let action = required_string(fields.action, "action")?;
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
    let data_type = required_string(fields.data_type, "data_type")?;
    if data_type.is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            "data_type must not be empty",
        ));
    }
    let user = optional_string(fields.user, "user")?.unwrap_or_default();
    let payload = payload_object(fields.payload.take())?;
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
    // The text passed serde_json's validation for raw values, which neither limits nesting
    // nor reads numbers or `\u` escapes; search and the stores read the resource as a tree,
    // so what could not become one is refused here rather than turning into `null` there.
    let resource = Resource::from_raw_checked(payload).map_err(|e| {
        Refusal::new(
            ErrorCode::InvalidField,
            format!(
                "payload is not a JSON tree the node can read ({e}): nested deeper than 128 \
                 levels, a number out of range or an invalid \\u escape"
            ),
        )
    })?;
    let resource_id = resource.required_id()?.to_owned();
    if resource_id.is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidField,
            "payload.id must not be empty",
        ));
    }
    let creator = resource.required_creator_id()?;
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

/// The top-level fields of an event the intake reads, each as its JSON text. Keys are
/// matched without regard to ASCII case, and `datatype` / `fromapp` (as Go producers spell
/// them) are `data_type` / `from_app`, so `DataType`, `dataType` and `data_type` are all
/// accepted; of keys that name the same field the last one wins; other keys are skipped
/// (their JSON checked, nothing kept).
#[derive(Default)]
struct Envelope<'a> {
    action: Option<&'a RawValue>,
    data_type: Option<&'a RawValue>,
    user: Option<&'a RawValue>,
    from_app: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
}

/// A top-level key of an event, read without allocating.
enum EnvelopeKey {
    Action,
    DataType,
    User,
    FromApp,
    Payload,
    Other,
}

impl<'de> Deserialize<'de> for EnvelopeKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EnvelopeKey, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = EnvelopeKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<EnvelopeKey, E> {
                let is = |name: &str| key.eq_ignore_ascii_case(name);
                Ok(if is("action") {
                    EnvelopeKey::Action
                } else if is("data_type") || is("datatype") {
                    EnvelopeKey::DataType
                } else if is("user") {
                    EnvelopeKey::User
                } else if is("from_app") || is("fromapp") {
                    EnvelopeKey::FromApp
                } else if is("payload") {
                    EnvelopeKey::Payload
                } else {
                    EnvelopeKey::Other
                })
            }
        }
        d.deserialize_identifier(Name)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Envelope<'a>, D::Error> {
        struct Top<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Top<'a> {
            type Value = Envelope<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'a>, A::Error> {
                let mut e = Envelope::default();
                while let Some(key) = map.next_key::<EnvelopeKey>()? {
                    let slot = match key {
                        EnvelopeKey::Action => &mut e.action,
                        EnvelopeKey::DataType => &mut e.data_type,
                        EnvelopeKey::User => &mut e.user,
                        EnvelopeKey::FromApp => &mut e.from_app,
                        EnvelopeKey::Payload => &mut e.payload,
                        EnvelopeKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(e)
            }
        }
        d.deserialize_map(Top(std::marker::PhantomData))
    }
}

fn required_string(field: Option<&RawValue>, name: &str) -> Result<String, Refusal> {
    optional_string(field, name)?
        .ok_or_else(|| Refusal::new(ErrorCode::MissingField, format!("missing field {name}")))
}

fn optional_string(field: Option<&RawValue>, name: &str) -> Result<Option<String>, Refusal> {
    let Some(raw) = field else {
        return Ok(None);
    };
    // The text passed the parser already: one in quotes without a backslash is the string
    // itself (control characters were refused), with nothing to unescape.
    let text = raw.get();
    if let Some(plain) = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|t| !t.contains('\\'))
    {
        return Ok(Some(plain.to_owned()));
    }
    serde_json::from_str::<Option<String>>(text)
        .map_err(|_| Refusal::new(ErrorCode::InvalidField, format!("field {name} must be a string")))
}

/// Reads JSON text through without building anything, under the limits a
/// `serde_json::Value` has (nesting depth, number range, valid escapes).
#[cfg(test)]
fn check_tree(json: &str) -> Result<(), serde_json::Error> {
    use serde::de::{MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The intake's one pass (`Resource::from_raw_checked`) refuses what the two passes it
    /// replaced refused (`check_tree`), and reads the same keys as `Resource::from_raw`.
    #[test]
    fn one_checked_pass_agrees_with_the_check_and_the_key_reading_it_replaced() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let deep_under_id = format!(r#"{{"id": {}"x"{}}}"#, "[".repeat(200), "]".repeat(200));
        let cases = [
            r#"{"id": "r", "creator_id": "c", "n": [1, 2.5, -3, {"a": null}]}"#,
            r#"{"id": 7, "creator_id": null}"#,
            r#"{"id": "a", "id": "b", "creator_id": "c"}"#,
            r#"{"i\u0064": "r", "creator_id": "c"}"#,
            r#"{"id": "r", "n": 1e400}"#,
            r#"{"id": 1e400}"#,
            r#"{"id": "r", "s": "\ud800"}"#,
            r#"{"creator_id": "\ud800"}"#,
            r#"{"k\ud800": 1}"#,
            r#"{"id": "r", "deep": [[[[[[[[[[1]]]]]]]]]]}"#,
            &deep,
            &deep_under_id,
            "[1, {\"id\": \"x\"}]",
            "\"id\"",
            "3",
            "null",
            "{}",
        ];
        for text in cases {
            let Ok(raw) = serde_json::value::RawValue::from_string(text.to_owned()) else {
                panic!("raw value {text}");
            };
            let before = check_tree(raw.get()).map(|()| Resource::from_raw(raw.clone()));
            let after = Resource::from_raw_checked(raw);
            match (before, after) {
                (Ok(b), Ok(a)) => {
                    assert_eq!(
                        (a.id(), a.creator_id(), a.json()),
                        (b.id(), b.creator_id(), b.json()),
                        "{text}"
                    )
                }
                (Err(_), Err(_)) => {}
                (b, a) => panic!(
                    "{text}: before {:?}, after {:?}",
                    b.map(|r| r.json().to_owned()),
                    a.map(|r| r.json().to_owned())
                ),
            }
        }
    }

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
    fn keys_of_any_case_and_escaped_name_their_field_and_the_last_one_wins() {
        let d = decode(
            r#"{"DATA_TYPE":"first","d\u0061taType":"DT","extra":[1,{"x":null}],"fromApp":"app",
                "action":"PB_UPDATE","user":"ren\u00e9 \"r\"","payload":{"id":"old","creator_id":"12D3KooWme"},
                "PAYLOAD":{"id":"r2","creator_id":"12D3KooWme"}}"#,
        )
        .unwrap();
        let Decoded::Accept(e) = d else {
            panic!("not accepted")
        };
        assert_eq!((e.data_type.as_str(), e.from_app.as_str()), ("DT", "app"));
        assert_eq!((e.action, e.resource_id.as_str()), (Action::Update, "r2"));
        assert_eq!(e.user, "rené \"r\"", "escapes read as a string's");
        assert_eq!(code(r#"["not", "an", "object"]"#), ErrorCode::InvalidJson);
        assert_eq!(
            code(r#"{"action":"PB_CREATE","data_type":"D","x":[1,}"#),
            ErrorCode::InvalidJson,
            "a skipped key's value is checked too"
        );
        assert_eq!(
            code(r#"{"action":7,"data_type":"D","payload":{}}"#),
            ErrorCode::InvalidField
        );
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
    fn own_echo_is_ignored() {
        assert_eq!(
            decode(r#"{"from_app":"oc-discovery","action":"PB_CREATE"}"#),
            Ok(Decoded::OwnEcho)
        );
    }
}
