//! The partner link's rules, apart from any I/O: the handshake, the send window, the acks
//! and where sending resumes after a reconnect. [`super::link`] reads the journal, writes
//! the frames and keeps the time; the types here only decide, so every rule is tested
//! without a store, a socket or a runtime.
//!
//! - [`Handshake`]: the partner answers each of the three `hello`s with an `ack` of what it
//!   already handled; it has the lowest of the three. An answer above this node's journal
//!   head is refused and ends the session.
//! - [`Window`]: the cursor (`acked`, every seq up to it acknowledged) and the next seq to
//!   push. A session resumes from the partner's report: right after it when the partner is
//!   less than a window behind, else right after the head announced in `hello` (the partner
//!   pulls the gap with journal sync). At most `size` entries beyond the cursor are pushed.
//!   An `ack` moves the cursor up only; one above the head is refused and moves nothing.
//!
//! Seq arithmetic saturates: no seq a partner sends can make it wrap.

use crate::p2p::StreamKind;

/// What an `ack` does to the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckOutcome {
    /// The cursor moves to the ack.
    Moved,
    /// At or below the cursor (acks are cumulative): nothing to do.
    Unchanged,
    /// Above `head`, the highest seq this node ever sent or served: refused, and it moves
    /// nothing (neither the cursor nor the window it opens).
    Beyond,
}

/// An `ack` naming a seq above this node's journal head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckBeyondHead {
    pub seq: u64,
    pub head: u64,
}

/// The partner's answers to the three `hello`s.
#[derive(Debug, Default)]
pub(crate) struct Handshake {
    answered: [Option<u64>; 3],
}

impl Handshake {
    pub(crate) fn new() -> Self {
        Handshake::default()
    }

    /// The partner's `ack` of `seq` on the `kind` stream, `head` the highest seq this node
    /// journaled. A later answer on the same stream replaces the earlier one.
    ///
    /// # Errors
    /// An answer above `head`: the partner claims what this node never journaled; nothing is
    /// recorded and the session must end.
    pub(crate) fn answer(&mut self, kind: StreamKind, seq: u64, head: u64) -> Result<(), AckBeyondHead> {
        if seq > head {
            return Err(AckBeyondHead { seq, head });
        }
        self.answered[kind as usize] = Some(seq);
        Ok(())
    }

    /// What the partner has on every stream, once each stream answered.
    pub(crate) fn partner_has(&self) -> Option<u64> {
        let mut lowest = u64::MAX;
        for answer in self.answered {
            lowest = lowest.min(answer?);
        }
        Some(lowest)
    }
}

/// A journal read the window allows: entries from `from`, at most `max` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Read {
    pub from: u64,
    pub max: usize,
}

/// The send window of one partner link. It lives as long as the link, across sessions.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    /// The cursor: every seq up to it is acknowledged by the partner.
    acked: u64,
    /// The next seq to push in this session.
    next: u64,
    /// How far beyond the cursor entries may be pushed.
    size: u64,
    /// The cursor as last written to the store.
    persisted: u64,
}

impl Window {
    /// A window whose cursor is `cursor` as read from the store, letting `size` entries
    /// beyond the cursor go unacknowledged. Nothing is pushed before [`Window::resume`].
    pub(crate) fn new(cursor: u64, size: u64) -> Self {
        Window {
            acked: cursor,
            next: u64::MAX,
            size,
            persisted: cursor,
        }
    }

    /// The cursor: every seq up to it is acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    #[cfg(test)]
    /// The next seq to push.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// The last seq the window lets through.
    pub(crate) fn end(&self) -> u64 {
        self.acked.saturating_add(self.size)
    }

    /// A session opened: the partner has everything up to `partner_has` (its answer to
    /// `hello`, from its durable applied mark, which may be below the cursor), and this node
    /// announced `head_at_hello`. The cursor becomes the partner's report; returns the first
    /// seq to push: everything after the report, or, when the partner is more than a window
    /// behind, everything after the announced head (the partner pulls the rest).
    pub(crate) fn resume(&mut self, partner_has: u64, head_at_hello: u64) -> u64 {
        self.acked = partner_has;
        self.next = if head_at_hello > self.end() {
            head_at_hello.saturating_add(1)
        } else {
            partner_has.saturating_add(1)
        };
        self.next
    }

    /// What to read from the journal now that it ends at `head`, in reads of at most
    /// `read_chunk` entries; `None` when everything up to `head` was pushed or the window is
    /// full.
    pub(crate) fn to_read(&self, head: u64, read_chunk: usize) -> Option<Read> {
        let last = head.min(self.end());
        if self.next > last {
            return None;
        }
        // `next <= last`: no underflow.
        let ahead = (last - self.next).saturating_add(1);
        let max = usize::try_from(ahead.min(read_chunk as u64)).unwrap_or(read_chunk);
        Some(Read { from: self.next, max })
    }

    /// Entries up to `last` were written to the partner.
    pub(crate) fn sent(&mut self, last: u64) {
        self.next = self.next.max(last.saturating_add(1));
    }

    /// The partner's `ack` of `seq` (cumulative), `head` the highest seq this node ever
    /// pushed or served.
    pub(crate) fn ack(&mut self, seq: u64, head: u64) -> AckOutcome {
        if seq > head {
            AckOutcome::Beyond
        } else if seq > self.acked {
            self.acked = seq;
            AckOutcome::Moved
        } else {
            AckOutcome::Unchanged
        }
    }

    /// The cursor, when it differs from what was last written to the store.
    pub(crate) fn unpersisted(&self) -> Option<u64> {
        (self.acked != self.persisted).then_some(self.acked)
    }

    /// `cursor` is now in the store.
    pub(crate) fn persisted(&mut self, cursor: u64) {
        self.persisted = cursor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 8192;

    fn open(partner_has: u64, head: u64) -> Window {
        let mut w = Window::new(0, SIZE);
        w.resume(partner_has, head);
        w
    }

    #[test]
    fn an_ack_moves_the_cursor_only_up_and_never_beyond_the_head() {
        let mut w = open(10, 20);
        assert_eq!(w.ack(12, 20), AckOutcome::Moved);
        assert_eq!(w.acked(), 12);
        assert_eq!(w.ack(20, 20), AckOutcome::Moved, "up to the head itself");
        assert_eq!(w.ack(20, 20), AckOutcome::Unchanged, "a duplicate");
        assert_eq!(w.ack(3, 20), AckOutcome::Unchanged, "acks are cumulative");
        assert_eq!(w.ack(21, 20), AckOutcome::Beyond);
        assert_eq!(w.ack(u64::MAX, 20), AckOutcome::Beyond);
        assert_eq!(w.acked(), 20, "a refused ack moves nothing");
        assert_eq!(w.ack(u64::MAX, u64::MAX), AckOutcome::Moved);
    }

    #[test]
    fn a_refused_ack_opens_no_window() {
        let mut w = open(0, 0);
        assert_eq!(w.ack(SIZE * 4, 100), AckOutcome::Beyond);
        assert_eq!(w.end(), SIZE);
        assert_eq!(w.to_read(SIZE * 8, 100_000).map(|r| r.max), Some(SIZE as usize));
    }

    #[test]
    fn less_than_a_window_behind_resumes_right_after_the_partners_report() {
        let mut w = Window::new(50, SIZE);
        assert_eq!(w.resume(5, 100), 6, "the report wins over the stored cursor");
        assert_eq!(w.acked(), 5);
        assert_eq!(w.resume(100, 100), 101, "caught up: from the head on");
    }

    #[test]
    fn far_behind_resumes_after_the_announced_head_and_leaves_the_gap_to_pull() {
        let mut w = Window::new(0, SIZE);
        assert_eq!(w.resume(5, 9000), 9001);
        assert_eq!(w.to_read(9500, 64), None, "nothing beyond the window end 8197");
        assert_eq!(
            w.ack(9000, 9500),
            AckOutcome::Moved,
            "what it pulled opens the window"
        );
        assert_eq!(w.to_read(9500, 64), Some(Read { from: 9001, max: 64 }));
    }

    #[test]
    fn reads_stop_at_the_head_the_window_end_and_the_chunk() {
        let mut w = open(10, 10);
        assert_eq!(w.to_read(10, 64), None, "caught up");
        assert_eq!(
            w.to_read(13, 64),
            Some(Read { from: 11, max: 3 }),
            "up to the head"
        );
        assert_eq!(
            w.to_read(1000, 64),
            Some(Read { from: 11, max: 64 }),
            "a chunk at most"
        );
        w.sent(8202);
        assert_eq!(
            w.to_read(100_000, 64),
            None,
            "the window (cursor 10 + 8192) is full"
        );
        w.ack(8000, 100_000);
        assert_eq!(w.to_read(100_000, 64), Some(Read { from: 8203, max: 64 }));
    }

    #[test]
    fn nothing_is_pushed_before_a_session_opens() {
        assert_eq!(Window::new(7, SIZE).to_read(100, 64), None);
    }

    #[test]
    fn window_arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(open(10, 10).end(), 8202);
        assert_eq!(open(u64::MAX - 1, u64::MAX - 1).end(), u64::MAX);
        assert_eq!(open(u64::MAX, u64::MAX).next(), u64::MAX);
        assert_eq!(open(0, u64::MAX).next(), u64::MAX);
        let mut w = open(u64::MAX - 1, u64::MAX);
        assert_eq!(
            w.to_read(u64::MAX, 64),
            Some(Read {
                from: u64::MAX,
                max: 1
            })
        );
        w.sent(u64::MAX);
        assert_eq!(w.next(), u64::MAX);
    }

    #[test]
    fn the_cursor_is_persisted_when_it_moved() {
        let mut w = Window::new(4, SIZE);
        assert_eq!(w.unpersisted(), None);
        w.resume(4, 10);
        w.ack(7, 10);
        assert_eq!(w.unpersisted(), Some(7));
        w.persisted(7);
        assert_eq!(w.unpersisted(), None);
        w.resume(2, 10);
        assert_eq!(
            w.unpersisted(),
            Some(2),
            "the partner's lower report is written too"
        );
    }

    #[test]
    fn the_handshake_takes_the_lowest_answer_of_the_three_streams() {
        let mut h = Handshake::new();
        assert_eq!(h.answer(StreamKind::Create, 9, 20), Ok(()));
        assert_eq!(h.answer(StreamKind::Delete, 4, 20), Ok(()));
        assert_eq!(h.partner_has(), None, "update has not answered");
        assert_eq!(h.answer(StreamKind::Update, 7, 20), Ok(()));
        assert_eq!(h.partner_has(), Some(4));
        assert_eq!(
            h.answer(StreamKind::Delete, 8, 20),
            Ok(()),
            "a later answer replaces"
        );
        assert_eq!(h.partner_has(), Some(7));
    }

    #[test]
    fn a_handshake_answer_beyond_the_head_is_refused_and_not_recorded() {
        let mut h = Handshake::new();
        assert_eq!(
            h.answer(StreamKind::Create, 21, 20),
            Err(AckBeyondHead { seq: 21, head: 20 })
        );
        h.answer(StreamKind::Update, 1, 20).unwrap();
        h.answer(StreamKind::Delete, 1, 20).unwrap();
        assert_eq!(h.partner_has(), None);
    }

    /// One thing that happens to a link.
    #[derive(Debug, Clone)]
    enum Step {
        /// The application journals this many entries.
        Journal(u64),
        /// The link pushes what the window allows (one read).
        Push,
        /// An ack: the next of what was pushed, a duplicate, a stale one, one above the head,
        /// or anything at all.
        AckInOrder(u64),
        AckDuplicate,
        AckStale(u64),
        AckAboveHead(u64),
        AckAny(u64),
        /// The session ends; at the next one the partner reports its cursor, or less.
        Reconnect {
            lost: u64,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..40).prop_map(Step::Journal),
            Just(Step::Push),
            (1u64..20).prop_map(Step::AckInOrder),
            Just(Step::AckDuplicate),
            (1u64..20).prop_map(Step::AckStale),
            (1u64..1000).prop_map(Step::AckAboveHead),
            any::<u64>().prop_map(Step::AckAny),
            (0u64..3).prop_map(|lost| Step::Reconnect { lost }),
        ]
    }

    proptest! {
        /// For any sequence of acks (in order, duplicated, stale, above the head) the cursor
        /// only moves forward within a session and never past the head; pushes stay within
        /// the window, in order and without gaps; after a reconnect everything the partner
        /// has not got is pushed again, or, when it is more than a window behind, left to its
        /// pull and everything after the head pushed.
        #[test]
        fn the_window_keeps_its_rules_whatever_the_partner_says(
            size in 1u64..64,
            chunk in 1usize..16,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut head = 0u64;
            let mut w = Window::new(0, size);
            let mut pushed = w.resume(0, head).saturating_sub(1);
            for step in steps {
                let before = w.acked();
                match step {
                    Step::Journal(n) => head += n,
                    Step::Push => {
                        if let Some(read) = w.to_read(head, chunk) {
                            prop_assert_eq!(read.from, pushed + 1, "in order, no gap");
                            prop_assert!(read.max >= 1 && read.max <= chunk);
                            let last = read.from + read.max as u64 - 1;
                            prop_assert!(last <= head, "nothing beyond the journal");
                            prop_assert!(last <= w.acked() + size, "nothing beyond the window");
                            w.sent(last);
                            pushed = last;
                        } else {
                            prop_assert!(pushed >= head || pushed >= w.acked() + size);
                        }
                    }
                    Step::AckInOrder(k) => {
                        let seq = (w.acked() + k).min(pushed.max(w.acked()));
                        w.ack(seq, head);
                    }
                    Step::AckDuplicate => {
                        prop_assert_eq!(w.ack(w.acked(), head), AckOutcome::Unchanged);
                    }
                    Step::AckStale(k) => {
                        prop_assert_eq!(w.ack(w.acked().saturating_sub(k), head), AckOutcome::Unchanged);
                    }
                    Step::AckAboveHead(k) => {
                        let (acked, next) = (w.acked(), w.next());
                        prop_assert_eq!(w.ack(head + k, head), AckOutcome::Beyond);
                        prop_assert_eq!((w.acked(), w.next()), (acked, next), "moves nothing");
                    }
                    Step::AckAny(seq) => {
                        let outcome = w.ack(seq, head);
                        prop_assert_eq!(outcome == AckOutcome::Beyond, seq > head);
                    }
                    Step::Reconnect { lost } => {
                        let partner_has = w.acked().saturating_sub(lost);
                        let from = w.resume(partner_has, head);
                        prop_assert_eq!(w.acked(), partner_has);
                        if head <= partner_has + size {
                            prop_assert_eq!(from, partner_has + 1, "everything not acked again");
                        } else {
                            prop_assert_eq!(from, head + 1, "the partner pulls up to the head");
                        }
                        pushed = from - 1;
                        continue;
                    }
                }
                prop_assert!(w.acked() >= before, "the cursor only moves forward");
                prop_assert!(w.acked() <= head, "never past what was journaled");
            }
        }
    }
}
