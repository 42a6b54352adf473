//! `flamingoctl train`: a training run on this machine, torchrun style —
//! `--nproc N` rank processes (`flamingo-worker rank train`) joined by Gloo,
//! each reading its shards in-process. Flags keep OpenFlamingo's names and
//! override a `--config` TOML file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use flamingo_engine::job::TrainJob;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Rank processes on this machine.
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    #[command(flatten)]
    pub flags: TrainFlags,
}

/// A run's settings: a TOML file and OpenFlamingo-named flags over it
/// (shared by `flamingoctl train` and `flamingoctl launch`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainFlags {
    /// A TOML file of the fields below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long = "run_name")]
    pub run_name: Option<String>,
    #[arg(long = "runs_dir")]
    pub runs_dir: Option<PathBuf>,
    #[arg(long = "laion_shards")]
    pub laion_shards: Option<String>,
    #[arg(long = "mmc4_shards")]
    pub mmc4_shards: Option<String>,
    #[arg(long = "batch_size_laion")]
    pub batch_size_laion: Option<u32>,
    #[arg(long = "batch_size_mmc4")]
    pub batch_size_mmc4: Option<u32>,
    #[arg(long = "loss_multiplier_laion")]
    pub loss_multiplier_laion: Option<f64>,
    #[arg(long = "loss_multiplier_mmc4")]
    pub loss_multiplier_mmc4: Option<f64>,
    #[arg(long = "learning_rate")]
    pub learning_rate: Option<f64>,
    #[arg(long = "lr_scheduler")]
    pub lr_scheduler: Option<String>,
    #[arg(long = "warmup_steps")]
    pub warmup_steps: Option<u64>,
    #[arg(long = "weight_decay")]
    pub weight_decay: Option<f64>,
    #[arg(long = "gradient_accumulation_steps")]
    pub gradient_accumulation_steps: Option<u64>,
    #[arg(long)]
    pub precision: Option<String>,
    #[arg(long = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    #[arg(long = "fsdp_sharding_strategy")]
    pub fsdp_sharding_strategy: Option<String>,
    #[arg(long = "train_num_samples_laion")]
    pub train_num_samples_laion: Option<u64>,
    #[arg(long = "train_num_samples_mmc4")]
    pub train_num_samples_mmc4: Option<u64>,
    #[arg(long = "num_epochs")]
    pub num_epochs: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long = "resume_from_checkpoint")]
    pub resume_from_checkpoint: Option<PathBuf>,
    #[arg(long = "delete_previous_checkpoint")]
    pub delete_previous_checkpoint: bool,
    #[arg(long = "freeze_lm_embeddings")]
    pub freeze_lm_embeddings: bool,
    #[arg(long = "logging_steps")]
    pub logging_steps: Option<u64>,
    #[arg(long = "checkpoint_steps")]
    pub checkpoint_steps: Option<u64>,
    #[arg(long = "dataset_resampled")]
    pub dataset_resampled: bool,
    #[arg(long = "mmc4_textsim_threshold")]
    pub mmc4_textsim_threshold: Option<f64>,
    #[arg(long = "max_steps")]
    pub max_steps: Option<u64>,
    /// Dense peak of one rank's device in TFLOP/s, for the MFU estimate the
    /// ranks report (H100/H200 SXM bf16: 989.4); unset: no MFU.
    #[arg(long = "peak_tflops")]
    pub peak_tflops: Option<f64>,
    /// Stream batches from these data-service replicas (comma-separated
    /// http://host:port) instead of reading shards in each rank.
    #[arg(long = "data_service", value_delimiter = ',')]
    pub data_service: Vec<String>,
}

impl TrainFlags {
    /// The file's fields, then the flags given, checked for `world` ranks.
    pub fn resolve(&self, world: u32) -> anyhow::Result<TrainJob> {
        let mut job = match &self.config {
            Some(path) => TrainJob::from_toml_file(path).map_err(anyhow::Error::msg)?,
            None => TrainJob::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field.clone() {
                    job.$field = value;
                }
            )*};
        }
        set!(
            model,
            run_name,
            runs_dir,
            batch_size_laion,
            batch_size_mmc4,
            loss_multiplier_laion,
            loss_multiplier_mmc4,
            learning_rate,
            lr_scheduler,
            warmup_steps,
            weight_decay,
            gradient_accumulation_steps,
            precision,
            fsdp_sharding_strategy,
            train_num_samples_laion,
            train_num_samples_mmc4,
            num_epochs,
            seed,
            logging_steps,
            checkpoint_steps,
            mmc4_textsim_threshold,
            max_steps,
            peak_tflops
        );
        if self.laion_shards.is_some() {
            job.laion_shards = self.laion_shards.clone();
        }
        if self.mmc4_shards.is_some() {
            job.mmc4_shards = self.mmc4_shards.clone();
        }
        if self.resume_from_checkpoint.is_some() {
            job.resume_from_checkpoint = self.resume_from_checkpoint.clone();
        }
        if !self.data_service.is_empty() {
            job.data_service = self.data_service.clone();
        }
        job.gradient_checkpointing |= self.gradient_checkpointing;
        job.delete_previous_checkpoint |= self.delete_previous_checkpoint;
        job.freeze_lm_embeddings |= self.freeze_lm_embeddings;
        job.dataset_resampled |= self.dataset_resampled;
        // Ranks run in the run folder's parent's terms: absolute paths.
        job.model = std::path::absolute(&job.model)?;
        job.runs_dir = std::path::absolute(&job.runs_dir)?;
        job.validate(u64::from(world)).map_err(anyhow::Error::msg)?;
        Ok(job)
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<i32> {
    if args.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    let job = args.flags.resolve(args.nproc)?;
    let run_dir = job.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let config_path = run_dir.join("launch.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&job)?)?;
    let worker = crate::local::binary("flamingo-worker")?;
    let port = flamingo_common::net::free_local_port()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.nproc as usize).max(1);
    eprintln!(
        "training {} on {} rank(s); run folder {}",
        job.run_name,
        args.nproc,
        run_dir.display()
    );
    // `LOCAL_WORLD_SIZE=2 flamingoctl train --nproc 4` emulates two nodes
    // (for `hybrid`); unset, all ranks are one node.
    let per_node = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|value| value.parse::<u32>().ok())
        .filter(|&size| size > 0)
        .unwrap_or(args.nproc);
    let mut logs = Vec::new();
    let mut children = flamingo_common::ranks::spawn_local_world(args.nproc, port, |env| {
        env.split_into_nodes_of(per_node);
        let mut command = Command::new(&worker);
        command
            .args(["rank", "train", "--config"])
            .arg(&config_path)
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
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("cannot create the rank logs: {}", logs.join("; "));
    }
    let mut failed = None;
    loop {
        let mut running = false;
        for (rank, child) in children.iter_mut().enumerate() {
            match child.try_wait()? {
                Some(status) if !status.success() && failed.is_none() => {
                    failed = Some((rank, status))
                }
                Some(_) => {}
                None => running = true,
            }
        }
        if failed.is_some() {
            // One rank died: the others would wait for it forever.
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            break;
        }
        if !running {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match failed {
        Some((rank, status)) => {
            let log = if rank == 0 {
                "its output is above".to_string()
            } else {
                format!("see {}", run_dir.join(format!("rank-{rank}.log")).display())
            };
            eprintln!("rank {rank} failed ({status}); {log}");
            Ok(1)
        }
        None => Ok(0),
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
/// `data_service` is the local cluster's replica, used when the run names
/// none; `name` becomes the run name when the run has none of its own.
pub fn cluster_job(
    flags: &TrainFlags,
    world: u32,
    name: Option<&str>,
    data_service: Option<&str>,
) -> anyhow::Result<TrainJob> {
    let mut job = flags.resolve(world)?;
    if job.run_name == TrainJob::default().run_name && flags.run_name.is_none() {
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
    if job.data_service.is_empty() {
        if let Some(endpoint) = data_service {
            job.data_service = vec![endpoint.to_string()];
        }
    }
    flamingo_model::ModelSpec::from_file(&job.model)
        .map_err(|error| anyhow::anyhow!("model: {}: {error}", job.model.display()))?;
    for (field, shards) in [
        ("laion_shards", &job.laion_shards),
        ("mmc4_shards", &job.mmc4_shards),
    ] {
        let Some(pattern) = shards else { continue };
        let urls = flamingo_data::brace::expand(pattern)
            .map_err(|error| anyhow::anyhow!("{field}: {error}"))?;
        for url in urls {
            let local = url.strip_prefix("file://").unwrap_or(&url);
            if url.contains("://") && !url.starts_with("file://") {
                continue; // object storage: the data service reports it
            }
            if !Path::new(local).exists() {
                bail!("{field}: shard {local} does not exist (pattern {pattern})");
            }
        }
    }
    Ok(job)
}
