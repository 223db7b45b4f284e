//! Propagation benchmark: the node against the thinnest NATS → NATS relay, in one run.
//!
//! `cargo bench --bench propagation` (full) or `cargo bench --bench propagation -- --smoke`
//! (a few seconds). `cargo test --all-targets` runs the smoke too (that is how CI runs it).
//! Other flags: `--only throughput|fanout|catchup` (repeatable), `--core-intake` (the
//! source reads core NATS instead of a JetStream stream), `--store embedded|mongodb` (repeatable; default
//! embedded), `--pace N` (repeatable: the fixed latency paces, in this order, instead of
//! 1 000, 10 000 and 20 000/s), `--json PATH` (default target/bench/propagation.json);
//! `--help` lists them, and a flag or value the benchmark does not know is refused.
//!
//! Every scenario starts its own nats-servers and nodes as processes on 127.0.0.1. The relay
//! runs beside each figure that has a baseline (throughput, every latency pace, the bulk
//! move the catch-up is set against); the run ends with the targets of docs/PERFORMANCE.md
//! as ratios of this run. A scenario that loses an event makes the run fail; speed is
//! printed, never asserted.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use oc_testkit::{MongoServer, NatsServer, NodeProcess};
use serde_json::{json, Value};

/// Payload padding so each event is about 1 KiB on the wire.
const PAD: usize = 880;
/// A delivery that makes no progress for this long is over (what is missing is lost).
const STALL: Duration = Duration::from_secs(20);

struct Sizes {
    throughput: usize,
    rates: Vec<u64>,
    rate_window: Duration,
    fanout_partners: usize,
    fanout_events: usize,
    catchup: usize,
}

#[derive(serde::Serialize)]
struct Row {
    scenario: String,
    store: String,
    metric: String,
    value: f64,
    unit: String,
    /// The same figure for the core-NATS relay, when there is one.
    baseline: Option<f64>,
    lost: u64,
}

/// The node binary: this build's, or `OC_BENCH_NODE` (another build's, to compare two
/// builds with the same benchmark on the same day).
fn bin() -> PathBuf {
    std::env::var_os("OC_BENCH_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_oc-discovery")))
}

fn body(creator: &str, i: usize) -> Vec<u8> {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    json!({"action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE", "user": "bench", "from_app": "bench",
           "payload": {"id": format!("r-{i}"), "creator_id": creator, "t": micros as u64, "pad": "x".repeat(PAD)}})
    .to_string()
    .into_bytes()
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Counts distinct deliveries on a subject and records publish → receipt latencies.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<HashSet<u64>>>,
    /// (publish time, latency), both in µs.
    latencies_us: Arc<Mutex<Vec<(u64, u64)>>>,
    last_progress: Arc<Mutex<Option<Instant>>>,
}

impl Receiver {
    /// `key` extracts the delivery's identity and its publish time from a message body.
    async fn start(
        client: &async_nats::Client,
        subject: &str,
        key: fn(&Value) -> Option<(u64, u64)>,
    ) -> anyhow::Result<Self> {
        let r = Receiver::default();
        let mut sub = client.subscribe(subject.to_owned()).await?;
        client.flush().await?;
        let me = r.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                let Some((id, t)) = key(&v) else { continue };
                let fresh = me.seen.lock().map(|mut s| s.insert(id)).unwrap_or(false);
                if fresh {
                    if let Ok(mut l) = me.latencies_us.lock() {
                        l.push((t, now_micros().saturating_sub(t)));
                    }
                    if let Ok(mut p) = me.last_progress.lock() {
                        *p = Some(Instant::now());
                    }
                }
            }
        });
        Ok(r)
    }

    fn count(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Waits until `n` distinct deliveries or a stall; returns when the last one arrived.
    async fn wait(&self, n: usize, since: Instant) -> (usize, Duration) {
        loop {
            let count = self.count();
            let last = self.last_progress.lock().ok().and_then(|p| *p).unwrap_or(since);
            if count >= n || last.elapsed() > STALL && since.elapsed() > STALL {
                return (count, last.saturating_duration_since(since));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn percentiles(&self) -> (f64, f64, f64) {
        let mut l: Vec<u64> = self
            .latencies_us
            .lock()
            .map(|l| l.iter().map(|&(_, us)| us).collect())
            .unwrap_or_default();
        if l.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        l.sort_unstable();
        let at = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)] as f64 / 1000.0;
        (at(0.50), at(0.99), at(0.999))
    }

    /// The p99 and the maximum, in ms, of the events published in each second of the run:
    /// whether a tail is spread over the run (queueing) or made in one moment (a stall).
    fn per_second(&self) -> Vec<(f64, f64)> {
        let l = self.latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
        let Some(start) = l.iter().map(|&(t, _)| t).min() else {
            return Vec::new();
        };
        let mut seconds: Vec<Vec<u64>> = Vec::new();
        for (t, us) in l {
            let s = usize::try_from((t - start) / 1_000_000).unwrap_or(usize::MAX);
            if s >= 3600 {
                continue;
            }
            if seconds.len() <= s {
                seconds.resize_with(s + 1, Vec::new);
            }
            seconds[s].push(us);
        }
        seconds
            .into_iter()
            .map(|mut v| {
                v.sort_unstable();
                let at = |q: f64| {
                    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                        .map_or(0.0, |&us| us as f64 / 1000.0)
                };
                (at(0.99), v.last().map_or(0.0, |&us| us as f64 / 1000.0))
            })
            .collect()
    }
}

/// Node notices: identity = origin seq, time = the `t` the publisher embedded.
fn notice_key(v: &Value) -> Option<(u64, u64)> {
    Some((v["origin_seq"].as_u64()?, v["resource"]["t"].as_u64()?))
}

/// Relay copies: identity = the resource index, time = `t`.
fn relay_key(v: &Value) -> Option<(u64, u64)> {
    let id = v["payload"]["id"]
        .as_str()?
        .trim_start_matches("r-")
        .parse()
        .ok()?;
    Some((id, v["payload"]["t"].as_u64()?))
}

/// CPU time each process of a scenario spends per delivered event: where the cost goes.
struct CpuMeter(Vec<(&'static str, u32, f64)>);

impl CpuMeter {
    fn start(processes: &[(&'static str, Option<u32>)]) -> Self {
        CpuMeter(
            processes
                .iter()
                .filter_map(|(name, pid)| {
                    let pid = (*pid)?;
                    Some((*name, pid, oc_testkit::cpu_seconds_of_pid(pid)?))
                })
                .collect(),
        )
    }

    /// Prints and records microseconds of CPU per event for each process, and the total.
    fn report(&self, store: &str, scenario: &str, events: usize, rows: &mut Vec<Row>) {
        let mut line = format!("[{store}] {scenario} CPU per event:");
        let mut total = 0.0;
        for (name, pid, before) in &self.0 {
            let Some(now) = oc_testkit::cpu_seconds_of_pid(*pid) else {
                continue;
            };
            let us = (now - before) * 1e6 / events.max(1) as f64;
            total += us;
            line.push_str(&format!(" {name} {us:.1} µs,"));
            rows.push(Row {
                scenario: format!("cpu {scenario}"),
                store: store.into(),
                metric: format!("{name}_us_per_event"),
                value: us,
                unit: "µs".into(),
                baseline: None,
                lost: 0,
            });
        }
        println!("{line} total {total:.1} µs");
        rows.push(Row {
            scenario: format!("cpu {scenario}"),
            store: store.into(),
            metric: "total_us_per_event".into(),
            value: total,
            unit: "µs".into(),
            baseline: None,
            lost: 0,
        });
    }
}

/// Publishes `n` events at `rate` per second (0: as fast as possible).
async fn publish(
    client: &async_nats::Client,
    subject: &str,
    creator: &str,
    n: usize,
    rate: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    for i in 0..n {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        client
            .publish(subject.to_owned(), body(creator, i).into())
            .await?;
    }
    client.flush().await?;
    Ok(())
}

struct Site {
    nats: NatsServer,
    node: NodeProcess,
    app: async_nats::Client,
}

/// The source site's NATS has JetStream (durable intake), unless `--core-intake` asks for
/// core NATS: that isolates the node's own pipeline from JetStream's persistence.
fn source_jetstream() -> bool {
    !CORE_INTAKE.get().copied().unwrap_or(false)
}

/// `--core-intake`, as `main` parsed it.
static CORE_INTAKE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Waits until every partner link of `node` is online, so a measurement never includes
/// connection set-up or reconnect backoff.
async fn links_online(node: &NodeProcess, partners: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let peers = node.get_json("/api/peers").await?;
        let online = peers
            .as_array()
            .map(|a| a.iter().filter(|p| p["state"] == "online").count())
            .unwrap_or(0);
        if online >= partners {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {online} of {partners} partner links online: {peers}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn site(jetstream: bool, store: &str, mongo_uri: Option<&str>) -> anyhow::Result<Site> {
    let nats = if jetstream {
        NatsServer::start_jetstream()?
    } else {
        NatsServer::start()?
    };
    let mut node = NodeProcess::new(&bin(), &nats.url())?;
    // What an operator runs: info, not the tests' debug logging.
    node.extra_env.push(("RUST_LOG".into(), "info".into()));
    if let Some(uri) = mongo_uri {
        node.extra_args.extend(["--store".into(), store.into()]);
        node.extra_args.extend([
            "--mongo-uri".into(),
            uri.into(),
            "--mongo-db".into(),
            format!("bench{}", node.p2p_port),
        ]);
    }
    let app = async_nats::connect(nats.url()).await?;
    Ok(Site { nats, node, app })
}

/// The thinnest relay: subscribe on A's core NATS, publish on B's, inside this process. It
/// stays up for the whole run, so each figure of the node can be set against the relay's
/// measured just before it.
struct Relay {
    a: NatsServer,
    b: NatsServer,
    publisher: async_nats::Client,
    out: async_nats::Client,
    /// Subjects used so far: each measurement gets fresh ones, so no delivery of an earlier
    /// one is counted in it.
    runs: usize,
}

impl Relay {
    async fn start() -> anyhow::Result<Self> {
        let (a, b) = (NatsServer::start()?, NatsServer::start()?);
        let publisher = async_nats::connect(a.url()).await?;
        let out = async_nats::connect(b.url()).await?;
        Ok(Relay {
            a,
            b,
            publisher,
            out,
            runs: 0,
        })
    }

    /// Relays `n` events published at `rate` (0: as fast as possible). Returns the receiver
    /// (counts, latencies) and the time from the first publish to the last delivery.
    async fn run(&mut self, n: usize, rate: u64) -> anyhow::Result<(Receiver, usize, Duration)> {
        self.runs += 1;
        let (inbound, outbound) = (format!("bench{}", self.runs), format!("bench{}.out", self.runs));
        let relay_in = async_nats::connect(self.a.url()).await?;
        let mut sub = relay_in.subscribe(inbound.clone()).await?;
        relay_in.flush().await?;
        let relay_out = self.out.clone();
        let forward = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let _ = relay_out.publish(outbound.clone(), m.payload).await;
            }
        });
        let rx = Receiver::start(&self.out, &format!("bench{}.out", self.runs), relay_key).await?;
        let t0 = Instant::now();
        publish(&self.publisher, &inbound, "relay", n, rate).await?;
        let (got, took) = rx.wait(n, t0).await;
        forward.abort();
        Ok((rx, got, took))
    }

    /// p50 / p99 / p999 of the relay at a fixed pace, for the same window as the node's.
    async fn latency(&mut self, pace: u64, window: Duration) -> anyhow::Result<(f64, f64, f64)> {
        let n = (pace as f64 * window.as_secs_f64()) as usize;
        let (rx, _, _) = self.run(n, pace).await?;
        Ok(rx.percentiles())
    }
}

/// The relay's throughput (with its CPU per event) and the time it takes to move `bulk`
/// events, the yardstick of the catch-up.
async fn baseline(relay: &mut Relay, sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<f64> {
    let n = sizes.throughput;
    // The relay runs inside this process, with the load generator.
    let cpu = CpuMeter::start(&[
        ("nats_a", relay.a.pid()),
        ("nats_b", relay.b.pid()),
        ("relay_and_load_generator", Some(std::process::id())),
    ]);
    let (_, got, took) = relay.run(n, 0).await?;
    let rate = got as f64 / took.as_secs_f64().max(1e-9);
    println!(
        "baseline relay: {got}/{n} in {took:?} = {rate:.0} events/s, lost {}",
        n - got
    );
    cpu.report("core-nats-relay", "throughput", got, rows);
    rows.push(Row {
        scenario: "throughput".into(),
        store: "core-nats-relay".into(),
        metric: "events_per_s".into(),
        value: rate,
        unit: "events/s".into(),
        baseline: None,
        lost: (n - got) as u64,
    });
    Ok(rate)
}

/// Seconds the relay takes to move `n` events published as fast as possible, at the rate it
/// delivered them (core NATS may drop some for a slow consumer; the row counts them).
async fn relay_bulk(relay: &mut Relay, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<f64> {
    let (_, got, took) = relay.run(n, 0).await?;
    // A relay that delivered fewer than `n` did not move `n` in `took`.
    let seconds = took.as_secs_f64() * n as f64 / got.max(1) as f64;
    println!("baseline relay: {got}/{n} moved in {took:?}: {seconds:.2} s for {n} at that rate");
    rows.push(Row {
        scenario: format!("catch-up {n}"),
        store: "core-nats-relay".into(),
        metric: "seconds".into(),
        value: seconds,
        unit: "s".into(),
        baseline: None,
        lost: (n - got.min(n)) as u64,
    });
    Ok(seconds)
}

async fn throughput_and_latency(
    store: &str,
    mongo: Option<&str>,
    mongod: Option<u32>,
    sizes: &Sizes,
    relay: &mut Relay,
    base_rate: f64,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (mut a, mut b) = (
        site(source_jetstream(), store, mongo).await?,
        site(false, store, mongo).await?,
    );
    a.node.partners.push(b.node.addr());
    b.node.partners.push(a.node.addr());
    a.node.start_healthy().await?;
    b.node.start_healthy().await?;
    links_online(&a.node, 1).await?;
    let idle_rss = b.node.rss_bytes().unwrap_or(0) as f64 / 1048576.0;
    rows.push(Row {
        scenario: "memory".into(),
        store: store.into(),
        metric: "idle_rss".into(),
        value: idle_rss,
        unit: "MiB".into(),
        baseline: None,
        lost: 0,
    });
    let creator = a.node.peer_id.clone();

    let rx = Receiver::start(&b.app, "CREATE_RESOURCE", notice_key).await?;
    let n = sizes.throughput;
    let cpu = CpuMeter::start(&[
        ("node_a", a.node.pid()),
        ("node_b", b.node.pid()),
        ("nats_a", a.nats.pid()),
        ("nats_b", b.nats.pid()),
        ("load_generator", Some(std::process::id())),
        // Both nodes' server, with the MongoDB store.
        ("mongod", mongod),
    ]);
    let t0 = Instant::now();
    publish(&a.app, "PROPALGATION_EVENT", &creator, n, 0).await?;
    let (got, took) = rx.wait(n, t0).await;
    let rate = got as f64 / took.as_secs_f64().max(1e-9);
    println!("[{store}] throughput: {got}/{n} in {took:?} = {rate:.0} events/s");
    cpu.report(store, "throughput", got, rows);
    // How many events each fsynced commit carried: the node's group commit at work.
    let per_commit = |events: u64, commits: u64| events as f64 / commits.max(1) as f64;
    let journal = per_commit(
        a.node.metric("oc_intake_accepted_total").await?,
        a.node.metric("oc_journal_commits_total").await?,
    );
    let apply = per_commit(
        b.node.metric("oc_events_applied_total").await?,
        b.node.metric("oc_apply_commits_total").await?,
    );
    println!("[{store}] throughput batches: {journal:.0} events per journal commit (A), {apply:.0} per apply commit (B)");
    for (metric, value) in [
        ("events_per_journal_commit", journal),
        ("events_per_apply_commit", apply),
    ] {
        rows.push(Row {
            scenario: "batches throughput".into(),
            store: store.into(),
            metric: metric.into(),
            value,
            unit: "events".into(),
            baseline: None,
            lost: 0,
        });
    }
    rows.push(Row {
        scenario: "throughput".into(),
        store: store.into(),
        metric: "events_per_s".into(),
        value: rate,
        unit: "events/s".into(),
        baseline: Some(base_rate),
        lost: (n - got) as u64,
    });

    // The fixed paces, then a quarter of the throughput just measured: the load a site
    // would run at with room to spare, where latency must stay low.
    let quarter = ((rate / 4.0 / 100.0).round() as u64 * 100).max(100);
    let mut paces = sizes.rates.clone();
    paces.push(quarter);
    let mut sent = n;
    for (i, &pace) in paces.iter().enumerate() {
        let label = if i + 1 == paces.len() {
            format!("latency@{pace}/s (1/4)")
        } else {
            format!("latency@{pace}/s")
        };
        // The relay at the same pace, just before, for the ratio.
        let (b50, b99, b999) = relay.latency(pace, sizes.rate_window).await?;
        let count = (pace as f64 * sizes.rate_window.as_secs_f64()) as usize;
        // A fresh receiver per pace so the percentiles are of that pace alone.
        let rx_pace = Receiver::start(&b.app, "CREATE_RESOURCE", notice_key).await?;
        let t0 = Instant::now();
        publish(&a.app, "PROPALGATION_EVENT", &creator, count, pace).await?;
        let (got, _) = rx_pace.wait(count, t0).await;
        sent += count;
        let (p50, p99, p999) = rx_pace.percentiles();
        println!("[{store}] latency at {pace}/s: p50 {p50:.2} ms, p99 {p99:.2} ms, p999 {p999:.2} ms ({got}/{count})");
        let seconds: Vec<String> = rx_pace
            .per_second()
            .iter()
            .map(|(p99, max)| format!("{p99:.1}/{max:.1}"))
            .collect();
        println!(
            "[{store}] latency at {pace}/s, p99/max ms of each second: {}",
            seconds.join(" ")
        );
        let lost = (count - got) as u64;
        for (metric, value, bvalue) in [
            ("p50_ms", p50, b50),
            ("p99_ms", p99, b99),
            ("p999_ms", p999, b999),
        ] {
            rows.push(Row {
                scenario: label.clone(),
                store: store.into(),
                metric: metric.into(),
                value,
                unit: "ms".into(),
                baseline: Some(bvalue),
                lost,
            });
        }
    }
    let (got, _) = rx.wait(sent, Instant::now()).await;
    if got < sent {
        bail!("[{store}] lost {} of {sent} events", sent - got);
    }
    drop((a.nats, b.nats));
    Ok(())
}

async fn fanout(
    store: &str,
    mongo: Option<&str>,
    sizes: &Sizes,
    base: f64,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut a = site(source_jetstream(), store, mongo).await?;
    let mut partners = Vec::new();
    for _ in 0..sizes.fanout_partners {
        let mut p = site(false, store, mongo).await?;
        p.node.partners.push(a.node.addr());
        a.node.partners.push(p.node.addr());
        partners.push(p);
    }
    a.node.start_healthy().await?;
    let mut receivers = Vec::new();
    for p in &mut partners {
        p.node.start_healthy().await?;
        receivers.push(Receiver::start(&p.app, "CREATE_RESOURCE", notice_key).await?);
    }
    links_online(&a.node, sizes.fanout_partners).await?;
    let n = sizes.fanout_events;
    let creator = a.node.peer_id.clone();
    // Node A's CPU per source event with k partners, set against the one-partner run's.
    let cpu = CpuMeter::start(&[("node_a", a.node.pid()), ("nats_a", a.nats.pid())]);
    let t0 = Instant::now();
    publish(&a.app, "PROPALGATION_EVENT", &creator, n, 0).await?;
    let mut worst = f64::MAX;
    let mut lost = 0;
    for rx in &receivers {
        let (got, took) = rx.wait(n, t0).await;
        lost += (n - got) as u64;
        worst = worst.min(got as f64 / took.as_secs_f64().max(1e-9));
    }
    cpu.report(store, &format!("fanout x{}", sizes.fanout_partners), n, rows);
    println!(
        "[{store}] fan-out to {}: slowest partner {worst:.0} events/s, lost {lost}",
        sizes.fanout_partners
    );
    rows.push(Row {
        scenario: format!("fanout x{}", sizes.fanout_partners),
        store: store.into(),
        metric: "events_per_s_per_partner".into(),
        value: worst,
        unit: "events/s".into(),
        baseline: Some(base),
        lost,
    });
    if lost > 0 {
        bail!("[{store}] fan-out lost {lost} deliveries");
    }
    Ok(())
}

async fn catchup(
    store: &str,
    mongo: Option<&str>,
    sizes: &Sizes,
    relay_seconds: Option<f64>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (mut a, mut b) = (
        site(source_jetstream(), store, mongo).await?,
        site(false, store, mongo).await?,
    );
    a.node.partners.push(b.node.addr());
    b.node.partners.push(a.node.addr());
    a.node.start_healthy().await?;
    let n = sizes.catchup;
    let creator = a.node.peer_id.clone();
    publish(&a.app, "PROPALGATION_EVENT", &creator, n, 0).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let head = a.node.get_json("/api/node").await?["journal_head"]
            .as_u64()
            .unwrap_or(0);
        if head >= n as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("[{store}] A journaled only {head} of {n}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rx = Receiver::start(&b.app, "CREATE_RESOURCE", notice_key).await?;
    let t0 = Instant::now();
    b.node.start_healthy().await?;
    let peak = Arc::new(Mutex::new((0u64, 0u64)));
    let sampler = {
        let peak = peak.clone();
        let (pa, pb) = (a.node.pid(), b.node.pid());
        tokio::spawn(async move {
            loop {
                let rss = |pid: Option<u32>| pid.and_then(oc_testkit::rss_of_pid).unwrap_or(0);
                let (ra, rb) = (rss(pa), rss(pb));
                if let Ok(mut p) = peak.lock() {
                    p.0 = p.0.max(ra);
                    p.1 = p.1.max(rb);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (got, took) = rx.wait(n, t0).await;
    sampler.abort();
    let (peak_a, peak_b) = peak.lock().map(|p| *p).unwrap_or_default();
    println!(
        "[{store}] catch-up of {n}: {got} in {took:?}; peak RSS source {} MiB, partner {} MiB",
        peak_a >> 20,
        peak_b >> 20
    );
    rows.push(Row {
        scenario: format!("catch-up {n}"),
        store: store.into(),
        metric: "seconds".into(),
        value: took.as_secs_f64(),
        unit: "s".into(),
        baseline: relay_seconds,
        lost: (n - got) as u64,
    });
    rows.push(Row {
        scenario: format!("catch-up {n}"),
        store: store.into(),
        metric: "peak_rss_source".into(),
        value: peak_a as f64 / 1048576.0,
        unit: "MiB".into(),
        baseline: None,
        lost: 0,
    });
    rows.push(Row {
        scenario: format!("catch-up {n}"),
        store: store.into(),
        metric: "peak_rss_partner".into(),
        value: peak_b as f64 / 1048576.0,
        unit: "MiB".into(),
        baseline: None,
        lost: 0,
    });
    if got < n {
        bail!("[{store}] catch-up lost {} events", n - got);
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<22} {:<16} {:<26} {:>12} {:>12} {:>8} {:>6}",
        "scenario", "store", "metric", "value", "relay", "ratio", "lost"
    );
    for r in rows {
        let (b, ratio) = match r.baseline {
            Some(b) if b > 0.0 => (format!("{b:.2}"), format!("{:.2}", r.value / b)),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{:<22} {:<16} {:<26} {:>12.2} {:>12} {:>8} {:>6}",
            r.scenario, r.store, r.metric, r.value, b, ratio, r.lost
        );
    }
}

/// The highest `--pace`: 5 s of it is 5 000 000 events, each one's latency kept.
const MAX_PACE: u64 = 1_000_000;

/// The benchmark's flags: `cargo bench --bench propagation -- [FLAGS]`. A flag or a value it
/// does not know is refused with the usage, so a typo never runs another benchmark than the
/// one asked for.
#[derive(clap::Parser)]
#[command(
    name = "propagation",
    about = "The node against the thinnest NATS → NATS relay, in one run (docs/PERFORMANCE.md)"
)]
struct Args {
    /// Full sizes; `cargo bench` passes it. Without it the smoke runs.
    #[arg(long)]
    bench: bool,
    /// A few seconds of each scenario, whatever else is given.
    #[arg(long)]
    smoke: bool,
    /// The store of the nodes (repeatable; default embedded).
    #[arg(long = "store", value_name = "STORE",
          value_parser = clap::builder::PossibleValuesParser::new(["embedded", "mongodb"]))]
    stores: Vec<String>,
    /// Run only this scenario (repeatable; default all); the relay always runs.
    #[arg(long = "only", value_name = "SCENARIO",
          value_parser = clap::builder::PossibleValuesParser::new(["throughput", "fanout", "catchup"]))]
    only: Vec<String>,
    /// A fixed latency pace in events/s (repeatable, in this order) instead of 1 000, 10 000
    /// and 20 000; the quarter of capacity still comes last. (0 would mean "as fast as
    /// possible" to the publisher: not a pace.)
    #[arg(long = "pace", value_name = "EVENTS_PER_S",
          value_parser = clap::value_parser!(u64).range(1..=MAX_PACE))]
    paces: Vec<u64>,
    /// The source reads core NATS instead of a JetStream stream.
    #[arg(long)]
    core_intake: bool,
    /// WiredTiger's cache of the benchmark's mongod, in GB (at least 0.25). Without it mongod
    /// keeps its own default (half of the RAM less 1 GB), as a site's server runs; runs
    /// before 2026-12-04 used 0.25, the tests' size.
    #[arg(long, value_name = "GB", value_parser = cache_gb)]
    mongod_cache_gb: Option<f64>,
    /// Where the JSON report goes.
    #[arg(long, value_name = "PATH", default_value = "target/bench/propagation.json")]
    json: PathBuf,
    /// What `cargo test -- --test-threads=N` hands every test binary, this one included.
    #[arg(long, hide = true)]
    test_threads: Option<String>,
    /// Other flags libtest takes, accepted and ignored for the same reason.
    #[arg(long, hide = true)]
    nocapture: bool,
    #[arg(long, hide = true)]
    quiet: bool,
    #[arg(long, hide = true)]
    exact: bool,
    #[arg(long, hide = true)]
    ignored: bool,
    #[arg(long, hide = true)]
    include_ignored: bool,
    /// Test-name filters from `cargo test -- NAME`: this binary has no tests to filter.
    #[arg(hide = true)]
    filters: Vec<String>,
}

/// `--mongod-cache-gb`: mongod refuses less than 0.25 GB.
fn cache_gb(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(gb) if gb.is_finite() && (0.25..=1024.0).contains(&gb) => Ok(gb),
        _ => Err(format!("{s}: a size in GB from 0.25 to 1024")),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = CORE_INTAKE.set(args.core_intake);
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` it is absent and the
    // smoke runs, so CI exercises the benchmark without timing anything.
    let smoke = args.smoke || !args.bench;
    let mut stores = args.stores;
    if stores.is_empty() {
        stores.push("embedded".into());
    }
    let json_path = args.json;
    let paces = args.paces;
    let mut sizes = if smoke {
        Sizes {
            throughput: 2_000,
            rates: vec![1_000],
            rate_window: Duration::from_secs(1),
            fanout_partners: 2,
            fanout_events: 500,
            catchup: 2_000,
        }
    } else {
        Sizes {
            throughput: 100_000,
            rates: vec![1_000, 10_000, 20_000],
            rate_window: Duration::from_secs(5),
            fanout_partners: 8,
            fanout_events: 20_000,
            catchup: 1_000_000,
        }
    };
    if !paces.is_empty() {
        sizes.rates = paces;
    }
    // `--only` (repeatable) runs a subset; the relay always runs.
    let only = &args.only;
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut rows = Vec::new();
    let mut relay = Relay::start()
        .await
        .context("starting the relay's nats-servers")?;
    let base_rate = baseline(&mut relay, &sizes, &mut rows)
        .await
        .context("baseline relay")?;
    let relay_catchup = if wanted("catchup") {
        Some(
            relay_bulk(&mut relay, sizes.catchup, &mut rows)
                .await
                .context("relay bulk")?,
        )
    } else {
        None
    };
    for store in &stores {
        // One mongod per store run, shared by its nodes (each node has its own database).
        let (mongo_uri, mongod): (Option<String>, Option<MongoServer>) = match store.as_str() {
            "embedded" => (None, None),
            "mongodb" => {
                let server = MongoServer::start_with_cache(args.mongod_cache_gb)
                    .await
                    .context("starting mongod")?;
                (Some(server.uri()), Some(server))
            }
            other => bail!("unknown store {other}: expected embedded or mongodb"),
        };
        if wanted("throughput") {
            throughput_and_latency(
                store,
                mongo_uri.as_deref(),
                mongod.as_ref().and_then(MongoServer::pid),
                &sizes,
                &mut relay,
                base_rate,
                &mut rows,
            )
            .await?;
        }
        if wanted("fanout") {
            fanout(store, mongo_uri.as_deref(), &sizes, base_rate, &mut rows).await?;
        }
        if wanted("catchup") {
            catchup(store, mongo_uri.as_deref(), &sizes, relay_catchup, &mut rows).await?;
        }
    }
    print_table(&rows);
    let targets = targets(&rows, &stores, sizes.fanout_partners, relay_catchup);
    print_targets(&targets);
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let report = json!({"smoke": smoke, "rows": rows, "targets": targets, "machine": machine()});
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    println!("\nJSON written to {}", json_path.display());
    let lost: u64 = rows
        .iter()
        .filter(|r| r.store != "core-nats-relay")
        .map(|r| r.lost)
        .sum();
    if lost > 0 {
        bail!("{lost} events lost");
    }
    println!("bench: 1 passed, 0 failed");
    Ok(())
}

/// One performance target of docs/PERFORMANCE.md, as measured in this run.
#[derive(serde::Serialize)]
struct Target {
    target: String,
    store: String,
    value: f64,
    /// `value` must be at most (`max`) or at least (`!max`) this.
    limit: f64,
    max: bool,
    met: bool,
}

/// The value of one row of this run.
fn find(rows: &[Row], scenario: &str, store: &str, metric: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.store == store && r.metric == metric)
        .map(|r| r.value)
}

/// The same row's relay figure.
fn find_baseline(rows: &[Row], scenario: &str, store: &str, metric: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.store == store && r.metric == metric)
        .and_then(|r| r.baseline)
}

/// Each target as a ratio (or bound) computed from this run's rows; missing scenarios
/// (`--only`) leave their targets out.
fn targets(
    rows: &[Row],
    stores: &[String],
    fanout_partners: usize,
    relay_catchup: Option<f64>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let mut push = |target: &str, store: &str, value: Option<f64>, limit: f64, max: bool| {
        if let Some(value) = value.filter(|v| v.is_finite()) {
            let met = if max { value <= limit } else { value >= limit };
            out.push(Target {
                target: target.into(),
                store: store.into(),
                value,
                limit,
                max,
                met,
            });
        }
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for store in stores {
        let s = store.as_str();
        let cpu = |name: &str| find(rows, "cpu throughput", s, &format!("{name}_us_per_event"));
        push(
            "node A CPU / JetStream server CPU per event",
            s,
            ratio(cpu("node_a"), cpu("nats_a")),
            0.3,
            true,
        );
        push(
            "node B CPU / JetStream server CPU per event",
            s,
            ratio(cpu("node_b"), cpu("nats_a")),
            0.3,
            true,
        );
        push(
            "throughput / relay throughput",
            s,
            ratio(
                find(rows, "throughput", s, "events_per_s"),
                find_baseline(rows, "throughput", s, "events_per_s"),
            ),
            0.4,
            false,
        );
        if let Some(quarter) = rows
            .iter()
            .find(|r| r.store == *store && r.scenario.ends_with("(1/4)") && r.metric == "p99_ms")
        {
            push(
                &format!("p99 ms at a quarter of capacity ({})", quarter.scenario),
                s,
                Some(quarter.value),
                10.0,
                true,
            );
        }
        push(
            "p99 at 1000/s / relay p99 at 1000/s",
            s,
            ratio(
                find(rows, "latency@1000/s", s, "p99_ms"),
                find_baseline(rows, "latency@1000/s", s, "p99_ms"),
            ),
            3.0,
            true,
        );
        let one = cpu("node_a");
        let many = find(
            rows,
            &format!("cpu fanout x{fanout_partners}"),
            s,
            "node_a_us_per_event",
        );
        if let (Some(one), Some(many)) = (one, many) {
            let extra = (many - one) / (fanout_partners.saturating_sub(1).max(1) as f64);
            push(
                "node A CPU per extra partner / with one partner",
                s,
                ratio(Some(extra), Some(one)),
                0.2,
                true,
            );
        }
        let catchup = rows
            .iter()
            .find(|r| r.store == *store && r.scenario.starts_with("catch-up") && r.metric == "seconds")
            .map(|r| r.value);
        push(
            "catch-up time / relay moving as many events",
            s,
            ratio(catchup, relay_catchup),
            3.0,
            true,
        );
        push("idle RSS MiB", s, find(rows, "memory", s, "idle_rss"), 64.0, true);
    }
    if stores.iter().any(|s| s == "mongodb") && stores.iter().any(|s| s == "embedded") {
        push(
            "MongoDB throughput / embedded throughput",
            "mongodb",
            ratio(
                find(rows, "throughput", "mongodb", "events_per_s"),
                find(rows, "throughput", "embedded", "events_per_s"),
            ),
            0.5,
            false,
        );
    }
    out
}

fn print_targets(targets: &[Target]) {
    println!(
        "\n{:<58} {:<10} {:>10} {:>10} {:>5}",
        "target", "store", "value", "limit", "met"
    );
    for t in targets {
        let limit = format!("{} {}", if t.max { "<=" } else { ">=" }, t.limit);
        let met = if t.met { "yes" } else { "no" };
        println!(
            "{:<58} {:<10} {:>10.2} {:>10} {:>5}",
            t.target, t.store, t.value, limit, met
        );
    }
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    json!({"cpus": cpus, "cpu": model})
}
