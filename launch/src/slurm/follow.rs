//! Following a submitted Slurm job from outside the allocation: its status
//! (Slurm's and the flamingo job's), waiting for it across requeues, and
//! stopping it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_common::JobRecord;

use super::records::{Record, SlurmState};
use super::slurm_command;

/// The live job record: from the coordinator while it runs, else the one
/// written when the job ended.
async fn current_job(record: &Record) -> crate::Result<Option<JobRecord>> {
    if let Some(job) = record.final_job()? {
        return Ok(Some(job));
    }
    if let (Some(address), Some(job_id)) = (record.coordinator(), record.job_id()) {
        if let Ok(mut session) = record.session(address).await {
            if let Ok(job) = session.job(job_id).await {
                return Ok(Some(job));
            }
        }
    }
    Ok(None)
}

/// `flamingoctl status` of a Slurm job: Slurm's state and the flamingo
/// job's, as text or JSON.
pub async fn status(record: &Record, json: bool) -> crate::Result<String> {
    let state = SlurmState::query(record.slurm_job_id());
    let job = current_job(record).await?;
    Ok(render(
        record,
        state.as_ref(),
        job.as_ref(),
        json,
        "not launched yet (it starts when Slurm runs the batch job)",
    ))
}

/// The Slurm job's state above the flamingo job (or `missing` when there is
/// none yet); with `json`, the job's JSON with a `slurm` object added.
pub fn render(
    record: &Record,
    state: Option<&SlurmState>,
    job: Option<&JobRecord>,
    json: bool,
    missing: &str,
) -> String {
    if json {
        let mut value = match job {
            Some(job) => flamingo_client::render::job_json(job),
            None => serde_json::json!({"id": null, "state": "not_started"}),
        };
        value["slurm"] = record.slurm_json(state);
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&value).expect("JSON values serialize")
        );
    }
    let mut out = format!(
        "slurm job {}: {}\nfolder    {}\n",
        record.slurm_job_id(),
        state.map_or_else(
            || "no longer in Slurm's records".to_string(),
            SlurmState::summary
        ),
        record.dir.display()
    );
    if let Some(dashboard) = record
        .control
        .as_ref()
        .filter(|c| !c.stopped)
        .and_then(|c| c.dashboard.as_deref())
    {
        out.push_str(&format!("dashboard {dashboard}\n"));
    }
    match job {
        Some(job) => out.push_str(&flamingo_client::render::job_text(job)),
        None => out.push_str(&format!("flamingo job: {missing}\n")),
    }
    out
}

/// Follows a Slurm job until its flamingo job ends (across requeues) and
/// Slurm has let go of the allocation.
pub async fn wait(record: &Record, progress: bool, follow: bool) -> anyhow::Result<JobRecord> {
    let job = wait_job(record, progress, follow).await?;
    // The batch job stops the agents and the control plane, then ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && SlurmState::query(record.slurm_job_id()).is_some_and(|s| !s.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(job)
}

async fn wait_job(record: &Record, progress: bool, follow: bool) -> anyhow::Result<JobRecord> {
    let mut last_state = String::new();
    loop {
        let record = Record::load(&record.dir)?;
        if let Some(job) = record.final_job()? {
            return Ok(job);
        }
        let state = SlurmState::query(record.slurm_job_id());
        let summary = state.as_ref().map_or_else(
            || "no longer in Slurm's records".to_string(),
            SlurmState::summary,
        );
        let started = record.control.as_ref().is_some_and(|c| {
            c.job_id.is_some()
                && !c.stopped
                && state
                    .as_ref()
                    .is_some_and(|s| s.restarts == c.restarts && s.state == "RUNNING")
        });
        if started {
            let address = record.coordinator().unwrap_or_default().to_string();
            let job_id = record.job_id().unwrap_or_default().to_string();
            if let Ok(mut session) = record.session(&address).await {
                match session.wait(&job_id, progress, follow).await {
                    Ok(job) => {
                        // The control plane writes the final record as it stops.
                        let deadline = Instant::now() + Duration::from_secs(20);
                        while Instant::now() < deadline {
                            if let Some(job) = record.final_job()? {
                                return Ok(job);
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        return Ok(job);
                    }
                    Err(error) if progress => {
                        eprintln!("(lost the coordinator: {error:#}; following Slurm)");
                    }
                    Err(_) => {}
                }
            }
        } else if state.as_ref().is_none_or(SlurmState::is_finished) {
            // One last look: the final record may have landed meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(job) = record.final_job()? {
                return Ok(job);
            }
            let output = record
                .dir
                .join(format!("slurm-{}.out", record.slurm_job_id()));
            bail!(
                "slurm job {} ended ({summary}) before its flamingo job did; its output ({}) ends:\n{}",
                record.slurm_job_id(),
                output.display(),
                crate::local::tail(&output, 15)
            );
        }
        if progress && summary != last_state {
            eprintln!("slurm job {}: {summary}", record.slurm_job_id());
            last_state = summary;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `flamingoctl stop` for a Slurm job: the flamingo job is stopped through
/// its coordinator (its ranks exit, the batch job ends by itself), then
/// `scancel` releases whatever is left of the allocation. Returns what
/// [`render`] shows of the result.
pub async fn stop(record: &Record, json: bool) -> anyhow::Result<String> {
    let mut stopped = None;
    if let (Some(address), Some(job_id)) = (record.coordinator(), record.job_id()) {
        if let Ok(mut session) = record.session(address).await {
            stopped = Some(session.stop(job_id).await?);
        }
    }
    let slurm_id = record.slurm_job_id();
    let before = SlurmState::query(slurm_id);
    if before.as_ref().is_some_and(|s| !s.is_finished()) {
        let status = slurm_command("scancel")?
            .arg(slurm_id)
            .status()
            .context("running scancel")?;
        if !status.success() {
            bail!("scancel {slurm_id} failed ({status})");
        }
    }
    // Until Slurm has let go of the nodes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut state = SlurmState::query(slurm_id);
    while state
        .as_ref()
        .is_some_and(|s| !s.is_finished() || s.state == "COMPLETING")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        state = SlurmState::query(slurm_id);
    }
    let job = match record.final_job()? {
        Some(job) => Some(job),
        None => stopped,
    };
    Ok(render(
        record,
        state.as_ref(),
        job.as_ref(),
        json,
        "cancelled before it was launched",
    ))
}
