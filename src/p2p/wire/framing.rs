//! The framing every stream protocol shares (`protocols/resource-streams.md`, "Framing"),
//! generic over each protocol's [`Frame`] enum, and the `error` frame they all carry.
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

use crate::contract::ErrorCode;

/// Hard ceiling for any frame, whatever the configuration: a length above it means the
/// peer does not speak our framing, and the stream is closed.
pub const ABSOLUTE_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Most bytes of a frame's body buffer written ahead of the bytes received.
pub const READ_CHUNK: usize = 64 * 1024;
/// Bytes read into the reader's own small buffer before a frame's body buffer grows.
const FIRST_READ: usize = 256;

/// The frames of one protocol: a `#[serde(tag = "type", rename_all = "snake_case")]` enum,
/// so that each frame is one JSON object whose `type` names it.
pub trait Frame: Serialize + Sized {
    /// The frame's `type` on the wire, for log lines (a whole frame may be large).
    fn kind(&self) -> &'static str;

    /// Decodes one frame's JSON body as a frame of this protocol.
    ///
    /// # Errors
    /// The body is not JSON, or not a frame of this protocol.
    fn decode(body: &[u8]) -> Result<Self, serde_json::Error>;
}

/// Receiver → sender on every protocol: a refusal, about one entry (`seq`) or about the
/// stream; `code` is one of [`ErrorCode`]'s stable codes. Each protocol's enum carries it as
/// its `error` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub code: String,
    pub message: String,
}

impl ErrorFrame {
    /// A refusal with its stable code, about entry `seq` or (`None`) the stream.
    pub(crate) fn new(seq: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame {
            seq,
            code: code.as_str().to_owned(),
            message: message.into(),
        }
    }
}

/// An `error` frame alone, for a stream refused before its protocol matters (a peer that is
/// not a partner, a helper pool that is full): the same bytes as any protocol's `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ErrorOnly {
    Error(ErrorFrame),
}

impl Frame for ErrorOnly {
    fn kind(&self) -> &'static str {
        "error"
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The frame was skipped; the stream is still usable.
    #[error("frame of {size} bytes exceeds the cap of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// The frame was read whole but is not a valid frame; the stream is still usable.
    #[error("undecodable frame: {0}")]
    Decode(serde_json::Error),
    /// The frame was read whole and is a valid frame of another protocol (its `type`); the
    /// stream is still usable.
    #[error("a {kind} frame does not belong to this protocol")]
    Unexpected { kind: &'static str },
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
        matches!(
            self,
            FrameError::TooLarge { .. } | FrameError::Decode(_) | FrameError::Unexpected { .. }
        )
    }
}

/// Appends one encoded frame to `out` (no I/O: callers batch frames and write once).
pub fn encode_frame<F: Frame>(frame: &F, out: &mut Vec<u8>) {
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

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin, F: Frame>(w: &mut W, frame: &F) -> std::io::Result<()> {
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

    pub(crate) fn limit(&self) -> usize {
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
pub async fn read_frame<F: Frame, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<F>, FrameError> {
    read_frame_inner(r, max, None).await
}

/// [`read_frame`], charging the body buffer to `budget` while the frame is read (the
/// budget of the peer that owns the stream, shared by its other streams).
///
/// # Errors
/// As [`read_frame`], and [`FrameError::OverBudget`] (not recoverable: the stream is in the
/// middle of a frame) when the peer's frames being read already hold the whole budget.
pub async fn read_frame_budgeted<F: Frame, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    budget: &ByteBudget,
) -> Result<Option<F>, FrameError> {
    read_frame_inner(r, max, Some(budget)).await
}

async fn read_frame_inner<F: Frame, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    budget: Option<&ByteBudget>,
) -> Result<Option<F>, FrameError> {
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
    decode_frame(&body).map(Some)
}

/// Decodes one frame's JSON as a frame of protocol `F`.
///
/// # Errors
/// [`FrameError::Unexpected`] when the body is a valid frame of another protocol,
/// [`FrameError::Decode`] when it is no frame at all.
pub fn decode_frame<F: Frame>(body: &[u8]) -> Result<F, FrameError> {
    F::decode(body).map_err(|e| match super::kind_in_any_protocol(body) {
        Some(kind) => FrameError::Unexpected { kind },
        None => FrameError::Decode(e),
    })
}

/// Reads frames until the stream ends or fails for good, handing each result to `tx`
/// (wrapped by `wrap`); the final `Ok(None)` or fatal error is handed over too. Stops early
/// when the receiver is gone. The channel bound is the backpressure: a slow consumer stops
/// the reading, and the peer's writes block on the transport window.
pub async fn forward_frames<F, R, T, W>(mut r: R, max: usize, tx: tokio::sync::mpsc::Sender<T>, wrap: W)
where
    F: Frame,
    R: AsyncRead + Unpin,
    W: Fn(Result<Option<F>, FrameError>) -> T,
{
    loop {
        let frame = read_frame::<F, R>(&mut r, max).await;
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
    use crate::contract::{Action, JournalEntry};
    use crate::p2p::wire::{HeartbeatFrame, ResourceFrame, SearchFrame, SyncFrame};

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
    fn an_error_frame_has_the_same_bytes_in_every_protocol() {
        let error = ErrorFrame::new(Some(2), ErrorCode::InvalidField, "m");
        let mut bytes = Vec::new();
        encode_frame(&ResourceFrame::Error(error.clone()), &mut bytes);
        let expected = br#"{"type":"error","seq":2,"code":"invalid_field","message":"m"}"#;
        assert_eq!(bytes.get(4..), Some(&expected[..]));
        for other in [
            encode(&HeartbeatFrame::Error(error.clone())),
            encode(&SyncFrame::Error(error.clone())),
            encode(&ErrorOnly::Error(error.clone())),
        ] {
            assert_eq!(other, bytes);
        }
        let without_seq = br#"{"type":"error","code":"busy","message":"m"}"#;
        assert_eq!(
            decode_frame::<SyncFrame>(without_seq).unwrap(),
            SyncFrame::Error(ErrorFrame::new(None, ErrorCode::Busy, "m"))
        );
    }

    fn encode<F: Frame>(frame: &F) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(frame, &mut out);
        out
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_skipped() {
        let mut buf = Vec::new();
        encode_frame(&ResourceFrame::Event(entry(1)), &mut buf);
        let big = ResourceFrame::Error(ErrorFrame {
            seq: None,
            code: "x".into(),
            message: "y".repeat(500),
        });
        encode_frame(&big, &mut buf);
        encode_frame(&ResourceFrame::Ack { seq: 7 }, &mut buf);
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(b"{{{");
        let mut r = futures::io::Cursor::new(buf);
        assert_eq!(
            read_frame::<ResourceFrame, _>(&mut r, 200).await.unwrap(),
            Some(ResourceFrame::Event(entry(1)))
        );
        assert!(matches!(
            read_frame::<ResourceFrame, _>(&mut r, 200).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            read_frame::<ResourceFrame, _>(&mut r, 200).await.unwrap(),
            Some(ResourceFrame::Ack { seq: 7 })
        );
        assert!(matches!(
            read_frame::<ResourceFrame, _>(&mut r, 200).await,
            Err(FrameError::Decode(_))
        ));
        assert_eq!(read_frame::<ResourceFrame, _>(&mut r, 200).await.unwrap(), None);
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
            let read = read_frame_budgeted::<ResourceFrame, _>(&mut prefix_only, 2 << 20, &budget);
            futures::pin_mut!(read);
            assert!(futures::poll!(read.as_mut()).is_pending());
            assert_eq!(budget.in_use(), 0, "nothing held for a bare prefix");
        }
        let mut data = (1u32 << 20).to_be_bytes().to_vec();
        data.extend(vec![b' '; 100_000]);
        let mut partial = trickle(data, 1 << 20);
        {
            let read = read_frame_budgeted::<ResourceFrame, _>(&mut partial, 2 << 20, &budget);
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
        encode_frame(&ResourceFrame::Event(entry(9)), &mut buf);
        let mut slow = trickle(buf.clone(), 3);
        let budget = ByteBudget::new(1 << 20);
        assert_eq!(
            read_frame_budgeted::<ResourceFrame, _>(&mut slow, 1 << 20, &budget)
                .await
                .unwrap(),
            Some(ResourceFrame::Event(entry(9)))
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
        let first = read_frame_budgeted::<ResourceFrame, _>(&mut one, 1 << 20, &budget);
        futures::pin_mut!(first);
        assert!(futures::poll!(first.as_mut()).is_pending());
        let second = read_frame_budgeted::<ResourceFrame, _>(&mut two, 1 << 20, &budget).await;
        assert!(matches!(second, Err(FrameError::OverBudget { .. })), "{second:?}");
        assert!(!second.unwrap_err().is_recoverable());
        assert!(budget.in_use() <= budget.limit());
    }

    #[tokio::test]
    async fn decoding_and_reading_never_panic_on_garbage() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut valid = Vec::new();
        encode_frame(&ResourceFrame::Event(entry(1)), &mut valid);
        encode_frame(
            &SyncFrame::SyncRequest {
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
            let _ = decode_frame::<ResourceFrame>(&bytes);
            let _ = decode_frame::<SyncFrame>(bytes.get(4..).unwrap_or_default());
            let mut r = bytes.as_slice();
            for _ in 0..4 {
                if !matches!(read_frame::<ResourceFrame, _>(&mut r, 4096).await, Err(e) if e.is_recoverable())
                {
                    break;
                }
            }
        }
        let deep = "[".repeat(100_000);
        assert!(
            decode_frame::<SearchFrame>(deep.as_bytes()).is_err(),
            "nesting is bounded by serde_json"
        );
    }
}
