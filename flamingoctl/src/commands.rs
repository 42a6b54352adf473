//! Job commands against a running coordinator.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_common::jobs::{DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES};
use flamingo_common::{JobEvent, JobKind, JobRecord, JobSpec, JobState};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::client;
use crate::render;

pub struct Session {
    pub address: String,
    pub client: JobServiceClient<Channel>,
}

impl Session {
    pub async fn open(address: &str) -> anyhow::Result<Self> {
        Ok(Self {
            address: address.to_string(),
            client: client::connect(address).await?,
        })
    }

    fn error(&self, status: tonic::Status) -> anyhow::Error {
        client::call_error(&self.address, status)
    }

    /// Every metric report the coordinator stored for the job.
    pub async fn metrics(&mut self, job_id: &str) -> anyhow::Result<Vec<pb::MetricPoint>> {
        Ok(self
            .client
            .job_metrics(pb::JobMetricsRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .points)
    }

    /// The benchmark scores stored with the job (`flamingoctl eval --job`).
    pub async fn evals(&mut self, job_id: &str) -> anyhow::Result<Vec<pb::EvalReport>> {
        Ok(self
            .client
            .job_evals(pb::JobEvalsRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .reports)
    }

    pub async fn job(&mut self, job_id: &str) -> anyhow::Result<JobRecord> {
        let job = self
            .client
            .get_job(pb::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .job
            .context("coordinator answered without a job")?;
        Ok(JobRecord::try_from(job)?)
    }

    pub async fn launch(&mut self, spec: &JobSpec) -> anyhow::Result<JobRecord> {
        let job = self
            .client
            .launch(pb::LaunchRequest {
                spec: Some(pb::JobSpec::from(spec)),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .job
            .context("coordinator answered without a job")?;
        Ok(JobRecord::try_from(job)?)
    }

    pub async fn list(&mut self) -> anyhow::Result<Vec<JobRecord>> {
        let jobs = self
            .client
            .list_jobs(pb::ListJobsRequest {})
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .jobs;
        jobs.into_iter()
            .map(|job| JobRecord::try_from(job).map_err(anyhow::Error::from))
            .collect()
    }

    pub async fn nodes(&mut self) -> anyhow::Result<Vec<pb::Node>> {
        Ok(self
            .client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .nodes)
    }

    /// Stops the job and waits until none of its ranks is alive.
    pub async fn stop(&mut self, job_id: &str) -> anyhow::Result<JobRecord> {
        self.client
            .stop_job(pb::StopJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.job(job_id).await?;
            if job.live_ranks().next().is_none() {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!(
                    "job {job_id} is {} but ranks {:?} are still alive after 60 s",
                    job.state.as_str(),
                    job.live_ranks().map(|rank| rank.rank).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams rank 0's output to stderr once the rank exists, until the
    /// returned task is aborted or the log ends.
    fn follow_rank0(&self, job_id: &str) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let job_id = job_id.to_string();
        tokio::spawn(async move {
            loop {
                let request = pb::JobLogsRequest {
                    job_id: job_id.clone(),
                    rank: 0,
                    follow: true,
                };
                if let Ok(response) = client.job_logs(request).await {
                    let mut stream = response.into_inner();
                    let mut stderr = std::io::stderr();
                    while let Ok(Some(chunk)) = stream.message().await {
                        let _ = stderr.write_all(&chunk.data);
                    }
                    return;
                }
                // Not scheduled or not started yet.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    }

    /// Follows the job's events until it ends; prints them to stderr when
    /// `progress` is set, and rank 0's output too when `follow` is.
    pub async fn wait(
        &mut self,
        job_id: &str,
        progress: bool,
        follow: bool,
    ) -> anyhow::Result<JobRecord> {
        let follower = follow.then(|| self.follow_rank0(job_id));
        let result = self.wait_events(job_id, progress).await;
        if let Some(follower) = follower {
            // Let the last lines of the log arrive, then stop following.
            let _ = tokio::time::timeout(Duration::from_secs(2), follower).await;
        }
        result
    }

    async fn wait_events(&mut self, job_id: &str, progress: bool) -> anyhow::Result<JobRecord> {
        let mut stream = self
            .client
            .watch_job(pb::WatchJobRequest {
                job_id: job_id.to_string(),
                from_seq: 0,
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner();
        let started = Instant::now();
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    let event = JobEvent::try_from(event)?;
                    if progress {
                        eprintln!(
                            "[{:>6.1}s] {:<9} {}",
                            started.elapsed().as_secs_f64(),
                            event.state.as_str(),
                            event.message
                        );
                    }
                    if event.state.is_terminal() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => return Err(self.error(status)),
            }
        }
        // Let the ranks' exit reports land so the record is complete.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.job(job_id).await?;
            if job.state.is_terminal()
                && (job.live_ranks().next().is_none() || Instant::now() > deadline)
            {
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Copies the rank's log to stdout; with `json`, one object per chunk:
    /// `{"job": …, "rank": …, "text": …}`.
    pub async fn logs(
        &mut self,
        job_id: &str,
        rank: u32,
        follow: bool,
        json: bool,
    ) -> anyhow::Result<()> {
        let mut stream = self
            .client
            .job_logs(pb::JobLogsRequest {
                job_id: job_id.to_string(),
                rank,
                follow,
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner();
        let mut stdout = std::io::stdout().lock();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|status| self.error(status))?
        {
            if json {
                let line = serde_json::json!({
                    "job": job_id,
                    "rank": rank,
                    "text": String::from_utf8_lossy(&chunk.data),
                });
                writeln!(stdout, "{line}")?;
            } else {
                stdout.write_all(&chunk.data)?;
            }
            stdout.flush()?;
        }
        Ok(())
    }
}

/// Builds a job spec from `launch`'s flags.
pub struct LaunchArgs {
    pub nodes: u32,
    /// Elastic jobs: the fewest nodes (0: `nodes`).
    pub min_nodes: u32,
    pub slots_per_node: u32,
    pub job: Option<String>,
    pub name: Option<String>,
    pub env: Vec<String>,
    pub min_bytes: Option<u64>,
    pub max_bytes: Option<u64>,
    pub backend: Option<String>,
    pub argv: Vec<String>,
    /// A resolved training run (the job is then `train`).
    pub train: Option<flamingo_engine::job::TrainJob>,
    pub policy: flamingo_common::JobPolicy,
}

/// `--nodes N` or `--nodes MIN:MAX` → (min, max).
pub fn parse_nodes(text: &str) -> Result<(u32, u32), String> {
    let number = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|_| format!("'{text}': expected N or MIN:MAX (whole numbers of nodes)"))
    };
    let (min, max) = match text.split_once(':') {
        Some((min, max)) => (number(min)?, number(max)?),
        None => (number(text)?, number(text)?),
    };
    // A single 0 is left to the spec's check ("nodes: must be at least 1").
    if text.contains(':') && (min == 0 || min > max) {
        return Err(format!("'{text}': need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

pub fn spec_from(args: LaunchArgs) -> anyhow::Result<JobSpec> {
    let mut env = BTreeMap::new();
    if args.train.is_some() {
        if !args.argv.is_empty() {
            bail!("a train job takes no command after `--`");
        }
        // Ranks share the node's cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        env.insert(
            "OMP_NUM_THREADS".to_string(),
            (cores / args.slots_per_node.max(1)).max(1).to_string(),
        );
    }
    let kind = match (&args.train, args.job.as_deref(), args.argv.is_empty()) {
        (Some(job), _, _) => JobKind::Train {
            config_json: serde_json::to_string(job)?,
        },
        (None, Some("train"), _) => {
            bail!("--job train needs a run: give --config job.toml and/or --model and shards")
        }
        (None, Some("collective-check"), true) => JobKind::CollectiveCheck {
            min_bytes: args.min_bytes.unwrap_or(DEFAULT_MIN_BYTES),
            max_bytes: args.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
            backend: args.backend,
        },
        (None, Some("collective-check"), false) => {
            bail!("--job collective-check takes no command after `--`")
        }
        (None, Some("command") | None, false) => JobKind::Command { argv: args.argv },
        (None, Some("command") | None, true) => {
            bail!("nothing to run: give --job collective-check, or a command after `--` (e.g. -- python train.py)")
        }
        (None, Some(other), _) => {
            bail!(
                "--job '{other}' is not a known job kind (known: train, eval, collective-check, command)"
            )
        }
    };
    for pair in args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env '{pair}': expected KEY=VALUE"))?;
        env.insert(key.to_string(), value.to_string());
    }
    let spec = JobSpec {
        name: args.name.unwrap_or_default(),
        nodes: args.nodes,
        slots_per_node: args.slots_per_node,
        min_nodes: args.min_nodes,
        kind,
        env,
        policy: args.policy,
    };
    spec.validate()?;
    Ok(spec)
}

pub fn print_job(job: &JobRecord, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&render::job_json(job))?);
    } else {
        print!("{}", render::job_text(job));
    }
    Ok(())
}

/// Exit status for a finished job: 0 only when it succeeded.
pub fn exit_code_for(job: &JobRecord) -> i32 {
    match job.state {
        JobState::Succeeded => 0,
        _ => 1,
    }
}

/// The checkpoint folder `run` names at `step` (default: the latest
/// committed one): `run` is a run folder, a checkpoint folder, or a cluster
/// job id whose checkpoints the coordinator knows.
pub async fn resolve_checkpoint(
    address: &str,
    run: &std::path::Path,
    step: Option<u64>,
) -> anyhow::Result<std::path::PathBuf> {
    // Not a folder here: a job id whose checkpoints etcd knows.
    let run = if run.exists() {
        run.to_path_buf()
    } else {
        let mut session = Session::open(address).await?;
        let job = session.job(&run.display().to_string()).await?;
        let checkpoint = match step {
            Some(step) => job.checkpoints.iter().find(|c| c.step == step),
            None => job.latest_checkpoint(),
        }
        .ok_or_else(|| {
            anyhow::anyhow!(
                "job {}: no committed checkpoint{} (see flamingoctl checkpoints {})",
                job.id,
                step.map_or(String::new(), |step| format!(" at step {step}")),
                job.id
            )
        })?;
        std::path::PathBuf::from(&checkpoint.path)
    };
    let step = step.filter(|_| !run.join("manifest.json").exists());
    Ok(match step {
        Some(step) => {
            let dir = flamingo_engine::checkpoint::checkpoint_dir(&run, step);
            if !dir.join("manifest.json").exists() {
                let committed: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
                    .map(|entries| {
                        let mut names: Vec<String> = entries
                            .filter_map(|entry| entry.ok())
                            .map(|entry| entry.file_name().to_string_lossy().into_owned())
                            .filter(|name| name.starts_with("step-"))
                            .collect();
                        names.sort();
                        names
                    })
                    .unwrap_or_default();
                bail!(
                    "{}: no checkpoint at step {step} (there: {})",
                    run.display(),
                    if committed.is_empty() {
                        "none".to_string()
                    } else {
                        committed.join(", ")
                    }
                );
            }
            dir
        }
        None if run.join("manifest.json").exists() => run.clone(),
        None => flamingo_engine::checkpoint::latest(&run)
            .ok_or_else(|| anyhow::anyhow!("{}: no committed checkpoint", run.display()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(job: Option<&str>, argv: &[&str]) -> LaunchArgs {
        LaunchArgs {
            nodes: 2,
            min_nodes: 0,
            slots_per_node: 2,
            job: job.map(String::from),
            name: None,
            env: vec!["A=1".into()],
            min_bytes: None,
            max_bytes: Some(1 << 20),
            backend: None,
            argv: argv.iter().map(|text| text.to_string()).collect(),
            train: None,
            policy: flamingo_common::JobPolicy::default(),
        }
    }

    #[test]
    fn launch_flags_pick_the_job_kind() {
        let check = spec_from(args(Some("collective-check"), &[])).expect("check spec");
        assert!(matches!(
            check.kind,
            JobKind::CollectiveCheck {
                max_bytes: 1048576,
                ..
            }
        ));
        assert_eq!(check.env.get("A").map(String::as_str), Some("1"));
        let command = spec_from(args(None, &["sh", "-c", "true"])).expect("command spec");
        assert_eq!(
            command.kind,
            JobKind::Command {
                argv: vec!["sh".into(), "-c".into(), "true".into()]
            }
        );
        assert!(spec_from(args(None, &[]))
            .unwrap_err()
            .to_string()
            .contains("nothing to run"));
        assert!(spec_from(args(Some("train"), &[]))
            .unwrap_err()
            .to_string()
            .contains("needs a run"));
        assert!(spec_from(args(Some("bake"), &[]))
            .unwrap_err()
            .to_string()
            .contains("not a known job kind"));
        let mut train = args(None, &[]);
        train.train = Some(flamingo_engine::job::TrainJob::default());
        let spec = spec_from(train).expect("train spec");
        let JobKind::Train { config_json } = &spec.kind else {
            panic!("not a train job: {spec:?}");
        };
        let job: flamingo_engine::job::TrainJob =
            serde_json::from_str(config_json).expect("the run travels as JSON");
        assert_eq!(job, flamingo_engine::job::TrainJob::default());
        assert!(spec.env.contains_key("OMP_NUM_THREADS"));
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn nodes_take_one_number_or_a_range() {
        assert_eq!(parse_nodes("4"), Ok((4, 4)));
        assert_eq!(parse_nodes("2:8"), Ok((2, 8)));
        assert!(parse_nodes("3:2").unwrap_err().contains("MIN <= MAX"));
        assert!(parse_nodes("0:2").unwrap_err().contains("MIN <= MAX"));
        assert!(parse_nodes("two").unwrap_err().contains("N or MIN:MAX"));
        let mut elastic = args(None, &["true"]);
        elastic.min_nodes = 1;
        assert!(spec_from(elastic)
            .unwrap_err()
            .to_string()
            .contains("only training jobs"));
    }
}
