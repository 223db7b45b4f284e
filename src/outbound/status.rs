//! The live state of a partner link (state, since when, cursor, heartbeat round trip, last
//! error), written by the link and read by the admin API without asking the link.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::contract::now_ms;
use crate::sync::snapshot::{SenderJob, STATE_IDLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Not (yet) answering, for less than `pong_discard_timeout`.
    Connecting,
    Online,
    /// No answer for `pong_discard_timeout` or more.
    Offline,
    /// The partner refused us (we are not its partner, or a stream-level error).
    Refused,
}

impl LinkState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Online => "online",
            LinkState::Offline => "offline",
            LinkState::Refused => "refused",
        }
    }
}

/// Live state of a link, read by the admin API without asking the link.
pub(crate) struct LinkStatus {
    acked: AtomicU64,
    /// Last heartbeat round trip, microseconds (0: none yet).
    rtt_us: AtomicU64,
    inner: Mutex<StatusInner>,
    pong_discard_timeout: Duration,
    /// The snapshot job towards this partner, as last persisted.
    snapshot: Mutex<SenderJob>,
    /// An operator asked for a snapshot (`partners resync`); the link takes it.
    resync: AtomicBool,
    /// Wakes the link's open session to take a resync request.
    pub(super) wake: tokio::sync::Notify,
}

/// A second resync request while a job runs.
#[derive(Debug, thiserror::Error)]
#[error("a snapshot job towards this partner is already {state}")]
pub struct SnapshotBusy {
    pub state: &'static str,
}

struct StatusInner {
    state: LinkState,
    /// When `state` last changed (ms since the epoch).
    since_ms: u64,
    /// Last time the partner answered anything.
    last_heard: Option<Instant>,
    created: Instant,
    last_error: Option<String>,
}

pub(crate) struct StatusSnapshot {
    pub acked: u64,
    pub state: LinkState,
    pub since_ms: u64,
    pub rtt_ms: Option<f64>,
    pub last_error: Option<String>,
}

impl LinkStatus {
    pub(crate) fn new(pong_discard_timeout: Duration) -> Self {
        LinkStatus {
            acked: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
            inner: Mutex::new(StatusInner {
                state: LinkState::Connecting,
                since_ms: now_ms(),
                last_heard: None,
                created: Instant::now(),
                last_error: None,
            }),
            pong_discard_timeout,
            snapshot: Mutex::new(SenderJob::default()),
            resync: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// The snapshot job as last persisted (state 0 when none).
    pub(crate) fn snapshot_job(&self) -> SenderJob {
        self.snapshot.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub(super) fn set_snapshot_job(&self, job: &SenderJob) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = job.clone();
        }
    }

    /// Asks for a snapshot; refused while one is asked for or running (at most one per
    /// partner).
    pub(crate) fn request_resync(&self) -> Result<(), SnapshotBusy> {
        if self.snapshot_job().state != STATE_IDLE {
            return Err(SnapshotBusy { state: "running" });
        }
        if self.resync.swap(true, Ordering::AcqRel) {
            return Err(SnapshotBusy { state: "requested" });
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Whether a resync was asked for (the flag stays until the job is done).
    pub(super) fn resync_requested(&self) -> bool {
        self.resync.load(Ordering::Acquire)
    }

    pub(super) fn resync_taken(&self) {
        self.resync.store(false, Ordering::Release);
    }

    pub(crate) fn snapshot(&self) -> StatusSnapshot {
        let rtt = self.rtt_us.load(Ordering::Relaxed);
        let acked = self.acked.load(Ordering::Relaxed);
        let Ok(mut g) = self.inner.lock() else {
            return StatusSnapshot {
                acked,
                state: LinkState::Connecting,
                since_ms: 0,
                rtt_ms: None,
                last_error: None,
            };
        };
        // "Connecting" turns "offline" once the partner has been silent too long.
        let silent_for = g.last_heard.unwrap_or(g.created).elapsed();
        if g.state == LinkState::Connecting && silent_for >= self.pong_discard_timeout {
            g.state = LinkState::Offline;
            g.since_ms = now_ms().saturating_sub((silent_for - self.pong_discard_timeout).as_millis() as u64);
        }
        StatusSnapshot {
            acked,
            state: g.state,
            since_ms: g.since_ms,
            rtt_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
            last_error: g.last_error.clone(),
        }
    }

    /// The cursor moved to `acked`.
    pub(super) fn set_acked(&self, acked: u64) {
        self.acked.store(acked, Ordering::Relaxed);
    }

    /// A heartbeat came back after `rtt`.
    pub(super) fn set_rtt(&self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.rtt_us.store(us, Ordering::Relaxed);
    }

    pub(super) fn set(&self, state: LinkState, error: Option<String>) {
        if let Ok(mut g) = self.inner.lock() {
            let effective = if state == LinkState::Connecting && g.state == LinkState::Offline {
                LinkState::Offline
            } else {
                state
            };
            if g.state != effective {
                g.state = effective;
                g.since_ms = now_ms();
            }
            if error.is_some() || state == LinkState::Online {
                g.last_error = error;
            }
        }
    }

    /// The partner answered something.
    pub(super) fn heard(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.last_heard = Some(Instant::now());
            if g.state != LinkState::Online {
                g.state = LinkState::Online;
                g.since_ms = now_ms();
            }
        }
    }
}
