//! One rank of a training run: model, data, trainer, logging, checkpoints.
//! `flamingoctl train` starts one process per rank running this (through
//! `flamingo-worker rank train`), torchrun style.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flamingo_collectives::{ProcessGroup, ReduceOp};
use flamingo_data::batch::{Assembler, Cursor};
use flamingo_data::client::{BatchStream, StreamConfig};
use flamingo_data::convert::{ImageFormat, RankBatch};
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::{DataSpec, DatasetKind, Mmc4Options};
use flamingo_data::store::Storage;
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec};
use serde_json::json;

use crate::batch::TrainBatch;
use crate::checkpoint::{self, Manifest};
use crate::flops::FlopModel;
use crate::job::TrainJob;
use crate::trainer::{Strategy, Trainer};

/// What a rank started by the cluster (a `flamingoctl launch` job) tells
/// and asks its coordinator. `flamingoctl train` runs without one.
pub trait ClusterLink {
    /// Which start of the job's group this rank belongs to.
    fn attempt(&self) -> u32;
    /// This rank finished optimizer step `step`: its metrics (rank 0's
    /// include the losses, lr and grad norm). Must never block the step.
    fn step(&self, step: u64, values: &[(&'static str, f64)]);
    /// Something for the job's timeline (samples skipped); never blocks.
    fn note(&self, step: u64, kind: &'static str, message: String);
    /// Every rank wrote its part of checkpoint `step` and the manifest is
    /// written: make it the job's latest. Returns the checkpoint folders the
    /// retention policy retired (the caller deletes them).
    fn commit(&self, step: u64, dir: &Path, cursor_json: &str) -> anyhow::Result<Vec<PathBuf>>;
}

/// How a rank's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The last step is done and saved.
    Finished,
    /// SIGTERM (preemption, a draining node): every rank saved a committed
    /// checkpoint at `step` and stops, for the job to be requeued.
    Preempted { step: u64 },
}

pub use flamingo_common::jobs::PREEMPTED_EXIT_CODE;

static TERMINATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_terminate(_signal: libc::c_int) {
    TERMINATE.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// From now on SIGTERM, and SIGUSR1 (Slurm's warning before a time limit or
/// a preemption, which reaches every process of a job step), ask for a
/// checkpoint at the next step boundary instead of killing the process.
fn catch_terminate() {
    for signal in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(signal, on_terminate as *const () as libc::sighandler_t);
        }
    }
}

/// One batch and where it came from (for the sample audit).
struct Fetched {
    batch: TrainBatch,
    keys: Vec<String>,
    epoch: u64,
    /// Samples the pipeline skipped for this batch: `shard key: reason`.
    skipped: Vec<String>,
}

fn describe_skips(skipped: &[flamingo_data::sample::Skipped]) -> Vec<String> {
    skipped
        .iter()
        .map(|skip| {
            format!(
                "{} {}: {} ({})",
                skip.shard, skip.key, skip.reject.reason, skip.reject.detail
            )
        })
        .collect()
}

/// Where a rank's batches come from.
enum Source {
    /// Read and prepared in this process.
    Local(Assembler),
    /// Streamed from data-service replicas (started at the first batch, so
    /// that a resumed cursor is used).
    Remote {
        config: StreamConfig,
        stream: Option<BatchStream>,
    },
}

/// A dataset's stream on this rank.
struct Feed {
    source: Source,
    cursor: Cursor,
    images_per_sample: usize,
    pad: i64,
    per_rank: usize,
}

impl Feed {
    fn open(
        job: &TrainJob,
        kind: DatasetKind,
        shards: &str,
        tokenizer: &Path,
        image_size: i64,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let samples = match kind {
            DatasetKind::Laion => job.train_num_samples_laion,
            DatasetKind::Mmc4 => job.train_num_samples_mmc4,
        };
        let spec = DataSpec {
            dataset: kind,
            shards: None,
            sources: vec![flamingo_data::spec::Source {
                shards: shards.to_string(),
                weight: 1.0,
            }],
            tokenizer: tokenizer.display().to_string(),
            resampled: job.dataset_resampled,
            samples_per_epoch: if job.dataset_resampled { samples } else { 0 },
            shuffle_block: 1000,
            shuffle_shards: true,
            image_size: image_size as u32,
            augment: true,
            drop_last: true,
            laion: Default::default(),
            mmc4: Mmc4Options {
                sim_threshold: job.mmc4_textsim_threshold,
                min_images: job.mmc4_min_num_images,
                max_images: job.mmc4_max_num_images,
                ..Mmc4Options::default()
            },
        };
        // Local paths absolute: a data service may run elsewhere.
        let spec = DataSpec::from_toml(&spec.to_toml(), Some(&std::env::current_dir()?))?;
        let per_rank = match kind {
            DatasetKind::Laion => job.batch_size_laion as usize,
            DatasetKind::Mmc4 => job.batch_size_mmc4 as usize,
        };
        let images_per_sample = spec.images_per_sample() as usize;
        // The job's own replicas, else the node's (`FLAMINGO_DATA_SERVICE`,
        // which a Slurm job's agents pass on: its replica moves when the
        // job is requeued), else the shards are read in this process.
        let endpoints = if job.data_service.is_empty() {
            std::env::var("FLAMINGO_DATA_SERVICE")
                .map(|list| {
                    list.split(',')
                        .map(str::trim)
                        .filter(|endpoint| !endpoint.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            job.data_service.clone()
        };
        if !endpoints.is_empty() {
            let config = StreamConfig {
                endpoints,
                spec_toml: spec.to_toml(),
                seed: job.seed,
                rank: 0,
                world_size: 1,
                batch_size: per_rank as u32,
                image_format: ImageFormat::Uint8,
                cursor: Cursor::default(),
                end_epoch: 0,
                buffer_depth: 4,
                reconnect_for: std::time::Duration::from_secs(120),
            };
            return Ok(Self {
                source: Source::Remote {
                    config,
                    stream: None,
                },
                cursor: Cursor::default(),
                images_per_sample,
                pad: 0,
                per_rank,
            });
        }
        let dataset = runtime.block_on(Dataset::open(&spec, &Storage::default()))?;
        let preparer = Arc::new(Preparer::new(&spec)?);
        let pad = preparer.pad_token_id();
        let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(1).build()?);
        Ok(Self {
            source: Source::Local(Assembler::new(dataset, preparer, pool, job.seed)),
            cursor: Cursor::default(),
            images_per_sample,
            pad,
            per_rank,
        })
    }

    fn next(
        &mut self,
        rank: usize,
        world: usize,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Fetched> {
        let assembler = match &mut self.source {
            Source::Local(assembler) => assembler,
            Source::Remote { config, stream } => {
                if stream.is_none() {
                    config.rank = rank as u32;
                    config.world_size = world as u32;
                    config.cursor = self.cursor;
                    let config = config.clone();
                    *stream = Some(runtime.block_on(async move { BatchStream::start(config) }));
                }
                let stream = stream
                    .as_mut()
                    .ok_or_else(|| anyhow::anyhow!("no batch stream"))?;
                let batch = runtime
                    .block_on(stream.next())
                    .ok_or_else(|| anyhow::anyhow!("the data service ended the stream"))??;
                self.cursor = batch.next;
                return Ok(Fetched {
                    batch: TrainBatch::from_rank_batch(&batch),
                    keys: batch.keys.clone(),
                    epoch: batch.start.epoch,
                    skipped: describe_skips(&batch.skipped),
                });
            }
        };
        let global = runtime.block_on(assembler.batch(self.cursor, self.per_rank * world))?;
        for skip in global.skipped.iter().filter(|_| rank == 0) {
            tracing::warn!(shard = %skip.shard, key = %skip.key, reason = %skip.reject.reason, detail = %skip.reject.detail, "sample skipped");
        }
        self.cursor = global.next;
        let slice = RankBatch::from_global(
            &global,
            rank,
            world,
            self.images_per_sample,
            self.pad,
            ImageFormat::Uint8,
        );
        Ok(Fetched {
            batch: TrainBatch::from_rank_batch(&slice),
            keys: slice.keys.clone(),
            epoch: slice.start.epoch,
            // The global batch's skips, told once (by rank 0).
            skipped: if rank == 0 {
                describe_skips(&global.skipped)
            } else {
                Vec::new()
            },
        })
    }
}

/// What one optimizer step of this rank took, measured across its
/// micro-batches.
struct StepMeter {
    started: Instant,
    data_wait: f64,
    samples: usize,
    tokens: f64,
    flops: f64,
    skipped: Vec<String>,
}

struct Measured {
    values: Vec<(&'static str, f64)>,
    skipped: Vec<String>,
}

impl StepMeter {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            data_wait: 0.0,
            samples: 0,
            tokens: 0.0,
            flops: 0.0,
            skipped: Vec::new(),
        }
    }

    fn count(&mut self, batch: &TrainBatch, flops: &FlopModel) {
        let images = batch.vision_x.size();
        let tokens = batch.input_ids.size();
        self.samples += batch.samples;
        self.tokens += (tokens[0] * tokens[1]) as f64;
        self.flops += flops.batch_flops(tokens[0] as f64, images[1] as f64, tokens[1] as f64);
    }

    /// The step's metrics; the meter starts over for the next step.
    /// Throughput is global (this rank's count × world: every rank's
    /// batches have the same shape).
    fn finish(&mut self, peak_tflops: f64, world: usize) -> Measured {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let achieved = self.flops / seconds;
        let mut values = vec![
            ("step_seconds", seconds),
            ("data_wait_seconds", self.data_wait),
            (
                "samples_per_second",
                (self.samples * world) as f64 / seconds,
            ),
            ("tokens_per_second", self.tokens * world as f64 / seconds),
            ("model_tflops", achieved / 1e12),
        ];
        if peak_tflops > 0.0 {
            values.push(("mfu", achieved / (peak_tflops * 1e12)));
        }
        if let Some(bytes) = resident_bytes() {
            values.push(("memory_bytes", bytes));
        }
        let skipped = std::mem::take(&mut self.skipped);
        *self = Self::new();
        Measured { values, skipped }
    }
}

/// This process's resident memory (`/proc/self/statm`).
fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as f64)
}

/// `hybrid`'s groups: this rank's node (`LOCAL_WORLD_SIZE` consecutive
/// ranks, torchrun's numbering; all ranks when unset) and the ranks with
/// its local rank on every node.
pub fn hybrid_groups(group: &ProcessGroup) -> anyhow::Result<(ProcessGroup, ProcessGroup)> {
    let world = group.world_size();
    let local = match std::env::var("LOCAL_WORLD_SIZE") {
        Ok(value) => value.parse::<i64>().map_err(|_| {
            anyhow::anyhow!("LOCAL_WORLD_SIZE '{value}' is not a number of ranks per node")
        })?,
        Err(_) => world,
    };
    if local < 1 || world % local != 0 {
        anyhow::bail!(
            "--fsdp_sharding_strategy hybrid: LOCAL_WORLD_SIZE {local} does not divide the world size {world}"
        );
    }
    let (node, local_rank) = (group.rank() / local, group.rank() % local);
    let nodes = group.subgroup(&format!("hybrid/node-{node}/"), local_rank, local)?;
    let replicas = group.subgroup(&format!("hybrid/local-{local_rank}/"), node, world / local)?;
    Ok((nodes, replicas))
}

/// Appends one line per micro-batch to `<run>/audit/rank-<r>.jsonl`.
struct Audit {
    file: std::fs::File,
    attempt: u32,
}

impl Audit {
    fn open(run_dir: &Path, rank: usize, attempt: u32) -> anyhow::Result<Self> {
        let dir = run_dir.join("audit");
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("rank-{rank}.jsonl")))?;
        Ok(Self { file, attempt })
    }

    fn record(&mut self, step: u64, dataset: &str, fetched: &Fetched) -> anyhow::Result<()> {
        let line = json!({
            "attempt": self.attempt,
            "step": step,
            "dataset": dataset,
            "epoch": fetched.epoch,
            "keys": fetched.keys,
        });
        writeln!(self.file, "{line}")?;
        Ok(())
    }
}

/// Runs this rank to the end of the job (or `max_steps`).
pub fn run_rank(job: &TrainJob, group: Option<&ProcessGroup>) -> anyhow::Result<()> {
    run_rank_with(job, group, None).map(|_| ())
}

/// [`run_rank`] for a rank of a cluster job: it resumes only from the
/// checkpoint the coordinator committed (`job.resume_from_checkpoint`, set
/// by the agent), reports steps and commits checkpoints through `link`.
pub fn run_rank_with(
    job: &TrainJob,
    group: Option<&ProcessGroup>,
    link: Option<&dyn ClusterLink>,
) -> anyhow::Result<RunEnd> {
    let entered = flamingo_common::unix_seconds();
    if link.is_some() {
        catch_terminate();
    }
    let (rank, world) = group.map_or((0, 1), |group| {
        (group.rank() as usize, group.world_size() as usize)
    });
    job.validate(world as u64).map_err(anyhow::Error::msg)?;
    let run_dir = job.run_dir();
    std::fs::create_dir_all(&run_dir)?;
    let spec = ModelSpec::from_file(&job.model)?;
    let options = LoadOptions {
        init_seed: job.seed as i64,
        ..LoadOptions::default()
    };
    let (model, tokenizer) = load_flamingo_with(&spec, options)?;
    let config = job.train_config(world as u64).map_err(anyhow::Error::msg)?;
    let total_steps = config.schedule.total_steps;
    let hybrid = match (config.strategy, group) {
        (Strategy::Hybrid, Some(group)) => Some(hybrid_groups(group)?),
        _ => None,
    };
    let mut trainer = match (&hybrid, group) {
        (Some((node, replicas)), Some(group)) => {
            Trainer::new_hybrid(model, &tokenizer, group, node, replicas, config)?
        }
        _ => Trainer::new(model, &tokenizer, group, config)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let image_size = spec.vision.image_size;
    let open = |kind: DatasetKind, shards: &Option<String>| {
        shards
            .as_deref()
            .map(|shards| Feed::open(job, kind, shards, &spec.language_dir, image_size, &runtime))
            .transpose()
    };
    let mut laion = open(DatasetKind::Laion, &job.laion_shards)?;
    let mut mmc4 = open(DatasetKind::Mmc4, &job.mmc4_shards)?;

    // A cluster job resumes from what etcd says was committed, never from
    // a folder's newest manifest (which may belong to an uncommitted save).
    let resume = match link {
        Some(_) => job.resume_from_checkpoint.clone(),
        None => job
            .resume_from_checkpoint
            .clone()
            .or_else(|| checkpoint::latest(&run_dir)),
    };
    if let Some(dir) = resume {
        let dir = if dir.join("manifest.json").exists() {
            dir
        } else {
            checkpoint::latest(&dir).ok_or_else(|| {
                anyhow::anyhow!("{}: no committed checkpoint to resume from", dir.display())
            })?
        };
        let (manifest, parameters, exp_avg, exp_avg_sq) =
            checkpoint::read(&dir).map_err(anyhow::Error::msg)?;
        trainer.restore(
            &parameters,
            &exp_avg,
            &exp_avg_sq,
            manifest.step,
            manifest.skipped_steps,
        )?;
        if let (Some(feed), Some(cursor)) = (laion.as_mut(), &manifest.laion_cursor) {
            feed.cursor = cursor.into();
        }
        if let (Some(feed), Some(cursor)) = (mmc4.as_mut(), &manifest.mmc4_cursor) {
            feed.cursor = cursor.into();
        }
        if rank == 0 {
            eprintln!(
                "resuming from {} (step {}, saved by {} rank(s); now {world})",
                dir.display(),
                manifest.step,
                manifest.world_size
            );
        }
    }
    if rank == 0 {
        std::fs::write(run_dir.join("config.json"), serde_json::to_vec_pretty(job)?)?;
        // When this start began and was ready (for `bench/recovery`).
        let mut starts = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("attempts.jsonl"))?;
        let line = json!({
            "attempt": link.map_or(0, |link| link.attempt()),
            "started": process_start_unix_seconds(),
            "entered": entered,
            "loaded": flamingo_common::unix_seconds(),
            "step": trainer.step_count(),
        });
        writeln!(starts, "{line}")?;
    }
    let mut log = if rank == 0 {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run_dir.join("log.jsonl"))?,
        )
    } else {
        None
    };
    let end = if job.max_steps > 0 {
        total_steps.min(job.max_steps)
    } else {
        total_steps
    };
    let mut audit = job
        .audit_samples
        .then(|| Audit::open(&run_dir, rank, link.map_or(0, |link| link.attempt())))
        .transpose()?;
    let mut last_save = Instant::now();
    let mut progress = flamingo_common::progress::Progress::new("step", Some(end));
    let first_step = trainer.step_count();
    let mut window = (Instant::now(), 0usize);
    let per_step_samples = (job.batch_size_laion as usize * usize::from(laion.is_some())
        + job.batch_size_mmc4 as usize * usize::from(mmc4.is_some()))
        * world
        * job.gradient_accumulation_steps as usize;
    let flop_model = FlopModel::new(
        trainer.model(),
        &format!(
            "lang_encoder.{}",
            trainer.model().decoder().input_embedding_name()
        ),
        !job.freeze_lm_embeddings,
        (image_size / spec.vision.patch_size).pow(2),
    );
    let mut meter = StepMeter::new();
    while trainer.step_count() < end {
        let next = |feed: Option<&mut Feed>| {
            feed.map(|feed| feed.next(rank, world, &runtime))
                .transpose()
        };
        let waiting = Instant::now();
        let laion_batch = next(laion.as_mut())?;
        let mmc4_batch = next(mmc4.as_mut())?;
        meter.data_wait += waiting.elapsed().as_secs_f64();
        for fetched in [&laion_batch, &mmc4_batch].into_iter().flatten() {
            meter.count(&fetched.batch, &flop_model);
            meter.skipped.extend(fetched.skipped.iter().cloned());
        }
        if let Some(audit) = audit.as_mut() {
            let step = trainer.step_count() + 1;
            for (name, fetched) in [("laion", &laion_batch), ("mmc4", &mmc4_batch)] {
                if let Some(fetched) = fetched {
                    audit.record(step, name, fetched)?;
                }
            }
        }
        let Some(report) = trainer.micro_step(
            laion_batch.as_ref().map(|fetched| &fetched.batch),
            mmc4_batch.as_ref().map(|fetched| &fetched.batch),
        )?
        else {
            continue;
        };
        window.1 += per_step_samples;
        let rate = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        let step = report.step;
        if rank == 0 {
            let logged = step % job.logging_steps.max(1) == 0 || step == end || report.skipped;
            let loss = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.4}"));
            let details = format!(
                "loss_laion {} loss_mmc4 {} lr {:.2e}",
                loss(report.loss_laion),
                loss(report.loss_mmc4),
                report.lr
            );
            // One line per logged step on a pipe or file (CI logs,
            // `flamingoctl train > log`); redrawn in place on a terminal.
            if logged {
                progress.print(step, &details, Some(rate));
            } else {
                progress.redraw(step, &details, Some(rate));
            }
            if logged {
                if let Some(log) = log.as_mut() {
                    let line = json!({
                        "step": step,
                        "loss_laion": report.loss_laion,
                        "loss_mmc4": report.loss_mmc4,
                        "lr": report.lr,
                        "grad_norm": report.grad_norm,
                        "samples_per_second": rate,
                        "skipped": report.skipped,
                        "time": flamingo_common::unix_seconds(),
                        "attempt": link.map_or(0, |link| link.attempt()),
                    });
                    writeln!(log, "{line}")?;
                }
            }
        }
        let measured = meter.finish(job.peak_tflops, world);
        if let Some(link) = link {
            let mut values = measured.values;
            if rank == 0 {
                values.push(("lr", report.lr));
                values.push(("grad_norm", report.grad_norm));
                values.push(("skipped_steps", trainer.skipped_steps() as f64));
                if let Some(loss) = report.loss_laion {
                    values.push(("loss_laion", loss));
                }
                if let Some(loss) = report.loss_mmc4 {
                    values.push(("loss_mmc4", loss));
                }
            }
            link.step(step, &values);
            if !measured.skipped.is_empty() {
                let shown: Vec<&str> = measured
                    .skipped
                    .iter()
                    .take(5)
                    .map(String::as_str)
                    .collect();
                let more = measured.skipped.len().saturating_sub(shown.len());
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                link.note(
                    step,
                    "samples_skipped",
                    format!(
                        "{} sample(s) skipped: {}{more}",
                        measured.skipped.len(),
                        shown.join("; ")
                    ),
                );
            }
        }
        let mut due = job.checkpoint_steps > 0 && step % job.checkpoint_steps == 0;
        if job.checkpoint_minutes > 0.0 {
            // Rank 0's clock decides for everyone.
            let late =
                rank == 0 && last_save.elapsed().as_secs_f64() >= job.checkpoint_minutes * 60.0;
            let late = match group.filter(|_| world > 1) {
                Some(group) => {
                    group.all_reduce_scalar(f64::from(u8::from(late)), ReduceOp::Max)? > 0.0
                }
                None => late,
            };
            due |= late;
        }
        // A preemption notice on any rank stops every rank at this step.
        let preempted = match (link, group.filter(|_| world > 1)) {
            (None, _) => false,
            (Some(_), None) => TERMINATE.load(std::sync::atomic::Ordering::SeqCst),
            (Some(_), Some(group)) => {
                let mine = TERMINATE.load(std::sync::atomic::Ordering::SeqCst);
                group.all_reduce_scalar(f64::from(u8::from(mine)), ReduceOp::Max)? > 0.0
            }
        };
        if due || step == end || preempted {
            save(
                job,
                &trainer,
                group,
                rank,
                world,
                &run_dir,
                laion.as_ref(),
                mmc4.as_ref(),
                link,
            )?;
            last_save = Instant::now();
        }
        if preempted && step < end {
            if rank == 0 {
                eprintln!("\npreempted (SIGTERM): checkpoint at step {step} committed; stopping for a requeue");
            }
            return Ok(RunEnd::Preempted { step });
        }
    }
    // Memory, for `bench/train-memory.sh`: what this rank held.
    let peak_rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024);
    std::fs::write(
        run_dir.join(format!("memory-rank-{rank}.json")),
        json!({
            "rank": rank,
            "world_size": world,
            "strategy": job.fsdp_sharding_strategy,
            "trainable_parameters": trainer.parameter_count(),
            "gradient_checkpointing": job.gradient_checkpointing,
            "parameter_bytes": trainer.parameter_bytes(),
            "gradient_bytes": trainer.gradient_bytes(),
            "optimizer_bytes": trainer.optimizer_bytes(),
            "frozen_bytes": trainer.frozen_bytes(),
            "gathered_peak_bytes": trainer.gathered_peak_bytes(),
            "peak_rss_bytes": peak_rss,
        })
        .to_string(),
    )?;
    if rank == 0 {
        let seconds = progress.finish();
        let steps = trainer.step_count() - first_step;
        eprintln!(
            "done: {steps} steps in {seconds:.1}s ({} skipped); run folder {}",
            trainer.skipped_steps(),
            run_dir.display()
        );
    }
    Ok(RunEnd::Finished)
}

#[allow(clippy::too_many_arguments)]
fn save(
    job: &TrainJob,
    trainer: &Trainer<'_>,
    group: Option<&ProcessGroup>,
    rank: usize,
    world: usize,
    run_dir: &Path,
    laion: Option<&Feed>,
    mmc4: Option<&Feed>,
    link: Option<&dyn ClusterLink>,
) -> anyhow::Result<()> {
    let step = trainer.step_count();
    let _span = tracing::info_span!("checkpoint", step, rank).entered();
    let dir = checkpoint::checkpoint_dir(run_dir, step);
    // no_shard ranks all hold everything, and hybrid's nodes hold copies:
    // only the first holder writes.
    let writes = trainer.writes_checkpoints();
    if writes {
        checkpoint::write_rank(&dir, rank as u64, trainer.owned_state())?;
    }
    // Every rank's part is on disk before the manifest names them.
    if let Some(group) = group.filter(|_| world > 1) {
        group.all_reduce_scalar(f64::from(u8::from(writes)), ReduceOp::Sum)?;
    }
    // The writers are ranks 0..shard_world (hybrid: the first node's).
    let ranges: Vec<(u64, i64, i64)> = if job.fsdp_sharding_strategy == "no_shard" {
        vec![(0, 0, trainer.parameter_count())]
    } else {
        (0..trainer.shard_world())
            .flat_map(|r| {
                trainer
                    .ranges_of(r)
                    .into_iter()
                    .map(move |(start, end)| (r as u64, start, end))
            })
            .collect()
    };
    if rank == 0 {
        let manifest = Manifest {
            format: checkpoint::manifest_format().to_string(),
            step,
            skipped_steps: trainer.skipped_steps(),
            world_size: world as u64,
            strategy: job.fsdp_sharding_strategy.clone(),
            total: trainer.parameter_count(),
            ranges,
            laion_cursor: laion.map(|feed| feed.cursor.into()),
            mmc4_cursor: mmc4.map(|feed| feed.cursor.into()),
            config: serde_json::to_value(job)?,
            layout: trainer.layout(),
        };
        fault_point("before-manifest", step);
        match link {
            Some(link) => {
                checkpoint::write_manifest(&dir, &manifest)?;
                fault_point("before-commit", step);
                let cursor = json!({
                    "laion": manifest.laion_cursor,
                    "mmc4": manifest.mmc4_cursor,
                });
                for retired in link.commit(step, &dir, &cursor.to_string())? {
                    if let Err(error) = std::fs::remove_dir_all(&retired) {
                        tracing::warn!(path = %retired.display(), %error, "could not delete a retired checkpoint");
                    }
                }
            }
            None => {
                checkpoint::commit(run_dir, &dir, &manifest)?;
                if job.delete_previous_checkpoint {
                    checkpoint::delete_older(run_dir, &dir)?;
                }
            }
        }
    }
    if let Some(group) = group.filter(|_| world > 1) {
        group.barrier()?;
    }
    Ok(())
}

/// Fault injection for the recovery tests: with
/// `FLAMINGO_FAULT=<point>:<step>` the process aborts (like a SIGKILL) at
/// that point of that step's checkpoint save, in a job's first attempt.
fn fault_point(point: &str, step: u64) {
    let Ok(fault) = std::env::var("FLAMINGO_FAULT") else {
        return;
    };
    // Once per job: a restarted group (attempt > 0) runs through.
    if std::env::var("FLAMINGO_ATTEMPT").is_ok_and(|attempt| attempt != "0") {
        return;
    }
    if fault == format!("{point}:{step}") {
        eprintln!("FLAMINGO_FAULT: aborting at {point} of step {step}");
        std::process::abort();
    }
}

/// When this process started (Unix seconds): its age from `/proc` (start
/// ticks since boot against the uptime, both to 10 ms) back from now; 0 if
/// unknown.
fn process_start_unix_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(19)?
                .parse::<f64>()
                .ok()
        });
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let hertz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    match (ticks, uptime) {
        (Some(ticks), Some(uptime)) if hertz > 0.0 => {
            flamingo_common::unix_seconds() - (uptime - ticks / hertz)
        }
        _ => 0.0,
    }
}
