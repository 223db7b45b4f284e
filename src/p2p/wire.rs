//! Framing and frames of the resource streams (`protocols/resource-streams.md`).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON. Frames
//! above the reader's cap are skipped (read and discarded) and reported, so one oversized
//! frame never kills a stream that carries good events behind it.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use crate::event::JournalEntry;

/// Hard ceiling for any frame, whatever the configuration: a length above it means the
/// peer does not speak our framing, and the stream is closed.
pub const ABSOLUTE_MAX_FRAME: usize = 64 * 1024 * 1024;

/// One message on a resource stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
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
    Large {
        seq: u64,
    },
    /// Considers / planner: an application message for the receiver to republish on its
    /// NATS as `PROPALGATION_EVENT` (answered by `ack`, or `error`).
    Forward {
        action: String,
        data_type: String,
        user: String,
        payload: serde_json::Value,
    },
    /// Heartbeat, either way: the peer answers `pong` with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Journal sync, puller → owner: entries `since < seq <= until` of `origin` (until
    /// chosen by the owner when absent), cut in parts of at most `part_bytes`; `parts`
    /// asks again for only those parts of an answer already begun.
    SyncRequest {
        origin: String,
        since: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
        part_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parts: Option<Vec<u32>>,
    },
    /// Journal sync, owner → puller: what the parts that follow hold.
    SyncHeader {
        since: u64,
        until: u64,
        head: u64,
        total: u32,
        bytes: u64,
    },
    /// Journal sync, owner → puller: part `index` of `total` (base64 of a slice of the JSON
    /// lines of the entries).
    SyncPart {
        index: u32,
        total: u32,
        data: String,
    },
    /// Receiver → sender: every entry of the origin up to and including `seq` is handled
    /// (applied, or refused with an `Error` frame). Cumulative.
    Ack {
        seq: u64,
    },
    /// Receiver → sender: a refusal, about one entry (`seq`) or about the stream.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        code: String,
        message: String,
    },
    /// Search (`protocols/search.md`), searcher → responder, first frame of a `known` /
    /// `partner` search stream: the responder's own resources of `data_type` whose values
    /// contain `search`, at most `limit`, in frames of at most `max_frame_bytes`.
    SearchQuery {
        query_id: String,
        data_type: String,
        search: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_frame_bytes: Option<u64>,
    },
    /// Search, responder → searcher: one batch of results (for an `all` search it is the
    /// first frame of the stream the responder opens).
    SearchResults {
        query_id: String,
        results: Vec<serde_json::Value>,
    },
    /// Search, responder → searcher: the last frame. `count` results were sent; `skipped`
    /// matches were left out because one alone exceeds a frame.
    SearchDone {
        query_id: String,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        skipped: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The frame was skipped; the stream is still usable.
    #[error("frame of {size} bytes exceeds the cap of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// The frame was read whole but is not a valid [`Frame`]; the stream is still usable.
    #[error("undecodable frame: {0}")]
    Decode(serde_json::Error),
    /// The length prefix is absurd: the stream cannot be trusted any more.
    #[error("frame length {0} is beyond any sane limit")]
    Corrupt(usize),
}

impl FrameError {
    /// Whether the stream can go on after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::TooLarge { .. } | FrameError::Decode(_))
    }
}

/// Appends one encoded frame to `out` (no I/O: callers batch frames and write once).
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    // Serializing our own enum into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, frame).is_err() {
        out.truncate(start);
        return;
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends an `event` frame built from the JSON text of a [`JournalEntry`] without decoding
/// it: the frame is that object with `"type":"event"` first. Returns false (and appends
/// nothing) when `entry_json` is not a non-empty JSON object.
pub fn encode_event_json(entry_json: &[u8], out: &mut Vec<u8>) -> bool {
    const TAG: &[u8] = br#"{"type":"event","#;
    let body = match entry_json.split_first() {
        Some((b'{', rest)) if rest.first().is_some_and(|b| *b != b'}') => rest,
        _ => return false,
    };
    let len = (TAG.len() + body.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(TAG);
    out.extend_from_slice(body);
    true
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(128);
    encode_frame(frame, &mut buf);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame. `Ok(None)` is a clean end of stream.
///
/// # Errors
/// See [`FrameError`]; recoverable errors leave the stream positioned at the next frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Frame>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > ABSOLUTE_MAX_FRAME {
        return Err(FrameError::Corrupt(size));
    }
    if size > max {
        let skipped = futures::io::copy(r.take(size as u64), &mut futures::io::sink()).await?;
        if skipped < size as u64 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        return Err(FrameError::TooLarge { size, max });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).await?;
    decode_frame(&body).map(Some).map_err(FrameError::Decode)
}

/// Decodes one frame's JSON. Frames must be decoded here, not by `Frame`'s `Deserialize`
/// alone: serde reads a tagged enum by first copying the whole object into an intermediate
/// tree, from which an `event` frame's [`Resource`](crate::event::Resource) (kept as JSON
/// text) cannot be read. An `event` frame is therefore read straight into its
/// [`JournalEntry`], which ignores the `type` key.
///
/// # Errors
/// The body is not JSON, or not a frame.
pub fn decode_frame(body: &[u8]) -> Result<Frame, serde_json::Error> {
    /// How this node writes `event` frames ([`encode_event_json`], [`encode_frame`]).
    const EVENT: &[u8] = br#"{"type":"event","#;
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    if body.starts_with(EVENT) || serde_json::from_slice::<Tag>(body)?.kind == "event" {
        return serde_json::from_slice::<JournalEntry>(body).map(Frame::Event);
    }
    serde_json::from_slice(body)
}

/// Reads frames until the stream ends or fails for good, handing each result to `tx`
/// (wrapped by `wrap`); the final `Ok(None)` or fatal error is handed over too. Stops early
/// when the receiver is gone. The channel bound is the backpressure: a slow consumer stops
/// the reading, and the peer's writes block on the transport window.
pub async fn forward_frames<R, T, F>(mut r: R, max: usize, tx: tokio::sync::mpsc::Sender<T>, wrap: F)
where
    R: AsyncRead + Unpin,
    F: Fn(Result<Option<Frame>, FrameError>) -> T,
{
    loop {
        let frame = read_frame(&mut r, max).await;
        let end = match &frame {
            Ok(Some(_)) => false,
            Ok(None) => true,
            Err(e) => !e.is_recoverable(),
        };
        if tx.send(wrap(frame)).await.is_err() || end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Action;

    #[tokio::test]
    async fn an_event_frame_from_entry_json_reads_back_as_the_entry() {
        let mut buf = Vec::new();
        assert!(encode_event_json(
            &serde_json::to_vec(&entry(5)).unwrap(),
            &mut buf
        ));
        let mut expected = Vec::new();
        encode_frame(&Frame::Event(entry(5)), &mut expected);
        assert_eq!(buf, expected, "the same bytes as encoding the frame");
        let read = read_frame(&mut buf.as_slice(), 1 << 20).await.unwrap();
        assert_eq!(read, Some(Frame::Event(entry(5))));
        for not_an_object in [&b""[..], b"{}", b"[1]", b"null"] {
            let mut out = Vec::new();
            assert!(!encode_event_json(not_an_object, &mut out));
            assert!(out.is_empty());
        }
    }

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

    #[test]
    fn an_event_frame_decodes_whatever_its_key_order_and_spacing() {
        let written = r#"{ "origin": "o", "seq": 1, "action": "PB_UPDATE", "data_type": "D",
            "user": "u", "resource": {"id": "r", "creator_id": "o"}, "type": "event", "time_ms": 1 }"#;
        let Ok(Frame::Event(e)) = decode_frame(written.as_bytes()) else {
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
        assert!(decode_frame(br#"{"seq": 1}"#).is_err(), "no type");
        assert!(
            decode_frame(br#"{"type":"event","seq":1}"#).is_err(),
            "missing fields"
        );
        assert_eq!(
            decode_frame(br#"{"seq":3,"type":"ack"}"#).unwrap(),
            Frame::Ack { seq: 3 }
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_skipped() {
        let mut buf = Vec::new();
        encode_frame(&Frame::Event(entry(1)), &mut buf);
        let big = Frame::Error {
            seq: None,
            code: "x".into(),
            message: "y".repeat(500),
        };
        encode_frame(&big, &mut buf);
        encode_frame(&Frame::Ack { seq: 7 }, &mut buf);
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(b"{{{");
        let mut r = futures::io::Cursor::new(buf);
        assert_eq!(
            read_frame(&mut r, 200).await.unwrap(),
            Some(Frame::Event(entry(1)))
        );
        assert!(matches!(
            read_frame(&mut r, 200).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            read_frame(&mut r, 200).await.unwrap(),
            Some(Frame::Ack { seq: 7 })
        );
        assert!(matches!(
            read_frame(&mut r, 200).await,
            Err(FrameError::Decode(_))
        ));
        assert_eq!(read_frame(&mut r, 200).await.unwrap(), None);
    }
}
