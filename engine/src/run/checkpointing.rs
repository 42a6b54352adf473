//! When a rank saves, and how: every `checkpoint_steps` steps, every
//! `checkpoint_minutes` (rank 0's clock, agreed by all ranks), at the end,
//! and on a preemption notice (SIGTERM, or Slurm's SIGUSR1) on any rank.
//! Every rank writes its part, rank 0 the manifest, then the checkpoint is
//! committed: through the coordinator for a cluster job, by the `latest`
//! pointer on one machine.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use flamingo_collectives::{ProcessGroup, ReduceOp};
use flamingo_common::train::{Strategy, TrainJob};
use serde_json::json;

use super::feed::Feed;
use super::ClusterLink;
use crate::checkpoint::{self, Manifest};
use crate::trainer::Trainer;

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_signal: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// From now on SIGTERM, and SIGUSR1 (Slurm's warning before a time limit or
/// a preemption, which reaches every process of a job step), ask for a
/// checkpoint at the next step boundary instead of killing the process.
pub(crate) fn catch_terminate() {
    for signal in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(signal, on_terminate as *const () as libc::sighandler_t);
        }
    }
}

/// Whether any rank of `group` says yes (this rank's `mine` alone).
fn any_rank(group: Option<&ProcessGroup>, mine: bool) -> anyhow::Result<bool> {
    match group.filter(|group| group.world_size() > 1) {
        Some(group) => Ok(group.all_reduce_scalar(f64::from(u8::from(mine)), ReduceOp::Max)? > 0.0),
        None => Ok(mine),
    }
}

/// When the next checkpoint is due.
pub(crate) struct Schedule<'a> {
    every_steps: u64,
    every_minutes: f64,
    rank: usize,
    group: Option<&'a ProcessGroup>,
    /// Cluster jobs stop at a preemption notice; one machine does not.
    preemptible: bool,
    last_save: Instant,
}

impl<'a> Schedule<'a> {
    pub(crate) fn new(
        job: &TrainJob,
        rank: usize,
        group: Option<&'a ProcessGroup>,
        preemptible: bool,
    ) -> Self {
        Self {
            every_steps: job.checkpoint_steps,
            every_minutes: job.checkpoint_minutes,
            rank,
            group,
            preemptible,
            last_save: Instant::now(),
        }
    }

    /// Whether step `step` saves: by steps, by rank 0's clock, or at a
    /// preemption notice; and whether the run then stops (preempted).
    /// Every rank calls it at every step (it agrees through collectives).
    pub(crate) fn at(&mut self, step: u64) -> anyhow::Result<(bool, bool)> {
        let mut due = self.every_steps > 0 && step.is_multiple_of(self.every_steps);
        if self.every_minutes > 0.0 {
            let late = self.rank == 0
                && self.last_save.elapsed().as_secs_f64() >= self.every_minutes * 60.0;
            due |= any_rank(self.group, late)?;
        }
        // A preemption notice on any rank stops every rank at this step.
        let preempted = self.preemptible && any_rank(self.group, TERMINATE.load(Ordering::SeqCst))?;
        Ok((due, preempted))
    }

    pub(crate) fn saved(&mut self) {
        self.last_save = Instant::now();
    }
}

/// The data cursors a checkpoint records.
pub(crate) struct Cursors<'a> {
    pub(crate) laion: Option<&'a Feed>,
    pub(crate) mmc4: Option<&'a Feed>,
}

/// Saves the trainer's state as checkpoint `trainer.step_count()` of the
/// run and commits it. Every rank calls it.
pub(crate) fn save(
    job: &TrainJob,
    trainer: &Trainer<'_>,
    group: Option<&ProcessGroup>,
    run_dir: &Path,
    cursors: Cursors<'_>,
    link: Option<&dyn ClusterLink>,
) -> anyhow::Result<()> {
    let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.world_size()));
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
    if rank == 0 {
        let manifest = manifest(job, trainer, world, cursors, &dir)?;
        commit(job, run_dir, &dir, &manifest, link)?;
    }
    if let Some(group) = group.filter(|_| world > 1) {
        group.barrier()?;
    }
    Ok(())
}

fn manifest(
    job: &TrainJob,
    trainer: &Trainer<'_>,
    world: i64,
    cursors: Cursors<'_>,
    dir: &Path,
) -> anyhow::Result<Manifest> {
    // The writers are ranks 0..shard_world (hybrid: the first node's).
    let ranges: Vec<(u64, i64, i64)> = if job.fsdp_sharding_strategy == Strategy::NoShard {
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
    let mut writers: Vec<u64> = ranges.iter().map(|(rank, _, _)| *rank).collect();
    writers.dedup();
    let files = checkpoint::file_sums(dir, &writers)?;
    Ok(Manifest {
        files,
        format: checkpoint::manifest_format().to_string(),
        step: trainer.step_count(),
        skipped_steps: trainer.skipped_steps(),
        world_size: world as u64,
        strategy: job.fsdp_sharding_strategy.to_string(),
        total: trainer.parameter_count(),
        ranges,
        laion_cursor: cursors.laion.map(|feed| feed.cursor.into()),
        mmc4_cursor: cursors.mmc4.map(|feed| feed.cursor.into()),
        config: serde_json::to_value(job)?,
        layout: trainer.layout(),
    })
}

/// Rank 0: writes the manifest and makes the checkpoint the latest, then
/// deletes what retention retired.
fn commit(
    job: &TrainJob,
    run_dir: &Path,
    dir: &Path,
    manifest: &Manifest,
    link: Option<&dyn ClusterLink>,
) -> anyhow::Result<()> {
    let step = manifest.step;
    fault_point("before-manifest", step);
    let Some(link) = link else {
        checkpoint::commit(run_dir, dir, manifest)?;
        if job.delete_previous_checkpoint {
            checkpoint::delete_older(run_dir, dir)?;
        }
        return Ok(());
    };
    checkpoint::write_manifest(dir, manifest)?;
    fault_point("before-commit", step);
    let cursor = json!({
        "laion": manifest.laion_cursor,
        "mmc4": manifest.mmc4_cursor,
    });
    let checkpoints = run_dir.join("checkpoints");
    for retired in link.commit(step, dir, &cursor.to_string())? {
        // Only this run's checkpoint folders are ever deleted, whatever
        // the coordinator names.
        if retired.parent() != Some(checkpoints.as_path()) {
            tracing::warn!(path = %retired.display(), "not deleting a retired checkpoint outside the run's checkpoints folder");
            continue;
        }
        if let Err(error) = checkpoint::remove(&retired) {
            tracing::warn!(path = %retired.display(), %error, "could not delete a retired checkpoint");
        }
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
