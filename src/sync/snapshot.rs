//! Snapshot sync, the pure rules of both sides: the persisted job of the origin
//! ([`SenderJob`]) and of the receiver ([`ReceiverJob`]), how a page of resources is cut
//! into parts under the frame cap ([`cut`]), and the receiver's checks of each part and
//! its assembly of lines ([`ReceiverJob::take_part`]).
//!
//! A partner whose cursor is behind the journal's compaction floor cannot be served the
//! journal: the origin sends it the latest entry of each of its live own resources, as
//! its journal holds them at position P (the head when the job began), in key order,
//! then the journal from P on. The receiver applies them by the version rule and removes
//! the origin's resources it holds that the snapshot skipped (deleted in the compacted
//! range). Both sides persist their progress after each applied part, so a job resumes
//! after either restarts from the last part the receiver confirmed.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::contract::{ErrorCode, JournalEntry, Refusal};
use crate::store::ResourceKey;

use super::plan::chunk_bytes;

/// Most resources read per snapshot page (one apply commit on the receiver).
pub const PAGE_RESOURCES: usize = 2048;

/// The `snapshot` state shown in `/api/peers`: no job.
pub const STATE_IDLE: u8 = 0;
/// Parts are being sent.
pub const STATE_RUNNING: u8 = 1;
/// Every part sent, waiting for the receiver's confirmation.
pub const STATE_DONE: u8 = 2;

/// Meta key of the job towards `peer` (origin side).
pub fn sender_key(peer: &str) -> String {
    format!("snapshot_out:{peer}")
}

/// Meta key of the job received from `origin` (receiver side).
pub fn receiver_key(origin: &str) -> String {
    format!("snapshot_in:{origin}")
}

/// The origin's job towards one partner, persisted after each confirmed part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderJob {
    pub job: u64,
    /// [`STATE_IDLE`], [`STATE_RUNNING`] or [`STATE_DONE`].
    pub state: u8,
    /// Journal position P: the snapshot is the state at P (or later), the journal follows
    /// from P.
    pub position: u64,
    /// Own resources when the job began.
    pub total: u64,
    /// Resources the receiver confirmed.
    pub sent: u64,
    /// The next part index.
    pub next_part: u32,
    /// The key of the last resource confirmed.
    pub after: Option<ResourceKey>,
}

impl SenderJob {
    /// Takes the receiver's report of where it is ([`SyncFrame::SnapshotReady`]) as the
    /// resume point: it persisted it after applying. A report for another job, or a part
    /// index without the key it follows, is refused. `resources` is only the progress shown
    /// (`sent`): pages read the live resources, so it may pass the `total` counted when the
    /// job began.
    ///
    /// [`SyncFrame::SnapshotReady`]: crate::p2p::wire::SyncFrame::SnapshotReady
    pub fn resume_from(
        &mut self,
        job: u64,
        next_part: u32,
        after: Option<ResourceKey>,
        resources: u64,
    ) -> Result<(), String> {
        if job != self.job {
            return Err(format!("ready for job {job}, not {}", self.job));
        }
        if next_part > 0 && after.is_none() {
            return Err(format!("next part {next_part} without a resource key"));
        }
        self.next_part = next_part;
        self.after = after;
        self.sent = resources;
        Ok(())
    }
}

/// The receiver's job of one origin, persisted after each applied part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverJob {
    pub job: u64,
    pub position: u64,
    /// The next part index expected.
    pub next_part: u32,
    /// The key of the last resource applied; the sweep of absent resources covers up to it.
    pub after: Option<ResourceKey>,
    /// Resources applied (entries of the snapshot).
    pub resources: u64,
    /// The end was applied: a repeated `snapshot_end` is confirmed again.
    pub done: bool,
    /// Bytes of a line begun in a `continued` part (not persisted: a restart resumes at the
    /// last complete part).
    #[serde(skip)]
    pub pending: Vec<u8>,
}

/// The receiver's bounds on a part: its data (`max_part` bytes once decoded) and a line
/// continued across parts (`max_line` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimits {
    pub max_part: usize,
    pub max_line: usize,
}

/// What a complete (not continued) part brings: its entries, in key order.
#[derive(Debug, Default, PartialEq)]
pub struct PartEntries {
    pub entries: Vec<(ResourceKey, JournalEntry)>,
}

impl ReceiverJob {
    /// Checks part `index` of `job` and adds its bytes; returns the entries once the part
    /// completes its lines (`None` for a continued part). Nothing changes on a refusal.
    ///
    /// Refused: another job, an index other than the next, data that is not base64 or
    /// larger than `max_part`, a line begun that grows beyond `max_line`, a line that is not
    /// a journal entry of `origin` with a resource id, keys not strictly ascending after the
    /// last one applied.
    pub fn take_part(
        &mut self,
        origin: &str,
        job: u64,
        index: u32,
        data: &str,
        continued: bool,
        limits: PartLimits,
    ) -> Result<Option<PartEntries>, Refusal> {
        let PartLimits { max_part, max_line } = limits;
        if self.done || job != self.job {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("no snapshot job {job} running from you"),
            ));
        }
        if index != self.next_part {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("snapshot part {index} out of order: expected {}", self.next_part),
            ));
        }
        if data.len() > max_part.saturating_mul(4) / 3 + 4 {
            return Err(Refusal::new(
                ErrorCode::PayloadTooLarge,
                format!("snapshot part of {} bytes, more than {max_part}", data.len()),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| Refusal::new(ErrorCode::InvalidField, format!("snapshot part data: {e}")))?;
        if self.pending.len().saturating_add(bytes.len()) > max_line.saturating_add(max_part) {
            return Err(Refusal::new(
                ErrorCode::PayloadTooLarge,
                format!("snapshot line longer than {max_line} bytes"),
            ));
        }
        if continued {
            self.pending.extend_from_slice(&bytes);
            self.next_part = self.next_part.saturating_add(1);
            return Ok(None);
        }
        let mut blob = std::mem::take(&mut self.pending);
        blob.extend_from_slice(&bytes);
        match parse_lines(origin, &blob, self.after.as_ref()) {
            Ok(entries) => {
                self.next_part = self.next_part.saturating_add(1);
                Ok(Some(PartEntries { entries }))
            }
            Err(refusal) => {
                // Nothing taken: the part may come again.
                blob.truncate(blob.len().saturating_sub(bytes.len()));
                self.pending = blob;
                Err(refusal)
            }
        }
    }

    /// The part's entries were applied: moves the resume point.
    pub fn applied(&mut self, last: Option<ResourceKey>, count: u64) {
        if last.is_some() {
            self.after = last;
        }
        self.resources = self.resources.saturating_add(count);
    }

    /// Checks `snapshot_end`: the same job, every part received, as many resources.
    pub fn check_end(&self, job: u64, parts: u32, resources: u64) -> Result<(), Refusal> {
        if job != self.job {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("no snapshot job {job} running from you"),
            ));
        }
        if self.done {
            return Ok(());
        }
        if parts != self.next_part || resources != self.resources || !self.pending.is_empty() {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!(
                    "snapshot end after {parts} parts and {resources} resources; received {} parts and {} resources",
                    self.next_part, self.resources
                ),
            ));
        }
        Ok(())
    }
}

/// JSON lines of journal entries of `origin`, keys strictly ascending after `after`.
fn parse_lines(
    origin: &str,
    blob: &[u8],
    after: Option<&ResourceKey>,
) -> Result<Vec<(ResourceKey, JournalEntry)>, Refusal> {
    let mut out: Vec<(ResourceKey, JournalEntry)> = Vec::new();
    for line in blob.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let entry: JournalEntry = serde_json::from_slice(line)
            .map_err(|e| Refusal::new(ErrorCode::InvalidJson, format!("snapshot line: {e}")))?;
        if entry.origin != origin {
            return Err(Refusal::new(
                ErrorCode::ForgedOrigin,
                format!("snapshot entry of {}, not of {origin}", entry.origin),
            ));
        }
        let Some(id) = entry.resource_id().filter(|id| !id.is_empty()) else {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "snapshot entry without a resource id",
            ));
        };
        let key = (entry.data_type.clone(), id.to_owned());
        let previous = out.last().map(|(k, _)| k).or(after);
        if previous.is_some_and(|p| *p >= key) {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("snapshot keys out of order at {}/{}", key.0, key.1),
            ));
        }
        out.push((key, entry));
    }
    Ok(out)
}

/// Cuts the JSON lines of one page into the data of its parts, each at most what fits
/// in a frame of `max_frame` bytes once base64-encoded; all but the last are `continued`.
pub fn cut(lines: &[u8], max_frame: usize) -> Vec<(String, bool)> {
    let chunk = chunk_bytes(max_frame as u64);
    let pieces: Vec<&[u8]> = lines.chunks(chunk.max(1)).collect();
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| (base64::engine::general_purpose::STANDARD.encode(p), i + 1 < n))
        .collect()
}

/// Raw bytes of one page: what a receiver's part buffer holds at most (with `cut`).
pub fn page_bytes(max_frame: usize) -> usize {
    chunk_bytes(max_frame as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Action;

    fn line(origin: &str, dt: &str, id: &str, seq: u64) -> Vec<u8> {
        let e = JournalEntry {
            origin: origin.into(),
            seq,
            action: Action::Update,
            data_type: dt.into(),
            user: "u".into(),
            resource: serde_json::json!({"id": id, "creator_id": origin}).into(),
            time_ms: 1,
        };
        let mut v = serde_json::to_vec(&e).unwrap();
        v.push(b'\n');
        v
    }

    fn lim(max_part: usize, max_line: usize) -> PartLimits {
        PartLimits { max_part, max_line }
    }

    fn job() -> ReceiverJob {
        ReceiverJob {
            job: 7,
            position: 10,
            ..ReceiverJob::default()
        }
    }

    #[test]
    fn parts_are_taken_in_order_and_continued_lines_are_joined() {
        let mut blob = line("o", "A", "1", 3);
        blob.extend(line("o", "A", "2", 5));
        let parts = cut(&blob, 4096);
        assert_eq!(parts.len(), 1);
        let mut j = job();
        let got = j
            .take_part("o", 7, 0, &parts[0].0, false, lim(1 << 20, 1 << 20))
            .unwrap()
            .unwrap();
        assert_eq!(got.entries.len(), 2);
        j.applied(got.entries.last().map(|(k, _)| k.clone()), 2);
        assert_eq!(j.after, Some(("A".into(), "2".into())));
        // Continued: a line split across parts is applied with the part that ends it.
        let big = line("o", "B", &"x".repeat(9000), 9);
        let parts = cut(&big, 4096);
        assert!(parts.len() > 2 && parts[..parts.len() - 1].iter().all(|p| p.1));
        for (i, (data, continued)) in parts.iter().enumerate() {
            let got = j
                .take_part("o", 7, 1 + i as u32, data, *continued, lim(1 << 20, 1 << 20))
                .unwrap();
            assert_eq!(got.is_some(), !continued);
        }
        assert_eq!(j.next_part, 1 + parts.len() as u32);
    }

    #[test]
    fn hostile_parts_are_refused_and_change_nothing() {
        let data = cut(&line("o", "A", "1", 3), 4096).remove(0).0;
        let mut j = job();
        let code = |r: Result<Option<PartEntries>, Refusal>| r.err().map(|r| r.code);
        assert_eq!(
            code(j.take_part("o", 8, 0, &data, false, lim(1 << 20, 1 << 20))),
            Some(ErrorCode::InvalidField),
            "another job"
        );
        assert_eq!(
            code(j.take_part("o", 7, 3, &data, false, lim(1 << 20, 1 << 20))),
            Some(ErrorCode::InvalidField),
            "out of order"
        );
        assert_eq!(
            code(j.take_part("o", 7, 0, &data, false, lim(8, 1 << 20))),
            Some(ErrorCode::PayloadTooLarge),
            "oversize"
        );
        assert_eq!(
            code(j.take_part("x", 7, 0, &data, false, lim(1 << 20, 1 << 20))),
            Some(ErrorCode::ForgedOrigin)
        );
        assert_eq!(
            code(j.take_part("o", 7, 0, "!!", false, lim(1 << 20, 1 << 20))),
            Some(ErrorCode::InvalidField)
        );
        assert_eq!(j, job(), "nothing moved");
        // Keys must ascend past the last one applied.
        j.after = Some(("A".into(), "5".into()));
        assert_eq!(
            code(j.take_part("o", 7, 0, &data, false, lim(1 << 20, 1 << 20))),
            Some(ErrorCode::InvalidField)
        );
        // A continued line may not grow without bound.
        let mut j = job();
        let piece = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 100]);
        assert!(j
            .take_part("o", 7, 0, &piece, true, lim(100, 150))
            .unwrap()
            .is_none());
        assert!(j
            .take_part("o", 7, 1, &piece, true, lim(100, 150))
            .unwrap()
            .is_none());
        assert_eq!(
            code(j.take_part("o", 7, 2, &piece, true, lim(100, 150))),
            Some(ErrorCode::PayloadTooLarge)
        );
    }

    #[test]
    fn the_end_must_match_what_was_received() {
        let mut j = job();
        j.next_part = 3;
        j.resources = 40;
        assert!(j.check_end(7, 3, 40).is_ok());
        assert!(j.check_end(7, 2, 40).is_err());
        assert!(j.check_end(7, 3, 41).is_err());
        assert!(j.check_end(6, 3, 40).is_err());
    }

    #[test]
    fn a_sender_resumes_from_the_receivers_report() {
        let mut s = SenderJob {
            job: 4,
            state: STATE_RUNNING,
            ..SenderJob::default()
        };
        assert!(s.resume_from(5, 0, None, 0).is_err());
        assert!(s.resume_from(4, 2, None, 0).is_err());
        s.resume_from(4, 2, Some(("A".into(), "9".into())), 77).unwrap();
        assert_eq!((s.next_part, s.sent), (2, 77));
    }
}
