//! How a responder writes its answer on a search stream: matches cut into `search_results`
//! frames under the frame cap the searcher asked for ([`Batcher`], pure), written from their
//! JSON text as they are read, then `search_done` with the count and the results skipped.

use std::time::Duration;

use futures::{AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde_json::value::RawValue;

use super::matching::OwnMatches;
use crate::contract::Refusal;
use crate::p2p::wire::{self, ErrorFrame, SearchFrame};

/// Smallest frame a searcher may ask for.
const MIN_FRAME: usize = 4096;

/// The frame size a responder writes: its own cap, lowered to the searcher's.
pub(super) fn frame_cap(own: usize, searcher: Option<u64>) -> usize {
    let asked = searcher.map_or(own, |s| usize::try_from(s).unwrap_or(usize::MAX));
    own.min(asked).max(MIN_FRAME)
}

/// Why a responder could not finish its answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error("store: {0}")]
    Store(String),
    #[error("write: {0}")]
    Write(#[from] std::io::Error),
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.to_string()
    }
}

/// A `search_results` frame's body, written from JSON text without building trees.
#[derive(Serialize)]
struct ResultsOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    query_id: &'a str,
    data_type: &'a str,
    results: &'a [Box<RawValue>],
}

/// The length-prefixed `search_results` frame of `results`.
fn encode_results(query_id: &str, data_type: &str, results: &[Box<RawValue>]) -> Vec<u8> {
    let out = ResultsOut {
        kind: "search_results",
        query_id,
        data_type,
        results,
    };
    let mut buf = vec![0u8; 4];
    // JSON text and strings always serialize.
    if serde_json::to_writer(&mut buf, &out).is_err() {
        return Vec::new();
    }
    let len = u32::try_from(buf.len().saturating_sub(4)).unwrap_or(u32::MAX);
    if let Some(prefix) = buf.get_mut(..4) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
    buf
}

/// Cuts results into batches whose frame stays within a cap, apart from I/O.
struct Batcher {
    /// Bytes left for results in a frame once its envelope is written.
    room: usize,
    batch: Vec<Box<RawValue>>,
    size: usize,
    count: u64,
    skipped: u64,
}

impl Batcher {
    fn new(query_id: &str, data_type: &str, cap: usize) -> Batcher {
        let envelope = encode_results(query_id, data_type, &[]).len();
        Batcher {
            room: cap.saturating_sub(envelope),
            batch: Vec::new(),
            size: 0,
            count: 0,
            skipped: 0,
        }
    }

    /// Adds `r`; returns the full batch to write first when `r` does not fit beside it.
    /// A result too large for a frame alone is skipped and counted.
    fn push(&mut self, r: Box<RawValue>) -> Option<Vec<Box<RawValue>>> {
        // Its size in the frame's array, with the separating comma.
        let len = r.get().len().saturating_add(1);
        if len > self.room {
            self.skipped = self.skipped.saturating_add(1);
            return None;
        }
        let full = (self.size.saturating_add(len) > self.room).then(|| self.take());
        self.size = self.size.saturating_add(len);
        self.batch.push(r);
        full.flatten()
    }

    /// The batch so far, if any.
    fn take(&mut self) -> Option<Vec<Box<RawValue>>> {
        if self.batch.is_empty() {
            return None;
        }
        self.size = 0;
        self.count = self.count.saturating_add(self.batch.len() as u64);
        Some(std::mem::take(&mut self.batch))
    }
}

/// Writes `first` and the rest of `matches` as `search_results` frames of at most `cap`
/// bytes each, as they are read, then `search_done`.
///
/// # Errors
/// The store failed (nothing more is written), or a write failed or took longer than
/// `timeout`.
pub(super) async fn send_matches<W: AsyncWrite + Unpin>(
    w: &mut W,
    query_id: &str,
    data_type: &str,
    first: Option<Box<RawValue>>,
    matches: &mut OwnMatches,
    cap: usize,
    timeout: Duration,
) -> Result<(u64, u64), SendError> {
    let mut batcher = Batcher::new(query_id, data_type, cap);
    let mut next = first;
    loop {
        let r = match next.take() {
            Some(r) => r,
            None => match matches.next().await.map_err(SendError::Store)? {
                Some(r) => r,
                None => break,
            },
        };
        if let Some(full) = batcher.push(r) {
            write_bytes(w, &encode_results(query_id, data_type, &full), timeout).await?;
        }
    }
    if let Some(last) = batcher.take() {
        write_bytes(w, &encode_results(query_id, data_type, &last), timeout).await?;
    }
    let done = SearchFrame::SearchDone {
        query_id: query_id.to_owned(),
        count: batcher.count,
        skipped: batcher.skipped,
    };
    write(w, &done, timeout).await?;
    Ok((batcher.count, batcher.skipped))
}

async fn write_bytes<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let io = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &SearchFrame,
    timeout: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(timeout, wire::write_frame(w, frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

pub(super) fn error_frame(refusal: &Refusal) -> SearchFrame {
    SearchFrame::Error(ErrorFrame::new(None, refusal.code, refusal.message.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn results_are_cut_into_frames_under_the_cap() {
        let mut b = Batcher::new("q1", "COMPUTE_RESOURCE", 4096);
        let mut frames = Vec::new();
        for i in 0..100 {
            frames.extend(b.push(raw(json!({"id": format!("r{i}"), "pad": "x".repeat(100)}))));
        }
        assert!(b
            .push(raw(json!({"id": "huge", "pad": "y".repeat(10_000)})))
            .is_none());
        frames.extend(b.take());
        assert_eq!((b.count, b.skipped), (100, 1));
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let mut got = 0;
        for f in &frames {
            let bytes = encode_results("q1", "COMPUTE_RESOURCE", f);
            assert!(bytes.len() <= 4096 + 4, "{} bytes", bytes.len());
            let SearchFrame::SearchResults {
                data_type, results, ..
            } = wire::decode_frame(&bytes[4..]).unwrap()
            else {
                panic!("not results")
            };
            assert_eq!(data_type.as_deref(), Some("COMPUTE_RESOURCE"));
            got += results.len();
        }
        assert_eq!(got, 100);
    }

    #[test]
    fn huge_frame_caps_stay_harmless() {
        assert_eq!(frame_cap(1 << 20, Some(u64::MAX)), 1 << 20);
        assert_eq!(frame_cap(1 << 20, Some(0)), MIN_FRAME);
    }
}
