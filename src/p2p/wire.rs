//! Framing and frames of the resource streams (`protocols/resource-streams.md`).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON. Frames
//! above the reader's cap are skipped (read and discarded) and reported, so one oversized
//! frame never kills a stream that carries good events behind it.
//!
//! A length prefix is a claim, not a reservation: the body buffer grows only once body bytes
//! arrive, one [`READ_CHUNK`] ahead of them at most (its capacity doubling, so never beyond
//! twice what arrived plus one chunk), so a peer that sends a 4-byte prefix of 1 MiB and
//! stalls costs nothing. [`read_frame_budgeted`] also
//! charges the growing buffer to a [`ByteBudget`] shared by all of one peer's streams, so
//! the owner of those streams bounds the bytes that peer holds in half-read frames.

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use crate::contract::{ErrorCode, JournalEntry};

/// Hard ceiling for any frame, whatever the configuration: a length above it means the
/// peer does not speak our framing, and the stream is closed.
pub const ABSOLUTE_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Most bytes of a frame's body buffer written ahead of the bytes received.
pub const READ_CHUNK: usize = 64 * 1024;
/// Bytes read into the reader's own small buffer before a frame's body buffer grows.
const FIRST_READ: usize = 256;

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
    /// chosen by the owner when absent; either way at most one round), cut in parts of at
    /// most `part_bytes`, the whole answer at most `max_bytes` (the puller's round byte
    /// cap; the owner's own cap when absent); `parts` asks again for only those parts of an
    /// answer already begun.
    SyncRequest {
        origin: String,
        since: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
        part_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
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
    /// first frame of the stream the responder opens), all of `data_type` (the one asked;
    /// a searcher drops batches without it or of another data type).
    SearchResults {
        query_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_type: Option<String>,
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

impl Frame {
    /// An `error` frame: a refusal with its stable code, about entry `seq` or (`None`) the
    /// stream.
    pub fn error(seq: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error {
            seq,
            code: code.as_str().to_owned(),
            message: message.into(),
        }
    }

    /// The frame's `type` on the wire, for log lines (a whole frame may be large).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Event(_) => "event",
            Frame::Large { .. } => "large",
            Frame::Forward { .. } => "forward",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::SyncRequest { .. } => "sync_request",
            Frame::SyncHeader { .. } => "sync_header",
            Frame::SyncPart { .. } => "sync_part",
            Frame::Ack { .. } => "ack",
            Frame::Error { .. } => "error",
            Frame::SearchQuery { .. } => "search_query",
            Frame::SearchResults { .. } => "search_results",
            Frame::SearchDone { .. } => "search_done",
        }
    }
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
    /// The peer's [`ByteBudget`] is spent by frames being read on its other streams; the
    /// stream is left in the middle of a frame and must be dropped.
    #[error("frame of {size} bytes: the peer's budget of {limit} bytes in flight is spent")]
    OverBudget { size: usize, limit: usize },
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
    // A frame beyond 4 GiB cannot be framed: appended nothing rather than a wrong length.
    let Ok(len) = u32::try_from(out.len().saturating_sub(start + 4)) else {
        out.truncate(start);
        return;
    };
    if let Some(prefix) = out.get_mut(start..start + 4) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
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
    let Some(len) = TAG
        .len()
        .checked_add(body.len())
        .and_then(|n| u32::try_from(n).ok())
    else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(TAG);
    out.extend_from_slice(body);
    true
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(128);
    encode_frame(frame, &mut buf);
    write_encoded(w, &buf).await
}

/// Writes frames already encoded ([`encode_frame`]: length prefixes included) and flushes,
/// for a frame encoded once and sent to many peers.
pub async fn write_encoded<W: AsyncWrite + Unpin>(w: &mut W, frames: &[u8]) -> std::io::Result<()> {
    w.write_all(frames).await?;
    w.flush().await
}

/// Bytes one peer may hold in frames being read, across all of its streams.
///
/// Shared (in an `Arc`) by whoever owns a peer's streams, and passed to
/// [`read_frame_budgeted`] for each of them. A frame's body
/// buffer is charged as it grows and released as soon as the frame is decoded (or fails):
/// the budget bounds the bytes of half-read frames, whatever the length prefixes claim.
/// What the caller keeps after a frame is decoded is the caller's to bound.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> ByteBudget {
        ByteBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes currently charged.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes, or nothing and false when that would pass the limit.
    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        // Never below zero: only what was taken is given back.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// The part of a [`ByteBudget`] one frame holds; given back when dropped.
struct Charge<'a> {
    budget: Option<&'a ByteBudget>,
    held: usize,
}

impl Charge<'_> {
    /// Raises the charge to `to` bytes; false when the budget does not allow it.
    fn raise(&mut self, to: usize) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        let more = to.saturating_sub(self.held);
        if more == 0 {
            return true;
        }
        if !budget.try_take(more) {
            return false;
        }
        self.held = to;
        true
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if let Some(budget) = self.budget {
            budget.give(self.held);
        }
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream.
///
/// The body is read as it arrives, its buffer grown only once bytes are there and at most
/// twice the bytes received plus [`READ_CHUNK`]: the length prefix alone allocates nothing.
///
/// # Errors
/// See [`FrameError`]; recoverable errors leave the stream positioned at the next frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Frame>, FrameError> {
    read_frame_inner(r, max, None).await
}

/// [`read_frame`], charging the body buffer to `budget` while the frame is read (the
/// budget of the peer that owns the stream, shared by its other streams).
///
/// # Errors
/// As [`read_frame`], and [`FrameError::OverBudget`] (not recoverable: the stream is in the
/// middle of a frame) when the peer's frames being read already hold the whole budget.
pub async fn read_frame_budgeted<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    budget: &ByteBudget,
) -> Result<Option<Frame>, FrameError> {
    read_frame_inner(r, max, Some(budget)).await
}

async fn read_frame_inner<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    budget: Option<&ByteBudget>,
) -> Result<Option<Frame>, FrameError> {
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
    let mut charge = Charge { budget, held: 0 };
    let mut body: Vec<u8> = Vec::new();
    let mut filled = 0usize;
    while filled < size {
        let eof = || FrameError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        if filled < body.len() {
            let got = match body.get_mut(filled..) {
                Some(room) => r.read(room).await?,
                None => 0,
            };
            if got == 0 {
                return Err(eof());
            }
            filled = filled.saturating_add(got);
            continue;
        }
        // The buffer is full: grow it only once more bytes are there, so a stream that
        // stalls (right after its length prefix, or anywhere) holds only what it sent.
        let mut first = [0u8; FIRST_READ];
        let n = size.saturating_sub(filled).min(FIRST_READ);
        let got = match first.get_mut(..n) {
            Some(room) => r.read(room).await?,
            None => 0,
        };
        if got == 0 {
            return Err(eof());
        }
        // Room for one more chunk. The capacity doubles (a large frame is not copied over
        // and over) and is charged to the budget before it exists; only the chunk ahead is
        // written (zeroed), so the memory touched stays within one chunk of what arrived.
        let step = READ_CHUNK.min(size.saturating_sub(filled));
        let want = filled.saturating_add(step);
        if body.capacity() < want {
            let grown = body.capacity().saturating_mul(2).max(want).min(size);
            if !charge.raise(grown) {
                return Err(FrameError::OverBudget {
                    size,
                    limit: budget.map_or(0, ByteBudget::limit),
                });
            }
            body.reserve_exact(grown.saturating_sub(body.len()));
        }
        body.resize(want, 0);
        let end = filled.saturating_add(got);
        match (body.get_mut(filled..end), first.get(..got)) {
            (Some(to), Some(from)) => to.copy_from_slice(from),
            _ => return Err(eof()),
        }
        filled = end;
    }
    decode_frame(&body).map(Some).map_err(FrameError::Decode)
}

/// Decodes one frame's JSON. Frames must be decoded here, not by `Frame`'s `Deserialize`
/// alone: serde reads a tagged enum by first copying the whole object into an intermediate
/// tree, from which an `event` frame's [`Resource`](crate::contract::Resource) (kept as JSON
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
    use crate::contract::Action;

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
    /// Gives `data` in reads of at most `step` bytes, then never ends (a stalled peer).
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let at = self.at;
            let n = self.step.min(buf.len()).min(self.data.len() - at);
            if n == 0 {
                return std::task::Poll::Pending;
            }
            buf[..n].copy_from_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    fn trickle(data: Vec<u8>, step: usize) -> Trickle {
        Trickle { data, at: 0, step }
    }

    #[tokio::test]
    async fn a_length_prefix_alone_costs_nothing_and_the_buffer_follows_the_bytes() {
        let budget = ByteBudget::new(1 << 30);
        let mut prefix_only = trickle((1u32 << 20).to_be_bytes().to_vec(), 4);
        {
            let read = read_frame_budgeted(&mut prefix_only, 2 << 20, &budget);
            futures::pin_mut!(read);
            assert!(futures::poll!(read.as_mut()).is_pending());
            assert_eq!(budget.in_use(), 0, "nothing held for a bare prefix");
        }
        let mut data = (1u32 << 20).to_be_bytes().to_vec();
        data.extend(vec![b' '; 100_000]);
        let mut partial = trickle(data, 1 << 20);
        {
            let read = read_frame_budgeted(&mut partial, 2 << 20, &budget);
            futures::pin_mut!(read);
            assert!(futures::poll!(read.as_mut()).is_pending());
            let held = budget.in_use();
            assert!(
                (100_000..=2 * 100_000 + READ_CHUNK).contains(&held),
                "{held} bytes held for 100 000 received"
            );
        }
        assert_eq!(budget.in_use(), 0, "given back when the read is dropped");
    }

    #[tokio::test]
    async fn a_frame_read_in_small_pieces_is_whole_and_the_budget_bounds_half_read_frames() {
        let mut buf = Vec::new();
        encode_frame(&Frame::Event(entry(9)), &mut buf);
        let mut slow = trickle(buf.clone(), 3);
        let budget = ByteBudget::new(1 << 20);
        assert_eq!(
            read_frame_budgeted(&mut slow, 1 << 20, &budget).await.unwrap(),
            Some(Frame::Event(entry(9)))
        );
        assert_eq!(budget.in_use(), 0, "released once decoded");

        // Two half-read frames of one peer: the second passes the budget.
        let big = |n: usize| {
            let mut d = (n as u32).to_be_bytes().to_vec();
            d.extend(vec![b' '; n - 1]);
            d
        };
        let budget = ByteBudget::new(150 * 1024);
        let (mut one, mut two) = (
            trickle(big(100 * 1024), 1 << 20),
            trickle(big(100 * 1024), 1 << 20),
        );
        let first = read_frame_budgeted(&mut one, 1 << 20, &budget);
        futures::pin_mut!(first);
        assert!(futures::poll!(first.as_mut()).is_pending());
        let second = read_frame_budgeted(&mut two, 1 << 20, &budget).await;
        assert!(matches!(second, Err(FrameError::OverBudget { .. })), "{second:?}");
        assert!(!second.unwrap_err().is_recoverable());
        assert!(budget.in_use() <= budget.limit());
    }

    #[tokio::test]
    async fn decoding_and_reading_never_panic_on_garbage() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut valid = Vec::new();
        encode_frame(&Frame::Event(entry(1)), &mut valid);
        encode_frame(
            &Frame::SyncRequest {
                origin: "o".into(),
                since: 1,
                until: Some(2),
                part_bytes: 3,
                max_bytes: Some(4),
                parts: Some(vec![1, 2]),
            },
            &mut valid,
        );
        for _ in 0..5_000 {
            let mut bytes = if rng.gen_bool(0.5) {
                valid.clone()
            } else {
                (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect()
            };
            for _ in 0..rng.gen_range(0..6) {
                if let Some(len) = std::num::NonZeroUsize::new(bytes.len()) {
                    let at = rng.gen_range(0..len.get());
                    bytes[at] = rng.gen();
                }
            }
            let _ = decode_frame(&bytes);
            let _ = decode_frame(bytes.get(4..).unwrap_or_default());
            let mut r = bytes.as_slice();
            for _ in 0..4 {
                if !matches!(read_frame(&mut r, 4096).await, Err(e) if e.is_recoverable()) {
                    break;
                }
            }
        }
        let deep = "[".repeat(100_000);
        assert!(
            decode_frame(deep.as_bytes()).is_err(),
            "nesting is bounded by serde_json"
        );
    }
}
