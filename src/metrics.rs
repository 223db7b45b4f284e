//! The node's metrics in a `prometheus-client` registry, served on `GET /metrics`
//! (OpenMetrics text). Every name, type and label is listed in protocols/admin-http.md.
//!
//! Counters and gauges are atomics shared with the registry, so the hot paths only add.
//! Labels are bounded: refusals by (place, code) from fixed sets, per-partner figures only
//! for configured partners (the caller checks; a removed partner's rows are dropped).

use std::fmt;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::contract::ErrorCode;

/// A rate counter (`_total` is appended by the encoder).
pub type Count = Counter;
/// Per-partner gauges take fractional values (seconds).
type SecondsGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Refusals: where they happened (`intake`, `inbound`, `sync`, ...) and the error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    place: &'static str,
    code: &'static str,
}

/// A peer record ignored: where it came from and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordRejectedLabels {
    via: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// A configured partner, by peer id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

/// The origin of applied entries: always a configured partner.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabels {
    origin: String,
}

/// A partner link's state (`connecting`, `online`, `offline`, `refused`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerStateLabels {
    peer: String,
    state: String,
}

/// Apply commits: 1 ms to about 16 s.
fn apply_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// End-to-end lag: 5 ms to about 5 min (a lag beyond is counted in `+Inf`).
fn lag_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 17))
}

/// One partner link as the scrape sees it (from the links' status).
pub struct PartnerFigures<'a> {
    pub peer: &'a str,
    pub pending: u64,
    pub lag: u64,
    pub state: &'a str,
    pub rtt_seconds: Option<f64>,
    /// Age of the oldest own journal entry the partner has not acknowledged (0 when none).
    pub lag_seconds: f64,
}

pub struct Metrics {
    /// Events accepted from the local application and journaled.
    pub intake_accepted: Count,
    /// Own echoes ignored on the intake.
    pub intake_echoes: Count,
    /// Intake messages the JetStream consumer still holds for this node (last delivery's
    /// figure; 0 with a core NATS intake).
    pub intake_pending: Gauge,
    /// Journal entries written to partner streams (resends included).
    pub events_sent: Count,
    /// Inbound entries that changed the store.
    pub events_applied: Count,
    /// Inbound entries that were already applied (duplicates, resends).
    pub events_stale: Count,
    /// Inbound entries dropped because the partner's reorder buffer was full
    /// (`--max-partner-buffer-bytes`); they are pulled later by journal sync.
    pub events_buffer_dropped: Count,
    /// Publishes confirmed by NATS (CREATE_RESOURCE / REMOVE_RESOURCE).
    pub nats_published: Count,
    /// Partner sessions opened (first connect and every reconnect).
    pub sessions_opened: Count,
    /// Store commits of the intake (`intake_accepted / journal_commits` is the mean batch).
    pub journal_commits: Count,
    /// Store commits of inbound sessions (`events_applied + events_stale` per commit, about).
    pub apply_commits: Count,
    /// Seconds each inbound apply commit took (retries included).
    pub apply_seconds: Histogram,
    /// Admin API requests refused for a missing or wrong token (401).
    pub admin_unauthorized: Count,
    /// Live entries feed clients missed because they could not keep up (`lagged`).
    pub feed_lagged: Count,
    /// Feed clients connected (set at scrape time).
    pub feed_clients: Gauge,
    /// Journal entries removed by compaction (superseded entries and old tombstones).
    pub journal_compacted: Count,
    /// Applied-log rows removed by retention (`--applied-log-retention`, `--applied-log-max-rows`).
    pub applied_log_trimmed: Count,
    /// The compaction floor of the own journal.
    pub journal_floor: Gauge,
    /// Bytes the journal takes in the store.
    pub journal_bytes: Gauge,
    /// Snapshot parts sent to partners and acknowledged (resends included).
    pub snapshot_parts_sent: Count,
    /// Snapshot parts received from partners and applied.
    pub snapshot_parts_applied: Count,
    /// Resources a snapshot receiver removed as absent from the origin's snapshot.
    pub snapshot_removed: Count,
    /// Snapshot jobs completed, as sender.
    pub snapshot_jobs_done: Count,
    refusals: Family<RefusalLabels, Counter>,
    /// Origin's journal time to applied here, per partner.
    lag_seconds: HistogramFamily<OriginLabels>,
    partner_pending: Family<PeerLabels, Gauge>,
    partner_lag: Family<PeerLabels, Gauge>,
    partner_lag_seconds: Family<PeerLabels, SecondsGauge>,
    partner_state: Family<PeerStateLabels, Gauge>,
    partner_rtt: Family<PeerLabels, SecondsGauge>,
    /// Peer records and searches.
    pub discovery: Discovery,
    registry: Registry,
}

/// Counters of the peer directory and the search service.
#[derive(Default)]
pub struct Discovery {
    /// This node's record put in the DHT (per key).
    pub records_published: Count,
    /// Valid peer records met (DHT puts and lookups).
    pub records_met: Count,
    /// Searches started by the local application.
    pub searches: Count,
    /// Queries answered for other peers (streams and gossip).
    pub queries_answered: Count,
    /// Results published on `SEARCH_EVENT`.
    pub results_forwarded: Count,
    /// Rows of relation `known` dropped from the peers table (`--max-known-peers`).
    pub known_peers_dropped: Count,
    records_rejected: Family<RecordRejectedLabels, Counter>,
    queries_rejected: Family<ReasonLabels, Counter>,
    results_dropped: Family<ReasonLabels, Counter>,
}

impl Discovery {
    pub fn record_rejected(&self, via: &'static str, reason: &'static str) {
        self.records_rejected
            .get_or_create(&RecordRejectedLabels { via, reason })
            .inc();
    }

    pub fn query_rejected(&self, reason: &'static str) {
        self.queries_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn results_dropped(&self, reason: &'static str, n: u64) {
        self.results_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    fn register(&self, r: &mut Registry) {
        let counters: [(&str, &str, &Count); 6] = [
            (
                "oc_peer_records_published",
                "Own peer record puts into the DHT",
                &self.records_published,
            ),
            ("oc_peer_records_met", "Valid peer records met", &self.records_met),
            (
                "oc_searches",
                "Searches started by the local application",
                &self.searches,
            ),
            (
                "oc_search_queries_answered",
                "Search queries answered for other peers",
                &self.queries_answered,
            ),
            (
                "oc_search_results_forwarded",
                "Search results published on SEARCH_EVENT",
                &self.results_forwarded,
            ),
            (
                "oc_known_peers_dropped",
                "Least recently seen known peers dropped from the peers table",
                &self.known_peers_dropped,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "oc_peer_records_rejected",
            "Peer records ignored, by source and reason",
            self.records_rejected.clone(),
        );
        r.register(
            "oc_search_queries_rejected",
            "Gossip search queries refused, by reason",
            self.queries_rejected.clone(),
        );
        r.register(
            "oc_search_results_dropped",
            "Results of peers' answers dropped by this searcher, by reason",
            self.results_dropped.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            intake_accepted: Count::default(),
            intake_echoes: Count::default(),
            intake_pending: Gauge::default(),
            events_sent: Count::default(),
            events_applied: Count::default(),
            events_stale: Count::default(),
            events_buffer_dropped: Count::default(),
            nats_published: Count::default(),
            sessions_opened: Count::default(),
            journal_commits: Count::default(),
            apply_commits: Count::default(),
            apply_seconds: apply_buckets(),
            admin_unauthorized: Count::default(),
            feed_lagged: Count::default(),
            feed_clients: Gauge::default(),
            journal_compacted: Count::default(),
            applied_log_trimmed: Count::default(),
            journal_floor: Gauge::default(),
            journal_bytes: Gauge::default(),
            snapshot_parts_sent: Count::default(),
            snapshot_parts_applied: Count::default(),
            snapshot_removed: Count::default(),
            snapshot_jobs_done: Count::default(),
            refusals: Family::default(),
            lag_seconds: Family::new_with_constructor(lag_buckets),
            partner_pending: Family::default(),
            partner_lag: Family::default(),
            partner_lag_seconds: Family::default(),
            partner_state: Family::default(),
            partner_rtt: Family::default(),
            discovery: Discovery::default(),
            registry: Registry::default(),
        };
        m.registered()
    }
}

impl Metrics {
    /// Puts every metric in the registry (each is a shared handle: the clone is the same).
    fn registered(mut self) -> Self {
        let mut r = Registry::default();
        let counters: [(&str, &str, &Count); 18] = [
            (
                "oc_journal_compacted",
                "Journal entries removed by compaction",
                &self.journal_compacted,
            ),
            (
                "oc_applied_log_trimmed",
                "Applied log rows removed by retention",
                &self.applied_log_trimmed,
            ),
            (
                "oc_snapshot_parts_sent",
                "Snapshot parts sent to partners and acknowledged",
                &self.snapshot_parts_sent,
            ),
            (
                "oc_snapshot_parts_applied",
                "Snapshot parts received from partners and applied",
                &self.snapshot_parts_applied,
            ),
            (
                "oc_snapshot_removed",
                "Resources removed as absent from an origin's snapshot",
                &self.snapshot_removed,
            ),
            (
                "oc_snapshot_jobs_done",
                "Snapshot jobs completed as sender",
                &self.snapshot_jobs_done,
            ),
            (
                "oc_intake_accepted",
                "Events accepted from the local application",
                &self.intake_accepted,
            ),
            ("oc_intake_echoes", "Own echoes ignored", &self.intake_echoes),
            (
                "oc_events_sent",
                "Journal entries written to partner streams",
                &self.events_sent,
            ),
            (
                "oc_events_applied",
                "Inbound entries applied to the store",
                &self.events_applied,
            ),
            (
                "oc_events_stale",
                "Inbound entries already applied",
                &self.events_stale,
            ),
            (
                "oc_events_buffer_dropped",
                "Inbound entries dropped for lack of room in the reorder buffer, pulled later",
                &self.events_buffer_dropped,
            ),
            (
                "oc_nats_published",
                "Publishes confirmed by NATS",
                &self.nats_published,
            ),
            (
                "oc_sessions_opened",
                "Partner sessions opened",
                &self.sessions_opened,
            ),
            (
                "oc_journal_commits",
                "Journal commits of the intake",
                &self.journal_commits,
            ),
            (
                "oc_apply_commits",
                "Store commits of inbound entries",
                &self.apply_commits,
            ),
            (
                "oc_admin_unauthorized",
                "Admin API requests refused for a missing or wrong token",
                &self.admin_unauthorized,
            ),
            (
                "oc_feed_lagged",
                "Live entries feed clients missed because they could not keep up",
                &self.feed_lagged,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "oc_refusals",
            "Refused inputs by place and error code",
            self.refusals.clone(),
        );
        r.register(
            "oc_journal_floor",
            "Compaction floor of the own journal",
            self.journal_floor.clone(),
        );
        r.register(
            "oc_journal_bytes",
            "Bytes the journal takes in the store",
            self.journal_bytes.clone(),
        );
        r.register(
            "oc_intake_pending",
            "Intake messages the JetStream consumer still holds",
            self.intake_pending.clone(),
        );
        r.register(
            "oc_apply_batch_seconds",
            "Seconds an inbound apply commit took",
            self.apply_seconds.clone(),
        );
        r.register(
            "oc_apply_lag_seconds",
            "Seconds from the origin's journal time to applied here, per partner",
            self.lag_seconds.clone(),
        );
        r.register(
            "oc_partner_pending",
            "Own journal entries a partner has not acknowledged",
            self.partner_pending.clone(),
        );
        r.register(
            "oc_partner_lag",
            "Own journal entries a partner lags behind (liveness contract name)",
            self.partner_lag.clone(),
        );
        r.register(
            "oc_partner_lag_seconds",
            "Age of the oldest own journal entry a partner has not acknowledged (0 when none)",
            self.partner_lag_seconds.clone(),
        );
        r.register(
            "oc_feed_clients",
            "Live feed (GET /api/feed) clients connected",
            self.feed_clients.clone(),
        );
        r.register(
            "oc_partner_state",
            "1 for the current state of each partner link",
            self.partner_state.clone(),
        );
        r.register(
            "oc_partner_rtt_seconds",
            "Last heartbeat round trip of each partner link",
            self.partner_rtt.clone(),
        );
        self.discovery.register(&mut r);
        self.registry = r;
        self
    }

    pub fn refused(&self, place: &'static str, code: ErrorCode) {
        self.refusals
            .get_or_create(&RefusalLabels {
                place,
                code: code.as_str(),
            })
            .inc();
    }

    pub fn add(counter: &Count, n: u64) {
        counter.inc_by(n);
    }

    /// Counts the lag of entries applied from `origin`, a configured partner (the caller
    /// checked), accepted by it at `time_ms` (its clock: a time ahead of ours counts 0).
    pub fn applied_lag(&self, origin: &str, times_ms: impl Iterator<Item = u64>) {
        let now = crate::contract::now_ms();
        let h = self.lag_seconds.get_or_create(&OriginLabels {
            origin: origin.to_owned(),
        });
        for t in times_ms {
            h.observe(now.saturating_sub(t) as f64 / 1000.0);
        }
    }

    /// Drops the lag histogram of a peer that is no longer a partner.
    pub fn forget_origin(&self, origin: &str) {
        self.lag_seconds.remove(&OriginLabels {
            origin: origin.to_owned(),
        });
    }

    /// Replaces the per-partner gauges by these links' figures (at scrape time), so a
    /// removed partner's rows go away.
    pub fn set_partners<'a>(&self, links: impl IntoIterator<Item = PartnerFigures<'a>>) {
        self.partner_pending.clear();
        self.partner_lag.clear();
        self.partner_lag_seconds.clear();
        self.partner_state.clear();
        self.partner_rtt.clear();
        for link in links {
            let peer = PeerLabels {
                peer: link.peer.to_owned(),
            };
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.partner_pending.get_or_create(&peer).set(gauge(link.pending));
            self.partner_lag.get_or_create(&peer).set(gauge(link.lag));
            self.partner_lag_seconds
                .get_or_create(&peer)
                .set(link.lag_seconds);
            self.partner_state
                .get_or_create(&PeerStateLabels {
                    peer: peer.peer.clone(),
                    state: link.state.to_owned(),
                })
                .set(1);
            if let Some(rtt) = link.rtt_seconds {
                self.partner_rtt.get_or_create(&peer).set(rtt);
            }
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text of these registries, one exposition ending in `# EOF`.
///
/// # Errors
/// Only a formatting error of the encoder (writing into a `String` does not fail).
pub fn render(registries: &[&Registry]) -> Result<String, fmt::Error> {
    let mut out = String::new();
    for r in registries {
        encode_registry(&mut out, r)?;
    }
    encode_eof(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_today_s() {
        let m = Metrics::default();
        m.refused("inbound", ErrorCode::InvalidField);
        Metrics::add(&m.events_applied, 3);
        m.discovery.record_rejected("put", "bad_signature");
        let text = render(&[m.registry()]).unwrap();
        assert!(text.contains("oc_events_applied_total 3\n"), "{text}");
        assert!(
            text.contains("oc_refusals_total{place=\"inbound\",code=\"invalid_field\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("oc_peer_records_rejected_total{via=\"put\",reason=\"bad_signature\"} 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn partner_rows_follow_the_links() {
        let m = Metrics::default();
        let figures = |peer| PartnerFigures {
            peer,
            pending: 2,
            lag: 2,
            state: "online",
            rtt_seconds: Some(0.005),
            lag_seconds: 1.5,
        };
        m.set_partners([figures("a"), figures("b")]);
        m.set_partners([figures("b")]);
        let text = render(&[m.registry()]).unwrap();
        assert!(text.contains("oc_partner_pending{peer=\"b\"} 2\n"), "{text}");
        assert!(text.contains("oc_partner_state{peer=\"b\",state=\"online\"} 1\n"));
        assert!(
            text.contains("oc_partner_lag_seconds{peer=\"b\"} 1.5\n"),
            "{text}"
        );
        assert!(!text.contains("peer=\"a\""), "{text}");
    }
}
