//! Finding a run's checkpoint from what a user names: a run folder, a
//! checkpoint folder, or a cluster job id whose committed checkpoints the
//! coordinator knows (`export`, `eval --job`, `launch --job eval`).

use std::path::{Path, PathBuf};

use anyhow::bail;
use flamingo_engine::checkpoint;

/// The checkpoint folder `run` names at `step` (default: the latest
/// committed one).
pub async fn resolve(address: &str, run: &Path, step: Option<u64>) -> anyhow::Result<PathBuf> {
    // Not a folder here (nor an object-store URL): a job id whose
    // checkpoints etcd knows.
    let run = if run.exists() || checkpoint::object::is_url(run) {
        run.to_path_buf()
    } else {
        committed(address, &run.display().to_string(), step).await?
    };
    let is_checkpoint = checkpoint::is_committed(&run);
    let step = step.filter(|_| !is_checkpoint);
    match step {
        Some(step) => at_step(&run, step),
        None if is_checkpoint => Ok(run),
        None => checkpoint::latest(&run)
            .ok_or_else(|| anyhow::anyhow!("{}: no committed checkpoint", run.display())),
    }
}

/// The folder of job `job`'s committed checkpoint at `step` (the latest).
async fn committed(address: &str, job: &str, step: Option<u64>) -> anyhow::Result<PathBuf> {
    let mut session = flamingo_client::Session::open(address).await?;
    let job = session.job(job).await?;
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
    Ok(PathBuf::from(&checkpoint.path))
}

/// A run folder's checkpoint at `step`, naming the ones there when it has
/// none at that step.
fn at_step(run: &Path, step: u64) -> anyhow::Result<PathBuf> {
    let dir = checkpoint::checkpoint_dir(run, step);
    if checkpoint::is_committed(&dir) {
        return Ok(dir);
    }
    let mut committed: Vec<String> = checkpoint::committed(run)
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    committed.sort();
    bail!(
        "{}: no checkpoint at step {step} (there: {})",
        run.display(),
        if committed.is_empty() {
            "none".to_string()
        } else {
            committed.join(", ")
        }
    )
}
