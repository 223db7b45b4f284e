//! The owner's side of journal sync: reads the asked range from the journal
//! ([`Answer::build`], capped by [`RoundCap`]) and sends its header and parts ([`serve`]).
//! Stateless: the answer is a pure function of the immutable journal and the request.

use std::time::Duration;

use base64::Engine;
use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream};

use crate::config::Tuning;
use crate::contract::ErrorCode;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, FrameError, SyncFrame};
use crate::store::Store;

use super::plan::{chunk_bytes, plan_until, wanted_parts, RoundCap};
use super::{invalid, SyncError, REFUSAL_LOG};

/// First journal read of an answer, in entries; later reads are sized from the largest
/// entry seen so far and the bytes left under the round's cap.
const FIRST_READ: u64 = 16;
/// Most entries one journal read of an answer asks for: with entries of at most the owner's
/// `--max-event-bytes` (1 MiB), one read holds at most 64 MiB, whatever came before it.
const MAX_READ: u64 = 64;
/// Bytes of answer written to the stream at once.
const WRITE_BATCH: usize = 256 * 1024;

/// The answer to a range, ready to be cut in parts.
pub struct Answer {
    pub since: u64,
    pub until: u64,
    pub head: u64,
    blob: Vec<u8>,
    chunk: usize,
}

impl Answer {
    /// Reads the range from the journal: entries `since < seq <= plan_until(..)`, then cut
    /// at the last entry that keeps the answer within `cap.bytes` (at least one entry).
    /// Memory: the answer (at most `cap.bytes`, or one entry) plus one journal read, sized
    /// from the largest entry seen so far to what is left under the cap, at most
    /// [`MAX_READ`] entries.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn build(
        store: &dyn Store,
        origin: &str,
        since: u64,
        until: Option<u64>,
        part_bytes: u64,
        cap: RoundCap,
    ) -> Result<Answer, SyncError> {
        let head = store.journal_head(origin).await?;
        let mut until = plan_until(since, until, head, cap.entries);
        let mut blob = Vec::new();
        let mut next = since.saturating_add(1);
        let mut largest: u64 = 0;
        'read: while next <= until {
            let left_entries = until.saturating_sub(next).saturating_add(1);
            let left_bytes = cap.bytes.saturating_sub(blob.len() as u64);
            let by_bytes = match largest {
                0 => FIRST_READ,
                n => (left_bytes / n).max(1),
            };
            let want = left_entries.min(by_bytes).min(MAX_READ);
            let want = usize::try_from(want).unwrap_or(1);
            let entries = store.read_journal_raw(origin, next, want).await?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            for e in entries {
                if e.seq > until {
                    break 'read;
                }
                let line = (e.json.len() as u64).saturating_add(1);
                largest = largest.max(line);
                if !blob.is_empty() && (blob.len() as u64).saturating_add(line) > cap.bytes {
                    // Cut here: the answer ends with the entry before this one.
                    until = e.seq.saturating_sub(1);
                    break 'read;
                }
                blob.extend_from_slice(&e.json);
                blob.push(b'\n');
            }
            if last < next || last == u64::MAX {
                break;
            }
            next = last.saturating_add(1);
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
        u32::try_from(self.blob.len().div_ceil(self.chunk)).unwrap_or(u32::MAX)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.blob.len() as u64
    }

    pub fn header(&self) -> SyncFrame {
        SyncFrame::SyncHeader {
            since: self.since,
            until: self.until,
            head: self.head,
            total: self.total(),
            bytes: self.bytes(),
        }
    }

    pub fn part(&self, index: u32) -> Option<SyncFrame> {
        let start = (index as usize).checked_mul(self.chunk)?;
        let end = start.saturating_add(self.chunk).min(self.blob.len());
        let slice = self.blob.get(start..end).filter(|s| !s.is_empty())?;
        Some(SyncFrame::SyncPart {
            index,
            total: self.total(),
            data: base64::engine::general_purpose::STANDARD.encode(slice),
        })
    }
}

/// Serves one sync stream from `peer`: reads the request, answers it, closes.
///
/// A request for another origin is answered `error forged_origin`, a `parts` list longer
/// than the answer's `total` `error invalid_field`; both are counted
/// (`oc_refusals_total{place="inbound"}`) and logged (throttled per peer).
///
/// # Errors
/// The stream failed or the request was not a sync request.
/// Reads the first frame of a sync stream (a `sync_request`, or a `snapshot_begin` when
/// the peer is an origin starting a snapshot job), within `--sync-timeout`.
///
/// # Errors
/// Nothing readable came in time.
pub(crate) async fn first_frame(
    stream: &mut Stream,
    tuning: &Tuning,
) -> Result<Option<SyncFrame>, SyncError> {
    let (max_frame, timeout) = (tuning.max_frame_bytes, tuning.sync_timeout);
    let read = tokio::time::timeout(timeout, wire::read_frame::<SyncFrame, _>(stream, max_frame))
        .await
        .map_err(|_| invalid("no request in time"))?;
    match read {
        Err(FrameError::Unexpected { .. }) => Err(invalid("expected a sync_request")),
        read => Ok(read?),
    }
}

/// Serves the request `request` (the stream's first frame) from `peer`, then closes.
pub(crate) async fn serve(
    store: &dyn Store,
    own_id: &str,
    peer: PeerId,
    mut stream: Stream,
    request: Option<SyncFrame>,
    tuning: &Tuning,
    metrics: &Metrics,
) -> Result<(), SyncError> {
    let (max_frame, timeout) = (tuning.max_frame_bytes, tuning.sync_timeout);
    let Some(SyncFrame::SyncRequest {
        origin,
        since,
        until,
        part_bytes,
        max_bytes,
        parts,
    }) = request
    else {
        return Err(invalid("expected a sync_request"));
    };
    if origin != own_id {
        let message = format!("this node serves only its own journal ({own_id})");
        refuse(
            &mut stream,
            peer,
            ErrorCode::ForgedOrigin,
            message,
            metrics,
            timeout,
        )
        .await;
        return Ok(());
    }
    let floor = store.journal_floor(own_id).await?;
    if since < floor {
        // The range is compacted: the puller gets a snapshot from this node's link instead.
        let message = format!("journal compacted up to {floor}: entries after {since} come by snapshot");
        refuse(
            &mut stream,
            peer,
            ErrorCode::InvalidField,
            message,
            metrics,
            timeout,
        )
        .await;
        return Ok(());
    }
    let part_bytes = part_bytes.min(max_frame as u64);
    let mut cap = RoundCap::from_tuning(tuning);
    if let Some(asked) = max_bytes {
        cap.bytes = cap.bytes.min(asked);
    }
    let answer = Answer::build(store, own_id, since, until, part_bytes, cap).await?;
    let indexes = match wanted_parts(parts, answer.total()) {
        Ok(indexes) => indexes,
        Err(message) => {
            refuse(
                &mut stream,
                peer,
                ErrorCode::InvalidField,
                message,
                metrics,
                timeout,
            )
            .await;
            return Ok(());
        }
    };
    let send = async {
        let mut buf = Vec::new();
        wire::encode_frame(&answer.header(), &mut buf);
        for index in indexes {
            if let Some(part) = answer.part(index) {
                wire::encode_frame(&part, &mut buf);
            }
            if buf.len() >= WRITE_BATCH {
                stream.write_all(&buf).await?;
                buf.clear();
            }
        }
        stream.write_all(&buf).await?;
        stream.close().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .map_err(|_| invalid("answer not taken in time"))??;
    Ok(())
}

/// Answers a request with an `error` frame (within `timeout`), counts and logs it.
async fn refuse(
    stream: &mut Stream,
    peer: PeerId,
    code: ErrorCode,
    message: String,
    metrics: &Metrics,
    timeout: Duration,
) {
    metrics.refused("inbound", code);
    if let Some(count) = REFUSAL_LOG.hit(peer, code.as_str()) {
        tracing::warn!(%peer, code = code.as_str(), count, reason = %message, "sync request refused");
    }
    let frame = SyncFrame::Error(ErrorFrame::new(None, code, message));
    let _ = tokio::time::timeout(timeout, async {
        wire::write_frame(&mut *stream, &frame).await?;
        stream.close().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::JournalEntry;
    use crate::sync::plan::{assemble, Ask, Header};

    #[tokio::test]
    async fn an_answer_holds_one_line_per_entry_however_its_resource_was_spaced() {
        use crate::contract::{Action, NewEvent, Resource};
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
        let cap = RoundCap {
            entries: 100,
            bytes: 1 << 20,
        };
        let answer = Answer::build(&store, "o", 0, None, 1 << 20, cap).await.unwrap();
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
            let SyncFrame::SyncPart { data, .. } = part else {
                unreachable!()
            };
            joined.extend(base64::engine::general_purpose::STANDARD.decode(data).unwrap());
        }
        assert_eq!(joined, blob);
        assert!(answer.part(answer.total()).is_none());
    }

    async fn journal(n: u64, pad: usize) -> (tempfile::TempDir, crate::store::embedded::EmbeddedStore) {
        use crate::contract::{Action, NewEvent, Resource};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("j.redb")).unwrap();
        let events = (1..=n)
            .map(|i| NewEvent {
                action: Action::Create,
                data_type: "D".into(),
                user: "u".into(),
                from_app: "app".into(),
                resource: Resource::from_json(&format!(
                    r#"{{"id":"r{i}","creator_id":"o","pad":"{}"}}"#,
                    "x".repeat(pad)
                ))
                .unwrap(),
                resource_id: format!("r{i}"),
            })
            .collect();
        store.append_journal("o", events).await.unwrap();
        (dir, store)
    }

    fn header_of(answer: &Answer) -> Header {
        Header {
            since: answer.since,
            until: answer.until,
            head: answer.head,
            total: answer.total(),
            bytes: answer.bytes(),
        }
    }

    fn parts_of(answer: &Answer) -> Vec<(u32, u32, String)> {
        (0..answer.total())
            .filter_map(|i| match answer.part(i) {
                Some(SyncFrame::SyncPart { index, total, data }) => Some((index, total, data)),
                _ => None,
            })
            .collect()
    }

    fn ask(since: u64) -> Ask {
        Ask {
            since,
            part_bytes: 2048,
            max_entries: 100,
            max_bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn a_round_is_cut_at_an_entry_boundary_by_the_byte_cap_but_holds_one_entry() {
        let (_dir, store) = journal(50, 1000).await;
        let line = store.read_journal_raw("o", 1, 1).await.unwrap()[0].json.len() as u64 + 1;
        let cap = RoundCap {
            entries: 4096,
            bytes: line * 3 + line / 2,
        };
        let answer = Answer::build(&store, "o", 0, Some(u64::MAX), 2048, cap)
            .await
            .unwrap();
        assert_eq!((answer.until, answer.head, answer.bytes()), (3, 50, line * 3));
        let entries = assemble(
            ask(0),
            header_of(&answer),
            parts_of(&answer).iter().map(|(i, t, d)| (*i, *t, d.as_str())),
        )
        .unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        // The re-request with the header's until reproduces the same answer.
        let again = Answer::build(&store, "o", 0, Some(3), 2048, cap).await.unwrap();
        assert_eq!(header_of(&again), header_of(&answer));

        let tiny = RoundCap {
            entries: 4096,
            bytes: 10,
        };
        let one = Answer::build(&store, "o", 7, None, 2048, tiny).await.unwrap();
        assert_eq!(
            (one.until, one.bytes()),
            (8, line),
            "one entry larger than the cap still travels"
        );

        let few = RoundCap {
            entries: 5,
            bytes: 1 << 30,
        };
        let capped = Answer::build(&store, "o", 0, Some(u64::MAX), 2048, few)
            .await
            .unwrap();
        assert_eq!(capped.until, 5);
    }

    #[tokio::test]
    async fn an_honest_answer_assembles_in_any_order() {
        let (_dir, store) = journal(30, 300).await;
        let cap = RoundCap {
            entries: 100,
            bytes: 1 << 20,
        };
        let answer = Answer::build(&store, "o", 4, None, 2048, cap).await.unwrap();
        assert!(answer.total() > 3);
        let mut parts = parts_of(&answer);
        parts.reverse();
        let entries = assemble(
            ask(4),
            header_of(&answer),
            parts.iter().map(|(i, t, d)| (*i, *t, d.as_str())),
        )
        .unwrap();
        assert_eq!(entries.len(), 26);
        assert_eq!((entries[0].seq, entries[25].seq), (5, 30));
        // Parts cut smaller by an owner with a smaller frame cap are fine too.
        let small = Answer::build(&store, "o", 4, None, 1024, cap).await.unwrap();
        let parts = parts_of(&small);
        assert_eq!(
            assemble(
                ask(4),
                header_of(&small),
                parts.iter().map(|(i, t, d)| (*i, *t, d.as_str()))
            )
            .unwrap()
            .len(),
            26
        );
    }
}
