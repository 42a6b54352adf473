//! Inside the allocation: `flamingoctl slurm run --job-dir DIR`, the batch
//! script's body. It starts the control plane on the first node (etcd
//! unless one is given, the coordinator, a data service for training jobs),
//! one agent per node as one `srun` step, launches the job (or lets a
//! requeued one go on), follows it, and on Slurm's warning (USR1) or
//! SIGTERM has every rank checkpoint, then requeues the Slurm job.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_client::Session;
use flamingo_common::{JobRecord, JobState};
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::records::{final_path, write_json, ControlPlane, JobFile, SlurmState};
use super::script::command_line;
use super::slurm_command;
use crate::local;
use crate::pki::ClusterCredentials;

/// Processes this batch job started, stopped (TERM, then KILL) when dropped.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn push(&mut self, name: &str, child: Child) {
        self.0.push((name.to_string(), child));
    }

    fn stop(&mut self) {
        // The last started first: the data service and the coordinator
        // before etcd.
        while let Some((_, mut child)) = self.0.pop() {
            local::terminate(&[child.id()], Duration::from_secs(10));
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Outcome {
    Done(Box<JobRecord>),
    /// USR1: the warning before the time limit (or a preemption).
    Warned,
    /// SIGTERM: scancel, or a preemption's grace period.
    Terminated,
    /// The agents' job step ended (its exit status) while the job ran.
    AgentsGone(String),
}

/// This start of the Slurm job.
struct Allocation {
    dir: PathBuf,
    file: JobFile,
    slurm_id: String,
    /// Slurm's restart count (0 = the first start).
    restarts: u32,
    nodes: u32,
    logs: PathBuf,
    /// The job's CA (`<job dir>/pki`) and the services' and admin's
    /// certificates.
    credentials: ClusterCredentials,
    children: Children,
    /// Caught before anything starts, so no signal is missed.
    usr1: Signal,
    term: Signal,
}

/// How the job stands once this start is over.
enum Settled {
    Final(Box<JobRecord>),
    /// Every rank checkpointed and the Slurm job was requeued.
    Requeued,
    /// `scontrol requeue` failed (said on stderr).
    RequeueFailed,
}

/// Where the control plane runs.
struct Endpoints {
    coordinator: String,
    dashboard: Option<String>,
    data_service: Option<String>,
}

/// `flamingoctl slurm run --job-dir DIR`: returns the exit status for the
/// batch script (0 only when the job succeeded, or was requeued).
pub async fn run_in_allocation(dir: &Path) -> anyhow::Result<i32> {
    let mut allocation = Allocation::from_env(dir)?;
    let previous = ControlPlane::load(dir)?;
    let endpoints = allocation.control_plane()?;
    let mut control = ControlPlane {
        slurm_job_id: allocation.slurm_id.clone(),
        restarts: allocation.restarts,
        coordinator: endpoints.coordinator.clone(),
        dashboard: endpoints.dashboard.clone(),
        data_service: endpoints.data_service.clone(),
        job_id: previous.and_then(|p| p.job_id),
        stopped: false,
    };
    control.save(dir)?;
    eprintln!("flamingo: coordinator {}", endpoints.coordinator);
    if let Some(dashboard) = &endpoints.dashboard {
        eprintln!("flamingo: dashboard {dashboard}");
    }
    let mut agents = allocation.start_agents(&endpoints)?;
    let job_id = match control.job_id.clone() {
        Some(id) => {
            eprintln!(
                "flamingo: job {id} goes on (Slurm restart {})",
                allocation.restarts
            );
            id
        }
        None => match allocation.launch_job(&endpoints.coordinator) {
            Ok(id) => id,
            Err(error) => {
                eprintln!("flamingo: {error:#}");
                stop_agents(&allocation.slurm_id, &mut agents).await;
                control.stopped = true;
                control.save(dir)?;
                return Ok(2);
            }
        },
    };
    control.job_id = Some(job_id.clone());
    control.save(dir)?;
    eprintln!("flamingo: job {job_id}");
    let mut session =
        crate::pki::admin_session(&allocation.credentials, &endpoints.coordinator).await?;
    let outcome = allocation
        .follow(&mut session, &mut agents, &endpoints.coordinator, &job_id)
        .await;
    let job = match allocation
        .settle(outcome, &mut session, &mut agents, &mut control, &job_id)
        .await?
    {
        Settled::Final(job) => *job,
        Settled::Requeued => {
            // Slurm ends this script as it requeues the job.
            tokio::time::sleep(Duration::from_secs(120)).await;
            return Ok(0);
        }
        Settled::RequeueFailed => return Ok(1),
    };
    write_json(&final_path(dir), &job)?;
    eprintln!(
        "flamingo: job {job_id} {}{}",
        job.state.as_str(),
        if job.message.is_empty() {
            String::new()
        } else {
            format!(": {}", job.message)
        }
    );
    control.stopped = true;
    control.save(dir)?;
    stop_agents(&allocation.slurm_id, &mut agents).await;
    drop(session);
    allocation.children.stop();
    Ok(i32::from(job.state != JobState::Succeeded))
}

impl Allocation {
    fn from_env(dir: &Path) -> anyhow::Result<Self> {
        let usr1 = signal(SignalKind::user_defined1())?;
        let term = signal(SignalKind::terminate())?;
        let file = JobFile::load(dir)?;
        let slurm_id = std::env::var("SLURM_JOB_ID").context(
            "SLURM_JOB_ID is not set: `flamingoctl slurm run` is the body of the batch job that `flamingoctl launch --scheduler slurm` submits",
        )?;
        let count = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|count| count.parse::<u32>().ok())
        };
        let restarts = count("SLURM_RESTART_COUNT").unwrap_or(0);
        let nodes = count("SLURM_JOB_NUM_NODES").unwrap_or(file.nodes);
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let host = flamingo_common::net::host_address(file.interface.as_deref())
            .map(|address| address.to_string())
            .ok();
        let credentials = ClusterCredentials::prepare(&file.pki_dir(dir), host.as_slice())?;
        eprintln!(
            "flamingo: Slurm job {slurm_id}, start {} on {nodes} node(s); folder {}",
            restarts + 1,
            dir.display()
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            slurm_id,
            restarts,
            nodes,
            logs,
            credentials,
            children: Children::default(),
            usr1,
            term,
        })
    }

    /// Starts `command` as `name`, its output in `logs/<log>`, and waits
    /// for its `port`.
    fn start_service(
        &mut self,
        command: Command,
        name: &str,
        log: &str,
        port: u16,
    ) -> anyhow::Result<()> {
        let log = self.logs.join(log);
        self.children
            .push(name, local::spawn(command, &log, false)?);
        local::wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(30)).with_context(
            || {
                format!(
                    "{name} did not start; {} ends:\n{}",
                    log.display(),
                    local::tail(&log, 15)
                )
            },
        )
    }

    /// The control plane on this (the first) node, or the coordinator the
    /// job joins.
    fn control_plane(&mut self) -> anyhow::Result<Endpoints> {
        if let Some(address) = &self.file.coordinator {
            return Ok(Endpoints {
                coordinator: address.clone(),
                dashboard: None,
                data_service: None,
            });
        }
        let host = match flamingo_common::net::host_address(self.file.interface.as_deref()) {
            Ok(address) => address,
            Err(error) if self.file.interface.is_none() => {
                eprintln!("flamingo: {error}; using 127.0.0.1, so the job cannot span machines");
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            }
            Err(error) => return Err(error).context("finding this node's address (--interface)"),
        };
        let etcd = match self.file.etcd_endpoints.clone() {
            Some(endpoints) => endpoints,
            None => self.start_etcd()?,
        };
        let free = flamingo_common::net::free_local_port;
        let (port, http_port) = (free()?, free()?);
        let mut command = Command::new(local::binary("flamingo-coordinator")?);
        command
            .arg(format!("--listen=0.0.0.0:{port}"))
            .arg(format!("--http-listen=0.0.0.0:{http_port}"))
            .arg(format!("--etcd-endpoints={etcd}"))
            .arg(format!(
                "--metrics-dir={}",
                self.dir.join("metrics").display()
            ))
            .arg(format!("--http-host={host}"))
            // The job's own control plane, reachable only with the job's
            // certificates: a command job runs in the submitter's own
            // allocation, as any step of theirs would.
            .arg("--allow-command-jobs")
            .args(self.credentials.coordinator.args());
        if self.file.etcd_endpoints.is_some() {
            command.arg(format!("--etcd-prefix=/flamingo/slurm-{}", self.slurm_id));
        }
        self.start_service(command, "the coordinator", "coordinator.log", port)?;
        let data_service = if self.file.train {
            let port = free()?;
            let mut command = Command::new(local::binary("flamingo-data-service")?);
            // The job's own replica, reachable only with the job's
            // certificates; it reads wherever the job's shards are.
            command
                .arg(format!("--listen=0.0.0.0:{port}"))
                .arg("--allow-prefix=/")
                .args(self.credentials.data_service.args());
            self.start_service(command, "the data service", "data-service.log", port)?;
            Some(format!("http://{host}:{port}"))
        } else {
            None
        };
        Ok(Endpoints {
            coordinator: format!("http://{host}:{port}"),
            dashboard: Some(format!("http://{host}:{http_port}/")),
            data_service,
        })
    }

    /// A one-member etcd for the job, its data in the job's folder.
    fn start_etcd(&mut self) -> anyhow::Result<String> {
        let free = flamingo_common::net::free_local_port;
        let spec = local::EtcdSpec {
            data_dir: self.dir.join("etcd"),
            client_port: free()?,
            peer_port: free()?,
            tls: Some(self.credentials.etcd.clone()),
        };
        let mut command = local::etcd_command(&spec)?;
        if spec.data_dir.exists() {
            // A requeued job: the same data on another node or other ports;
            // keep it, as the only member.
            command.arg("--force-new-cluster");
        }
        self.start_service(command, "etcd", "etcd.log", spec.client_port)?;
        Ok(spec.endpoint())
    }

    /// One agent per node, as one job step.
    fn start_agents(&self, endpoints: &Endpoints) -> anyhow::Result<Child> {
        let exe = std::env::current_exe()?;
        let mut srun = slurm_command("srun")?;
        srun.arg(format!("--nodes={}", self.nodes))
            .arg(format!("--ntasks={}", self.nodes))
            .arg("--ntasks-per-node=1")
            .arg("--kill-on-bad-exit=0")
            .arg("--job-name=flamingo-agents")
            .arg(&exe)
            .args(["slurm", "agent", "--job-dir"])
            .arg(&self.dir)
            .arg(format!("--coordinator={}", endpoints.coordinator))
            .arg(format!("--slots={}", self.file.slots_per_node))
            .args(
                endpoints
                    .data_service
                    .as_ref()
                    .map(|endpoint| format!("--data-service={endpoint}")),
            );
        eprintln!("flamingo: agents: {}", command_line(&srun));
        let agents_log = self.logs.join("agents.log");
        let agents_file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&agents_log)?;
        srun.stdin(Stdio::null())
            .stdout(agents_file.try_clone()?)
            .stderr(agents_file);
        srun.spawn().context("starting the agents with srun")
    }

    /// Runs `flamingoctl launch` (the submitted flags) against the job's
    /// coordinator; returns the job id. The data service is not named in
    /// the job: it moves when the job is requeued, so the agents pass the
    /// current one to their ranks.
    fn launch_job(&self, coordinator: &str) -> anyhow::Result<String> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            // Not a local cluster's record (its data service) from the
            // submitting user's environment.
            .env("FLAMINGO_STATE_DIR", self.dir.join("launch"))
            .envs(self.credentials.admin.env())
            .arg(format!("--coordinator={coordinator}"))
            .arg("--json")
            .arg("launch")
            .args(&self.file.launch_args);
        eprintln!("flamingo: launching: {}", command_line(&command));
        let output = command.output().context("running flamingoctl launch")?;
        if !output.status.success() {
            bail!(
                "the launch failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let value: serde_json::Value = serde_json::from_slice(&output.stdout)
            .context("flamingoctl launch --json printed no JSON")?;
        value["id"]
            .as_str()
            .map(String::from)
            .context("flamingoctl launch --json printed no job id")
    }

    /// Follows the job until it ends, a signal arrives or the agents go;
    /// its events go to Slurm's output file meanwhile.
    async fn follow(
        &mut self,
        session: &mut Session,
        agents: &mut Child,
        coordinator: &str,
        job_id: &str,
    ) -> Outcome {
        let progress = {
            let coordinator = coordinator.to_string();
            let job_id = job_id.to_string();
            let credentials = self.credentials.clone();
            tokio::spawn(async move {
                if let Ok(mut session) = crate::pki::admin_session(&credentials, &coordinator).await
                {
                    let _ = session.wait(&job_id, true, false).await;
                }
            })
        };
        let outcome = loop {
            tokio::select! {
                _ = self.usr1.recv() => break Outcome::Warned,
                _ = self.term.recv() => break Outcome::Terminated,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if let Ok(job) = session.job(job_id).await {
                        if job.state.is_terminal() && job.live_ranks().next().is_none() {
                            break Outcome::Done(Box::new(job));
                        }
                    }
                    if let Ok(Some(status)) = agents.try_wait() {
                        break Outcome::AgentsGone(status.to_string());
                    }
                }
            }
        };
        progress.abort();
        outcome
    }

    /// The job's final record, or the Slurm job requeued (every rank
    /// checkpointed first).
    async fn settle(
        &mut self,
        outcome: Outcome,
        session: &mut Session,
        agents: &mut Child,
        control: &mut ControlPlane,
        job_id: &str,
    ) -> anyhow::Result<Settled> {
        let warned = match outcome {
            Outcome::Done(job) => return Ok(Settled::Final(job)),
            Outcome::AgentsGone(status) => {
                eprintln!(
                    "flamingo: the agents' step ended ({status}) while the job ran; see {}",
                    self.logs.join("agents.log").display()
                );
                let job = match session.stop(job_id).await {
                    Ok(job) => job,
                    Err(_) => session.job(job_id).await?,
                };
                return Ok(Settled::Final(Box::new(job)));
            }
            Outcome::Warned => true,
            Outcome::Terminated => false,
        };
        eprintln!(
            "flamingo: {}: every rank checkpoints and stops",
            if warned {
                "USR1 (time limit or preemption ahead)"
            } else {
                "SIGTERM"
            }
        );
        if warned {
            // Steps only: every agent drains, every training rank commits
            // a checkpoint.
            let _ = slurm_command("scancel")?
                .args(["--signal=USR1", &self.slurm_id])
                .status();
        }
        wait_for_exit(agents, Duration::from_secs(180)).await;
        let job = session.job(job_id).await?;
        let cancelled = SlurmState::query(&self.slurm_id).is_some_and(|s| s.state == "CANCELLED");
        if job.state.is_terminal() {
            return Ok(Settled::Final(Box::new(job)));
        }
        if cancelled {
            eprintln!("flamingo: the Slurm job was cancelled; stopping job {job_id}");
            return Ok(Settled::Final(Box::new(session.stop(job_id).await?)));
        }
        self.requeue(&job, control)
    }

    /// Stops the control plane and requeues the Slurm job; the flamingo
    /// job resumes from its latest checkpoint when Slurm runs it again.
    fn requeue(&mut self, job: &JobRecord, control: &mut ControlPlane) -> anyhow::Result<Settled> {
        let from = job
            .latest_checkpoint()
            .map_or("the start".to_string(), |c| format!("step {}", c.step));
        eprintln!(
            "flamingo: requeueing Slurm job {}; the job resumes from {from}",
            self.slurm_id
        );
        control.stopped = true;
        control.save(&self.dir)?;
        self.children.stop();
        let status = slurm_command("scontrol")?
            .args(["requeue", &self.slurm_id])
            .status()?;
        if !status.success() {
            eprintln!(
                "flamingo: scontrol requeue {} failed ({status}); resume by hand with --resume_from_checkpoint",
                self.slurm_id
            );
            return Ok(Settled::RequeueFailed);
        }
        Ok(Settled::Requeued)
    }
}

/// The agents' step ends: USR1 drains each agent (nothing runs any more),
/// and srun is killed if they linger.
async fn stop_agents(slurm_id: &str, agents: &mut Child) {
    if let Ok(mut scancel) = slurm_command("scancel") {
        let _ = scancel.args(["--signal=USR1", slurm_id]).status();
    }
    if !wait_for_exit(agents, Duration::from_secs(60)).await {
        let _ = agents.kill();
        let _ = agents.wait();
    }
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
