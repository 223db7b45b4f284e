//! Journal retention: which entries one compaction run may remove, and the periodic task
//! that runs it.
//!
//! An entry is compacted (only the latest entry or tombstone of its resource is kept) once
//! it is older than `--journal-retention` (or at once when the journal holds more than
//! `--journal-max-bytes`) and every partner still waited for acknowledged it. A partner
//! whose oldest unacknowledged entry is older than `--partner-max-lag` is not waited for:
//! the floor may pass its cursor, and it is then caught up by a snapshot
//! (`crate::outbound::snapshot`). A partner in the middle of a snapshot holds compaction at
//! the snapshot's position, so that the journal it resumes from stays whole.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{CompactBounds, CompactReport, Store, StoreResult};
use crate::config::Tuning;
use crate::contract::now_ms;

/// Most journal entries one compaction run examines; the rest waits for the next run.
pub const MAX_EXAMINED_PER_RUN: usize = 1_000_000;

/// A partner as compaction sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartnerMark {
    /// Its persisted cursor.
    pub cursor: u64,
    /// When its oldest unacknowledged entry was journaled (ms); `None` when it has none
    /// (it acknowledged the head) or when that entry is already compacted.
    pub oldest_unacked_ms: Option<u64>,
    /// The position of its running snapshot job, if any.
    pub snapshot_at: Option<u64>,
}

/// The bounds of one run: pure, from the partners' marks, the clock and the settings.
pub fn bounds(
    head: u64,
    partners: &[PartnerMark],
    now_ms: u64,
    journal_bytes: u64,
    t: &Tuning,
) -> CompactBounds {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let max_lag_ms = now_ms.saturating_sub(ms(t.partner_max_lag));
    let mut up_to = head;
    for p in partners {
        let lagging = p.oldest_unacked_ms.is_none_or(|t| t <= max_lag_ms) && p.cursor < head;
        if !lagging {
            up_to = up_to.min(p.cursor);
        }
        if let Some(at) = p.snapshot_at {
            up_to = up_to.min(at);
        }
    }
    let over_bytes = t.journal_max_bytes > 0 && journal_bytes > t.journal_max_bytes;
    CompactBounds {
        up_to,
        older_than_ms: if over_bytes {
            u64::MAX
        } else {
            now_ms.saturating_sub(ms(t.journal_retention))
        },
        tombstones_older_than_ms: now_ms.saturating_sub(ms(t.tombstone_retention)),
        max_examined: MAX_EXAMINED_PER_RUN,
    }
}

/// What the compaction task reads of each partner: the owner of the partner links.
#[async_trait::async_trait]
pub trait PartnerMarks: Send + Sync + 'static {
    /// Each partner's peer id, cursor and running snapshot position.
    async fn marks(&self) -> Vec<(String, u64, Option<u64>)>;
}

/// Entries removed since the space was last given back that make a run give it back.
pub const RECLAIM_MIN_ENTRIES: u64 = 100_000;
/// A run that removed anything gives the space back when it was last given back this long
/// ago (redb's `compact()` holds the store alone while it runs: not at every run).
pub const RECLAIM_EVERY: Duration = Duration::from_secs(6 * 3600);

/// When to give freed space back: after [`RECLAIM_MIN_ENTRIES`] removals, or after
/// [`RECLAIM_EVERY`] when anything was removed.
#[derive(Debug)]
pub struct Reclaim {
    pending: u64,
    last: Instant,
}

impl Default for Reclaim {
    fn default() -> Self {
        Reclaim {
            pending: 0,
            last: Instant::now(),
        }
    }
}

impl Reclaim {
    /// Counts `removed` entries; true when the space is to be given back at `now`.
    fn due(&mut self, removed: u64, now: Instant) -> bool {
        self.pending = self.pending.saturating_add(removed);
        self.pending >= RECLAIM_MIN_ENTRIES
            || (self.pending > 0 && now.saturating_duration_since(self.last) >= RECLAIM_EVERY)
    }

    fn done(&mut self, now: Instant) {
        self.pending = 0;
        self.last = now;
    }
}

/// One compaction run: bounds from the partners, compaction, space given back when
/// [`Reclaim`] says so.
///
/// # Errors
/// The store failed.
pub async fn run_once(
    store: &dyn Store,
    origin: &str,
    partners: &dyn PartnerMarks,
    t: &Tuning,
    reclaim: &mut Reclaim,
) -> StoreResult<CompactReport> {
    let head = store.journal_head(origin).await?;
    let floor = store.journal_floor(origin).await?;
    let mut marks = Vec::new();
    for (_, cursor, snapshot_at) in partners.marks().await {
        let oldest_unacked_ms = if cursor >= head || cursor < floor {
            None
        } else {
            store
                .read_journal(origin, cursor.saturating_add(1), 1)
                .await?
                .first()
                .map(|e| e.time_ms)
        };
        marks.push(PartnerMark {
            cursor,
            oldest_unacked_ms,
            snapshot_at,
        });
    }
    let bytes = store.journal_bytes().await?;
    let b = bounds(head, &marks, now_ms(), bytes, t);
    let report = store.compact_journal(origin, b).await?;
    let removed = report.removed.saturating_add(report.tombstones_dropped);
    if removed > 0 {
        let freed = if reclaim.due(removed, Instant::now()) {
            let freed = store.reclaim_space().await?;
            reclaim.done(Instant::now());
            freed
        } else {
            0
        };
        tracing::info!(
            freed,
            examined = report.examined,
            removed = report.removed,
            tombstones_dropped = report.tombstones_dropped,
            floor = report.floor,
            bytes_before = bytes,
            "journal compacted"
        );
    }
    Ok(report)
}

/// Most applied-log rows removed in one store call; a run calls again until done, up to
/// [`MAX_APPLIED_TRIM_PER_RUN`].
pub const APPLIED_TRIM_BATCH: usize = 10_000;
/// Most applied-log rows removed per run; the rest waits for the next run.
pub const MAX_APPLIED_TRIM_PER_RUN: u64 = 1_000_000;

/// Trims the applied log to `--applied-log-retention` and `--applied-log-max-rows`, in
/// batches of [`APPLIED_TRIM_BATCH`] rows. Returns the rows removed.
///
/// # Errors
/// The store failed (what was removed before stays removed).
pub async fn trim_applied_log(store: &dyn Store, t: &Tuning) -> StoreResult<u64> {
    let ms = u64::try_from(t.applied_log_retention.as_millis()).unwrap_or(u64::MAX);
    let older_than_ms = now_ms().saturating_sub(ms);
    let mut removed = 0u64;
    while removed < MAX_APPLIED_TRIM_PER_RUN {
        let n = store
            .trim_applied_log(older_than_ms, t.applied_log_max_rows, APPLIED_TRIM_BATCH)
            .await?;
        removed = removed.saturating_add(n);
        if n < APPLIED_TRIM_BATCH as u64 {
            break;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "applied log trimmed");
    }
    Ok(removed)
}

/// Runs compaction every `--compact-interval` until shutdown (the first run one interval
/// after start-up), and trims the applied log in the same runs.
pub async fn run(
    store: Arc<dyn Store>,
    origin: String,
    partners: Arc<dyn PartnerMarks>,
    t: Tuning,
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    // The first run waits one interval: partnerships made at run time are re-applied at
    // start-up, and a run before they are would not wait for them.
    let first = tokio::time::Instant::now() + t.compact_interval;
    let mut tick = tokio::time::interval_at(first, t.compact_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reclaim = Reclaim::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        }
        match run_once(store.as_ref(), &origin, partners.as_ref(), &t, &mut reclaim).await {
            Ok(report) => {
                crate::metrics::Metrics::add(
                    &metrics.journal_compacted,
                    report.removed + report.tombstones_dropped,
                );
                metrics
                    .journal_floor
                    .set(i64::try_from(report.floor).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::warn!(cause = %e, "journal compaction failed; retried at the next interval"),
        }
        match trim_applied_log(store.as_ref(), &t).await {
            Ok(n) => crate::metrics::Metrics::add(&metrics.applied_log_trimmed, n),
            Err(e) => tracing::warn!(cause = %e, "applied log trim failed; retried at the next interval"),
        }
        if let Ok(bytes) = store.journal_bytes().await {
            metrics
                .journal_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn mark(cursor: u64, oldest: Option<u64>) -> PartnerMark {
        PartnerMark {
            cursor,
            oldest_unacked_ms: oldest,
            snapshot_at: None,
        }
    }

    #[test]
    fn compaction_waits_for_partners_unless_they_lag_too_long() {
        let t = Tuning::default();
        let now = 100 * DAY;
        // A partner behind by a day is waited for.
        let b = bounds(50, &[mark(10, Some(now - DAY)), mark(50, None)], now, 0, &t);
        assert_eq!(b.up_to, 10);
        assert_eq!(b.older_than_ms, now - 30 * DAY);
        assert_eq!(b.tombstones_older_than_ms, now - 90 * DAY);
        // One silent for 31 days is not.
        let b = bounds(
            50,
            &[mark(10, Some(now - 31 * DAY)), mark(40, Some(now))],
            now,
            0,
            &t,
        );
        assert_eq!(b.up_to, 40);
        // Behind the floor already: not waited for.
        assert_eq!(bounds(50, &[mark(3, None)], now, 0, &t).up_to, 50);
        // A running snapshot holds the floor at its position.
        let mut snap = mark(3, None);
        snap.snapshot_at = Some(20);
        assert_eq!(bounds(50, &[snap], now, 0, &t).up_to, 20);
    }

    #[test]
    fn over_the_byte_limit_age_does_not_matter() {
        let t = Tuning {
            journal_max_bytes: 1000,
            ..Tuning::default()
        };
        assert_eq!(bounds(5, &[], DAY, 1001, &t).older_than_ms, u64::MAX);
        assert_eq!(bounds(5, &[], DAY, 999, &t).older_than_ms, 0);
    }

    #[test]
    fn space_is_given_back_after_many_removals_or_after_a_while() {
        let t0 = Instant::now();
        let mut r = Reclaim { pending: 0, last: t0 };
        assert!(!r.due(0, t0), "nothing removed");
        assert!(!r.due(RECLAIM_MIN_ENTRIES - 1, t0));
        assert!(r.due(1, t0), "the removals add up");
        r.done(t0);
        assert!(!r.due(10, t0));
        let later = t0 + RECLAIM_EVERY;
        assert!(r.due(0, later), "a while later, what was removed is given back");
        r.done(later);
        assert!(!r.due(0, later + RECLAIM_EVERY), "nothing pending");
    }
}
