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
    /// Sender → receiver, first frame on each stream: whose journal follows.
    Hello { origin: String },
    /// Sender → receiver: one journal entry.
    Event(JournalEntry),
    /// Receiver → sender: every entry of the origin up to and including `seq` is handled
    /// (applied, or refused with an `Error` frame). Cumulative.
    Ack { seq: u64 },
    /// Receiver → sender: a refusal, about one entry (`seq`) or about the stream.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        code: String,
        message: String,
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
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Action;

    fn entry(seq: u64) -> JournalEntry {
        JournalEntry {
            origin: "o".into(),
            seq,
            action: Action::Update,
            data_type: "D".into(),
            user: "u".into(),
            resource: serde_json::json!({"id": "r", "creator_id": "o"}),
            time_ms: 1,
        }
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
