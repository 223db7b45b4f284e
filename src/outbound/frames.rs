//! The newest journal batch as frames, encoded once for every partner link.
//!
//! With several partners, every link used to read the same just-committed entries back from
//! the store and encode them into the same frames: read and encoding were a fifth of the
//! source's CPU with eight partners (docs/PERFORMANCE.md). Links reading from the same seq
//! now share the batch the first of them read: the others write a prefix of its buffers.

use std::sync::{Arc, Mutex};

use crate::p2p::wire;
use crate::p2p::StreamKind;
use crate::store::RawEntry;

/// A batch larger than this in frame bytes is not kept for the other links (it is served
/// to its reader and dropped).
pub(crate) const MAX_SHARED_BYTES: usize = 8 * 1024 * 1024;

/// Consecutive journal entries from `from`, as the bytes each resource stream gets.
pub(crate) struct FrameBatch {
    pub from: u64,
    /// One buffer per resource stream ([`StreamKind`] order).
    bufs: [Vec<u8>; 3],
    /// Per entry: its seq and the end of its frame in each stream's buffer.
    ends: Vec<(u64, [usize; 3])>,
}

impl FrameBatch {
    /// Encodes `entries` (ascending seqs, as the store returned them from `from`): each as
    /// an `event` frame, or as a `large` marker when it does not fit in one frame (the
    /// partner pulls it). `on_large(seq, not_json)` is told of each marker.
    pub fn encode(
        from: u64,
        entries: Vec<RawEntry>,
        max_frame_bytes: usize,
        mut on_large: impl FnMut(u64, bool),
    ) -> FrameBatch {
        // Sized once: growing by doubling copied each batch (megabytes) about twice over.
        let mut sizes = [0usize; 3];
        for entry in &entries {
            let size = &mut sizes[StreamKind::for_action(entry.action) as usize];
            *size = size.saturating_add(wire::event_frame_len(&entry.json));
        }
        let mut bufs: [Vec<u8>; 3] = sizes.map(Vec::with_capacity);
        let mut ends = Vec::with_capacity(entries.len());
        for entry in entries {
            let buf = &mut bufs[StreamKind::for_action(entry.action) as usize];
            let before = buf.len();
            let seq = entry.seq;
            if !wire::encode_event_json(&entry.json, buf) {
                on_large(seq, true);
                wire::encode_frame(&wire::ResourceFrame::Large { seq }, buf);
            } else if buf.len() - before > max_frame_bytes {
                buf.truncate(before);
                on_large(seq, false);
                wire::encode_frame(&wire::ResourceFrame::Large { seq }, buf);
            }
            ends.push((seq, [bufs[0].len(), bufs[1].len(), bufs[2].len()]));
        }
        FrameBatch { from, bufs, ends }
    }

    /// Entries in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The seq of the last of the first `n` entries (`None` when `n` is 0 or beyond).
    pub fn last_seq(&self, n: usize) -> Option<u64> {
        n.checked_sub(1)
            .and_then(|i| self.ends.get(i))
            .map(|(seq, _)| *seq)
    }

    /// What each stream gets for the first `n` entries (all of them when `n` is larger).
    pub fn prefix(&self, n: usize) -> [&[u8]; 3] {
        let ends = match n.min(self.ends.len()).checked_sub(1) {
            Some(i) => self.ends[i].1,
            None => [0; 3],
        };
        [
            &self.bufs[0][..ends[0]],
            &self.bufs[1][..ends[1]],
            &self.bufs[2][..ends[2]],
        ]
    }

    fn bytes(&self) -> usize {
        self.bufs.iter().map(Vec::len).sum()
    }
}

/// Batches kept at once: links a little apart (one woken by a later commit than another)
/// each find the batch that starts where they stand.
const KEPT_BATCHES: usize = 16;

/// The batches last read by the links, for the others reading from the same seq.
#[derive(Default)]
pub(crate) struct SharedFrames {
    /// Oldest first; at most [`KEPT_BATCHES`] and [`MAX_SHARED_BYTES`] in all.
    kept: Mutex<std::collections::VecDeque<Arc<FrameBatch>>>,
}

impl SharedFrames {
    /// The batch read from `from`, when a link read one lately.
    pub fn get(&self, from: u64) -> Option<Arc<FrameBatch>> {
        let kept = self.kept.lock().ok()?;
        kept.iter().rev().find(|b| b.from == from && b.len() > 0).cloned()
    }

    /// Keeps `batch` for the other links, dropping the oldest beyond the bounds (a batch
    /// too large to keep is not kept).
    pub fn put(&self, batch: &Arc<FrameBatch>) {
        if batch.bytes() > MAX_SHARED_BYTES {
            return;
        }
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        kept.retain(|b| b.from != batch.from);
        kept.push_back(batch.clone());
        let mut bytes: usize = kept.iter().map(|b| b.bytes()).sum();
        while kept.len() > KEPT_BATCHES || bytes > MAX_SHARED_BYTES {
            match kept.pop_front() {
                Some(old) => bytes -= old.bytes(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Action, JournalEntry};

    fn raw(seq: u64, action: Action, pad: usize) -> RawEntry {
        let entry = JournalEntry {
            origin: "o".into(),
            seq,
            action,
            data_type: "D".into(),
            user: "u".into(),
            resource: serde_json::json!({"id": format!("r{seq}"), "creator_id": "o", "pad": "x".repeat(pad)})
                .into(),
            time_ms: 1,
        };
        RawEntry::encode(&entry).unwrap()
    }

    #[test]
    fn a_prefix_holds_the_frames_of_the_first_entries_of_each_stream() {
        let entries = vec![
            raw(4, Action::Create, 1),
            raw(5, Action::Delete, 1),
            raw(6, Action::Create, 1),
        ];
        let mut alone = [Vec::new(), Vec::new(), Vec::new()];
        for e in &entries {
            assert!(wire::encode_event_json(
                &e.json,
                &mut alone[StreamKind::for_action(e.action) as usize]
            ));
        }
        let batch = FrameBatch::encode(4, entries, 1 << 20, |_, _| panic!("no large entry here"));
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.prefix(3), [&alone[0][..], &alone[1][..], &alone[2][..]]);
        assert_eq!(batch.prefix(9), batch.prefix(3));
        assert_eq!(batch.last_seq(2), Some(5));
        assert_eq!(batch.last_seq(0), None);
        // The first two entries: one create, one delete, nothing of the third.
        let two = batch.prefix(2);
        let create = StreamKind::for_action(Action::Create) as usize;
        let delete = StreamKind::for_action(Action::Delete) as usize;
        assert!(two[create].len() < alone[create].len() && !two[create].is_empty());
        assert_eq!(two[delete], &alone[delete][..]);
        assert!(batch.prefix(0).iter().all(|b| b.is_empty()));
    }

    #[test]
    fn an_entry_above_the_frame_cap_becomes_a_large_marker() {
        let mut large = Vec::new();
        let batch = FrameBatch::encode(
            1,
            vec![raw(1, Action::Update, 5000), raw(2, Action::Update, 1)],
            1000,
            |seq, _| large.push(seq),
        );
        assert_eq!(large, vec![1]);
        assert_eq!(batch.last_seq(2), Some(2));
    }

    #[test]
    fn only_a_batch_read_from_the_same_seq_is_shared() {
        let shared = SharedFrames::default();
        let batch = Arc::new(FrameBatch::encode(
            7,
            vec![raw(7, Action::Create, 1)],
            1 << 20,
            |_, _| {},
        ));
        shared.put(&batch);
        assert!(shared.get(7).is_some());
        assert!(shared.get(8).is_none());
        let big = Arc::new(FrameBatch::encode(
            9,
            vec![raw(9, Action::Create, MAX_SHARED_BYTES)],
            usize::MAX,
            |_, _| {},
        ));
        shared.put(&big);
        assert!(shared.get(9).is_none(), "too large to keep");
        assert!(shared.get(7).is_some());
        for from in 10..10 + KEPT_BATCHES as u64 {
            shared.put(&Arc::new(FrameBatch::encode(
                from,
                vec![raw(from, Action::Create, 1)],
                1 << 20,
                |_, _| {},
            )));
        }
        assert!(shared.get(7).is_none(), "the oldest went");
        assert!(shared.get(10).is_some() && shared.get(9 + KEPT_BATCHES as u64).is_some());
    }
}
