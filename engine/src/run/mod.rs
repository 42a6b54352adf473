//! One rank of a training run: set-up ([`setup`]: model, trainer, data
//! feeds, resume), the step loop (here), checkpointing ([`checkpointing`])
//! and reporting ([`reporting`]). `flamingoctl train` starts one process
//! per rank running this (through `flamingo-worker rank train`), torchrun
//! style; a cluster job's ranks run it with a [`ClusterLink`] to their
//! coordinator.

mod checkpointing;
mod feed;
mod reporting;
mod setup;

use std::path::{Path, PathBuf};
use std::time::Instant;

use flamingo_collectives::ProcessGroup;
use flamingo_common::train::{Strategy, TrainJob};

pub use flamingo_common::jobs::PREEMPTED_EXIT_CODE;
pub use reporting::{peak_rss, read_bytes};

use crate::flops::FlopModel;
use checkpointing::Cursors;
use reporting::{Audit, Reporter, StepMeter};
use setup::{Groups, Started};

/// What a rank started by the cluster (a `flamingoctl launch` job) tells
/// and asks its coordinator. `flamingoctl train` runs without one.
pub trait ClusterLink {
    /// Which start of the job's group this rank belongs to.
    fn attempt(&self) -> u32;
    /// This rank finished optimizer step `step`: its metrics (rank 0's
    /// include the losses, lr and grad norm). Must never block the step.
    fn step(&self, step: u64, values: &[(&'static str, f64)]);
    /// Something for the job's timeline (an unusual skip rate); never
    /// blocks.
    fn note(&self, step: u64, kind: &'static str, message: String);
    /// One of the first skipped samples of its reason, an example for the
    /// job's table of reasons (`dataset`: `laion` or `mmc4`); never blocks.
    fn skip_example(&self, step: u64, dataset: &str, skipped: &flamingo_data::sample::Skipped) {
        let _ = (step, dataset, skipped);
    }
    /// Every rank wrote its part of checkpoint `step` and the manifest is
    /// written: make it the job's latest. Returns the checkpoint folders the
    /// retention policy retired (the caller deletes them).
    fn commit(&self, step: u64, dir: &Path, cursor_json: &str) -> anyhow::Result<Vec<PathBuf>>;
    /// The job's older committed checkpoints, newest first: where to
    /// resume when the latest fails verification.
    fn fallback_checkpoints(&self) -> Vec<PathBuf> {
        Vec::new()
    }
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
        checkpointing::catch_terminate();
    }
    let (rank, world) = group.map_or((0, 1), |group| {
        (group.rank() as usize, group.world_size() as usize)
    });
    job.validate(world as u64)?;
    let run_dir = job.run_dir();
    std::fs::create_dir_all(&run_dir)?;
    let hybrid = match (job.fsdp_sharding_strategy, group) {
        (Strategy::Hybrid, Some(group)) => Some(hybrid_groups(group)?),
        _ => None,
    };
    let groups = Groups {
        all: group,
        hybrid: hybrid.as_ref(),
    };
    let (loading, read_before) = (Instant::now(), reporting::read_bytes());
    let mut started = setup::start(job, groups, world as u64)?;
    let checkpoints = job.checkpoint_run();
    setup::resume(job, &checkpoints, &mut started, (rank, world), link)?;
    let load = reporting::LoadCost {
        peak_rss: reporting::restart_peak_rss(),
        read_bytes: reporting::read_bytes().saturating_sub(read_before),
        seconds: loading.elapsed().as_secs_f64(),
    };
    if rank == 0 {
        setup::record_start(job, &run_dir, link, entered, started.trainer.step_count())?;
    }
    let loop_ = StepLoop {
        job,
        group,
        link,
        rank,
        world,
        run_dir: &run_dir,
        checkpoints: &checkpoints,
    };
    let end = loop_.run(&mut started)?;
    if end == RunEnd::Finished {
        reporting::write_memory_report(&run_dir, job, (rank, world), &started.trainer, &load)?;
    }
    Ok(end)
}

/// The step loop of one rank.
struct StepLoop<'a> {
    job: &'a TrainJob,
    group: Option<&'a ProcessGroup>,
    link: Option<&'a dyn ClusterLink>,
    rank: usize,
    world: usize,
    run_dir: &'a Path,
    /// Where checkpoints go: the run folder, or its folder in the
    /// checkpoint store.
    checkpoints: &'a Path,
}

impl StepLoop<'_> {
    /// Steps until the end of the run (or `max_steps`, or a preemption),
    /// saving as the checkpoint schedule says.
    fn run(&self, started: &mut Started<'_>) -> anyhow::Result<RunEnd> {
        let job = self.job;
        let total_steps = job.total_steps(self.world as u64);
        let end = match job.max_steps {
            0 => total_steps,
            max => total_steps.min(max),
        };
        let mut audit = job
            .audit_samples
            .then(|| {
                Audit::open(
                    self.run_dir,
                    self.rank,
                    self.link.map_or(0, |link| link.attempt()),
                )
            })
            .transpose()?;
        let mut schedule =
            checkpointing::Schedule::new(job, self.rank, self.group, self.link.is_some());
        let mut reporter =
            Reporter::new(job, self.run_dir, (self.rank, self.world), end, self.link)?;
        let first_step = started.trainer.step_count();
        let flop_model = FlopModel::new(
            started.trainer.model(),
            &format!(
                "lang_encoder.{}",
                started.trainer.model().decoder().input_embedding_name()
            ),
            !job.freeze_lm_embeddings,
            (started.spec.vision.image_size / started.spec.vision.patch_size).pow(2),
        );
        let mut meter = StepMeter::new();
        while started.trainer.step_count() < end {
            let Some(report) = self.micro_step(started, &mut meter, &flop_model, audit.as_mut())?
            else {
                continue;
            };
            let step = report.step;
            reporter.step(&report)?;
            let measured = meter.finish(job.peak_tflops, self.world);
            reporter.metrics(&report, started.trainer.skipped_steps(), measured);
            let (due, preempted) = schedule.at(step)?;
            if due || step == end || preempted {
                let cursors = Cursors {
                    laion: started.laion.as_ref(),
                    mmc4: started.mmc4.as_ref(),
                };
                checkpointing::save(
                    job,
                    &started.trainer,
                    self.group,
                    self.checkpoints,
                    cursors,
                    self.link,
                )?;
                schedule.saved();
            }
            if preempted && step < end {
                if self.rank == 0 {
                    eprintln!("\npreempted (SIGTERM): checkpoint at step {step} committed; stopping for a requeue");
                }
                return Ok(RunEnd::Preempted { step });
            }
        }
        if self.rank == 0 {
            let seconds = reporter.finish();
            let steps = started.trainer.step_count() - first_step;
            eprintln!(
                "done: {steps} steps in {seconds:.1}s ({} skipped); run folder {}",
                started.trainer.skipped_steps(),
                self.run_dir.display()
            );
        }
        Ok(RunEnd::Finished)
    }

    /// Fetches this rank's LAION and MMC4 batches and runs one micro-step;
    /// the step's report once the optimizer stepped.
    fn micro_step(
        &self,
        started: &mut Started<'_>,
        meter: &mut StepMeter,
        flop_model: &FlopModel,
        audit: Option<&mut Audit>,
    ) -> anyhow::Result<Option<crate::trainer::StepReport>> {
        let (rank, world, runtime) = (self.rank, self.world, &started.runtime);
        let waiting = Instant::now();
        let next = |feed: Option<&mut feed::Feed>| {
            feed.map(|feed| feed.next(rank, world, runtime)).transpose()
        };
        let laion = next(started.laion.as_mut())?;
        let mmc4 = next(started.mmc4.as_mut())?;
        meter.data_wait += waiting.elapsed().as_secs_f64();
        for (dataset, fetched) in [("laion", &laion), ("mmc4", &mmc4)] {
            if let Some(fetched) = fetched {
                meter.count(&fetched.batch, flop_model);
                meter.skipped(dataset, &fetched.skipped);
            }
        }
        if let Some(audit) = audit {
            let step = started.trainer.step_count() + 1;
            for (name, fetched) in [("laion", &laion), ("mmc4", &mmc4)] {
                if let Some(fetched) = fetched {
                    audit.record(step, name, fetched)?;
                }
            }
        }
        Ok(started.trainer.micro_step(
            laion.as_ref().map(|fetched| &fetched.batch),
            mmc4.as_ref().map(|fetched| &fetched.batch),
        )?)
    }
}
