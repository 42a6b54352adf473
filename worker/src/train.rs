//! `flamingo-worker rank train --config run.json`: one rank of a training
//! run, joining the process group from torchrun's environment. Started by
//! an agent (a `flamingoctl launch` train job) it also talks to the
//! coordinator: step progress from rank 0 (hang detection) and checkpoint
//! commits, and it resumes only from the checkpoint the agent names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig};
use flamingo_engine::job::TrainJob;
use flamingo_engine::run::{ClusterLink, RunEnd, PREEMPTED_EXIT_CODE};
use flamingo_engine::trainer::StepReport;
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

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
    client: NodeServiceClient<Channel>,
    job_id: String,
    node_id: String,
    rank: u32,
    attempt: u32,
    steps: mpsc::Sender<pb::MetricsReport>,
}

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
        let channel = {
            let _entered = runtime.enter();
            Endpoint::from_shared(endpoint.clone())
                .map_err(|error| anyhow::anyhow!("FLAMINGO_JOB_COORDINATOR '{endpoint}': {error}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .connect_lazy()
        };
        let client = NodeServiceClient::new(channel);
        // Step reports go out from a background task; when it falls behind
        // (coordinator down) reports are dropped, never waited for.
        let (steps, mut steps_rx) = mpsc::channel::<pb::MetricsReport>(64);
        let sender = client.clone();
        runtime.spawn(async move {
            while let Some(report) = steps_rx.recv().await {
                let _ = sender.clone().report_metrics(report).await;
            }
        });
        Ok(Some(Self {
            runtime,
            client,
            job_id: var("FLAMINGO_JOB_ID"),
            node_id: var("FLAMINGO_NODE_ID"),
            rank,
            attempt,
            steps,
        }))
    }
}

impl ClusterLink for CoordinatorLink {
    fn attempt(&self) -> u32 {
        self.attempt
    }

    fn step(&self, report: &StepReport) {
        let mut values = std::collections::HashMap::new();
        values.insert("lr".to_string(), report.lr);
        values.insert("grad_norm".to_string(), report.grad_norm);
        if let Some(loss) = report.loss_laion {
            values.insert("loss_laion".to_string(), loss);
        }
        if let Some(loss) = report.loss_mmc4 {
            values.insert("loss_mmc4".to_string(), loss);
        }
        let _dropped_when_full = self.steps.try_send(pb::MetricsReport {
            node_id: self.node_id.clone(),
            job_id: self.job_id.clone(),
            rank: self.rank,
            step: report.step,
            values,
            attempt: self.attempt,
        });
    }

    fn commit(&self, step: u64, dir: &Path, cursor_json: &str) -> anyhow::Result<Vec<PathBuf>> {
        let request = pb::CommitCheckpointRequest {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            step,
            path: dir.display().to_string(),
            data_cursor_json: cursor_json.to_string(),
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
        Some(ProcessGroup::new(&config)?)
    } else {
        None
    };
    let end = flamingo_engine::run::run_rank_with(
        &job,
        group.as_ref(),
        link.as_ref().map(|link| link as &dyn ClusterLink),
    )?;
    if let RunEnd::Preempted { .. } = end {
        std::process::exit(PREEMPTED_EXIT_CODE);
    }
    Ok(())
}
