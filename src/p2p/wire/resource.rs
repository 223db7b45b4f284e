//! Frames of the resource streams `/opencloud/resource/{create,update,delete}/1.0`
//! (`protocols/resource-streams.md`): `hello`, `event` and `large` from the sender, `ack`
//! and `error` from the receiver.

use serde::{Deserialize, Serialize};

use super::framing::{ErrorFrame, Frame};
use crate::contract::JournalEntry;

/// How this node writes `event` frames ([`encode_event_json`], `encode_frame`): the tag
/// first, then the entry's fields.
const EVENT_TAG: &[u8] = br#"{"type":"event","#;

/// One message on a resource stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResourceFrame {
    /// Sender → receiver, first frame on each stream: whose journal follows, and how far it
    /// goes (a receiver far behind pulls the gap with the journal sync protocol).
    Hello {
        origin: String,
        #[serde(default)]
        head: u64,
    },
    /// Sender → receiver: one journal entry.
    Event(JournalEntry),
    /// Sender → receiver: the entry `seq` is larger than a frame may be; pull it with the
    /// journal sync protocol, which splits it.
    Large { seq: u64 },
    /// Receiver → sender: every entry of the origin up to and including `seq` is handled
    /// (applied, or refused with an `error` frame). Cumulative.
    Ack { seq: u64 },
    /// Receiver → sender: a refusal, about one entry (`seq`) or about the stream.
    Error(ErrorFrame),
}

impl Frame for ResourceFrame {
    fn kind(&self) -> &'static str {
        match self {
            ResourceFrame::Hello { .. } => "hello",
            ResourceFrame::Event(_) => "event",
            ResourceFrame::Large { .. } => "large",
            ResourceFrame::Ack { .. } => "ack",
            ResourceFrame::Error(_) => "error",
        }
    }

    /// Not by `Deserialize` alone: serde reads a tagged enum by first copying the whole
    /// object into an intermediate tree, from which an `event` frame's
    /// [`Resource`](crate::contract::Resource) (kept as JSON text) cannot be read. An `event`
    /// frame is therefore read straight into its [`JournalEntry`], which ignores the `type`
    /// key.
    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        if body.starts_with(EVENT_TAG) || serde_json::from_slice::<Tag>(body)?.kind == "event" {
            return serde_json::from_slice::<JournalEntry>(body).map(ResourceFrame::Event);
        }
        serde_json::from_slice(body)
    }
}

/// The bytes [`encode_event_json`] writes for `entry_json` (an upper bound when it refuses it).
pub fn event_frame_len(entry_json: &[u8]) -> usize {
    (4 + EVENT_TAG.len()).saturating_add(entry_json.len())
}

/// Appends an `event` frame built from the JSON text of a [`JournalEntry`] without decoding
/// it: the frame is that object with `"type":"event"` first. Returns false (and appends
/// nothing) when `entry_json` is not a non-empty JSON object.
pub fn encode_event_json(entry_json: &[u8], out: &mut Vec<u8>) -> bool {
    let body = match entry_json.split_first() {
        Some((b'{', rest)) if rest.first().is_some_and(|b| *b != b'}') => rest,
        _ => return false,
    };
    let Some(len) = EVENT_TAG
        .len()
        .checked_add(body.len())
        .and_then(|n| u32::try_from(n).ok())
    else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(EVENT_TAG);
    out.extend_from_slice(body);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Action;
    use crate::p2p::wire::{decode_frame, encode_frame, read_frame, FrameError, HeartbeatFrame};

    fn entry(seq: u64) -> JournalEntry {
        JournalEntry {
            origin: "o".into(),
            seq,
            action: Action::Update,
            data_type: "D".into(),
            user: "u".into(),
            resource: serde_json::json!({"id": "r", "creator_id": "o"}).into(),
            time_ms: 1,
        }
    }

    #[tokio::test]
    async fn an_event_frame_from_entry_json_reads_back_as_the_entry() {
        let mut buf = Vec::new();
        assert!(encode_event_json(
            &serde_json::to_vec(&entry(5)).unwrap(),
            &mut buf
        ));
        let mut expected = Vec::new();
        encode_frame(&ResourceFrame::Event(entry(5)), &mut expected);
        assert_eq!(buf, expected, "the same bytes as encoding the frame");
        let read = read_frame::<ResourceFrame, _>(&mut buf.as_slice(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(read, Some(ResourceFrame::Event(entry(5))));
        for not_an_object in [&b""[..], b"{}", b"[1]", b"null"] {
            let mut out = Vec::new();
            assert!(!encode_event_json(not_an_object, &mut out));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn an_event_frame_decodes_whatever_its_key_order_and_spacing() {
        let written = r#"{ "origin": "o", "seq": 1, "action": "PB_UPDATE", "data_type": "D",
            "user": "u", "resource": {"id": "r", "creator_id": "o"}, "type": "event", "time_ms": 1 }"#;
        let Ok(ResourceFrame::Event(e)) = decode_frame(written.as_bytes()) else {
            panic!("not an event frame")
        };
        assert_eq!(
            (e.seq, e.resource_id(), e.creator_id()),
            (1, Some("r"), Some("o"))
        );
        assert_eq!(
            e.resource.json(),
            r#"{"id": "r", "creator_id": "o"}"#,
            "kept as sent"
        );
        assert!(
            decode_frame::<ResourceFrame>(br#"{"seq": 1}"#).is_err(),
            "no type"
        );
        assert!(
            decode_frame::<ResourceFrame>(br#"{"type":"event","seq":1}"#).is_err(),
            "missing fields"
        );
        assert_eq!(
            decode_frame::<ResourceFrame>(br#"{"seq":3,"type":"ack"}"#).unwrap(),
            ResourceFrame::Ack { seq: 3 }
        );
    }

    #[test]
    fn a_frame_of_another_protocol_is_unexpected_and_garbage_is_undecodable() {
        let ping = br#"{"type":"ping","nonce":7}"#;
        assert!(matches!(
            decode_frame::<ResourceFrame>(ping),
            Err(FrameError::Unexpected { kind: "ping" })
        ));
        assert_eq!(
            decode_frame::<HeartbeatFrame>(ping).unwrap(),
            HeartbeatFrame::Ping { nonce: 7 }
        );
        let hello = br#"{"type":"hello","origin":"o"}"#;
        assert!(matches!(
            decode_frame::<HeartbeatFrame>(hello),
            Err(FrameError::Unexpected { kind: "hello" })
        ));
        for garbage in [&br#"{"type":"ping"}"#[..], br#"{"type":"nope"}"#, b"{{"] {
            let read = decode_frame::<ResourceFrame>(garbage);
            assert!(matches!(read, Err(FrameError::Decode(_))), "{read:?}");
        }
    }
}
