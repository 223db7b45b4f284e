//! Counters exposed on `GET /metrics` (Prometheus text format).
//!
//! Hot-path counters are plain atomics; refusals are counted per (where, code) in a small
//! map, since they are rare by nature.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::contract::ErrorCode;

#[derive(Default)]
pub struct Metrics {
    /// Events accepted from the local application and journaled.
    pub intake_accepted: AtomicU64,
    /// Own echoes ignored on the intake.
    pub intake_echoes: AtomicU64,
    /// Journal entries written to partner streams (resends included).
    pub events_sent: AtomicU64,
    /// Inbound entries that changed the store.
    pub events_applied: AtomicU64,
    /// Inbound entries that were already applied (duplicates, resends).
    pub events_stale: AtomicU64,
    /// Inbound entries dropped because the partner's reorder buffer was full
    /// (`--max-partner-buffer-bytes`); they are pulled later by journal sync.
    pub events_buffer_dropped: AtomicU64,
    /// Publishes confirmed by NATS (CREATE_RESOURCE / REMOVE_RESOURCE).
    pub nats_published: AtomicU64,
    /// Partner sessions opened (first connect and every reconnect).
    pub sessions_opened: AtomicU64,
    /// Store commits of the intake (`intake_accepted / journal_commits` is the mean batch).
    pub journal_commits: AtomicU64,
    /// Store commits of inbound sessions (`events_applied + events_stale` per commit, about).
    pub apply_commits: AtomicU64,
    /// Admin API requests refused for a missing or wrong token (401).
    pub admin_unauthorized: AtomicU64,
    /// Refusals by where they happened ("intake", "inbound", "outbound") and code.
    refusals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Peer records and searches.
    pub discovery: Discovery,
}

/// Counters of the peer directory and the search service.
#[derive(Default)]
pub struct Discovery {
    /// This node's record put in the DHT (per key).
    pub records_published: AtomicU64,
    /// Valid peer records met (DHT puts and lookups).
    pub records_met: AtomicU64,
    /// Searches started by the local application.
    pub searches: AtomicU64,
    /// Queries answered for other peers (streams and gossip).
    pub queries_answered: AtomicU64,
    /// Results published on `SEARCH_EVENT`.
    pub results_forwarded: AtomicU64,
    /// Rows of relation `known` dropped from the peers table (`--max-known-peers`).
    pub known_peers_dropped: AtomicU64,
    /// Peer records ignored, by where they came from (`put`, `get`, `store`) and why.
    records_rejected: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Gossip search queries refused, by why.
    queries_rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Results of peers' answers dropped by the searcher, by why.
    results_dropped: Mutex<BTreeMap<&'static str, u64>>,
}

impl Discovery {
    pub(crate) fn record_rejected(&self, via: &'static str, reason: &'static str) {
        if let Ok(mut map) = self.records_rejected.lock() {
            *map.entry((via, reason)).or_default() += 1;
        }
    }

    pub(crate) fn query_rejected(&self, reason: &'static str) {
        if let Ok(mut map) = self.queries_rejected.lock() {
            *map.entry(reason).or_default() += 1;
        }
    }

    pub(crate) fn results_dropped(&self, reason: &'static str, n: u64) {
        if let Ok(mut map) = self.results_dropped.lock() {
            let c = map.entry(reason).or_default();
            *c = c.saturating_add(n);
        }
    }

    fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 6] = [
            (
                "oc_peer_records_published_total",
                "Own peer record puts into the DHT",
                &self.records_published,
            ),
            (
                "oc_peer_records_met_total",
                "Valid peer records met",
                &self.records_met,
            ),
            (
                "oc_searches_total",
                "Searches started by the local application",
                &self.searches,
            ),
            (
                "oc_search_queries_answered_total",
                "Search queries answered for other peers",
                &self.queries_answered,
            ),
            (
                "oc_search_results_forwarded_total",
                "Search results published on SEARCH_EVENT",
                &self.results_forwarded,
            ),
            (
                "oc_known_peers_dropped_total",
                "Least recently seen known peers dropped from the peers table",
                &self.known_peers_dropped,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP oc_peer_records_rejected_total Peer records ignored, by source and reason\n# TYPE oc_peer_records_rejected_total counter");
        if let Ok(map) = self.records_rejected.lock() {
            for ((via, reason), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "oc_peer_records_rejected_total{{via=\"{via}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP oc_search_queries_rejected_total Gossip search queries refused, by reason\n# TYPE oc_search_queries_rejected_total counter");
        if let Ok(map) = self.queries_rejected.lock() {
            for (reason, n) in map.iter() {
                let _ = writeln!(out, "oc_search_queries_rejected_total{{reason=\"{reason}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# HELP oc_search_results_dropped_total Results of peers' answers dropped by this searcher, by reason\n# TYPE oc_search_results_dropped_total counter");
        if let Ok(map) = self.results_dropped.lock() {
            for (reason, n) in map.iter() {
                let _ = writeln!(out, "oc_search_results_dropped_total{{reason=\"{reason}\"}} {n}");
            }
        }
    }
}

impl Metrics {
    pub(crate) fn refused(&self, place: &'static str, code: ErrorCode) {
        if let Ok(mut map) = self.refusals.lock() {
            *map.entry((place, code.as_str())).or_default() += 1;
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 11] = [
            (
                "oc_intake_accepted_total",
                "Events accepted from the local application",
                &self.intake_accepted,
            ),
            (
                "oc_intake_echoes_total",
                "Own echoes ignored",
                &self.intake_echoes,
            ),
            (
                "oc_events_sent_total",
                "Journal entries written to partner streams",
                &self.events_sent,
            ),
            (
                "oc_events_applied_total",
                "Inbound entries applied to the store",
                &self.events_applied,
            ),
            (
                "oc_events_stale_total",
                "Inbound entries already applied",
                &self.events_stale,
            ),
            (
                "oc_events_buffer_dropped_total",
                "Inbound entries dropped for lack of room in the reorder buffer, pulled later",
                &self.events_buffer_dropped,
            ),
            (
                "oc_nats_published_total",
                "Publishes confirmed by NATS",
                &self.nats_published,
            ),
            (
                "oc_sessions_opened_total",
                "Partner sessions opened",
                &self.sessions_opened,
            ),
            (
                "oc_journal_commits_total",
                "Journal commits of the intake",
                &self.journal_commits,
            ),
            (
                "oc_apply_commits_total",
                "Store commits of inbound entries",
                &self.apply_commits,
            ),
            (
                "oc_admin_unauthorized_total",
                "Admin API requests refused for a missing or wrong token",
                &self.admin_unauthorized,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP oc_refusals_total Refused inputs by place and error code\n# TYPE oc_refusals_total counter");
        if let Ok(map) = self.refusals.lock() {
            for ((place, code), n) in map.iter() {
                let _ = writeln!(out, "oc_refusals_total{{place=\"{place}\",code=\"{code}\"}} {n}");
            }
        }
        self.discovery.render(&mut out);
        out
    }
}
