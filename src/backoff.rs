//! The one backoff rule of the node: the delay starts at `min`, doubles after each failure
//! up to `max`, and goes back to `min` after progress. Every retry loop (NATS intake, partner
//! links, inbound steps, restoring partnerships) uses it, so they all behave alike.

use std::time::Duration;

/// Exponential backoff between `min` and `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff whose first delay is `min`. A `max` below `min` is taken as `min`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The delay to wait now, before the next attempt.
    pub(crate) fn current(&self) -> Duration {
        self.current
    }

    /// Returns the delay to wait now and doubles the next one (saturating, capped at `max`).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let now = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        now
    }

    /// The delay before a retry that follows `failures` failures in a row, as [`Self::next_delay`]
    /// would have given it: none before the first attempt, `min` after one failure, doubling
    /// up to `max`. For a retry loop a library runs and counts itself (the NATS client).
    pub(crate) fn after_failures(&self, failures: usize) -> Duration {
        let Some(doublings) = failures.checked_sub(1) else {
            return Duration::ZERO;
        };
        let factor = 2u32.saturating_pow(u32::try_from(doublings).unwrap_or(u32::MAX));
        self.min.saturating_mul(factor).min(self.max)
    }

    /// After progress: the next delay is `min` again.
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }

    /// Waits the current delay (then doubles it); `false` when `stop` resolved first.
    pub(crate) async fn wait_or<F: std::future::Future>(&mut self, stop: F) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let seen: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(seen, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn after_failures_counts_like_next_delay() {
        let ms = Duration::from_millis;
        let b = Backoff::new(ms(100), ms(500));
        let seen: Vec<_> = [0, 1, 2, 3, 4, usize::MAX].map(|n| b.after_failures(n)).into();
        assert_eq!(seen, [ms(0), ms(100), ms(200), ms(400), ms(500), ms(500)]);
    }

    #[test]
    fn never_overflows_and_max_below_min_is_min() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::MAX);
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.current(), Duration::MAX);
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
