//! A resource as the JSON text the application sent, with its `id` and `creator_id` read
//! once: the node journals, forwards, stores and republishes the text as it came.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{ErrorCode, Refusal};

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

    /// The field as [`decode_intake`](super::decode_intake) requires it: a string, else the refusal naming it.
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
    pub(crate) fn from_raw(raw: Box<RawValue>) -> Resource {
        let raw = one_line(raw);
        let (id, creator_id) = read_keys(raw.get());
        Resource { raw, id, creator_id }
    }

    /// [`Resource::from_raw`] for text from an application: in the same pass that reads
    /// `id` and `creator_id`, every value is read as a tree would read it (nesting within
    /// serde_json's 128 levels, numbers in range, valid `\u` escapes), which the validation
    /// of a raw value does not do. One pass instead of two over each resource the intake
    /// takes (docs/PERFORMANCE.md).
    ///
    /// # Errors
    /// A value no tree could hold.
    pub(crate) fn from_raw_checked(raw: Box<RawValue>) -> Result<Resource, serde_json::Error> {
        let raw = one_line(raw);
        let (id, creator_id) = check_and_read_keys(raw.get())?;
        Ok(Resource { raw, id, creator_id })
    }

    /// # Errors
    /// `text` is not valid JSON.
    pub(crate) fn from_json(text: &str) -> Result<Resource, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Resource::from_raw)
    }

    /// The JSON text of a value (for tests and for callers that built a tree).
    pub(crate) fn from_value(value: &Value) -> Resource {
        // A Value always serializes, and to valid JSON.
        let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
        Resource::from_json(&text).unwrap_or_else(|_| Resource::from_raw(RawValue::NULL.to_owned()))
    }

    /// The JSON text, as received.
    pub fn json(&self) -> &str {
        self.raw.get()
    }

    pub(crate) fn raw(&self) -> &RawValue {
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

    /// The top-level `id` as the intake requires it: a string, else the refusal naming it.
    pub(super) fn required_id(&self) -> Result<&str, Refusal> {
        self.id.required("id")
    }

    /// The top-level `creator_id` as the intake requires it.
    pub(super) fn required_creator_id(&self) -> Result<&str, Refusal> {
        self.creator_id.required("creator_id")
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

/// `raw` without line breaks (see [`Resource::from_raw`]).
fn one_line(raw: Box<RawValue>) -> Box<RawValue> {
    // A vectorised byte scan: `str::contains` with a char set decoded every UTF-8 code
    // point (≈ 3 % of a receiving node's CPU), a plain byte loop still cost 2–3.5 % of
    // either node (docs/PERFORMANCE.md).
    if memchr::memchr2(b'\n', b'\r', raw.get().as_bytes()).is_some() {
        let flat = raw.get().replace(['\n', '\r'], " ");
        RawValue::from_string(flat).unwrap_or(raw)
    } else {
        raw
    }
}

/// Any JSON value, read the way a tree reads it and then dropped: what
/// [`check_and_read_keys`] makes of the values it does not keep.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(CheckedVisitor).map(|_| Checked)
    }
}

/// Visits any value as [`Checked`]; a string or `null` says so (for `id` and `creator_id`).
struct CheckedVisitor;

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Field;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
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
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Field, E> {
        Ok(Field::Text(v.into()))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Field, E> {
        Ok(Field::Missing)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Field::NotText)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Field::NotText)
    }
}

/// [`read_keys`] and the check of every value in one pass: the top-level `id` and
/// `creator_id` (the last of duplicate keys wins), or the error a tree would meet.
fn check_and_read_keys(json: &str) -> Result<(Field, Field), serde_json::Error> {
    use serde::de::MapAccess;

    struct Top;
    impl<'de> serde::de::Visitor<'de> for Top {
        type Value = (Field, Field);
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(Field, Field), A::Error> {
            let (mut id, mut creator) = (Field::Missing, Field::Missing);
            while let Some(key) = map.next_key::<KeyName>()? {
                match key {
                    KeyName::Id => id = map.next_value::<CheckedField>()?.0,
                    KeyName::CreatorId => creator = map.next_value::<CheckedField>()?.0,
                    KeyName::Other => {
                        map.next_value::<Checked>()?;
                    }
                }
            }
            Ok((id, creator))
        }
        // Not an object: checked all the same, and it has no keys.
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(Field, Field), E> {
            Ok((Field::Missing, Field::Missing))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(Field, Field), E> {
            Ok((Field::Missing, Field::Missing))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(Field, Field), E> {
            Ok((Field::Missing, Field::Missing))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(Field, Field), E> {
            Ok((Field::Missing, Field::Missing))
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(Field, Field), E> {
            Ok((Field::Missing, Field::Missing))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<(Field, Field), E> {
            Ok((Field::Missing, Field::Missing))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<(Field, Field), A::Error> {
            CheckedVisitor
                .visit_seq(seq)
                .map(|_| (Field::Missing, Field::Missing))
        }
    }

    /// The value of `id` or `creator_id`, checked like any other.
    struct CheckedField(Field);
    impl<'de> Deserialize<'de> for CheckedField {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CheckedField, D::Error> {
            d.deserialize_any(CheckedVisitor).map(CheckedField)
        }
    }

    let mut de = serde_json::Deserializer::from_str(json);
    let keys = serde::Deserializer::deserialize_any(&mut de, Top)?;
    de.end()?;
    Ok(keys)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
