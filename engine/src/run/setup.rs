//! A rank's start: the model and its trainer, the data feeds, the resume
//! from a checkpoint, and the run folder's `config.json` and
//! `attempts.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};

use flamingo_collectives::ProcessGroup;
use flamingo_common::train::TrainJob;
use flamingo_data::spec::DatasetKind;
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec};
use serde_json::json;

use super::feed::Feed;
use super::ClusterLink;
use crate::checkpoint;
use crate::trainer::{TrainConfig, Trainer};

/// The process groups a rank trains over: every rank, and under `hybrid`
/// its node's and its replicas' (see [`super::hybrid_groups`]).
pub(crate) struct Groups<'g> {
    pub(crate) all: Option<&'g ProcessGroup>,
    pub(crate) hybrid: Option<&'g (ProcessGroup, ProcessGroup)>,
}

/// Everything a rank's step loop works with.
pub(crate) struct Started<'g> {
    pub(crate) spec: ModelSpec,
    pub(crate) trainer: Trainer<'g>,
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) laion: Option<Feed>,
    pub(crate) mmc4: Option<Feed>,
}

/// Loads the model, builds the trainer and opens the feeds.
pub(crate) fn start<'g>(
    job: &TrainJob,
    groups: Groups<'g>,
    world: u64,
) -> anyhow::Result<Started<'g>> {
    let spec = ModelSpec::from_file(&job.model)?;
    let config = TrainConfig::for_job(job, world);
    // Under full/hybrid sharding each rank reads only the parts of the
    // weights it keeps (safetensors by byte range).
    let options = LoadOptions {
        init_seed: job.seed as i64,
        lazy: config.strategy.shards_units(),
        ..LoadOptions::default()
    };
    let (model, tokenizer) = load_flamingo_with(&spec, options)?;
    let trainer = match (groups.hybrid, groups.all) {
        (Some((node, replicas)), Some(group)) => {
            Trainer::new_hybrid(model, &tokenizer, group, node, replicas, config)?
        }
        _ => Trainer::new(model, &tokenizer, groups.all, config)?,
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
    let laion = open(DatasetKind::Laion, &job.laion_shards)?;
    let mmc4 = open(DatasetKind::Mmc4, &job.mmc4_shards)?;
    Ok(Started {
        spec,
        trainer,
        runtime,
        laion,
        mmc4,
    })
}

/// Where to resume from: a cluster job only from what etcd says was
/// committed (`job.resume_from_checkpoint`, set by the agent), never from
/// a folder's newest manifest (which may belong to an uncommitted save); a
/// run on one machine also from its folder's `latest`.
fn resume_dir(job: &TrainJob, run_dir: &Path, cluster: bool) -> anyhow::Result<Option<PathBuf>> {
    let resume = match cluster {
        true => job.resume_from_checkpoint.clone(),
        false => job
            .resume_from_checkpoint
            .clone()
            .or_else(|| checkpoint::latest(run_dir)),
    };
    let Some(dir) = resume else {
        return Ok(None);
    };
    if checkpoint::is_committed(&dir) {
        return Ok(Some(dir));
    }
    checkpoint::latest(&dir)
        .map(Some)
        .ok_or_else(|| anyhow::anyhow!("{}: no committed checkpoint to resume from", dir.display()))
}

/// Restores the trainer and the data cursors from the checkpoint to resume
/// from, if any. A checkpoint that fails verification (a file missing, cut
/// short or changed since it was written) is reported and the next older
/// committed one is used: the coordinator's list under a cluster, the run's
/// own checkpoints folder otherwise. Every rank reads and verifies the same
/// files, so all make the same choice.
pub(crate) fn resume(
    job: &TrainJob,
    run_dir: &Path,
    started: &mut Started<'_>,
    (rank, world): (usize, usize),
    link: Option<&dyn ClusterLink>,
) -> anyhow::Result<()> {
    let Some(dir) = resume_dir(job, run_dir, link.is_some())? else {
        return Ok(());
    };
    let mut candidates = vec![dir.clone()];
    match link {
        Some(link) => candidates.extend(link.fallback_checkpoints()),
        None => candidates.extend(checkpoint::committed(run_dir)),
    }
    candidates.dedup();
    let mut failures: Vec<String> = Vec::new();
    let mut loaded = None;
    for candidate in &candidates {
        match checkpoint::read(candidate) {
            Ok(read) => {
                loaded = Some((candidate.clone(), read));
                break;
            }
            Err(error) => failures.push(error.to_string()),
        }
    }
    let Some((dir, (manifest, parameters, exp_avg, exp_avg_sq))) = loaded else {
        anyhow::bail!(
            "no committed checkpoint verifies: {}; restore one, or start the run afresh under a new run_name",
            failures.join("; ")
        );
    };
    started.trainer.restore(
        &parameters,
        &exp_avg,
        &exp_avg_sq,
        manifest.step,
        manifest.skipped_steps,
    )?;
    if let (Some(feed), Some(cursor)) = (started.laion.as_mut(), &manifest.laion_cursor) {
        feed.cursor = cursor.into();
    }
    if let (Some(feed), Some(cursor)) = (started.mmc4.as_mut(), &manifest.mmc4_cursor) {
        feed.cursor = cursor.into();
    }
    if rank == 0 {
        if !failures.is_empty() {
            let message = format!(
                "checkpoint verification failed, resumed from the previous committed one at step {}: {}",
                manifest.step,
                failures.join("; ")
            );
            eprintln!("{message}");
            tracing::warn!("{message}");
            if let Some(link) = link {
                link.note(manifest.step, "checkpoint", message);
            }
        }
        eprintln!(
            "resuming from {} (step {}, saved by {} rank(s); now {world})",
            dir.display(),
            manifest.step,
            manifest.world_size
        );
    }
    Ok(())
}

/// Rank 0: the resolved run as `config.json`, and a line in
/// `attempts.jsonl` saying when this start began, entered the run and was
/// ready, and from which step (for `bench/recovery`).
pub(crate) fn record_start(
    job: &TrainJob,
    run_dir: &Path,
    link: Option<&dyn ClusterLink>,
    entered: f64,
    step: u64,
) -> anyhow::Result<()> {
    std::fs::write(run_dir.join("config.json"), serde_json::to_vec_pretty(job)?)?;
    let mut starts = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("attempts.jsonl"))?;
    let line = json!({
        "attempt": link.map_or(0, |link| link.attempt()),
        "started": process_start_unix_seconds(),
        "entered": entered,
        "loaded": flamingo_common::unix_seconds(),
        "step": step,
    });
    writeln!(starts, "{line}")?;
    Ok(())
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
