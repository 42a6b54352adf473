//! `flamingoctl train`: a training run on this machine, torchrun style —
//! `--nproc N` rank processes (`flamingo-worker rank train`) joined by Gloo,
//! each reading its shards in-process. Flags keep OpenFlamingo's names and
//! override a `--config` TOML file.

use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};

use anyhow::{bail, Context};
use flamingo_common::train::{TrainFlags, TrainJob};
use flamingo_common::CommonError;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Rank processes on this machine.
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    #[command(flatten)]
    pub flags: TrainFlags,
}

/// The flags' run (over its `--config` file), checked for `world` ranks,
/// with local paths made absolute (ranks run in other folders).
pub fn resolve(flags: &TrainFlags, world: u32) -> anyhow::Result<TrainJob> {
    let as_flag = |error: CommonError| match error {
        CommonError::InvalidField { field, message } => anyhow::anyhow!("--{field}: {message}"),
        other => anyhow::Error::from(other),
    };
    let mut job = flags.overlay().map_err(as_flag)?;
    job.model = std::path::absolute(&job.model)?;
    job.runs_dir = std::path::absolute(&job.runs_dir)?;
    job.validate(u64::from(world)).map_err(as_flag)?;
    Ok(job)
}

pub fn run(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    if args.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    let job = resolve(&args.flags, args.nproc)?;
    let run_dir = job.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let config_path = run_dir.join("launch.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&job)?)?;
    eprintln!(
        "training {} on {} rank(s); run folder {}",
        job.run_name,
        args.nproc,
        run_dir.display()
    );
    let mut children = spawn_ranks(args.nproc, &config_path, &run_dir)?;
    match supervise(&mut children)? {
        Some((rank, status)) => {
            let log = if rank == 0 {
                "its output is above".to_string()
            } else {
                format!("see {}", run_dir.join(format!("rank-{rank}.log")).display())
            };
            eprintln!("rank {rank} failed ({status}); {log}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `nproc` ranks of `flamingo-worker rank train` on this machine, rank 0's
/// output here and the others' in `rank-<r>.log` in the run folder.
fn spawn_ranks(nproc: u32, config_path: &Path, run_dir: &Path) -> anyhow::Result<Vec<Child>> {
    let worker = flamingo_launch::local::binary("flamingo-worker")?;
    let port = flamingo_common::net::free_local_port()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / nproc as usize).max(1);
    // `LOCAL_WORLD_SIZE=2 flamingoctl train --nproc 4` emulates two nodes
    // (for `hybrid`); unset, all ranks are one node.
    let per_node = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|value| value.parse::<u32>().ok())
        .filter(|&size| size > 0)
        .unwrap_or(nproc);
    let mut logs = Vec::new();
    let mut children = flamingo_common::ranks::spawn_local_world(nproc, port, |env| {
        env.split_into_nodes_of(per_node);
        let mut command = Command::new(&worker);
        command
            .args(["rank", "train", "--config"])
            .arg(config_path)
            .env("OMP_NUM_THREADS", threads.to_string())
            // Not a cluster rank, whatever this shell exported.
            .env_remove("FLAMINGO_JOB_COORDINATOR")
            .stdin(Stdio::null());
        if env.rank != 0 {
            let log = run_dir.join(format!("rank-{}.log", env.rank));
            match std::fs::File::create(&log).and_then(|file| Ok((file.try_clone()?, file))) {
                Ok((stdout, stderr)) => {
                    command.stdout(stdout).stderr(stderr);
                }
                Err(error) => logs.push(format!("{}: {error}", log.display())),
            }
        }
        command
    })
    .context("starting the ranks")?;
    if !logs.is_empty() {
        kill_all(&mut children);
        bail!("cannot create the rank logs: {}", logs.join("; "));
    }
    Ok(children)
}

fn kill_all(children: &mut [Child]) {
    for child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits for every rank; the first that fails (its rank and status) stops
/// the others, which would wait for it forever.
fn supervise(children: &mut [Child]) -> anyhow::Result<Option<(usize, ExitStatus)>> {
    loop {
        let mut running = false;
        for (rank, child) in children.iter_mut().enumerate() {
            match child.try_wait()? {
                Some(status) if !status.success() => {
                    kill_all(children);
                    return Ok(Some((rank, status)));
                }
                Some(_) => {}
                None => running = true,
            }
        }
        if !running {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `flamingoctl launch` of a train job: failure policy flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyFlags {
    /// Restarts of the whole group from the last committed checkpoint
    /// before the job fails (torchrun's --max-restarts).
    #[arg(long = "max-restarts", default_value_t = 3)]
    pub max_restarts: u32,
    /// No finished step for this many seconds is a hang: the group restarts.
    #[arg(long = "hang-timeout", default_value_t = 600)]
    pub hang_timeout_seconds: u32,
    /// Committed checkpoints kept (the newest n)…
    #[arg(long = "keep-checkpoints", default_value_t = 2)]
    pub keep_checkpoints: u32,
    /// …plus those at multiples of this step (0: none).
    #[arg(long = "keep-every", default_value_t = 0)]
    pub keep_every_checkpoint_steps: u32,
    /// Leave out a node after this many rank failures while others can take
    /// its place (0: never).
    #[arg(long = "exclude-after", default_value_t = 2)]
    pub exclude_node_after_failures: u32,
}

impl PolicyFlags {
    pub fn policy(&self) -> flamingo_common::JobPolicy {
        flamingo_common::JobPolicy {
            max_restarts: self.max_restarts,
            hang_timeout_seconds: self.hang_timeout_seconds,
            keep_checkpoints: self.keep_checkpoints,
            keep_every_checkpoint_steps: self.keep_every_checkpoint_steps,
            exclude_node_after_failures: self.exclude_node_after_failures,
        }
    }
}

/// Resolves and checks a train job for `world` cluster ranks before it is
/// submitted: the model spec loads, every local shard exists, batch sizes
/// and the world size give at least one step. Each problem names its field.
/// `name` becomes the run name when the run has none of its own. (The
/// ranks stream from their node's data-service replica, which their agent
/// names, unless the run names its own replicas.)
pub fn cluster_job(flags: &TrainFlags, world: u32, name: Option<&str>) -> anyhow::Result<TrainJob> {
    let mut job = resolve(flags, world)?;
    if job.run_name == TrainJob::default().run_name && !flags.given("run_name") {
        job.run_name = match name {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => format!("launch-{}", flamingo_common::unix_ms()),
        };
    }
    // Ranks start in their agent's folder: local shard paths absolute.
    let cwd = std::env::current_dir()?;
    for shards in [&mut job.laion_shards, &mut job.mmc4_shards] {
        if let Some(pattern) = shards.as_mut() {
            if !pattern.contains("://") && !pattern.starts_with('/') {
                *pattern = cwd.join(&*pattern).display().to_string();
            }
        }
    }
    flamingo_model::ModelSpec::from_file(&job.model)
        .map_err(|error| anyhow::anyhow!("--model: {}: {error}", job.model.display()))?;
    job.check_paths(flamingo_common::brace::DEFAULT_MAX_SHARDS)
        .map_err(|error| match error {
            CommonError::InvalidField { field, message } => anyhow::anyhow!("--{field}: {message}"),
            other => anyhow::Error::from(other),
        })?;
    Ok(job)
}
