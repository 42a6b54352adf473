//! `bench-dashboard`: the coordinator's metrics path under load. A real
//! coordinator (and etcd) holds one job with `--prefill` stored reports;
//! then `--ranks` simulated ranks each send a report every `--interval-ms`
//! for `--seconds`, while `--viewers` simulated dashboards refresh the job
//! page (its four API calls, as the page makes them) every
//! `--refresh-ms`. Printed: the data API's latency idle (the baseline, same
//! run) and under load, p99 against the 200 ms target, the coordinator's
//! CPU and resident memory over the run, and the first query after a
//! coordinator SIGKILL and restart (curves loaded back from disk).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use flamingo_common::progress::Progress;
use flamingo_launch::local::{self, CoordinatorSpec, EtcdSpec};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::node_service_client::NodeServiceClient;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 64)]
    ranks: u32,
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Reports stored before the load starts (one report: one rank, one
    /// step, 7–11 values).
    #[arg(long, default_value_t = 1_000_000)]
    prefill: u64,
    #[arg(long, default_value_t = 4)]
    viewers: u32,
    #[arg(long, default_value_t = 2000)]
    refresh_ms: u64,
    /// Write the summary as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const TARGET_P99_MS: f64 = 200.0;

/// A report as a rank of a real run sends it.
fn sample(rank: u32, step: u64) -> pb::MetricSample {
    let mut values: std::collections::HashMap<String, f64> = [
        ("step_seconds", 0.1 + 0.01 * f64::from(rank % 7)),
        ("data_wait_seconds", 0.002),
        ("samples_per_second", 640.0),
        ("tokens_per_second", 163_840.0),
        ("model_tflops", 350.0),
        ("mfu", 0.35),
        ("memory_bytes", 6.0e10),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect();
    if rank == 0 {
        let loss = 2.0 + 8.0 / (1.0 + step as f64 / 1000.0);
        values.insert("loss_laion".into(), loss);
        values.insert("loss_mmc4".into(), loss * 1.1);
        values.insert("lr".into(), 1e-4);
        values.insert("grad_norm".into(), 1.0);
    }
    pb::MetricSample {
        step,
        unix_ms: flamingo_common::unix_ms(),
        values,
    }
}

fn batch(job: &str, rank: u32, samples: Vec<pb::MetricSample>) -> pb::MetricsBatch {
    pb::MetricsBatch {
        node_id: format!("sim-{rank}"),
        job_id: job.to_string(),
        rank,
        attempt: 0,
        samples,
        dropped: 0,
        notes: Vec::new(),
        rank_token: RANK_TOKEN.get().cloned().unwrap_or_default(),
        skip_examples: Vec::new(),
    }
}

/// The simulated ranks' credential (the job's attempt 0), minted with the
/// bench cluster's rank key once the job exists.
static RANK_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The job page's calls, as `app.js` makes them.
fn page_urls(base: &str, job: &str) -> Vec<(&'static str, String)> {
    let api = format!("{base}api/jobs/{job}");
    vec![
        ("job", api.clone()),
        (
            "rank0_series",
            format!("{api}/series?ranks=0&names=loss_laion,loss_mmc4,lr,grad_norm,samples_per_second,tokens_per_second,mfu&max_points=2000"),
        ),
        (
            "per_rank_series",
            format!("{api}/series?names=step_seconds,data_wait_seconds,memory_bytes&max_points=400"),
        ),
        ("events", format!("{api}/events")),
    ]
}

/// The dashboard's token (the bench cluster's), as a viewer's browser
/// holds it.
static DASHBOARD_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn get(url: &str) -> anyhow::Result<usize> {
    let token = DASHBOARD_TOKEN
        .get()
        .map(String::as_str)
        .unwrap_or_default();
    let body = ureq::get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(30))
        .call()?
        .into_string()?;
    Ok(body.len())
}

#[derive(Default)]
struct Latencies(Mutex<Vec<(&'static str, f64)>>);

impl Latencies {
    fn add(&self, name: &'static str, ms: f64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, ms));
    }
    fn take(&self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}

fn summarise(label: &str, samples: &[(&'static str, f64)]) -> serde_json::Value {
    let mut all: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    let count = all.len();
    let (p50, p99, max) = (
        percentile(&mut all, 0.5),
        percentile(&mut all, 0.99),
        percentile(&mut all, 1.0),
    );
    println!("{label}: {count} requests, p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    let mut names: Vec<&str> = samples.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    names.dedup();
    let mut per = serde_json::Map::new();
    for name in names {
        let mut values: Vec<f64> = samples
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, ms)| *ms)
            .collect();
        let (p50, p99) = (percentile(&mut values, 0.5), percentile(&mut values, 0.99));
        println!("  {name:<16} p50 {p50:>7.1} ms  p99 {p99:>7.1} ms");
        per.insert(
            name.to_string(),
            serde_json::json!({ "p50_ms": p50, "p99_ms": p99 }),
        );
    }
    serde_json::json!({ "requests": count, "p50_ms": p50, "p99_ms": p99, "max_ms": max, "by_call": per })
}

/// CPU seconds (user + system) and resident bytes of a process.
fn usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks / hz, rss_kb * 1024))
}

fn viewers(
    count: u32,
    refresh: Duration,
    urls: Vec<(&'static str, String)>,
    stop: Arc<AtomicBool>,
    latencies: Arc<Latencies>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..count)
        .map(|viewer| {
            let (urls, stop, latencies) = (urls.clone(), stop.clone(), latencies.clone());
            std::thread::spawn(move || {
                // Stagger the viewers over one refresh period.
                std::thread::sleep(refresh * viewer / count.max(1));
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    for (name, url) in &urls {
                        let call = Instant::now();
                        if let Err(error) = get(url) {
                            eprintln!("viewer: {name}: {error}");
                        }
                        latencies.add(name, call.elapsed().as_secs_f64() * 1000.0);
                    }
                    std::thread::sleep(refresh.saturating_sub(started.elapsed()));
                }
            })
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    // Secure, as users run it: mutual TLS everywhere, ranks with credentials.
    let credentials =
        flamingo_launch::pki::ClusterCredentials::prepare(&dir.path().join("pki"), &[])?;
    let etcd_spec = EtcdSpec {
        data_dir: dir.path().join("etcd"),
        client_port: flamingo_common::net::free_local_port()?,
        peer_port: flamingo_common::net::free_local_port()?,
        tls: Some(credentials.etcd.clone()),
    };
    let mut etcd = local::spawn_etcd(&etcd_spec, &dir.path().join("etcd.log"), false)?;
    local::wait_for_port(&etcd_spec.endpoint(), Duration::from_secs(20))?;
    let spec = CoordinatorSpec {
        port: flamingo_common::net::free_local_port()?,
        http_port: flamingo_common::net::free_local_port()?,
        etcd_endpoint: etcd_spec.endpoint(),
        lease_ttl_seconds: 10,
        heartbeat_interval_ms: 1000,
        tls: credentials.coordinator.clone(),
        // The simulated ranks share one node certificate (real ranks are
        // spread over nodes), so the per-client limit is off.
        extra_args: vec!["--max-requests-per-second=0".into()],
    };
    let log = dir.path().join("coordinator.log");
    let mut coordinator = local::spawn_coordinator(&spec, &log, false)?;
    local::wait_for_port(&spec.endpoint(), Duration::from_secs(20))?;
    local::wait_for_port(
        &format!("http://127.0.0.1:{}", spec.http_port),
        Duration::from_secs(20),
    )?;
    let result = run(
        &args,
        &spec,
        &credentials,
        &mut coordinator,
        &log,
        dir.path(),
    )
    .await;
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    let _ = etcd.kill();
    let _ = etcd.wait();
    result
}

/// The load phase's measurements.
struct Load {
    latencies: serde_json::Value,
    reports: u64,
    failures: u64,
    cpu_percent: f64,
    rss_max: u64,
    rss_end: u64,
    rss_samples: Vec<u64>,
}

async fn run(
    args: &Args,
    spec: &CoordinatorSpec,
    credentials: &flamingo_launch::pki::ClusterCredentials,
    coordinator: &mut std::process::Child,
    log: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let job = launch_job(spec, credentials).await?;
    let _ = DASHBOARD_TOKEN.set(credentials.pki.dashboard_token()?);
    let secret = credentials.pki.rank_secret()?;
    let _ = RANK_TOKEN.set(flamingo_security::RankToken::mint(
        &secret,
        &job,
        0,
        24 * 3600,
    ));
    let node = credentials.node("sim")?.client()?;
    let channel = flamingo_security::endpoint(
        &spec.endpoint(),
        node.as_ref(),
        flamingo_security::COORDINATOR_NAME,
    )?
    .connect()
    .await?;
    let nodes = NodeServiceClient::new(channel);
    let started = Instant::now();
    let sent = prefill(args, &nodes, &job).await?;
    let pid = coordinator.id();
    let (_, rss_prefilled) = usage(pid).unwrap_or((0.0, 0));
    println!(
        "prefilled {sent} reports in {:.1} s; coordinator RSS {:.0} MiB",
        started.elapsed().as_secs_f64(),
        rss_prefilled as f64 / 1048576.0
    );
    let urls = page_urls(&spec.dashboard(), &job);
    // Baseline: the same page loads with no ranks reporting.
    let idle = Arc::new(Latencies::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handles = viewers(
        args.viewers,
        Duration::from_millis(args.refresh_ms),
        urls.clone(),
        stop.clone(),
        idle.clone(),
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        let _ = handle.join();
    }
    let idle = summarise("idle (baseline)", &idle.take());
    let load = load(args, &nodes, &job, &urls, pid, rss_prefilled).await;
    let stored = sent + load.reports;
    // The coordinator dies and comes back: the first page load reads the
    // curves back from disk.
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    *coordinator = local::spawn_coordinator(spec, log, false)?;
    local::wait_for_port(
        &format!("http://127.0.0.1:{}", spec.http_port),
        Duration::from_secs(60),
    )?;
    let cold = Instant::now();
    get(&urls[1].1)?;
    let cold_ms = cold.elapsed().as_secs_f64() * 1000.0;
    let warm = Instant::now();
    get(&urls[1].1)?;
    let warm_ms = warm.elapsed().as_secs_f64() * 1000.0;
    let file = dir.join("metrics").join(format!("{job}.jsonl"));
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "stored reports: {stored} ({:.0} MiB on disk); {} failed sends",
        file_bytes as f64 / 1048576.0,
        load.failures
    );
    println!(
        "coordinator: CPU {:.0} % of one core under load; RSS {:.0} MiB after prefill, {:.0} MiB max, {:.0} MiB at the end",
        load.cpu_percent,
        rss_prefilled as f64 / 1048576.0,
        load.rss_max as f64 / 1048576.0,
        load.rss_end as f64 / 1048576.0
    );
    println!(
        "after a coordinator SIGKILL and restart: first rank-0 series query {cold_ms:.0} ms (loads the curves from disk), then {warm_ms:.1} ms"
    );
    let p99 = load.latencies["p99_ms"].as_f64().unwrap_or(f64::NAN);
    let idle_p99 = idle["p99_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "p99 under load {p99:.1} ms = {:.2}× the idle baseline ({idle_p99:.1} ms); {:.2}× the 200 ms target: {}",
        p99 / idle_p99,
        p99 / TARGET_P99_MS,
        if p99 < TARGET_P99_MS { "met" } else { "NOT met" }
    );
    if let Some(path) = &args.json {
        let summary = serde_json::json!({
            "ranks": args.ranks, "interval_ms": args.interval_ms, "seconds": args.seconds,
            "prefill": args.prefill, "stored_reports": stored, "file_bytes": file_bytes,
            "viewers": args.viewers, "refresh_ms": args.refresh_ms,
            "idle": idle, "under_load": load.latencies,
            "cpu_percent": load.cpu_percent, "rss_prefilled": rss_prefilled, "rss_max": load.rss_max,
            "rss_end": load.rss_end, "rss_samples": load.rss_samples,
            "cold_query_ms": cold_ms, "warm_query_ms": warm_ms,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// A job to report to: a collective check no node can take (there are
/// none), so it stays pending and its curves are all simulated.
async fn launch_job(
    spec: &CoordinatorSpec,
    credentials: &flamingo_launch::pki::ClusterCredentials,
) -> anyhow::Result<String> {
    let admin = credentials.admin.client()?;
    let mut session = flamingo_client::Session::open_with(&spec.endpoint(), admin.as_ref()).await?;
    let job = session
        .launch(&flamingo_common::JobSpec {
            name: "dashboard-bench".into(),
            nodes: 1,
            slots_per_node: 1,
            min_nodes: 0,
            kind: flamingo_common::JobKind::CollectiveCheck {
                min_bytes: 1,
                max_bytes: 1,
                backend: None,
            },
            env: Default::default(),
            policy: Default::default(),
            submitter: String::new(),
        })
        .await?;
    Ok(job.id.to_string())
}

/// The history of a long run, in 1000-report batches; returns the reports
/// sent.
async fn prefill(
    args: &Args,
    nodes: &NodeServiceClient<tonic::transport::Channel>,
    job: &str,
) -> anyhow::Result<u64> {
    let per_rank = args.prefill / u64::from(args.ranks.max(1));
    let chunk = 1000u64;
    let mut sent = 0u64;
    let mut progress = Progress::new("prefill", Some(args.prefill)).counting("reports");
    for rank in 0..args.ranks {
        let mut step = 0;
        while step < per_rank {
            let end = (step + chunk).min(per_rank);
            let samples = (step..end).map(|s| sample(rank, s)).collect();
            nodes
                .clone()
                .report_metrics_batch(batch(job, rank, samples))
                .await?;
            sent += end - step;
            step = end;
        }
        progress.update(sent, "", None);
    }
    progress.finish();
    Ok(sent)
}

/// Every rank reports every interval while viewers refresh, for
/// `--seconds`; the coordinator's CPU and memory are sampled meanwhile.
async fn load(
    args: &Args,
    nodes: &NodeServiceClient<tonic::transport::Channel>,
    job: &str,
    urls: &[(&'static str, String)],
    pid: u32,
    rss_prefilled: u64,
) -> Load {
    let per_rank = args.prefill / u64::from(args.ranks.max(1));
    let loaded = Arc::new(Latencies::default());
    let stop = Arc::new(AtomicBool::new(false));
    let reports = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut ranks = Vec::new();
    for rank in 0..args.ranks {
        let (mut client, job, stop) = (nodes.clone(), job.to_string(), stop.clone());
        let (reports, failures) = (reports.clone(), failures.clone());
        let interval = Duration::from_millis(args.interval_ms);
        ranks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut step = per_rank;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let report = batch(&job, rank, vec![sample(rank, step)]);
                match client.report_metrics_batch(report).await {
                    Ok(_) => reports.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
                step += 1;
            }
        }));
    }
    let handles = viewers(
        args.viewers,
        Duration::from_millis(args.refresh_ms),
        urls.to_vec(),
        stop.clone(),
        loaded.clone(),
    );
    let load_started = Instant::now();
    let (cpu_start, _) = usage(pid).unwrap_or((0.0, 0));
    let mut rss_max = rss_prefilled;
    let mut rss_samples = Vec::new();
    while load_started.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (cpu, rss) = usage(pid).unwrap_or((0.0, 0));
        rss_max = rss_max.max(rss);
        rss_samples.push(rss);
        let elapsed = load_started.elapsed().as_secs_f64();
        eprintln!(
            "{elapsed:>5.0}/{} s: {} reports ({:.0}/s), {} failed; coordinator CPU {:.0} %, RSS {:.0} MiB",
            args.seconds,
            reports.load(Ordering::Relaxed),
            reports.load(Ordering::Relaxed) as f64 / elapsed,
            failures.load(Ordering::Relaxed),
            (cpu - cpu_start) / elapsed * 100.0,
            rss as f64 / 1048576.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    for rank in ranks {
        let _ = rank.await;
    }
    for handle in handles {
        let _ = handle.join();
    }
    let elapsed = load_started.elapsed().as_secs_f64();
    let (cpu_end, rss_end) = usage(pid).unwrap_or((0.0, 0));
    Load {
        latencies: summarise("under load", &loaded.take()),
        reports: reports.load(Ordering::Relaxed),
        failures: failures.load(Ordering::Relaxed),
        cpu_percent: (cpu_end - cpu_start) / elapsed * 100.0,
        rss_max,
        rss_end,
        rss_samples,
    }
}
