//! `bench-control-plane`: the coordinator and etcd against N simulated
//! agents that speak the real protocol over mutual TLS, each with its own
//! node certificate and connection: register, attach, heartbeat at the
//! coordinator's interval, report rank starts and exits at once. For each
//! size it measures, on this machine with the probe beside them:
//!
//! - the time for N agents to register and attach;
//! - the coordinator's and etcd's CPU (cores) during steady heartbeats;
//! - a job of N nodes × `--slots` ranks that exit at once (`true`): Launch
//!   to the last agent receiving its starts, and the last exit to
//!   `Succeeded`;
//! - the same job held running, then one placed node's agent killed: the
//!   kill to the last start of the new attempt (one spare node registered);
//! - metric reports from every rank, one batch a second each, relayed as
//!   agents do (one call a second per node carrying its ranks' batches):
//!   batches accepted per second and the cores they cost;
//! - etcd's database size and its write rate (revisions per second).
//!
//! Every phase is bounded; a size that misses a bound is reported as such
//! and the next, larger sizes are skipped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use flamingo_common::{JobKind, JobSpec};
use flamingo_launch::local::{self, CoordinatorSpec, EtcdSpec};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::job_service_client::JobServiceClient;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "The control plane against N simulated agents")]
struct Args {
    /// Cluster sizes in nodes, smallest first.
    #[arg(long, value_delimiter = ',', default_value = "64,512,4096")]
    nodes: Vec<u32>,
    /// Ranks per node.
    #[arg(long, default_value_t = 8)]
    slots: u32,
    /// Seconds of steady heartbeats measured.
    #[arg(long, default_value_t = 15)]
    steady_seconds: u64,
    /// Seconds of metric reports measured.
    #[arg(long, default_value_t = 15)]
    metrics_seconds: u64,
    /// The bound on each phase (seconds): a size that misses it ends the
    /// run.
    #[arg(long, default_value_t = 120)]
    phase_seconds: u64,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Targets at 4,096 nodes × 8 slots (issue: a control plane for 4,096
/// nodes).
const TARGETS: &[(&str, f64)] = &[
    ("register_seconds", 10.0),
    ("heartbeat_cores", 0.5),
    ("starts_seconds", 2.0),
    ("succeeded_seconds", 5.0),
    ("replace_seconds", 3.0),
    ("metrics_cores", 1.0),
];

/// What the simulated agents saw, shared by all of them.
#[derive(Default)]
struct Observed {
    /// Rank starts received, by attempt.
    starts: Mutex<HashMap<u32, (u64, Option<Instant>)>>,
    /// When the last rank exit was sent.
    last_exit: Mutex<Option<Instant>>,
    /// Ranks exit as soon as they start (a job of `true`).
    exit_at_once: AtomicBool,
    rank_reports_failed: AtomicU64,
    metrics_sent: AtomicU64,
    metrics_failed: AtomicU64,
}

impl Observed {
    fn started(&self, attempt: u32) -> (u64, Option<Instant>) {
        self.starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&attempt)
            .copied()
            .unwrap_or((0, None))
    }
}

/// One simulated agent.
struct Agent {
    id: String,
    client: NodeServiceClient<Channel>,
    running: Mutex<Vec<pb::RunningRank>>,
    killed: CancellationToken,
}

struct StopAgents(Vec<Arc<Agent>>);

impl Drop for StopAgents {
    fn drop(&mut self) {
        for agent in &self.0 {
            agent.killed.cancel();
        }
    }
}

fn heartbeat(agent: &Agent) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
            node_id: agent.id.clone(),
            running: agent
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            draining: false,
        })),
    }
}

async fn report(agent: &Agent, observed: &Observed, rank: &pb::RunningRank, exited: bool) {
    let event = if exited {
        pb::rank_report::Event::Exited(pb::RankExited {
            exit_code: 0,
            signal: 0,
            result_json: String::new(),
        })
    } else {
        pb::rank_report::Event::Started(pb::RankStarted { pid: 1 })
    };
    let sent = agent
        .client
        .clone()
        .report_rank(pb::RankReport {
            node_id: agent.id.clone(),
            job_id: rank.job_id.clone(),
            rank: rank.rank,
            attempt: rank.attempt,
            event: Some(event),
        })
        .await;
    if sent.is_err() {
        observed.rank_reports_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Registers, attaches, then heartbeats and answers starts and stops until
/// killed.
async fn run_agent(
    agent: Arc<Agent>,
    observed: Arc<Observed>,
    slots: u32,
    attached: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let registered = agent
        .client
        .clone()
        .register(pb::RegisterRequest {
            protocol_version: flamingo_proto::PROTOCOL_VERSION,
            node_id: agent.id.clone(),
            address: "127.0.0.1".into(),
            slots,
            gpu: false,
            rendezvous_port_first: 29500,
            rendezvous_port_count: 16,
            agent_endpoint: String::new(),
        })
        .await?
        .into_inner();
    let (outgoing, outgoing_rx) = tokio::sync::mpsc::channel(16);
    outgoing.send(heartbeat(&agent)).await?;
    let mut incoming = agent
        .client
        .clone()
        .attach(tokio_stream::wrappers::ReceiverStream::new(outgoing_rx))
        .await?
        .into_inner();
    let _ = attached.send(()).await;
    let mut ticker = tokio::time::interval(Duration::from_millis(u64::from(
        registered.heartbeat_interval_ms.max(100),
    )));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Dropping the stream is what a dead agent's closed connection
            // looks like to the coordinator.
            _ = agent.killed.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                if outgoing.send(heartbeat(&agent)).await.is_err() {
                    anyhow::bail!("{}: stream closed", agent.id);
                }
            }
            message = incoming.message() => match message?.and_then(|message| message.kind) {
                None => anyhow::bail!("{}: the coordinator ended the stream", agent.id),
                Some(pb::coordinator_message::Kind::Start(start)) => {
                    let now = Instant::now();
                    let ranks: Vec<pb::RunningRank> = start
                        .ranks
                        .iter()
                        .map(|assignment| pb::RunningRank {
                            job_id: assignment.job_id.clone(),
                            rank: assignment.rank,
                            attempt: assignment.attempt,
                        })
                        .collect();
                    {
                        let mut starts = observed.starts.lock().unwrap_or_else(|e| e.into_inner());
                        for rank in &ranks {
                            let entry = starts.entry(rank.attempt).or_insert((0, None));
                            entry.0 += 1;
                            entry.1 = Some(entry.1.map_or(now, |last: Instant| last.max(now)));
                        }
                    }
                    let (agent, observed) = (agent.clone(), observed.clone());
                    tokio::spawn(async move {
                        let exit = observed.exit_at_once.load(Ordering::Relaxed);
                        agent
                            .running
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(ranks.iter().cloned());
                        for rank in &ranks {
                            report(&agent, &observed, rank, false).await;
                        }
                        if exit {
                            for rank in &ranks {
                                // When the rank "exited": just before its
                                // agent reports it.
                                *observed.last_exit.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(Instant::now());
                                report(&agent, &observed, rank, true).await;
                            }
                            agent
                                .running
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .retain(|running| !ranks.contains(running));
                        }
                    });
                }
                Some(pb::coordinator_message::Kind::Stop(stop)) => {
                    let stopped: Vec<pb::RunningRank> = {
                        let mut running = agent.running.lock().unwrap_or_else(|e| e.into_inner());
                        let (stopped, kept) = running.drain(..).partition(|rank: &pb::RunningRank| {
                            rank.job_id == stop.job_id
                                && (stop.before_attempt == 0 || rank.attempt < stop.before_attempt)
                        });
                        *running = kept;
                        stopped
                    };
                    let (agent, observed) = (agent.clone(), observed.clone());
                    tokio::spawn(async move {
                        for rank in &stopped {
                            report(&agent, &observed, rank, true).await;
                        }
                    });
                }
            },
        }
    }
}

/// CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|field| field.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// The cores two processes used over `seconds`, measured now.
async fn cores_over(pids: [u32; 2], seconds: u64) -> (f64, f64) {
    let before = pids.map(cpu_seconds);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = pids.map(cpu_seconds);
    (
        (after[0] - before[0]) / elapsed,
        (after[1] - before[1]) / elapsed,
    )
}

/// Raises this process's open-file limit to its hard limit (thousands of
/// connections; the coordinator and etcd, its children, inherit it).
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

struct Stack {
    /// The cluster's folder (etcd's data, logs), removed with the stack.
    _dir: tempfile::TempDir,
    credentials: flamingo_launch::pki::ClusterCredentials,
    etcd: std::process::Child,
    coordinator: std::process::Child,
    spec: CoordinatorSpec,
    etcd_client: etcd_client::Client,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in [&mut self.coordinator, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn start_stack(pki: &std::path::Path) -> anyhow::Result<Stack> {
    let dir = tempfile::tempdir()?;
    let credentials = flamingo_launch::pki::ClusterCredentials::prepare(pki, &[])?;
    let free = flamingo_common::net::free_local_port;
    let etcd_spec = EtcdSpec {
        data_dir: dir.path().join("etcd"),
        client_port: free()?,
        peer_port: free()?,
        tls: Some(credentials.etcd.clone()),
    };
    let etcd = local::spawn_etcd(&etcd_spec, &dir.path().join("etcd.log"), false)?;
    local::wait_for_port(&etcd_spec.endpoint(), Duration::from_secs(20))?;
    let spec = CoordinatorSpec {
        port: free()?,
        http_port: free()?,
        etcd_endpoint: etcd_spec.endpoint(),
        lease_ttl_seconds: 10,
        heartbeat_interval_ms: 1000,
        tls: credentials.coordinator.clone(),
        // The probe's jobs never run (the agents are simulated), so their
        // paths are not checked; the largest job is the whole cluster.
        extra_args: vec![
            "--allow-command-jobs".into(),
            "--no-path-checks".into(),
            "--max-job-nodes=65536".into(),
        ],
    };
    let coordinator = local::spawn_coordinator(&spec, &dir.path().join("coordinator.log"), false)?;
    local::wait_for_port(&spec.endpoint(), Duration::from_secs(20))?;
    let files = &credentials.coordinator;
    let read = |path: &Option<std::path::PathBuf>| -> anyhow::Result<Vec<u8>> {
        let path = path
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no TLS file"))?;
        Ok(std::fs::read(path)?)
    };
    let options = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&files.ca)?))
            .identity(etcd_client::Identity::from_pem(
                read(&files.cert)?,
                read(&files.key)?,
            ))
            .domain_name(flamingo_security::ETCD_NAME),
    );
    let etcd_client = etcd_client::Client::connect([etcd_spec.endpoint()], Some(options)).await?;
    Ok(Stack {
        _dir: dir,
        credentials,
        etcd,
        coordinator,
        spec,
        etcd_client,
    })
}

/// etcd's database size (bytes) and revision.
async fn etcd_status(client: &mut etcd_client::Client) -> (i64, i64) {
    match client.status().await {
        Ok(status) => (
            status.db_size(),
            status.header().map_or(0, |header| header.revision()),
        ),
        Err(_) => (0, 0),
    }
}

/// A whole-cluster job: a command (`true`), or a training run when it
/// must restart after a node dies (only training runs restart). Nothing
/// runs: the agents are simulated.
fn job(nodes: u32, slots: u32, train: bool) -> pb::LaunchRequest {
    let kind = if train {
        let run = serde_json::json!({
            "model": "/probe/model.toml",
            "runs_dir": "/probe/runs",
            "run_name": "probe",
            "laion_shards": "/probe/laion-{000..009}.tar",
            "batch_size_laion": 1,
            "train_num_samples_laion": 100_000_000u64,
        });
        JobKind::Train {
            config_json: run.to_string(),
        }
    } else {
        JobKind::Command {
            argv: vec!["true".into()],
        }
    };
    let spec = JobSpec {
        name: "probe".into(),
        nodes,
        slots_per_node: slots,
        min_nodes: 0,
        kind,
        env: Default::default(),
        policy: Default::default(),
        submitter: String::new(),
    };
    pb::LaunchRequest {
        spec: Some(pb::JobSpec::from(&spec)),
    }
}

/// Waits until `probe` holds, checking every 10 ms, at most `bound`.
async fn until(what: &str, bound: Duration, mut probe: impl FnMut() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !probe() {
        if started.elapsed() > bound {
            anyhow::bail!("{what}: not within {} s", bound.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits for the job's event in `state` on a `WatchJob` stream; returns
/// when it arrived.
async fn watch_for(
    jobs: &mut JobServiceClient<Channel>,
    job_id: &str,
    state: pb::JobState,
    bound: Duration,
) -> anyhow::Result<Instant> {
    let mut stream = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    tokio::time::timeout(bound, async {
        while let Some(event) = stream.message().await? {
            if event.state == state as i32 {
                return Ok(Instant::now());
            }
        }
        anyhow::bail!("the watch of {job_id} ended before {state:?}")
    })
    .await
    .map_err(|_| anyhow::anyhow!("{job_id} not {state:?} within {} s", bound.as_secs()))?
}

/// Figures for one size.
type Figures = serde_json::Map<String, serde_json::Value>;

async fn measure(args: &Args, nodes: u32, pki: &std::path::Path) -> anyhow::Result<Figures> {
    let mut figures = Figures::new();
    let mut record = |name: &str, value: f64| {
        println!("  {name:<28} {value:>10.3}");
        figures.insert(name.to_string(), serde_json::json!(value));
    };
    let bound = Duration::from_secs(args.phase_seconds);
    let mut stack = start_stack(pki).await?;
    let pids = [stack.coordinator.id(), stack.etcd.id()];
    let observed = Arc::new(Observed::default());
    // One spare node for the re-placement.
    let total = nodes + 1;
    let prepared = Instant::now();
    let mut agents = Vec::new();
    for n in 0..total {
        let id = format!("sim-{n:05}");
        let tls = stack.credentials.node(&id)?.client()?;
        let channel = flamingo_security::endpoint(
            &stack.spec.endpoint(),
            tls.as_ref(),
            flamingo_security::COORDINATOR_NAME,
        )?
        .connect_lazy();
        agents.push(Arc::new(Agent {
            id,
            client: NodeServiceClient::new(channel),
            running: Mutex::default(),
            killed: CancellationToken::new(),
        }));
    }
    // However the measurement ends, the agents stop before the stack.
    let _stop_agents = StopAgents(agents.clone());
    eprintln!(
        "  ({total} node certificates in {:.1} s)",
        prepared.elapsed().as_secs_f64()
    );

    // Registration and attach.
    let (attached_tx, mut attached_rx) = tokio::sync::mpsc::channel(total as usize);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for agent in &agents {
        let (agent, observed, attached) = (agent.clone(), observed.clone(), attached_tx.clone());
        let slots = args.slots;
        tasks.push(tokio::spawn(async move {
            if let Err(error) = run_agent(agent.clone(), observed, slots, attached).await {
                if !agent.killed.is_cancelled() {
                    eprintln!("  agent {}: {error}", agent.id);
                }
            }
        }));
    }
    drop(attached_tx);
    let mut attached = 0;
    tokio::time::timeout(bound, async {
        while attached < total {
            if attached_rx.recv().await.is_none() {
                break;
            }
            attached += 1;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("only {attached} of {total} agents attached within the bound"))?;
    if attached < total {
        anyhow::bail!("only {attached} of {total} agents attached (see the errors above)");
    }
    record("register_seconds", started.elapsed().as_secs_f64());

    // Steady heartbeats.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (coordinator, etcd) = cores_over(pids, args.steady_seconds).await;
    record("heartbeat_cores_coordinator", coordinator);
    record("heartbeat_cores_etcd", etcd);
    record("heartbeat_cores", coordinator + etcd);

    let admin = stack.credentials.admin.client()?;
    let channel = flamingo_security::endpoint(
        &stack.spec.endpoint(),
        admin.as_ref(),
        flamingo_security::COORDINATOR_NAME,
    )?
    .connect()
    .await?;
    let mut jobs = JobServiceClient::new(channel);
    let ranks = u64::from(nodes) * u64::from(args.slots);
    let (db_before, revision_before) = etcd_status(&mut stack.etcd_client).await;
    let jobs_started = Instant::now();

    // A job of ranks that exit at once.
    observed.exit_at_once.store(true, Ordering::Relaxed);
    let launched = Instant::now();
    let job_id = jobs
        .launch(job(nodes, args.slots, false))
        .await?
        .into_inner()
        .job
        .map(|job| job.id)
        .unwrap_or_default();
    let mut watcher = jobs.clone();
    let watched = {
        let job_id = job_id.clone();
        tokio::spawn(async move {
            watch_for(&mut watcher, &job_id, pb::JobState::Succeeded, bound).await
        })
    };
    until("every start delivered", bound, || {
        observed.started(0).0 >= ranks
    })
    .await?;
    let (_, last_start) = observed.started(0);
    record(
        "starts_seconds",
        last_start.map_or(0.0, |at| at.duration_since(launched).as_secs_f64()),
    );
    let succeeded = watched.await??;
    let last_exit = observed
        .last_exit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(succeeded);
    record(
        "succeeded_seconds",
        succeeded.saturating_duration_since(last_exit).as_secs_f64(),
    );

    // A job held running; then one of its nodes dies.
    observed.exit_at_once.store(false, Ordering::Relaxed);
    observed
        .starts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let job_id = jobs
        .launch(job(nodes, args.slots, true))
        .await?
        .into_inner()
        .job
        .map(|job| job.id)
        .unwrap_or_default();
    until("the held job's starts", bound, || {
        observed.started(0).0 >= ranks
    })
    .await?;
    watch_for(&mut jobs, &job_id, pb::JobState::Running, bound).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = agents
        .iter()
        .find(|agent| {
            agent
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|rank| rank.job_id == job_id)
        })
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no agent runs {job_id}"))?;
    let killed = Instant::now();
    victim.killed.cancel();
    until("the job re-placed", bound, || {
        observed.started(1).0 >= ranks
    })
    .await?;
    let (_, last_start) = observed.started(1);
    record(
        "replace_seconds",
        last_start.map_or(0.0, |at| at.duration_since(killed).as_secs_f64()),
    );

    // Metric reports: every rank of the re-placed job, a batch a second,
    // as agents relay them: one call a second per node with its ranks'
    // batches.
    let secret = stack.credentials.pki.rank_secret()?;
    let token = flamingo_security::RankToken::mint(&secret, &job_id, 1, 3600);
    let stop = CancellationToken::new();
    let mut reporters = Vec::new();
    for (index, agent) in agents
        .iter()
        .filter(|agent| !agent.killed.is_cancelled())
        .enumerate()
    {
        let ranks: Vec<u32> = agent
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|rank| rank.job_id == job_id && rank.attempt == 1)
            .map(|rank| rank.rank)
            .collect();
        if ranks.is_empty() {
            continue;
        }
        let (agent, observed, stop) = (agent.clone(), observed.clone(), stop.clone());
        let (job_id, token) = (job_id.clone(), token.clone());
        reporters.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            // Spread the nodes over the second, as real ones are.
            tokio::time::sleep(Duration::from_millis(index as u64 * 7919 % 1000)).await;
            let mut step = 0u64;
            while !stop.is_cancelled() {
                ticker.tick().await;
                let batches: Vec<pb::MetricsBatch> = ranks
                    .iter()
                    .map(|&rank| pb::MetricsBatch {
                        node_id: agent.id.clone(),
                        job_id: job_id.clone(),
                        rank,
                        attempt: 1,
                        rank_token: token.clone(),
                        samples: vec![pb::MetricSample {
                            step,
                            unix_ms: flamingo_common::unix_ms(),
                            values: [
                                ("loss".to_string(), 2.0),
                                ("step_seconds".to_string(), 1.0),
                                ("samples_per_second".to_string(), 32.0),
                            ]
                            .into(),
                        }],
                        ..Default::default()
                    })
                    .collect();
                let count = batches.len() as u64;
                let sent = agent
                    .client
                    .clone()
                    .report_node_metrics(pb::NodeMetrics {
                        node_id: agent.id.clone(),
                        batches,
                    })
                    .await;
                match sent {
                    Ok(response) => {
                        let refused = u64::from(response.get_ref().refused);
                        observed
                            .metrics_sent
                            .fetch_add(count - refused, Ordering::Relaxed);
                        observed
                            .metrics_failed
                            .fetch_add(refused, Ordering::Relaxed);
                    }
                    Err(_) => {
                        observed.metrics_failed.fetch_add(count, Ordering::Relaxed);
                    }
                };
                step += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent_before = observed.metrics_sent.load(Ordering::Relaxed);
    let measured = Instant::now();
    let (coordinator, etcd) = cores_over(pids, args.metrics_seconds).await;
    let sent = observed.metrics_sent.load(Ordering::Relaxed) - sent_before;
    record(
        "metrics_batches_per_second",
        sent as f64 / measured.elapsed().as_secs_f64(),
    );
    record("metrics_cores_coordinator", coordinator);
    record("metrics_cores_etcd", etcd);
    record("metrics_cores", coordinator + etcd);
    stop.cancel();
    for reporter in reporters {
        let _ = reporter.await;
    }
    record(
        "metrics_failed",
        observed.metrics_failed.load(Ordering::Relaxed) as f64,
    );
    let (db_after, revision_after) = etcd_status(&mut stack.etcd_client).await;
    record("etcd_db_mib", db_after as f64 / 1048576.0);
    record(
        "etcd_db_growth_mib",
        (db_after - db_before) as f64 / 1048576.0,
    );
    record(
        "etcd_writes_per_second",
        (revision_after - revision_before) as f64 / jobs_started.elapsed().as_secs_f64(),
    );
    record(
        "rank_reports_failed",
        observed.rank_reports_failed.load(Ordering::Relaxed) as f64,
    );
    let _ = jobs.stop_job(pb::StopJobRequest { job_id }).await;
    drop(_stop_agents);
    for task in tasks {
        let _ = task.await;
    }
    Ok(figures)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_open_files();
    // One CA for every size (node certificates are kept and reused).
    let pki = tempfile::tempdir()?;
    let mut results = serde_json::Map::new();
    for &nodes in &args.nodes {
        println!(
            "{nodes} nodes × {} slots ({} ranks):",
            args.slots,
            u64::from(nodes) * u64::from(args.slots)
        );
        match measure(&args, nodes, pki.path()).await {
            Ok(figures) => {
                if nodes >= 4096 {
                    for (name, target) in TARGETS {
                        let value = figures.get(*name).and_then(|value| value.as_f64());
                        if let Some(value) = value {
                            let verdict = if value < *target { "holds" } else { "MISSED" };
                            println!("  target {name} < {target}: {value:.3} {verdict}");
                        }
                    }
                }
                results.insert(nodes.to_string(), serde_json::Value::Object(figures));
            }
            Err(error) => {
                println!("  failed: {error:#}; larger sizes skipped");
                results.insert(
                    nodes.to_string(),
                    serde_json::json!({ "failed": error.to_string() }),
                );
                break;
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}
