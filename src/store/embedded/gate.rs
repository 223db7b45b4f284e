//! Reads wait for the apply commits whose notices may be out already.
//!
//! The receiver publishes a batch's notices while its commit writes and syncs
//! ([`super::super::Store::apply_batch_publishing_early`]). An application that reacts to a
//! notice by asking the node for the resource (`GET /api/resources/...`) must find it: every
//! store operation first waits for the apply commits that began before it, so whatever was
//! announced before the operation started is visible to it.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest an operation waits for earlier apply commits; past it (a stalled disk), it reads
/// what is committed.
const WAIT_AT_MOST: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct CommitGate {
    tickets: Mutex<Tickets>,
    ended: Condvar,
}

/// Apply commits counted as they begin and end; they end in the order they began (redb has
/// one writer at a time).
#[derive(Default)]
struct Tickets {
    begun: u64,
    ended: u64,
}

/// One apply commit in progress: ended when dropped, whether the commit succeeded or not.
pub(super) struct Ticket<'a> {
    gate: &'a CommitGate,
    number: u64,
}

impl CommitGate {
    fn lock(&self) -> MutexGuard<'_, Tickets> {
        // The counters stay consistent whatever a panicking holder did.
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called before the commit's notices can leave.
    pub(super) fn begin(&self) -> Ticket<'_> {
        let mut t = self.lock();
        t.begun = t.begun.saturating_add(1);
        Ticket {
            gate: self,
            number: t.begun,
        }
    }

    /// Waits until every apply commit begun before this call has ended.
    pub(super) fn wait_for_earlier(&self) {
        let deadline = Instant::now() + WAIT_AT_MOST;
        let mut t = self.lock();
        let target = t.begun;
        while t.ended < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    waited = ?WAIT_AT_MOST,
                    "an apply commit is still running; this store operation reads without it"
                );
                return;
            }
            t = match self.ended.wait_timeout(t, left) {
                Ok((t, _)) => t,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut t = self.gate.lock();
        t.ended = t.ended.max(self.number);
        drop(t);
        self.gate.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_operation_waits_for_the_commit_begun_before_it_and_not_for_later_ones() {
        let gate = Arc::new(CommitGate::default());
        let ticket = gate.begin();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.wait_for_earlier();
                tx.send(()).ok();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "returned while the commit was running"
        );
        drop(ticket);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("returned once the commit ended");
        waiter.join().ok();
        // Nothing begun: no wait.
        gate.wait_for_earlier();
    }
}
