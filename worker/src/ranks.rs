//! Rank processes on this node: started with torchrun's environment in their
//! own process group (so a stop kills the rank and everything it spawned),
//! stdout and stderr captured to a per-rank log, exits reported upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flamingo_common::ranks::{RankEnv, Tie};
use flamingo_common::{JobId, JobKind, JobSpec};
use flamingo_proto::v1 as pb;
use tokio::sync::mpsc;

/// Identifies one rank of one attempt of one job: (job, attempt, rank).
pub type RankKey = (JobId, u32, u32);

/// Where rank logs and result files live: `<state dir>/jobs/<job>/rank-<r>.log`.
pub fn log_path(state_dir: &Path, job_id: &JobId, rank: u32) -> PathBuf {
    state_dir
        .join("jobs")
        .join(job_id.as_str())
        .join(format!("rank-{rank}.log"))
}

fn result_path(state_dir: &Path, job_id: &JobId, rank: u32) -> PathBuf {
    state_dir
        .join("jobs")
        .join(job_id.as_str())
        .join(format!("rank-{rank}.result.json"))
}

#[derive(Debug)]
struct RunningRank {
    pid: u32,
    /// A training rank: SIGTERM makes it checkpoint and exit (preemption).
    preemptible: bool,
}

#[derive(Debug, Default)]
struct Table {
    running: BTreeMap<RankKey, RunningRank>,
    /// Every rank ever started here, so a re-sent start is ignored.
    launched: BTreeSet<RankKey>,
    /// Jobs told to stop, with the first attempt still allowed to run
    /// (`u32::MAX`: none): a late start for a stopped attempt is ignored.
    stopped: BTreeMap<JobId, u32>,
    /// Rank exits by outcome (`succeeded`, `failed`, `killed`, `preempted`).
    exits: BTreeMap<&'static str, u64>,
}

/// Supervises this node's rank processes.
#[derive(Clone)]
pub struct Ranks {
    state_dir: PathBuf,
    node_address: String,
    node_id: String,
    coordinator: String,
    worker_exe: PathBuf,
    kill_grace: Duration,
    /// `FLAMINGO_TLS_*` for the ranks (the node's own certificate).
    tls_env: Vec<(&'static str, PathBuf)>,
    /// `FLAMINGO_DATA_SERVICE` for the ranks: the node's replica first.
    data_service: Option<String>,
    table: Arc<Mutex<Table>>,
    report_keys_tx: mpsc::UnboundedSender<(RankKey, pb::rank_report::Event)>,
    /// The agent's own service, where ranks hand in their metrics
    /// (`FLAMINGO_AGENT_ENDPOINT`); set once it listens.
    agent_endpoint: Arc<std::sync::OnceLock<String>>,
}

impl Ranks {
    pub fn new(
        state_dir: PathBuf,
        node_address: String,
        node_id: String,
        coordinator: String,
        kill_grace: Duration,
        report_keys_tx: mpsc::UnboundedSender<(RankKey, pb::rank_report::Event)>,
        tls: flamingo_security::TlsFiles,
    ) -> anyhow::Result<Self> {
        let worker_exe = std::env::current_exe()?;
        Ok(Self {
            state_dir,
            node_address,
            node_id,
            coordinator,
            worker_exe,
            kill_grace,
            tls_env: tls.env(),
            data_service: None,
            table: Arc::new(Mutex::new(Table::default())),
            report_keys_tx,
            agent_endpoint: Arc::default(),
        })
    }

    /// The node's data-service replicas for its ranks (`--data-service`).
    pub fn with_data_service(mut self, replicas: Option<String>) -> Self {
        self.data_service = replicas;
        self
    }

    /// Where this node's ranks send their metrics (the agent's service).
    pub fn set_agent_endpoint(&self, endpoint: &str) {
        let _ = self.agent_endpoint.set(endpoint.to_string());
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .expect("rank table lock is never poisoned")
    }

    /// This node's rank processes in Prometheus' text format.
    pub fn prometheus_text(&self, node_id: &str, slots: u32, draining: bool) -> String {
        use flamingo_common::prometheus::{family, sample};
        let table = self.table();
        let node = ("node", node_id);
        let mut out = String::new();
        family(
            &mut out,
            "flamingo_agent_slots",
            "gauge",
            "Rank slots of this node.",
        );
        sample(&mut out, "flamingo_agent_slots", &[node], f64::from(slots));
        family(
            &mut out,
            "flamingo_agent_draining",
            "gauge",
            "Whether the node is draining (SIGTERM received).",
        );
        sample(
            &mut out,
            "flamingo_agent_draining",
            &[node],
            f64::from(u8::from(draining)),
        );
        family(
            &mut out,
            "flamingo_agent_ranks_running",
            "gauge",
            "Rank processes running on this node.",
        );
        sample(
            &mut out,
            "flamingo_agent_ranks_running",
            &[node],
            table.running.len() as f64,
        );
        family(
            &mut out,
            "flamingo_agent_rank_running",
            "gauge",
            "One per running rank process.",
        );
        for ((job, attempt, rank), process) in &table.running {
            let (attempt, rank, pid) = (
                attempt.to_string(),
                rank.to_string(),
                process.pid.to_string(),
            );
            let labels = [
                node,
                ("job", job.as_str()),
                ("attempt", attempt.as_str()),
                ("rank", rank.as_str()),
                ("pid", pid.as_str()),
            ];
            sample(&mut out, "flamingo_agent_rank_running", &labels, 1.0);
        }
        family(
            &mut out,
            "flamingo_agent_rank_starts_total",
            "counter",
            "Rank processes started on this node.",
        );
        sample(
            &mut out,
            "flamingo_agent_rank_starts_total",
            &[node],
            table.launched.len() as f64,
        );
        family(
            &mut out,
            "flamingo_agent_rank_exits_total",
            "counter",
            "Rank process exits by outcome.",
        );
        for outcome in ["succeeded", "failed", "killed", "preempted"] {
            let count = table.exits.get(outcome).copied().unwrap_or(0);
            sample(
                &mut out,
                "flamingo_agent_rank_exits_total",
                &[node, ("outcome", outcome)],
                count as f64,
            );
        }
        out
    }

    pub fn running(&self) -> Vec<RankKey> {
        self.table().running.keys().cloned().collect()
    }

    /// Whether any attempt of this rank of the job runs here.
    pub fn is_running(&self, job_id: &JobId, rank: u32) -> bool {
        self.table()
            .running
            .keys()
            .any(|key| &key.0 == job_id && key.2 == rank)
    }

    fn report(&self, key: RankKey, event: pb::rank_report::Event) {
        let _ = self.report_keys_tx.send((key, event));
    }

    fn command_for(
        &self,
        spec: &JobSpec,
        job_id: &JobId,
        attempt: u32,
    ) -> anyhow::Result<(PathBuf, Vec<String>)> {
        Ok(match &spec.kind {
            JobKind::CollectiveCheck {
                min_bytes,
                max_bytes,
                backend,
            } => {
                let mut args = vec![
                    "rank".to_string(),
                    "collective-check".to_string(),
                    format!("--min-bytes={min_bytes}"),
                    format!("--max-bytes={max_bytes}"),
                ];
                if let Some(name) = backend {
                    args.push(format!("--backend={name}"));
                }
                (self.worker_exe.clone(), args)
            }
            JobKind::Command { argv } => (PathBuf::from(&argv[0]), argv[1..].to_vec()),
            JobKind::Train { config_json } => {
                let path = self
                    .state_dir
                    .join("jobs")
                    .join(job_id.as_str())
                    .join(format!("train-attempt-{attempt}.json"));
                std::fs::write(&path, config_json)
                    .map_err(|error| anyhow::anyhow!("writing {}: {error}", path.display()))?;
                (
                    self.worker_exe.clone(),
                    vec![
                        "rank".to_string(),
                        "train".to_string(),
                        "--config".to_string(),
                        path.display().to_string(),
                    ],
                )
            }
        })
    }

    /// Starts the ranks of an assignment that are not yet started here.
    pub fn start(&self, assignment: &pb::RankAssignment) {
        let job_id = JobId(assignment.job_id.clone());
        let key = (job_id.clone(), assignment.attempt, assignment.rank);
        {
            let mut table = self.table();
            let stopped = table
                .stopped
                .get(&job_id)
                .is_some_and(|first_allowed| assignment.attempt < *first_allowed);
            if table.launched.contains(&key) || stopped {
                return;
            }
            // A newer attempt supersedes whatever this node still runs of
            // an older one.
            let older: Vec<u32> = table
                .running
                .iter()
                .filter(|(running, _)| running.0 == job_id && running.1 < assignment.attempt)
                .map(|(_, rank)| rank.pid)
                .collect();
            if !older.is_empty() {
                self.signal_groups(&older, libc::SIGKILL);
            }
            table.launched.insert(key.clone());
        }
        let spec = match assignment.spec.clone().map(JobSpec::try_from).transpose() {
            Ok(Some(spec)) => spec,
            Ok(None) => {
                return self.report(
                    key,
                    pb::rank_report::Event::FailedToStart(pb::RankFailedToStart {
                        message: "assignment carries no job spec".into(),
                    }),
                )
            }
            Err(error) => {
                return self.report(
                    key,
                    pb::rank_report::Event::FailedToStart(pb::RankFailedToStart {
                        message: error.to_string(),
                    }),
                )
            }
        };
        match self.spawn(assignment, &job_id, &spec) {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                let preemptible = spec.kind.restartable();
                self.table()
                    .running
                    .insert(key.clone(), RunningRank { pid, preemptible });
                tracing::info!(job = %job_id, rank = assignment.rank, pid, "rank started");
                self.report(
                    key.clone(),
                    pb::rank_report::Event::Started(pb::RankStarted { pid }),
                );
                let ranks = self.clone();
                tokio::spawn(async move { ranks.supervise(key, child).await });
            }
            Err(error) => {
                tracing::warn!(job = %job_id, rank = assignment.rank, %error, "rank failed to start");
                self.report(
                    key,
                    pb::rank_report::Event::FailedToStart(pb::RankFailedToStart {
                        message: error.to_string(),
                    }),
                );
            }
        }
    }

    fn spawn(
        &self,
        assignment: &pb::RankAssignment,
        job_id: &JobId,
        spec: &JobSpec,
    ) -> anyhow::Result<tokio::process::Child> {
        let log = log_path(&self.state_dir, job_id, assignment.rank);
        let job_dir = log.parent().expect("log path has a parent");
        std::fs::create_dir_all(job_dir)
            .map_err(|error| anyhow::anyhow!("creating {}: {error}", job_dir.display()))?;
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|error| anyhow::anyhow!("opening {}: {error}", log.display()))?;
        let result_file = result_path(&self.state_dir, job_id, assignment.rank);
        let _ = std::fs::remove_file(&result_file);
        // The master port must be bindable on the node hosting rank 0.
        if assignment.rank == 0 {
            std::net::TcpListener::bind((self.node_address.as_str(), assignment.master_port as u16))
                .map_err(|error| {
                    anyhow::anyhow!(
                        "master port {}:{} is not free ({error}); free it or give the agent another --rendezvous-ports range",
                        self.node_address,
                        assignment.master_port
                    )
                })?;
        }
        let (program, args) = self.command_for(spec, job_id, assignment.attempt)?;
        let mut command = std::process::Command::new(&program);
        command.args(&args);
        if let Some(replicas) = &self.data_service {
            // The node's replica (a job's own `--data_service`, or its
            // environment, still wins).
            command.env("FLAMINGO_DATA_SERVICE", replicas);
        }
        command.envs(&spec.env);
        RankEnv {
            rank: assignment.rank,
            world_size: assignment.world_size,
            local_rank: assignment.local_rank,
            local_world_size: assignment.local_world_size,
            group_rank: assignment.node_rank,
            master_addr: assignment.master_addr.clone(),
            master_port: assignment.master_port as u16,
            local_addr: self.node_address.clone(),
        }
        .apply(&mut command)
        .env("FLAMINGO_JOB_ID", job_id.as_str())
        .env("FLAMINGO_RESULT_FILE", &result_file)
        .env("FLAMINGO_ATTEMPT", assignment.attempt.to_string())
        .env("FLAMINGO_RESUME_FROM", &assignment.resume_from)
        .env(
            "FLAMINGO_RESUME_FALLBACKS",
            assignment.fallback_checkpoints.join("\n"),
        )
        .env("FLAMINGO_JOB_COORDINATOR", &self.coordinator)
        .env(
            "FLAMINGO_AGENT_ENDPOINT",
            self.agent_endpoint.get().map_or("", String::as_str),
        )
        .env("FLAMINGO_NODE_ID", &self.node_id)
        // The node's certificate and the attempt's credential: ranks reach
        // the coordinator and the data service with them.
        .envs(self.tls_env.iter().map(|(name, path)| (*name, path)))
        .env(flamingo_security::ENV_RANK_TOKEN, &assignment.rank_token)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
        // Own process group (a stop kills the rank and its children); if the
        // agent dies, even by SIGKILL, its ranks die with it.
        Tie::RANK.apply(&mut command);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(false)
            .spawn()
            .map_err(|error| anyhow::anyhow!("cannot run {}: {error}", program.display()))?;
        Ok(child)
    }

    async fn supervise(&self, key: RankKey, mut child: tokio::process::Child) {
        let status = child.wait().await;
        let (exit_code, signal) = match status {
            Ok(status) => (status.code().unwrap_or(-1), status.signal().unwrap_or(0)),
            Err(error) => {
                tracing::warn!(%error, "waiting for rank failed");
                (-1, 0)
            }
        };
        let result_json = std::fs::read_to_string(result_path(&self.state_dir, &key.0, key.2))
            .unwrap_or_default();
        {
            let mut table = self.table();
            table.running.remove(&key);
            let outcome = match (exit_code, signal) {
                (_, signal) if signal != 0 => "killed",
                (0, _) => "succeeded",
                (flamingo_common::jobs::PREEMPTED_EXIT_CODE, _) => "preempted",
                _ => "failed",
            };
            *table.exits.entry(outcome).or_default() += 1;
        }
        tracing::info!(job = %key.0, attempt = key.1, rank = key.2, exit_code, signal, "rank exited");
        self.report(
            key,
            pb::rank_report::Event::Exited(pb::RankExited {
                exit_code,
                signal,
                result_json,
            }),
        );
    }

    /// Kills the job's ranks of attempts before `before_attempt` (0: all
    /// of them): SIGKILL at once when `kill_now` (a restart: the group is
    /// being replaced), else SIGTERM to each process group and SIGKILL
    /// after `grace` (the agent's kill grace when `None`; longer when the
    /// ranks are to checkpoint first).
    pub fn stop_job(
        &self,
        job_id: &JobId,
        before_attempt: u32,
        kill_now: bool,
        grace: Option<Duration>,
        reason: &str,
    ) {
        let limit = if before_attempt == 0 {
            u32::MAX
        } else {
            before_attempt
        };
        let pids: Vec<u32> = {
            let mut table = self.table();
            let first_allowed = table.stopped.entry(job_id.clone()).or_insert(0);
            *first_allowed = (*first_allowed).max(limit);
            table
                .running
                .iter()
                .filter(|(key, _)| &key.0 == job_id && key.1 < limit)
                .map(|(_, rank)| rank.pid)
                .collect()
        };
        if pids.is_empty() {
            return;
        }
        tracing::info!(job = %job_id, ?pids, "stopping ranks: {reason}");
        if kill_now {
            self.signal_groups(&pids, libc::SIGKILL);
            return;
        }
        self.signal_groups(&pids, libc::SIGTERM);
        let ranks = self.clone();
        let job_id = job_id.clone();
        let grace = grace.unwrap_or(self.kill_grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let remaining: Vec<u32> = ranks
                .table()
                .running
                .iter()
                .filter(|(key, _)| key.0 == job_id && key.1 < limit)
                .map(|(_, rank)| rank.pid)
                .collect();
            ranks.signal_groups(&remaining, libc::SIGKILL);
        });
    }

    /// Preemption notice (the agent drains): SIGTERM to every training
    /// rank, which checkpoints at its next step and exits for a requeue.
    /// Other ranks are left to finish within the drain timeout.
    pub fn preempt_all(&self) {
        let pids: Vec<u32> = self
            .table()
            .running
            .values()
            .filter(|rank| rank.preemptible)
            .map(|rank| rank.pid)
            .collect();
        if !pids.is_empty() {
            tracing::info!(
                ?pids,
                "draining: asking training ranks to checkpoint and exit"
            );
            self.signal_groups(&pids, libc::SIGTERM);
        }
    }

    /// Kills every rank on the node (drain timeout, shutdown).
    pub fn stop_all(&self, reason: &str) {
        let jobs: BTreeSet<JobId> = self
            .table()
            .running
            .keys()
            .map(|key| key.0.clone())
            .collect();
        for job_id in jobs {
            self.stop_job(&job_id, 0, false, None, reason);
        }
    }

    /// Kills every rank on the node at once because the node lost the
    /// coordinator for longer than its lease (the coordinator has declared
    /// the node lost and restarts its jobs elsewhere). Unlike a stop, later
    /// attempts of the same jobs may still start here once the node is back.
    pub fn fence(&self, reason: &str) -> usize {
        let pids: Vec<u32> = self.table().running.values().map(|rank| rank.pid).collect();
        if !pids.is_empty() {
            tracing::warn!(?pids, "fencing: killing every rank: {reason}");
            self.signal_groups(&pids, libc::SIGKILL);
        }
        pids.len()
    }

    fn signal_groups(&self, pids: &[u32], signal: i32) {
        for &pid in pids {
            // SAFETY: plain syscall; the rank is its own process-group leader.
            unsafe {
                libc::kill(-(pid as i32), signal);
            }
        }
    }
}
