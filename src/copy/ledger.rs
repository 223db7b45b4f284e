//! The offset bookkeeping of a copy, pure (no file, stream or clock): the sender's
//! [`SendLedger`] (what to send next within its window, which acknowledgements are
//! believable) and the receiver's [`ReceiveCursor`] (which chunk it accepts next). The tasks
//! in `job.rs` and `receive.rs` only move bytes around these decisions.

/// A chunk or acknowledgement the other side should not have sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    #[error("offset {got} is not the expected {expected}")]
    Unexpected { got: u64, expected: u64 },
    #[error("a chunk of {len} bytes exceeds the limit of {max}")]
    ChunkTooLarge { len: u64, max: u64 },
    #[error("an empty chunk")]
    EmptyChunk,
    #[error("bytes up to {end} pass the announced total of {total}")]
    PastTotal { end: u64, total: u64 },
    #[error("acknowledgement of {offset} outside the bytes in flight ({acked}, {sent}]")]
    BadAck { offset: u64, acked: u64, sent: u64 },
}

/// The sender's view of one attempt: bytes below `acked` are on the receiver's disk, bytes
/// up to `sent` are on the way; at most `window` bytes are unacknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendLedger {
    total: u64,
    chunk: u64,
    window: u64,
    acked: u64,
    sent: u64,
}

impl SendLedger {
    /// An attempt resuming at `start` (what the receiver already holds).
    ///
    /// # Errors
    /// `start` is beyond `total`: the receiver claims bytes that do not exist.
    pub fn new(total: u64, start: u64, chunk: u64, window: u64) -> Result<SendLedger, OffsetError> {
        if start > total {
            return Err(OffsetError::PastTotal { end: start, total });
        }
        let chunk = chunk.max(1);
        Ok(SendLedger {
            total,
            chunk,
            window: window.max(chunk),
            acked: start,
            sent: start,
        })
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Every byte is acknowledged.
    pub fn is_complete(&self) -> bool {
        self.acked >= self.total
    }

    /// The next chunk to send, `(offset, len)`, when the window has room; marks it sent.
    pub fn next_chunk(&mut self) -> Option<(u64, u64)> {
        let in_flight = self.sent.saturating_sub(self.acked);
        if self.sent >= self.total || in_flight >= self.window {
            return None;
        }
        let len = self
            .chunk
            .min(self.total.saturating_sub(self.sent))
            .min(self.window.saturating_sub(in_flight));
        let offset = self.sent;
        self.sent = self.sent.saturating_add(len);
        Some((offset, len))
    }

    /// A cumulative acknowledgement; returns the bytes it newly acknowledges.
    ///
    /// # Errors
    /// [`OffsetError::BadAck`]: not above the last one, or beyond what was sent.
    pub fn on_ack(&mut self, offset: u64) -> Result<u64, OffsetError> {
        if offset <= self.acked || offset > self.sent {
            return Err(OffsetError::BadAck {
                offset,
                acked: self.acked,
                sent: self.sent,
            });
        }
        let newly = offset - self.acked;
        self.acked = offset;
        Ok(newly)
    }
}

/// The receiver's view: the next byte it expects, the announced total, the largest chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveCursor {
    expected: u64,
    total: u64,
    max_chunk: u64,
}

impl ReceiveCursor {
    /// A cursor at `held` bytes already on disk.
    ///
    /// # Errors
    /// More bytes held than announced.
    pub fn new(held: u64, total: u64, max_chunk: u64) -> Result<ReceiveCursor, OffsetError> {
        if held > total {
            return Err(OffsetError::PastTotal { end: held, total });
        }
        Ok(ReceiveCursor {
            expected: held,
            total,
            max_chunk,
        })
    }

    pub fn expected(&self) -> u64 {
        self.expected
    }

    pub fn is_complete(&self) -> bool {
        self.expected >= self.total
    }

    /// Whether a chunk of `len` bytes at `offset` is the one expected, before it is written.
    ///
    /// # Errors
    /// Another offset, an empty or oversized chunk, bytes past the total.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), OffsetError> {
        if offset != self.expected {
            return Err(OffsetError::Unexpected {
                got: offset,
                expected: self.expected,
            });
        }
        if len == 0 {
            return Err(OffsetError::EmptyChunk);
        }
        if len > self.max_chunk {
            return Err(OffsetError::ChunkTooLarge {
                len,
                max: self.max_chunk,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.total => Ok(()),
            Some(end) => Err(OffsetError::PastTotal {
                end,
                total: self.total,
            }),
            None => Err(OffsetError::PastTotal {
                end: u64::MAX,
                total: self.total,
            }),
        }
    }

    /// Records a checked chunk as written; returns the new offset (what is acknowledged).
    pub fn advance(&mut self, len: u64) -> u64 {
        self.expected = self.expected.saturating_add(len).min(self.total);
        self.expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_bounds_what_is_in_flight() {
        let mut l = SendLedger::new(10, 0, 3, 6).unwrap();
        assert_eq!(l.next_chunk(), Some((0, 3)));
        assert_eq!(l.next_chunk(), Some((3, 3)));
        assert_eq!(l.next_chunk(), None, "6 bytes in flight fill the window");
        assert_eq!(l.on_ack(3), Ok(3));
        assert_eq!(l.next_chunk(), Some((6, 3)));
        assert_eq!(l.on_ack(9), Ok(6));
        assert_eq!(l.next_chunk(), Some((9, 1)), "the last chunk is short");
        assert_eq!(l.next_chunk(), None);
        assert!(!l.is_complete());
        assert_eq!(l.on_ack(10), Ok(1));
        assert!(l.is_complete());
    }

    #[test]
    fn a_resumed_attempt_starts_at_what_the_receiver_holds() {
        let mut l = SendLedger::new(10, 7, 4, 8).unwrap();
        assert_eq!(l.next_chunk(), Some((7, 3)));
        assert_eq!(
            SendLedger::new(10, 11, 4, 8),
            Err(OffsetError::PastTotal { end: 11, total: 10 })
        );
        let mut done = SendLedger::new(10, 10, 4, 8).unwrap();
        assert!(done.is_complete());
        assert_eq!(done.next_chunk(), None);
    }

    #[test]
    fn acks_must_move_forward_within_what_was_sent() {
        let mut l = SendLedger::new(10, 0, 4, 8).unwrap();
        l.next_chunk();
        assert!(
            matches!(l.on_ack(5), Err(OffsetError::BadAck { .. })),
            "beyond sent"
        );
        assert_eq!(l.on_ack(4), Ok(4));
        assert!(
            matches!(l.on_ack(4), Err(OffsetError::BadAck { .. })),
            "not forward"
        );
        assert!(matches!(l.on_ack(0), Err(OffsetError::BadAck { .. })));
    }

    #[test]
    fn the_receiver_takes_only_the_expected_chunk() {
        let mut c = ReceiveCursor::new(0, 10, 4).unwrap();
        assert_eq!(
            c.check(1, 2),
            Err(OffsetError::Unexpected { got: 1, expected: 0 })
        );
        assert_eq!(c.check(0, 0), Err(OffsetError::EmptyChunk));
        assert_eq!(c.check(0, 5), Err(OffsetError::ChunkTooLarge { len: 5, max: 4 }));
        assert_eq!(c.check(0, 4), Ok(()));
        assert_eq!(c.advance(4), 4);
        assert_eq!(c.advance(4), 8);
        assert_eq!(c.check(8, 3), Err(OffsetError::PastTotal { end: 11, total: 10 }));
        assert!(matches!(
            c.check(u64::MAX, 1),
            Err(OffsetError::Unexpected { .. })
        ));
        assert_eq!(c.check(8, 2), Ok(()));
        c.advance(2);
        assert!(c.is_complete());
        assert!(ReceiveCursor::new(11, 10, 4).is_err());
    }

    #[test]
    fn an_overflowing_chunk_is_refused() {
        let c = ReceiveCursor::new(u64::MAX - 1, u64::MAX, u64::MAX).unwrap();
        assert!(matches!(
            c.check(u64::MAX - 1, 2),
            Err(OffsetError::PastTotal { .. })
        ));
    }

    proptest::proptest! {
        /// A sender and a receiver driven by the two types, the connection cut after random
        /// numbers of chunks (what was in flight is lost, the receiver keeps what it wrote):
        /// the receiver ends with every byte once, in order, and the sender sent at most one
        /// window more per cut.
        #[test]
        fn cuts_cost_at_most_a_window_each_and_lose_nothing(
            total in 0u64..5_000,
            chunk in 1u64..300,
            window_chunks in 1u64..6,
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let window = chunk * window_chunks;
            let mut held = 0u64; // the receiver's file length
            let mut sent = 0u64;
            let mut happened = 0u64;
            let mut cuts = cuts.into_iter();
            loop {
                let mut ledger = SendLedger::new(total, held, chunk, window).unwrap();
                let mut cursor = ReceiveCursor::new(held, total, chunk).unwrap();
                let cut_after = cuts.next();
                let mut in_flight = std::collections::VecDeque::new();
                let mut steps = 0usize;
                let mut cut = false;
                while !ledger.is_complete() {
                    while let Some((offset, len)) = ledger.next_chunk() {
                        sent += len;
                        in_flight.push_back((offset, len));
                    }
                    if cut_after == Some(steps) {
                        cut = true;
                        break;
                    }
                    steps += 1;
                    let (offset, len) = in_flight.pop_front().unwrap();
                    proptest::prop_assert!(cursor.check(offset, len).is_ok());
                    held = cursor.advance(len);
                    proptest::prop_assert!(ledger.on_ack(held).is_ok());
                }
                if !cut {
                    break;
                }
                happened += 1;
            }
            proptest::prop_assert_eq!(held, total);
            proptest::prop_assert!(
                sent <= total + happened * window,
                "{} bytes sent for {} with {} cuts", sent, total, happened
            );
        }
    }
}
