//! Journal sync (`/opencloud/journal/sync/1.0`): a node pulls a range of another node's
//! journal, in parts that each fit in a frame.
//!
//! The cursor is the puller's integer "applied up to" mark for that origin, never a time.
//! The owner answers `since < seq <= until` as the JSON lines of the entries, cut into
//! `total` numbered parts of at most `part_bytes` each, so an entry larger than a frame is
//! split across parts, never dropped. The answer is a pure function of the immutable
//! journal and `(since, until, part_bytes)`, so the owner keeps no state: a puller that
//! misses parts, or whose `--sync-timeout` expires, keeps the parts it has and asks again
//! for the others only.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream, StreamProtocol};

use crate::event::{ErrorCode, JournalEntry};
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self};
use crate::store::Store;

pub const PROTOCOL_SYNC: StreamProtocol = StreamProtocol::new("/opencloud/journal/sync/1.0");

/// Room left in each part for the frame's JSON envelope.
const PART_ENVELOPE: usize = 256;
/// Smallest part accepted from a puller (smaller would mean absurdly many parts).
const MIN_PART_BYTES: u64 = 1024;
/// Requests for one range before the puller gives up until its next attempt.
const MAX_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Net(#[from] p2p::NetError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("refused by the owner: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("answer does not hold together: {0}")]
    Invalid(String),
    #[error("incomplete after {attempts} requests: {missing} of {total} parts missing")]
    Incomplete {
        attempts: usize,
        missing: usize,
        total: u32,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Bytes of one part's payload before base64.
fn chunk_bytes(part_bytes: u64) -> usize {
    let usable = (part_bytes.max(MIN_PART_BYTES) as usize).saturating_sub(PART_ENVELOPE);
    (usable / 4 * 3).max(1)
}

/// The answer to a range, ready to be cut in parts.
pub struct Answer {
    pub since: u64,
    pub until: u64,
    pub head: u64,
    blob: Vec<u8>,
    chunk: usize,
}

impl Answer {
    /// Reads the range from the journal. `until` defaults to `since + max_entries`, capped
    /// at the head.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn build(
        store: &dyn Store,
        origin: &str,
        since: u64,
        until: Option<u64>,
        part_bytes: u64,
        max_entries: usize,
    ) -> Result<Answer, SyncError> {
        let head = store.journal_head(origin).await?;
        let until = until
            .unwrap_or(since.saturating_add(max_entries as u64))
            .min(head)
            .max(since);
        let mut blob = Vec::new();
        let mut next = since + 1;
        while next <= until {
            let want = (until - next + 1).min(max_entries as u64) as usize;
            let entries = store.read_journal_raw(origin, next, want).await?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            for e in entries.iter().filter(|e| e.seq <= until) {
                blob.extend_from_slice(&e.json);
                blob.push(b'\n');
            }
            next = last + 1;
        }
        Ok(Answer {
            since,
            until,
            head,
            blob,
            chunk: chunk_bytes(part_bytes),
        })
    }

    pub fn total(&self) -> u32 {
        self.blob.len().div_ceil(self.chunk) as u32
    }

    pub fn header(&self) -> Frame {
        Frame::SyncHeader {
            since: self.since,
            until: self.until,
            head: self.head,
            total: self.total(),
            bytes: self.blob.len() as u64,
        }
    }

    pub fn part(&self, index: u32) -> Option<Frame> {
        let start = index as usize * self.chunk;
        if start >= self.blob.len() {
            return None;
        }
        let end = (start + self.chunk).min(self.blob.len());
        Some(Frame::SyncPart {
            index,
            total: self.total(),
            data: base64::engine::general_purpose::STANDARD.encode(&self.blob[start..end]),
        })
    }
}

/// Serves one sync stream: reads the request, answers it, closes.
///
/// # Errors
/// The stream failed or the request was not a sync request.
pub async fn serve(
    store: &dyn Store,
    own_id: &str,
    mut stream: Stream,
    max_frame: usize,
    max_entries: usize,
    timeout: Duration,
) -> Result<(), SyncError> {
    let request = tokio::time::timeout(timeout, wire::read_frame(&mut stream, max_frame))
        .await
        .map_err(|_| SyncError::Invalid("no request in time".into()))??;
    let Some(Frame::SyncRequest {
        origin,
        since,
        until,
        part_bytes,
        parts,
    }) = request
    else {
        return Err(SyncError::Invalid("expected a sync_request".into()));
    };
    if origin != own_id {
        let refusal = Frame::Error {
            seq: None,
            code: ErrorCode::ForgedOrigin.as_str().into(),
            message: format!("this node serves only its own journal ({own_id})"),
        };
        wire::write_frame(&mut stream, &refusal).await?;
        return Ok(());
    }
    let part_bytes = part_bytes.min(max_frame as u64);
    let answer = Answer::build(store, own_id, since, until, part_bytes, max_entries).await?;
    let indexes: Vec<u32> = match parts {
        Some(list) => list.into_iter().filter(|i| *i < answer.total()).collect(),
        None => (0..answer.total()).collect(),
    };
    let send = async {
        let mut buf = Vec::new();
        wire::encode_frame(&answer.header(), &mut buf);
        for index in indexes {
            if let Some(part) = answer.part(index) {
                wire::encode_frame(&part, &mut buf);
            }
            if buf.len() >= 256 * 1024 {
                stream.write_all(&buf).await?;
                buf.clear();
            }
        }
        stream.write_all(&buf).await?;
        stream.close().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .map_err(|_| SyncError::Invalid("answer not taken in time".into()))??;
    Ok(())
}

/// What a pull brought back.
#[derive(Debug)]
pub struct Pulled {
    pub entries: Vec<JournalEntry>,
    pub until: u64,
    /// The owner's journal head when it answered.
    pub head: u64,
}

/// Pulls `since < seq <= until` (owner's choice of `until` when `None`) of `peer`'s
/// journal, re-requesting missing parts, within `MAX_ATTEMPTS` requests of `timeout` each.
///
/// # Errors
/// The peer is unreachable, refuses, or the answer stays incomplete.
pub async fn pull(
    net: &p2p::Client,
    peer: PeerId,
    since: u64,
    part_bytes: usize,
    timeout: Duration,
) -> Result<Pulled, SyncError> {
    let mut header: Option<(u64, u64, u32, u64)> = None; // until, head, total, bytes
    let mut parts: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let missing: Option<Vec<u32>> =
            header.map(|(_, _, total, _)| (0..total).filter(|i| !parts.contains_key(i)).collect());
        let request = Frame::SyncRequest {
            origin: peer.to_string(),
            since,
            until: header.map(|(until, ..)| until),
            part_bytes: part_bytes as u64,
            parts: missing,
        };
        // Progress is kept whatever happens to this attempt.
        let result = tokio::time::timeout(timeout, async {
            let mut stream = net.open_stream(peer, PROTOCOL_SYNC, timeout).await?;
            wire::write_frame(&mut stream, &request).await?;
            loop {
                match wire::read_frame(&mut stream, part_bytes + PART_ENVELOPE * 4).await? {
                    None => return Ok::<(), SyncError>(()),
                    Some(Frame::SyncHeader {
                        since: s,
                        until,
                        head,
                        total,
                        bytes,
                    }) => {
                        if s != since || header.is_some_and(|(u, _, t, b)| (u, t, b) != (until, total, bytes))
                        {
                            return Err(SyncError::Invalid("header changed between requests".into()));
                        }
                        header = Some((until, head, total, bytes));
                    }
                    Some(Frame::SyncPart { index, total, data }) => {
                        if header.is_none_or(|(_, _, t, _)| t != total || index >= t) {
                            return Err(SyncError::Invalid(format!("part {index}/{total} out of place")));
                        }
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .map_err(|e| SyncError::Invalid(e.to_string()))?;
                        parts.insert(index, bytes);
                    }
                    Some(Frame::Error { code, message, .. }) => {
                        return Err(SyncError::Refused { code, message })
                    }
                    Some(other) => return Err(SyncError::Invalid(format!("unexpected {other:?}"))),
                }
            }
        })
        .await;
        match result {
            Ok(Err(e @ (SyncError::Refused { .. } | SyncError::Invalid(_)))) => return Err(e),
            Ok(Err(e)) => tracing::debug!(%peer, attempt, cause = %e, "sync attempt failed"),
            Ok(Ok(())) => {}
            Err(_) => {
                tracing::info!(%peer, attempt, have = parts.len(), "sync request timed out; asking for the rest")
            }
        }
        if let Some((until, head, total, bytes)) = header {
            if parts.len() == total as usize {
                // `concat` copies part by part; a flattening iterator went byte by byte and
                // was a tenth of a catching-up node's CPU.
                let blob: Vec<u8> = parts.into_values().collect::<Vec<_>>().concat();
                if blob.len() as u64 != bytes {
                    return Err(SyncError::Invalid(format!(
                        "{} bytes, header said {bytes}",
                        blob.len()
                    )));
                }
                let entries = blob
                    .split(|b| *b == b'\n')
                    .filter(|line| !line.is_empty())
                    .map(serde_json::from_slice)
                    .collect::<Result<Vec<JournalEntry>, _>>()
                    .map_err(|e| SyncError::Invalid(e.to_string()))?;
                return Ok(Pulled { entries, until, head });
            }
        }
    }
    let (total, missing) = header
        .map(|(_, _, t, _)| (t, t as usize - parts.len()))
        .unwrap_or((0, 0));
    Err(SyncError::Incomplete {
        attempts: MAX_ATTEMPTS,
        missing,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_holds_one_line_per_entry_however_its_resource_was_spaced() {
        use crate::event::{Action, NewEvent, Resource};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("j.redb")).unwrap();
        let pretty = "{\n  \"id\": \"r1\",\r\n  \"creator_id\": \"o\"\n}";
        let event = NewEvent {
            action: Action::Create,
            data_type: "D".into(),
            user: "u".into(),
            from_app: "app".into(),
            resource: Resource::from_json(pretty).unwrap(),
            resource_id: "r1".into(),
        };
        store
            .append_journal("o", vec![event.clone(), event])
            .await
            .unwrap();
        let answer = Answer::build(&store, "o", 0, None, 1 << 20, 100).await.unwrap();
        let entries: Vec<JournalEntry> = answer
            .blob
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[1].seq, entries[1].resource_id()), (2, Some("r1")));
    }

    #[test]
    fn parts_fit_in_frames_and_cover_the_blob() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let answer = Answer {
            since: 0,
            until: 3,
            head: 3,
            blob: blob.clone(),
            chunk: chunk_bytes(2048),
        };
        let mut joined = Vec::new();
        for i in 0..answer.total() {
            let Some(part) = answer.part(i) else {
                panic!("part {i} missing")
            };
            let mut framed = Vec::new();
            wire::encode_frame(&part, &mut framed);
            assert!(framed.len() <= 2048, "part {i} is {} bytes", framed.len());
            let Frame::SyncPart { data, .. } = part else {
                unreachable!()
            };
            joined.extend(base64::engine::general_purpose::STANDARD.decode(data).unwrap());
        }
        assert_eq!(joined, blob);
        assert!(answer.part(answer.total()).is_none());
    }
}
