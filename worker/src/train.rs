//! `flamingo-worker rank train --config run.json`: one rank of a training
//! run, joining the process group from torchrun's environment. Started by
//! an agent (a `flamingoctl launch` train job) it also talks to the
//! coordinator: step progress from rank 0 (hang detection) and checkpoint
//! commits, and it resumes only from the checkpoint the agent names.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig};
use flamingo_common::train::TrainJob;
use flamingo_engine::run::{ClusterLink, RunEnd, PREEMPTED_EXIT_CODE};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::agent_service_client::AgentServiceClient;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The resolved run configuration (JSON, as `flamingoctl train` writes it).
    #[arg(long)]
    pub config: PathBuf,
}

/// How long a checkpoint commit keeps retrying while the coordinator (or
/// its etcd) is unreachable before the rank gives up.
const COMMIT_PATIENCE: Duration = Duration::from_secs(300);

/// The coordinator, as seen from one rank of one attempt.
struct CoordinatorLink {
    runtime: tokio::runtime::Runtime,
    client: NodeServiceClient<flamingo_security::Failover>,
    job_id: String,
    attempt: u32,
    /// The attempt's credential (`FLAMINGO_RANK_TOKEN`).
    token: String,
    reports: mpsc::Sender<Report>,
    sender: tokio::task::JoinHandle<()>,
    /// Reports that found the queue full (the coordinator is slow or
    /// down): counted and told to the coordinator with the next batch.
    dropped: Arc<AtomicU64>,
    /// Older committed checkpoints, newest first
    /// (`FLAMINGO_RESUME_FALLBACKS`, one per line).
    fallbacks: Vec<PathBuf>,
}

enum Report {
    Step(pb::MetricSample),
    Note(pb::RankNote),
    Example(pb::SkipExample),
}

/// Where a rank's metrics batches go: its node's agent, or the coordinator.
enum MetricsSink {
    Agent(AgentServiceClient<Channel>),
    Coordinator(NodeServiceClient<flamingo_security::Failover>),
}

impl MetricsSink {
    async fn send(&self, batch: pb::MetricsBatch) -> Result<(), tonic::Status> {
        match self {
            MetricsSink::Agent(client) => client.clone().report_metrics_batch(batch).await?,
            MetricsSink::Coordinator(client) => client.clone().report_metrics_batch(batch).await?,
        };
        Ok(())
    }
}

/// Reports queued at most (about a minute of steps at 10 per second).
const REPORT_QUEUE: usize = 512;
/// How often queued reports go out, as one batch.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

impl CoordinatorLink {
    fn from_env(rank: u32) -> anyhow::Result<Option<Self>> {
        let Ok(endpoint) = std::env::var("FLAMINGO_JOB_COORDINATOR") else {
            return Ok(None);
        };
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let attempt = var("FLAMINGO_ATTEMPT").parse().unwrap_or(0);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let tls = flamingo_security::client_tls_from_env()?;
        let token = var(flamingo_security::ENV_RANK_TOKEN);
        let channel = {
            let _entered = runtime.enter();
            flamingo_security::Failover::new(
                &endpoint,
                tls.as_ref(),
                flamingo_security::COORDINATOR_NAME,
                Duration::from_secs(2),
                Some(Duration::from_secs(10)),
            )
            .map_err(|error| anyhow::anyhow!("FLAMINGO_JOB_COORDINATOR '{endpoint}': {error}"))?
        };
        let client = NodeServiceClient::new(channel);
        // Batches go to this node's agent, which sends its node's batches
        // to the coordinator together; straight to the coordinator when no
        // agent started the rank.
        let sink = match std::env::var("FLAMINGO_AGENT_ENDPOINT") {
            Ok(agent) if !agent.is_empty() => {
                let _entered = runtime.enter();
                let channel = flamingo_security::endpoint(
                    &agent,
                    tls.as_ref(),
                    flamingo_security::AGENT_NAME,
                )
                .map_err(|error| anyhow::anyhow!("FLAMINGO_AGENT_ENDPOINT '{agent}': {error}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .connect_lazy();
                MetricsSink::Agent(AgentServiceClient::new(channel))
            }
            _ => MetricsSink::Coordinator(client.clone()),
        };
        // Reports go out in batches from a background task; a step only
        // ever does a non-blocking send into a bounded queue.
        let (reports, reports_rx) = mpsc::channel::<Report>(REPORT_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let template = pb::MetricsBatch {
            node_id: var("FLAMINGO_NODE_ID"),
            job_id: var("FLAMINGO_JOB_ID"),
            rank,
            attempt,
            rank_token: token.clone(),
            skip_examples: Vec::new(),
            ..pb::MetricsBatch::default()
        };
        let sender = runtime.spawn(send_batches(sink, template, reports_rx, dropped.clone()));
        let fallbacks = var("FLAMINGO_RESUME_FALLBACKS")
            .lines()
            .filter(|line| !line.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Some(Self {
            fallbacks,
            runtime,
            client,
            job_id: var("FLAMINGO_JOB_ID"),
            attempt,
            token,
            reports,
            sender,
            dropped,
        }))
    }

    /// Sends what is still queued (waiting a few seconds at most).
    fn finish(self) {
        let Self {
            runtime,
            reports,
            sender,
            ..
        } = self;
        drop(reports);
        runtime.block_on(async move {
            let _late_reports_are_dropped =
                tokio::time::timeout(Duration::from_secs(3), sender).await;
        });
    }

    fn send(&self, report: Report) {
        if self.reports.try_send(report).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends what the queue holds about once a second. A batch the
/// coordinator did not take is dropped and counted (the next one may get
/// through), so a down coordinator costs memory for one queue, no more.
async fn send_batches(
    sink: MetricsSink,
    template: pb::MetricsBatch,
    mut reports: mpsc::Receiver<Report>,
    dropped: Arc<AtomicU64>,
) {
    let mut open = true;
    while open {
        let deadline = tokio::time::Instant::now() + REPORT_INTERVAL;
        let mut batch = template.clone();
        loop {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(Report::Step(sample))) => batch.samples.push(sample),
                Ok(Some(Report::Note(note))) => batch.notes.push(note),
                Ok(Some(Report::Example(example))) => batch.skip_examples.push(example),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_elapsed) => break,
            }
        }
        if batch.samples.is_empty() && batch.notes.is_empty() && batch.skip_examples.is_empty() {
            continue;
        }
        let count = batch.samples.len() as u64;
        batch.dropped = dropped.load(Ordering::Relaxed);
        if sink.send(batch).await.is_err() {
            dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}

impl ClusterLink for CoordinatorLink {
    fn attempt(&self) -> u32 {
        self.attempt
    }

    fn fallback_checkpoints(&self) -> Vec<PathBuf> {
        self.fallbacks.clone()
    }

    fn step(&self, step: u64, values: &[(&'static str, f64)]) {
        self.send(Report::Step(pb::MetricSample {
            step,
            unix_ms: flamingo_common::unix_ms(),
            values: values
                .iter()
                .map(|(name, value)| (name.to_string(), *value))
                .collect(),
        }));
    }

    fn note(&self, step: u64, kind: &'static str, message: String) {
        self.send(Report::Note(pb::RankNote {
            step,
            unix_ms: flamingo_common::unix_ms(),
            kind: kind.to_string(),
            message,
        }));
    }

    fn skip_example(&self, step: u64, dataset: &str, skipped: &flamingo_data::sample::Skipped) {
        self.send(Report::Example(pb::SkipExample {
            step,
            dataset: dataset.to_string(),
            reason: skipped.reject.reason.as_str().to_string(),
            shard: skipped.shard.clone(),
            key: skipped.key.clone(),
            detail: skipped.reject.detail.clone(),
        }));
    }

    fn commit(&self, step: u64, dir: &Path, cursor_json: &str) -> anyhow::Result<Vec<PathBuf>> {
        let request = pb::CommitCheckpointRequest {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            step,
            path: dir.display().to_string(),
            data_cursor_json: cursor_json.to_string(),
            rank_token: self.token.clone(),
        };
        let client = self.client.clone();
        self.runtime.block_on(async move {
            let started = tokio::time::Instant::now();
            let mut delay = Duration::from_millis(100);
            loop {
                match client.clone().commit_checkpoint(request.clone()).await {
                    Ok(response) => {
                        return Ok(response
                            .into_inner()
                            .retired_paths
                            .into_iter()
                            .map(PathBuf::from)
                            .collect())
                    }
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::FailedPrecondition
                                | tonic::Code::NotFound
                                | tonic::Code::InvalidArgument
                        ) =>
                    {
                        anyhow::bail!(
                            "the coordinator refused checkpoint step {step}: {}",
                            status.message()
                        )
                    }
                    Err(status) if started.elapsed() > COMMIT_PATIENCE => anyhow::bail!(
                        "could not commit checkpoint step {step} within {COMMIT_PATIENCE:?}: {}",
                        status.message()
                    ),
                    Err(status) => {
                        tracing::warn!(step, code = ?status.code(), message = status.message(), "checkpoint commit not delivered; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        })
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", args.config.display()))?;
    let mut job: TrainJob = serde_json::from_str(&text)
        .map_err(|error| anyhow::anyhow!("{}: {error}", args.config.display()))?;
    let world: i64 = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let rank: u32 = std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let link = CoordinatorLink::from_env(rank)?;
    if link.is_some() {
        // The committed checkpoint the agent names; none (a first start, or
        // nothing committed yet) keeps the run's own `resume_from_checkpoint`.
        if let Ok(path) = std::env::var("FLAMINGO_RESUME_FROM") {
            if !path.is_empty() {
                job.resume_from_checkpoint = Some(PathBuf::from(path));
            }
        }
    }
    let group = if world > 1 {
        let config = ProcessGroupConfig::from_env(Backend::Gloo, Duration::from_secs(300))?;
        let span = tracing::info_span!("rendezvous", rank = config.rank, world = config.world_size);
        Some(span.in_scope(|| ProcessGroup::new(&config))?)
    } else {
        None
    };
    let end = flamingo_engine::run::run_rank_with(
        &job,
        group.as_ref(),
        link.as_ref().map(|link| link as &dyn ClusterLink),
    );
    if let Some(link) = link {
        link.finish();
    }
    if let RunEnd::Preempted { .. } = end? {
        std::process::exit(PREEMPTED_EXIT_CODE);
    }
    Ok(())
}
