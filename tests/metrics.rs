//! `GET /metrics` of real nodes after events propagate: the exposition parses, today's
//! names keep their meaning, the histograms counted, per-partner rows exist for the
//! partner and only for it, libp2p's swarm metrics are there.

use std::time::Duration;

use oc_testkit::*;
use serde_json::json;

/// One sample line: `name{labels} value`.
struct Sample {
    series: String,
    value: f64,
}

/// Parses the OpenMetrics text strictly enough to catch a broken exposition: every line is
/// a `# HELP|TYPE|UNIT` comment or a sample with a numeric value, and `# EOF` ends it.
fn parse(text: &str) -> Vec<Sample> {
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("# EOF"), "the exposition ends with # EOF");
    let mut samples = Vec::new();
    for line in lines {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap_or("");
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "unknown comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        samples.push(Sample {
            series: series.to_owned(),
            value,
        });
    }
    samples
}

fn value(samples: &[Sample], series: &str) -> Option<f64> {
    samples.iter().find(|s| s.series == series).map(|s| s.value)
}

async fn scrape(site: &Site) -> Vec<Sample> {
    let (status, body) = site.node.get("/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_propagation() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    // Published before A's link to B is open, the events would reach B by the journal sync
    // round that opens B's session, which `oc_events_sent_total` does not count (it counts
    // pushed entries only): wait for the link, so that all three are pushed.
    let partner_id = b.id();
    let online = format!("oc_partner_state{{peer=\"{partner_id}\",state=\"online\"}}");
    for _ in 0..200 {
        if value(&scrape(&a).await, &online) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let me = a.id();
    for id in ["r1", "r2", "r3"] {
        a.publish_ok(&event("PB_CREATE", id, &me, json!({"name": id})))
            .await;
    }
    seen_b.wait_distinct("three creates", 3).await;

    // The receiving side: today's counters, and both histograms counted.
    let on_b = scrape(&b).await;
    assert_eq!(value(&on_b, "oc_events_applied_total"), Some(3.0));
    assert_eq!(
        value(
            &on_b,
            "oc_refusals_total{place=\"inbound\",code=\"invalid_field\"}"
        ),
        None
    );
    assert!(value(&on_b, "oc_apply_commits_total").unwrap_or(0.0) >= 1.0);
    assert!(value(&on_b, "oc_apply_batch_seconds_count").unwrap_or(0.0) >= 1.0);
    let lag = format!("oc_apply_lag_seconds_count{{origin=\"{me}\"}}");
    assert_eq!(value(&on_b, &lag), Some(3.0), "one lag per applied entry");
    assert!(on_b
        .iter()
        .filter(|s| s.series.starts_with("oc_apply_lag_seconds"))
        .all(|s| s.series.contains(&format!("origin=\"{me}\""))));
    assert!(value(&on_b, "oc_intake_pending").is_some());

    // The sending side: its counters, and the partner rows for the partner only, once the
    // partner acknowledged everything.
    assert_eq!(value(&scrape(&a).await, "oc_intake_accepted_total"), Some(3.0));
    let pending = format!("oc_partner_pending{{peer=\"{partner_id}\"}}");
    let mut on_a = scrape(&a).await;
    for _ in 0..200 {
        if value(&on_a, &pending) == Some(0.0) && value(&on_a, &online) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        on_a = scrape(&a).await;
    }
    assert_eq!(value(&on_a, &pending), Some(0.0));
    assert_eq!(value(&on_a, &online), Some(1.0));
    assert_eq!(
        value(&on_a, &format!("oc_partner_lag{{peer=\"{partner_id}\"}}")),
        Some(0.0)
    );
    let partner_rows: Vec<&Sample> = on_a
        .iter()
        .filter(|s| s.series.starts_with("oc_partner_"))
        .collect();
    assert!(
        partner_rows
            .iter()
            .all(|s| s.series.contains(&format!("peer=\"{partner_id}\""))),
        "rows only for the partner"
    );
    assert!(value(&on_a, "oc_events_sent_total").unwrap_or(0.0) >= 3.0);

    // libp2p's swarm metrics.
    let established: f64 = on_a
        .iter()
        .filter(|s| s.series.starts_with("libp2p_swarm_connections_established_total"))
        .map(|s| s.value)
        .sum();
    assert!(established >= 1.0, "libp2p swarm metrics present and counting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_lag_in_seconds_grows_while_the_partner_is_away_and_ends_at_zero() {
    init_tracing();
    let mut a = Site::new().await;
    let mut b = Site::new().await;
    partner(&mut a, &mut [&mut b]);
    a.node.start_healthy().await.unwrap();
    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "lagging", &me, json!({}))).await;
    let series = format!("oc_partner_lag_seconds{{peer=\"{}\"}}", b.id());
    // The partner never acknowledged: the entry's age, growing.
    let mut first = None;
    for _ in 0..600 {
        let v = value(&scrape(&a).await, &series);
        match (first, v) {
            (None, Some(v)) if v > 0.0 => first = Some(v),
            (Some(f), Some(v)) if v > f => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = value(&scrape(&a).await, &series).expect("the gauge");
    assert!(first.is_some_and(|f| grown > f), "{first:?} then {grown}");
    assert_eq!(
        value(
            &scrape(&a).await,
            &format!("oc_partner_lag{{peer=\"{}\"}}", b.id())
        ),
        Some(1.0),
        "oc_partner_lag stays in entries"
    );
    // The partner comes and acknowledges: 0.
    b.node.start_healthy().await.unwrap();
    let mut now = grown;
    for _ in 0..600 {
        now = value(&scrape(&a).await, &series).unwrap_or(-1.0);
        if now == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(now, 0.0);
}
