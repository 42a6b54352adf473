//! Checkpoint commits, and a job's end (finished or stopped).

use flamingo_common::{CheckpointRecord, EventKind, JobId, JobRecord, JobState};

use super::nodes::stop_message;
use super::{Cluster, CommitRefused, Effects};

impl Cluster {
    /// Rank 0 says every rank wrote checkpoint `record.step`: it becomes the
    /// latest (one write of the job record, cursor included), and the
    /// retention policy names the checkpoints to delete.
    pub fn commit_checkpoint(
        &mut self,
        job_id: &JobId,
        record: CheckpointRecord,
        now_ms: i64,
    ) -> Result<(Effects, Vec<String>), CommitRefused> {
        let job = self.jobs.get_mut(job_id).ok_or(CommitRefused::UnknownJob)?;
        if job.attempt != record.attempt || job.state != JobState::Running {
            return Err(CommitRefused::Stale {
                current_attempt: job.attempt,
                state: job.state,
            });
        }
        let mut effects = Effects::default();
        job.checkpoints.retain(|kept| kept.step != record.step);
        let step = record.step;
        let path = record.path.clone();
        // Rank 0 finished this step (its batched step reports may lag).
        job.last_step = job.last_step.max(step);
        job.checkpoints.push(record);
        job.checkpoints.sort_by_key(|kept| kept.step);
        let keep_last = job.spec.policy.keep_checkpoints.max(1) as usize;
        let every = u64::from(job.spec.policy.keep_every_checkpoint_steps);
        let newest_from = job.checkpoints.len().saturating_sub(keep_last);
        let mut retired = Vec::new();
        let mut kept = Vec::new();
        for (index, checkpoint) in job.checkpoints.drain(..).enumerate() {
            let milestone = every > 0 && checkpoint.step % every == 0;
            if index >= newest_from || milestone {
                kept.push(checkpoint);
            } else {
                retired.push(checkpoint.path);
            }
        }
        job.checkpoints = kept;
        let dropped = if retired.is_empty() {
            String::new()
        } else {
            format!("; retired {}", retired.len())
        };
        Self::event(
            job,
            now_ms,
            EventKind::Checkpoint,
            format!("checkpoint step {step} committed ({path}){dropped}"),
            &mut effects,
        );
        Ok((effects, retired))
    }

    /// Moves a job to a terminal state and tells every node that still runs
    /// one of its ranks to kill them.
    pub(super) fn finish(
        job: &mut JobRecord,
        state: JobState,
        message: String,
        now_ms: i64,
    ) -> Effects {
        let mut effects = Effects::default();
        job.state = state;
        job.message = message.clone();
        job.finished_unix_ms = Some(now_ms);
        Self::event(
            job,
            now_ms,
            EventKind::Finished,
            format!("{}: {message}", state.as_str()),
            &mut effects,
        );
        let nodes = job.live_nodes();
        for node_id in nodes {
            effects.messages.push((
                node_id,
                stop_message(&job.id, &format!("job {}: {message}", state.as_str())),
            ));
        }
        effects
    }

    /// A user asked to stop the job.
    pub fn stop(&mut self, job_id: &JobId, now_ms: i64) -> Effects {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return Effects::default();
        };
        if job.state.is_terminal() {
            return Effects::default();
        }
        let mut effects = Self::finish(
            job,
            JobState::Stopped,
            "stopped by user".to_string(),
            now_ms,
        );
        effects.merge(self.schedule(now_ms));
        effects
    }
}
