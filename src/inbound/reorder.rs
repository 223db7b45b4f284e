//! The inbound reorder buffer and the gap and sync decisions around it: pure bookkeeping of
//! one origin's entries above its applied mark, no store, stream or runtime inside.
//!
//! An origin's entries arrive on three streams (create, update, delete) in any order, again
//! after a reconnect, and in rounds pulled by journal sync. [`Reorder`] keeps those above the
//! applied mark until the ones before them are there and hands them out as contiguous runs in
//! seq order ([`Reorder::next_run`]); the session applies a run and reports it
//! ([`Reorder::mark_applied`]). Around the buffer it decides:
//! - what a new entry becomes ([`Buffered`]): stale (only an ack is owed), kept, beyond the
//!   reorder window (dropped, the sender sends it again), or no room (dropped, pulled later);
//! - which entries make room when the byte bound is reached: the highest seqs, since lower
//!   ones are needed first; an entry alone is always kept, so progress is always possible;
//! - when to pull the origin's journal ([`Pull`]): a `hello` far ahead, an announced entry
//!   too large for a frame, a hole or dropped entries still missing at the next check, the
//!   periodic safety net; one pull at a time, another pass when the target was raised while
//!   it ran.
//!
//! Seq arithmetic saturates: a hostile seq near `u64::MAX` is only beyond the window.

use std::collections::BTreeMap;

/// What [`Reorder::offer`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffered {
    /// At or below the applied mark: already handled, only the ack was missing.
    Stale,
    Kept,
    /// Beyond the reorder window (`applied + 2 × send_window`): dropped, it comes again.
    BeyondWindow,
    /// No room in the byte bound for it: dropped, it is pulled later.
    NoRoom,
}

/// A journal pull to start: the origin's entries after `since`, until `target` is applied
/// (`u64::MAX`: up to the origin's head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pull {
    pub since: u64,
    pub target: u64,
}

/// The one pull of an origin: wanted up to `target`, running or not.
#[derive(Debug, Default)]
struct Pulling {
    /// Pull wanted up to here (0: nothing wanted).
    target: u64,
    running: bool,
    /// The target the running (or last) pull was started for.
    started_for: u64,
}

/// The reorder buffer of one origin with its applied mark, gap and pull state.
///
/// Bounded in seqs (`applied + 2 × send_window`) and in bytes (`max_bytes`, the byte size of
/// each entry as the caller counts it). `T` is what the caller keeps with an entry.
#[derive(Debug)]
pub(crate) struct Reorder<T> {
    applied: u64,
    send_window: u64,
    entries: BTreeMap<u64, (T, usize)>,
    bytes: usize,
    max_bytes: usize,
    /// The highest seq dropped for lack of room (0: none).
    dropped_max: u64,
    /// A stale entry came (a resend of something applied): an ack is owed even with nothing
    /// to apply.
    ack_owed: bool,
    pulling: Pulling,
    /// Something missing seen at the last gap check: (applied, pull target).
    gap_seen: Option<(u64, u64)>,
}

impl<T> Reorder<T> {
    /// An empty buffer above `applied`, for a sender's `send_window`, holding at most
    /// `max_bytes` (an entry alone excepted).
    pub(crate) fn new(applied: u64, send_window: u64, max_bytes: usize) -> Reorder<T> {
        Reorder {
            applied,
            send_window,
            entries: BTreeMap::new(),
            bytes: 0,
            max_bytes,
            dropped_max: 0,
            ack_owed: false,
            pulling: Pulling::default(),
            gap_seen: None,
        }
    }

    /// The seq up to which the origin's entries are applied.
    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    #[cfg(test)]
    /// Bytes of the entries held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes entry `seq` of `bytes`, read from a stream or pulled.
    pub(crate) fn offer(&mut self, seq: u64, item: T, bytes: usize) -> Buffered {
        if seq <= self.applied {
            self.ack_owed = true;
            return Buffered::Stale;
        }
        if seq > self.applied.saturating_add(self.send_window.saturating_mul(2)) {
            return Buffered::BeyondWindow;
        }
        if let Some((_, old)) = self.entries.remove(&seq) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        if !self.make_room(seq, bytes) {
            return Buffered::NoRoom;
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.entries.insert(seq, (item, bytes));
        Buffered::Kept
    }

    /// Drops the highest seqs above `seq` until `bytes` more fit; false (and `seq`
    /// remembered as dropped) when every entry left is lower.
    fn make_room(&mut self, seq: u64, bytes: usize) -> bool {
        while self.bytes.saturating_add(bytes) > self.max_bytes {
            match self.entries.last_key_value().map(|(k, _)| *k) {
                Some(highest) if highest > seq => {
                    if let Some((_, b)) = self.entries.remove(&highest) {
                        self.bytes = self.bytes.saturating_sub(b);
                    }
                    self.dropped_max = self.dropped_max.max(highest);
                }
                // Every entry kept is lower: this one is pulled later.
                Some(_) => {
                    self.dropped_max = self.dropped_max.max(seq);
                    return false;
                }
                // Alone, an entry is kept whatever its size (a frame or a sync round
                // bounds it), so the lowest missing entry can always be applied.
                None => break,
            }
        }
        true
    }

    /// Whether an entry of `bytes` would push something out (an entry alone always fits).
    pub(crate) fn is_full_for(&self, bytes: usize) -> bool {
        !self.entries.is_empty() && self.bytes.saturating_add(bytes) > self.max_bytes
    }

    /// Takes the contiguous run after the applied mark, at most `max` entries, in seq order.
    /// The mark moves only with [`Reorder::mark_applied`], once the run is applied.
    pub(crate) fn next_run(&mut self, max: usize) -> Vec<T> {
        // Sized once: grown by doubling, a run of a thousand entries was copied ten times
        // and touched fresh pages each time (≈ 3 % of a receiving node, docs/PERFORMANCE.md).
        let mut run = Vec::with_capacity(max.min(self.entries.len()));
        while run.len() < max {
            let Some(next) = self
                .applied
                .checked_add(1)
                .and_then(|n| n.checked_add(run.len() as u64))
            else {
                break;
            };
            match self.entries.remove(&next) {
                Some((item, bytes)) => {
                    self.bytes = self.bytes.saturating_sub(bytes);
                    run.push(item);
                }
                None => break,
            }
        }
        run
    }

    /// A run up to `up_to` is applied (and acknowledged with it).
    pub(crate) fn mark_applied(&mut self, up_to: u64) {
        self.applied = up_to;
        self.ack_owed = false;
    }

    /// Whether an ack is owed for stale entries; owed no more once asked.
    pub(crate) fn take_ack_owed(&mut self) -> bool {
        std::mem::take(&mut self.ack_owed)
    }

    /// Forgets the entries held (the partnership ended).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The seq up to which a pull must go to fill what is missing after the applied mark (a
    /// hole before the first entry held, or entries dropped for lack of room), if anything.
    pub(crate) fn missing_up_to(&self) -> Option<u64> {
        let next = self.applied.saturating_add(1);
        let hole = self
            .entries
            .keys()
            .next()
            .filter(|first| **first > next)
            .map(|first| first.saturating_sub(1));
        let dropped = (self.dropped_max > self.applied && !self.entries.contains_key(&next))
            .then_some(self.dropped_max);
        hole.max(dropped)
    }

    /// The periodic gap check: the pull target of what was missing at the previous check
    /// too, at the same applied mark (a hole that outlived one check interval).
    pub(crate) fn check_gap(&mut self) -> Option<u64> {
        match self.missing_up_to() {
            Some(target) if self.gap_seen == Some((self.applied, target)) => Some(target),
            Some(target) => {
                self.gap_seen = Some((self.applied, target));
                None
            }
            None => {
                self.gap_seen = None;
                None
            }
        }
    }

    /// The origin's `hello`: a head more than half a send window ahead is pulled rather than
    /// waited for.
    pub(crate) fn hello(&mut self, head: u64) -> Option<Pull> {
        if head > self.applied.saturating_add(self.send_window / 2) {
            self.want_sync(head)
        } else {
            None
        }
    }

    /// Entries up to `target` are wanted by pull: the pull to start now, if none is running
    /// (a running one takes the raised target at its end, [`Reorder::sync_done`]).
    pub(crate) fn want_sync(&mut self, target: u64) -> Option<Pull> {
        self.pulling.target = self.pulling.target.max(target);
        (!self.pulling.running).then(|| self.start_pull())
    }

    fn start_pull(&mut self) -> Pull {
        self.pulling.running = true;
        self.pulling.started_for = self.pulling.target;
        Pull {
            since: self.applied,
            target: self.pulling.target,
        }
    }

    /// The running pull ended (`ok`: it reached its target or the origin's head). Another
    /// pass when the target was raised meanwhile and is not applied yet; otherwise nothing is
    /// wanted any more (after a failure too: the next trigger asks again, no busy loop).
    pub(crate) fn sync_done(&mut self, ok: bool) -> Option<Pull> {
        self.pulling.running = false;
        let raised = self.pulling.target > self.pulling.started_for;
        if ok && raised && self.applied < self.pulling.target {
            return Some(self.start_pull());
        }
        self.pulling.target = 0;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reorder window (`2 × send_window`) of 1000 seqs.
    const SEND_WINDOW: u64 = 500;
    const W: u64 = 2 * SEND_WINDOW;

    fn buffer(applied: u64, max_bytes: usize) -> Reorder<u64> {
        Reorder::new(applied, SEND_WINDOW, max_bytes)
    }

    /// Offers `seq` carrying itself.
    fn offer(r: &mut Reorder<u64>, seq: u64, bytes: usize) -> Buffered {
        r.offer(seq, seq, bytes)
    }

    /// Applies every contiguous run, returning what was applied.
    fn apply_all(r: &mut Reorder<u64>) -> Vec<u64> {
        let mut applied = Vec::new();
        loop {
            let run = r.next_run(3);
            let Some(last) = run.last().copied() else {
                return applied;
            };
            r.mark_applied(last);
            applied.extend(run);
        }
    }

    #[test]
    fn stale_entries_owe_an_ack_and_far_entries_are_dropped() {
        let mut r = buffer(5, 100);
        assert_eq!(offer(&mut r, 5, 10), Buffered::Stale);
        assert!(r.take_ack_owed(), "a resend of an applied entry is acknowledged");
        assert!(!r.take_ack_owed(), "once");
        assert_eq!(offer(&mut r, 5 + W + 1, 10), Buffered::BeyondWindow);
        assert_eq!(offer(&mut r, u64::MAX, 10), Buffered::BeyondWindow);
        assert_eq!(offer(&mut r, 5 + W, 10), Buffered::Kept, "the window's last seq");
        let mut r = buffer(u64::MAX - 3, 100);
        assert_eq!(
            offer(&mut r, u64::MAX, 10),
            Buffered::Kept,
            "the window saturates"
        );
    }

    #[test]
    fn a_duplicate_replaces_rather_than_adds() {
        let mut r = buffer(0, 100);
        assert_eq!(offer(&mut r, 2, 40), Buffered::Kept);
        assert_eq!(offer(&mut r, 2, 40), Buffered::Kept);
        assert_eq!((r.len(), r.bytes()), (1, 40));
        assert_eq!(r.missing_up_to(), Some(1), "seq 1 is missing");
        assert!(r.next_run(10).is_empty(), "nothing applies before 1");
        assert_eq!(offer(&mut r, 1, 40), Buffered::Kept);
        assert_eq!(r.next_run(10), [1, 2]);
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn runs_are_contiguous_in_seq_order_and_bounded() {
        let mut r = buffer(0, 1000);
        for seq in [4, 2, 3, 1, 6] {
            assert_eq!(offer(&mut r, seq, 10), Buffered::Kept);
        }
        assert_eq!(r.next_run(3), [1, 2, 3], "at most the batch size");
        r.mark_applied(3);
        assert_eq!(r.next_run(3), [4], "stops at the hole at 5");
        r.mark_applied(4);
        assert_eq!(r.missing_up_to(), Some(5));
        assert_eq!(r.applied(), 4);
    }

    #[test]
    fn beyond_its_bytes_the_buffer_drops_the_highest_seqs_and_remembers_to_pull_them() {
        let mut r = buffer(0, 100);
        for seq in 3..=7 {
            assert_eq!(offer(&mut r, seq, 20), Buffered::Kept);
        }
        assert_eq!(r.bytes(), 100);
        // Higher than everything kept and no room: dropped.
        assert_eq!(offer(&mut r, 8, 20), Buffered::NoRoom);
        // Lower seqs are needed first: the highest make room.
        assert_eq!(offer(&mut r, 1, 30), Buffered::Kept);
        assert!(r.bytes() <= 100);
        assert_eq!(r.missing_up_to(), None, "seq 1 is there");
        assert_eq!(r.next_run(10), [1]);
        r.mark_applied(1);
        assert_eq!(
            r.missing_up_to(),
            Some(8),
            "a hole at 2 and the dropped entries up to 8"
        );
        assert_eq!(offer(&mut r, 2, 20), Buffered::Kept);
        assert_eq!(apply_all(&mut r), [2, 3, 4, 5], "7 and 6 were dropped");
        assert_eq!(
            r.missing_up_to(),
            Some(8),
            "nothing held, dropped entries to pull"
        );
        for seq in 6..=8 {
            assert_eq!(offer(&mut r, seq, 20), Buffered::Kept);
        }
        assert_eq!(apply_all(&mut r), [6, 7, 8]);
        assert_eq!(r.missing_up_to(), None, "all applied");
    }

    #[test]
    fn an_entry_larger_than_the_bound_is_kept_alone_so_progress_is_always_possible() {
        let mut r = buffer(0, 100);
        assert_eq!(offer(&mut r, 1, 500), Buffered::Kept);
        assert_eq!(offer(&mut r, 2, 1), Buffered::NoRoom);
        assert!(r.is_full_for(1));
        let mut r = buffer(0, 100);
        assert!(!r.is_full_for(500), "an empty buffer takes anything");
        assert_eq!(offer(&mut r, 5, 90), Buffered::Kept);
        assert_eq!(offer(&mut r, 1, 500), Buffered::Kept, "5 makes room for 1");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_gap_is_pulled_once_it_outlived_one_check() {
        let mut r = buffer(0, 1000);
        assert_eq!(r.check_gap(), None, "nothing missing");
        offer(&mut r, 3, 10);
        assert_eq!(r.check_gap(), None, "first seen");
        assert_eq!(r.check_gap(), Some(2), "still there: pull up to 2");
        assert_eq!(r.check_gap(), Some(2), "and again while it stays");
        offer(&mut r, 1, 10);
        r.next_run(10);
        r.mark_applied(1);
        assert_eq!(r.check_gap(), None, "the mark moved: seen anew");
        offer(&mut r, 2, 10);
        assert_eq!(apply_all(&mut r), [2, 3]);
        assert_eq!(r.check_gap(), None);
        assert_eq!(r.check_gap(), None, "filled");
    }

    #[test]
    fn a_hello_far_ahead_is_pulled() {
        let mut r = buffer(10, 1000);
        assert_eq!(r.hello(10 + SEND_WINDOW / 2), None, "half a window: pushed");
        let pull = r.hello(10 + SEND_WINDOW / 2 + 1);
        assert_eq!(
            pull,
            Some(Pull {
                since: 10,
                target: 10 + SEND_WINDOW / 2 + 1
            })
        );
        let mut r = buffer(u64::MAX - 1, 1000);
        assert_eq!(r.hello(u64::MAX), None, "no overflow");
    }

    #[test]
    fn one_pull_at_a_time_and_another_pass_for_a_raised_target() {
        let mut r = buffer(0, 1000);
        assert_eq!(r.want_sync(50), Some(Pull { since: 0, target: 50 }));
        assert_eq!(r.want_sync(80), None, "running: the target is raised");
        r.mark_applied(50);
        assert_eq!(
            r.sync_done(true),
            Some(Pull {
                since: 50,
                target: 80
            }),
            "raised while it ran"
        );
        r.mark_applied(70);
        assert_eq!(
            r.sync_done(true),
            None,
            "the owner had no more: done, no busy loop"
        );
        assert_eq!(
            r.want_sync(60),
            Some(Pull {
                since: 70,
                target: 60
            }),
            "wanted anew"
        );
        assert_eq!(r.want_sync(90), None);
        assert_eq!(r.sync_done(false), None, "a failure waits for the next trigger");
        assert_eq!(
            r.want_sync(1),
            Some(Pull { since: 70, target: 1 }),
            "the target was reset"
        );
        r.mark_applied(130);
        assert_eq!(r.want_sync(120), None);
        assert_eq!(r.sync_done(true), None, "applied past the raised target already");
    }

    #[test]
    fn clearing_forgets_the_entries_held() {
        let mut r = buffer(0, 1000);
        offer(&mut r, 1, 10);
        offer(&mut r, 2, 10);
        r.clear();
        assert_eq!((r.len(), r.bytes()), (0, 0));
        assert!(r.next_run(10).is_empty());
        assert_eq!(r.applied(), 0);
    }

    mod interleavings {
        //! Any interleaving of the three streams, with resends, entries lost on the way and
        //! the pulls the buffer asks for, delivers every seq once, in order, within the bound.

        use super::super::{Buffered, Pull, Reorder};
        use proptest::prelude::*;

        const MAX_BYTES: usize = 100;
        const SEND_WINDOW: u64 = 8;
        /// Entries of one pulled round (the owner's cap), below the reorder window.
        const ROUND: u64 = 5;
        const BATCH: usize = 4;

        /// One step of the session: a frame read from stream `0..3`, a gap check, a `hello`,
        /// or the end of the running pull.
        #[derive(Debug, Clone)]
        enum Step {
            Read(usize),
            GapCheck,
            Hello,
            PullEnds,
        }

        #[derive(Debug, Clone)]
        struct Case {
            /// Size in bytes of each entry `1..=n`.
            sizes: Vec<usize>,
            /// The stream (create, update, delete) each entry travels on.
            kinds: Vec<usize>,
            /// Entries lost on their stream (filled by pull).
            lost: Vec<bool>,
            /// Per stream, where a reconnect resends from (an index into its entries).
            resend_from: [usize; 3],
            steps: Vec<Step>,
        }

        fn case() -> impl Strategy<Value = Case> {
            (1usize..40).prop_flat_map(|n| {
                (
                    proptest::collection::vec(1usize..=40, n),
                    proptest::collection::vec(0usize..3, n),
                    proptest::collection::vec(proptest::bool::weighted(0.15), n),
                    [0usize..n, 0usize..n, 0usize..n],
                    proptest::collection::vec(
                        prop_oneof![
                            6 => (0usize..3).prop_map(Step::Read),
                            1 => Just(Step::GapCheck),
                            1 => Just(Step::Hello),
                            1 => Just(Step::PullEnds),
                        ],
                        0..200,
                    ),
                )
                    .prop_map(|(sizes, kinds, lost, resend_from, steps)| Case {
                        sizes,
                        kinds,
                        lost,
                        resend_from,
                        steps,
                    })
            })
        }

        /// A session around the buffer: the origin's journal, what each stream still has to
        /// deliver, the running pull, what was applied.
        struct Sim {
            sizes: Vec<usize>,
            streams: [Vec<u64>; 3],
            reorder: Reorder<u64>,
            pull: Option<Pull>,
            delivered: Vec<u64>,
        }

        impl Sim {
            fn new(c: &Case) -> Sim {
                let mut streams: [Vec<u64>; 3] = Default::default();
                for (i, kind) in c.kinds.iter().enumerate() {
                    if !c.lost[i] {
                        streams[*kind].push(i as u64 + 1);
                    }
                }
                // A reconnect resends a stream's entries from some point: duplicates.
                for (stream, from) in streams.iter_mut().zip(c.resend_from) {
                    let again: Vec<u64> = stream.iter().skip(from).copied().collect();
                    stream.extend(again);
                }
                for s in &mut streams {
                    s.reverse();
                }
                Sim {
                    sizes: c.sizes.clone(),
                    streams,
                    reorder: Reorder::new(0, SEND_WINDOW, MAX_BYTES),
                    pull: None,
                    delivered: Vec::new(),
                }
            }

            fn head(&self) -> u64 {
                self.sizes.len() as u64
            }

            fn size(&self, seq: u64) -> usize {
                self.sizes[seq as usize - 1]
            }

            fn apply(&mut self) {
                loop {
                    let run = self.reorder.next_run(BATCH);
                    let Some(last) = run.last().copied() else {
                        return;
                    };
                    self.delivered.extend(run);
                    self.reorder.mark_applied(last);
                }
            }

            fn start(&mut self, pull: Option<Pull>) {
                if let Some(p) = pull {
                    assert!(self.pull.is_none(), "two pulls at once");
                    self.pull = Some(p);
                }
            }

            /// The running pull brings its rounds (each applied before the next one is
            /// handed over), then ends.
            fn finish_pull(&mut self) {
                let Some(p) = self.pull.take() else {
                    return;
                };
                let mut since = p.since.max(self.reorder.applied());
                while since < p.target.min(self.head()) {
                    let until = since.saturating_add(ROUND).min(self.head());
                    for seq in since + 1..=until {
                        let bytes = self.size(seq);
                        if self.reorder.is_full_for(bytes) {
                            self.apply();
                        }
                        self.reorder.offer(seq, seq, bytes);
                    }
                    self.apply();
                    since = until;
                }
                let next = self.reorder.sync_done(true);
                self.start(next);
            }

            fn step(&mut self, step: &Step) {
                match step {
                    Step::Read(kind) => {
                        if let Some(seq) = self.streams[*kind].pop() {
                            let bytes = self.size(seq);
                            if self.reorder.offer(seq, seq, bytes) == Buffered::Stale {
                                assert!(self.reorder.take_ack_owed());
                            }
                        }
                    }
                    Step::GapCheck => {
                        if let Some(target) = self.reorder.check_gap() {
                            let pull = self.reorder.want_sync(target);
                            self.start(pull);
                        }
                    }
                    Step::Hello => {
                        let pull = self.reorder.hello(self.head());
                        self.start(pull);
                    }
                    Step::PullEnds => self.finish_pull(),
                }
                self.apply();
                assert!(
                    self.reorder.bytes() <= MAX_BYTES,
                    "{} bytes held",
                    self.reorder.bytes()
                );
            }

            /// After the streams: the safety-net sync until everything is applied.
            fn settle(&mut self) {
                for kind in 0..3 {
                    while !self.streams[kind].is_empty() {
                        self.step(&Step::Read(kind));
                    }
                }
                for _ in 0..4 {
                    self.finish_pull();
                    let pull = self.reorder.want_sync(u64::MAX);
                    self.start(pull);
                    self.finish_pull();
                }
            }
        }

        proptest! {
            #[test]
            fn every_seq_is_delivered_once_in_order_within_the_bytes(c in case()) {
                let mut sim = Sim::new(&c);
                for step in &c.steps {
                    sim.step(step);
                }
                sim.settle();
                let all: Vec<u64> = (1..=sim.head()).collect();
                prop_assert_eq!(&sim.delivered, &all);
                prop_assert_eq!(sim.reorder.missing_up_to(), None);
                prop_assert_eq!(sim.reorder.bytes(), 0);
            }
        }
    }
}
