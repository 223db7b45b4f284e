//! Guards against peers that take more than their share: a pool of helper tasks in which
//! each peer holds a bounded share ([`PeerPool`]), per-peer token buckets ([`PeerBuckets`])
//! and refusal logs throttled per peer and code ([`LogThrottle`]).
//!
//! Pure bookkeeping: no I/O, no runtime. Every map here is bounded in entries, so a flood
//! of fresh peer ids cannot grow it (docs/SECURITY.md).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a [`PeerPool`] refused a permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PoolFull {
    /// This peer already holds its share.
    #[error("this peer already holds its share of {0}")]
    Peer(usize),
    /// Every permit of the pool is taken.
    #[error("all {0} permits are taken")]
    Total(usize),
}

/// A pool of `total` permits in which one peer holds at most `per_peer`.
pub(crate) struct PeerPool {
    total: usize,
    per_peer: usize,
    permits: Arc<Semaphore>,
    held: Mutex<HashMap<PeerId, usize>>,
}

/// One permit of a [`PeerPool`], given back when dropped.
pub(crate) struct PeerPermit {
    pool: Arc<PeerPool>,
    peer: PeerId,
    _permit: OwnedSemaphorePermit,
}

impl PeerPool {
    pub(crate) fn new(total: usize, per_peer: usize) -> Arc<PeerPool> {
        Arc::new(PeerPool {
            total,
            per_peer: per_peer.min(total),
            permits: Arc::new(Semaphore::new(total)),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for `peer`, unless it holds its share already or the pool is empty.
    ///
    /// # Errors
    /// [`PoolFull`] says which bound was hit.
    pub(crate) fn try_acquire(self: &Arc<Self>, peer: PeerId) -> Result<PeerPermit, PoolFull> {
        let Ok(mut held) = self.held.lock() else {
            return Err(PoolFull::Total(self.total));
        };
        let mine = held.get(&peer).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return Err(PoolFull::Peer(self.per_peer));
        }
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| PoolFull::Total(self.total))?;
        held.insert(peer, mine + 1);
        Ok(PeerPermit {
            pool: self.clone(),
            peer,
            _permit: permit,
        })
    }

    #[cfg(test)]
    /// Permits `peer` holds now.
    pub(crate) fn held_by(&self, peer: &PeerId) -> usize {
        self.held
            .lock()
            .map(|h| h.get(peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        if let Ok(mut held) = self.pool.held.lock() {
            match held.get_mut(&self.peer) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    held.remove(&self.peer);
                }
            }
        }
    }
}

/// A token bucket: `burst` tokens at most, refilled at `per_second`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(per_second: f64, burst: f64, now: Instant) -> TokenBucket {
        let burst = burst.max(1.0);
        TokenBucket {
            per_second: per_second.max(0.0),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.last = now;
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is back to full: it then says nothing a new bucket would not.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// One token bucket per peer, at most `max_peers` remembered. A full bucket is forgotten
/// first (a new one would be the same); when every remembered bucket is in use, a peer not
/// among them is refused until one refills.
pub(crate) struct PeerBuckets<K = PeerId> {
    per_second: f64,
    burst: f64,
    max_peers: usize,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Eq + Hash + Clone> PeerBuckets<K> {
    pub(crate) fn new(per_second: f64, burst: f64, max_peers: usize) -> PeerBuckets<K> {
        PeerBuckets {
            per_second,
            burst,
            max_peers: max_peers.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `key`'s bucket.
    pub(crate) fn try_take(&self, key: &K) -> bool {
        self.try_take_at(key, Instant::now())
    }

    pub(crate) fn try_take_at(&self, key: &K, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if let Some(b) = buckets.get_mut(key) {
            return b.try_take(now);
        }
        if buckets.len() >= self.max_peers {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= self.max_peers {
                return false;
            }
        }
        let mut bucket = TokenBucket::new(self.per_second, self.burst, now);
        let taken = bucket.try_take(now);
        buckets.insert(key.clone(), bucket);
        taken
    }
}

/// Most (peer, code) pairs a [`LogThrottle`] tracks; beyond, refusals share one slot.
const THROTTLE_KEYS: usize = 4096;

/// What a [`LogThrottle`] remembers of a (peer, code): when it last logged, and the
/// refusals counted since. `None` as the peer: the slot shared once the map is full.
type ThrottleSlots<K> = HashMap<(Option<K>, &'static str), (Instant, u64)>;

/// Logs a refusal once per interval per peer and code, with the count since the last line.
/// The peer is a libp2p [`PeerId`] by default; the admin API keys it by client address.
///
/// ```text
/// if let Some(count) = throttle.hit(peer, "not_partner") {
///     tracing::warn!(%peer, code = "not_partner", count, "...");
/// }
/// ```
pub(crate) struct LogThrottle<K = PeerId> {
    every: Duration,
    seen: Mutex<ThrottleSlots<K>>,
}

impl<K: Hash + Eq> LogThrottle<K> {
    pub(crate) fn new(every: Duration) -> LogThrottle<K> {
        LogThrottle {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(count)` when this refusal should be logged now: `count` refusals of this kind
    /// (this one included) happened since the last line. `None`: counted, stay quiet.
    pub(crate) fn hit(&self, peer: K, code: &'static str) -> Option<u64> {
        self.hit_at(peer, code, Instant::now())
    }

    pub(crate) fn hit_at(&self, peer: K, code: &'static str, now: Instant) -> Option<u64> {
        let Ok(mut seen) = self.seen.lock() else {
            return Some(1);
        };
        let mut key = (Some(peer), code);
        if !seen.contains_key(&key) && seen.len() >= THROTTLE_KEYS {
            let every = self.every;
            seen.retain(|_, (last, _)| now.saturating_duration_since(*last) < every);
            if seen.len() >= THROTTLE_KEYS {
                // Too many peers refused at once: they share one slot per code.
                key = (None, code);
            }
        }
        match seen.get_mut(&key) {
            Some((last, count)) => {
                *count = count.saturating_add(1);
                if now.saturating_duration_since(*last) >= self.every {
                    let n = *count;
                    *last = now;
                    *count = 0;
                    Some(n)
                } else {
                    None
                }
            }
            None => {
                seen.insert(key, (now, 0));
                Some(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_share_and_others_still_get_permits() {
        let pool = PeerPool::new(4, 2);
        let (greedy, good) = (PeerId::random(), PeerId::random());
        let a = pool.try_acquire(greedy).unwrap();
        let _b = pool.try_acquire(greedy).unwrap();
        assert_eq!(pool.try_acquire(greedy).err(), Some(PoolFull::Peer(2)));
        let _c = pool.try_acquire(good).unwrap();
        let _d = pool.try_acquire(good).unwrap();
        assert_eq!(pool.try_acquire(PeerId::random()).err(), Some(PoolFull::Total(4)));
        drop(a);
        assert_eq!(pool.held_by(&greedy), 1);
        assert!(
            pool.try_acquire(greedy).is_ok(),
            "a permit given back is free again"
        );
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3.0, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(500)));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
        assert!(b.try_take(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn peer_buckets_stay_bounded_and_forget_full_buckets_first() {
        let t0 = Instant::now();
        let buckets: PeerBuckets<u32> = PeerBuckets::new(1.0, 1.0, 2);
        assert!(buckets.try_take_at(&1, t0));
        assert!(buckets.try_take_at(&2, t0));
        assert!(!buckets.try_take_at(&3, t0), "both remembered buckets are in use");
        let later = t0 + Duration::from_secs(5);
        assert!(buckets.try_take_at(&3, later), "refilled buckets are forgotten");
        assert!(buckets.buckets.lock().unwrap().len() <= 2);
    }

    #[test]
    fn repeated_refusals_are_logged_once_per_interval_with_their_count() {
        let t0 = Instant::now();
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let peer = PeerId::random();
        assert_eq!(throttle.hit_at(peer, "x", t0), Some(1));
        for i in 1..100 {
            assert_eq!(throttle.hit_at(peer, "x", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.hit_at(PeerId::random(), "x", t0), Some(1), "per peer");
        assert_eq!(throttle.hit_at(peer, "y", t0), Some(1), "per code");
        assert_eq!(
            throttle.hit_at(peer, "x", t0 + Duration::from_secs(10)),
            Some(100)
        );
    }

    #[test]
    fn a_flood_of_peers_shares_one_slot_instead_of_growing_the_map() {
        let t0 = Instant::now();
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let logged = (0..THROTTLE_KEYS + 500)
            .filter(|_| throttle.hit_at(PeerId::random(), "x", t0).is_some())
            .count();
        assert_eq!(logged, THROTTLE_KEYS + 1);
        assert!(throttle.seen.lock().unwrap().len() <= THROTTLE_KEYS + 1);
    }
}
