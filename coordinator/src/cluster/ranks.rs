//! Ranks' starts and exits as agents report them, the restart policy, step
//! progress and the hang watchdog.

use flamingo_common::{EventKind, JobId, JobRecord, JobState, NodeId, RankState};

use super::nodes::stop_attempts;
use super::{Cluster, Effects, RankCounts, RankOutcome, CHECKPOINT_GRACE_SECONDS};

impl Cluster {
    /// An agent's report about one rank of one attempt (reports about a
    /// superseded attempt are ignored: its ranks were already written off).
    pub fn rank_report(
        &mut self,
        job_id: &JobId,
        attempt: u32,
        rank: u32,
        outcome: RankOutcome,
        now_ms: i64,
    ) -> Effects {
        let mut effects = Effects::default();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return effects;
        };
        if attempt != job.attempt {
            return effects;
        }
        // Ranks are kept in rank order: the report's record is at its index.
        let index = match job.ranks.get(rank as usize) {
            Some(record) if record.rank == rank => rank as usize,
            _ => match job.ranks.iter().position(|record| record.rank == rank) {
                Some(index) => index,
                None => return effects,
            },
        };
        let key = (job_id.clone(), attempt);
        let counts = self
            .counts
            .entry(key.clone())
            .or_insert_with(|| RankCounts::of(job));
        let record = &mut job.ranks[index];
        match outcome {
            RankOutcome::Started { pid } => {
                if record.state == RankState::Assigned {
                    record.state = RankState::Running;
                    record.pid = Some(pid);
                    effects.jobs_changed.insert(job_id.clone());
                    counts.unstarted = counts.unstarted.saturating_sub(1);
                    // One event when the whole group runs (not one per
                    // rank: a 32,768-rank job would write 32,768).
                    if counts.unstarted == 0 {
                        *counts = RankCounts::of(job);
                        if counts.unstarted == 0 {
                            let message = format!(
                                "all {} rank(s) of attempt {attempt} started",
                                job.ranks.len()
                            );
                            Self::event(job, now_ms, EventKind::RankStarted, message, &mut effects);
                        }
                    }
                }
            }
            RankOutcome::Exited {
                exit_code,
                signal,
                result_json,
            } => {
                if record.state == RankState::Exited {
                    return effects;
                }
                let state_before = job.state;
                record.state = RankState::Exited;
                record.exit_code = Some(exit_code);
                record.signal = (signal != 0).then_some(signal);
                let node = record.node.clone();
                if rank == 0 && result_json.is_some() {
                    job.result_json = result_json;
                }
                let failed = exit_code != 0 || signal != 0;
                effects.jobs_changed.insert(job_id.clone());
                if job.state == JobState::Running
                    && job.spec.kind.restartable()
                    && exit_code == flamingo_common::jobs::PREEMPTED_EXIT_CODE
                    && signal == 0
                {
                    self.counts.remove(&key);
                    effects.merge(Self::requeue(job, &node, now_ms));
                    effects.merge(self.schedule(now_ms));
                    return effects;
                }
                if failed {
                    let description = if signal != 0 {
                        format!("rank {rank} on {node} was killed by signal {signal}")
                    } else {
                        format!("rank {rank} on {node} exited with code {exit_code}")
                    };
                    Self::event(
                        job,
                        now_ms,
                        EventKind::RankExited,
                        description.clone(),
                        &mut effects,
                    );
                    if job.state == JobState::Running {
                        self.counts.remove(&key);
                        effects.merge(Self::fail_or_restart(job, description, &[node], now_ms));
                    }
                } else {
                    counts.unfinished = counts.unfinished.saturating_sub(1);
                    if counts.unfinished == 0 {
                        *counts = RankCounts::of(job);
                    }
                    if job.state == JobState::Running && counts.unfinished == 0 {
                        self.counts.remove(&key);
                        let message = format!("all {} rank(s) exited with code 0", job.ranks.len());
                        effects.merge(Self::finish(job, JobState::Succeeded, message, now_ms));
                    }
                }
                // The job ended or restarts: its slots are free now. (A
                // slot freed by one rank of a job that goes on is used by
                // the next tick: scheduling at each of 32,768 exits would
                // cost more than it gains.)
                if state_before != job.state {
                    effects.merge(self.schedule(now_ms));
                }
                return effects;
            }
            RankOutcome::FailedToStart { message } => {
                if !record.state.is_live() {
                    return effects;
                }
                record.state = RankState::Exited;
                record.message = message.clone();
                let node = record.node.clone();
                let description = format!("rank {rank} on {node} failed to start: {message}");
                if job.state == JobState::Running {
                    effects.merge(Self::fail_or_restart(job, description, &[node], now_ms));
                } else {
                    effects.jobs_changed.insert(job_id.clone());
                }
                self.counts.remove(&key);
                effects.merge(self.schedule(now_ms));
            }
        }
        effects
    }

    /// A failure of a running job: a training job restarts its whole group
    /// from the last committed checkpoint while restarts remain (the old
    /// ranks are killed at once, the job queues again and is re-placed,
    /// avoiding nodes that keep failing); any other job, or one out of
    /// restarts, fails.
    pub(super) fn fail_or_restart(
        job: &mut JobRecord,
        cause: String,
        failed_nodes: &[NodeId],
        now_ms: i64,
    ) -> Effects {
        for node in failed_nodes {
            *job.node_failures.entry(node.clone()).or_default() += 1;
        }
        let restarts_used = job.restarts.len() as u32;
        let max = job.spec.policy.max_restarts;
        if !job.spec.kind.restartable() || restarts_used >= max {
            let message = if job.spec.kind.restartable() {
                format!("{cause} (no restarts left: {restarts_used} of {max} used)")
            } else {
                cause
            };
            return Self::finish(job, JobState::Failed, message, now_ms);
        }
        let mut effects = Effects::default();
        let nodes = job.live_nodes();
        job.attempt += 1;
        job.state = JobState::Pending;
        job.ranks.clear();
        let from = job.latest_checkpoint().map_or_else(
            || "the start (no checkpoint committed yet)".to_string(),
            |checkpoint| format!("step {} ({})", checkpoint.step, checkpoint.path),
        );
        let excluded = job.excluded_nodes();
        let excluded = if excluded.is_empty() {
            String::new()
        } else {
            format!(
                "; avoiding {}",
                excluded
                    .iter()
                    .map(NodeId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let line = format!(
            "restart {} of {max}: {cause}; resuming from {from}{excluded}",
            job.attempt
        );
        job.restarts.push(format!(
            "{} {line}",
            flamingo_common::format_unix_ms(now_ms)
        ));
        Self::event(job, now_ms, EventKind::Restart, line, &mut effects);
        effects.messages.extend(nodes.into_iter().map(|node_id| {
            (
                node_id,
                stop_attempts(
                    &job.id,
                    format!("restarting the group: {cause}"),
                    job.attempt,
                    true,
                    0,
                ),
            )
        }));
        effects
    }

    /// A rank checkpointed and stopped on SIGTERM (its node is draining or
    /// preempted): the group is replaced from that checkpoint when capacity
    /// allows, without using up a restart.
    pub(super) fn requeue(job: &mut JobRecord, node: &NodeId, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        let nodes = job.live_nodes();
        job.attempt += 1;
        job.state = JobState::Pending;
        job.ranks.clear();
        let from = job
            .latest_checkpoint()
            .map_or("the start".to_string(), |c| format!("step {}", c.step));
        let message = if job.growing {
            format!("checkpointed to grow; requeued to resume from {from} on more nodes")
        } else {
            format!("preempted on {node}: checkpointed; requeued to resume from {from}")
        };
        Self::event(job, now_ms, EventKind::Preempted, message, &mut effects);
        effects.messages.extend(nodes.into_iter().map(|node_id| {
            (
                node_id,
                stop_attempts(
                    &job.id,
                    "requeued after a preemption".into(),
                    job.attempt,
                    false,
                    CHECKPOINT_GRACE_SECONDS,
                ),
            )
        }));
        effects
    }

    /// Rank 0 reported a finished step.
    pub fn progress(&mut self, job_id: &JobId, attempt: u32, step: u64, now_ms: i64) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            if job.attempt == attempt && job.state == JobState::Running {
                job.last_step = step;
                self.progress_ms.insert(job_id.clone(), now_ms);
            }
        }
    }

    /// Periodic check: a running job with a hang timeout that reported no
    /// step for that long is failed over like a crashed rank.
    pub fn tick(&mut self, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        let hung: Vec<(JobId, i64)> = self
            .jobs
            .values()
            .filter(|job| job.state == JobState::Running)
            .filter_map(|job| {
                let timeout = i64::from(job.spec.policy.hang_timeout_seconds) * 1000;
                let last = self
                    .progress_ms
                    .get(&job.id)
                    .copied()
                    .unwrap_or(0)
                    .max(job.started_unix_ms.unwrap_or(0))
                    .max(self.booted_ms);
                (timeout > 0 && now_ms - last > timeout).then(|| (job.id.clone(), now_ms - last))
            })
            .collect();
        for (job_id, silent_ms) in hung {
            let job = self.jobs.get_mut(&job_id).expect("listed above");
            let cause = format!(
                "hang: no step finished for {:.0} s (hang_timeout_seconds = {}) after step {}",
                silent_ms as f64 / 1000.0,
                job.spec.policy.hang_timeout_seconds,
                job.last_step
            );
            effects.merge(Self::fail_or_restart(job, cause, &[], now_ms));
            self.progress_ms.remove(&job_id);
        }
        // Also places pending jobs in slots that ranks freed one by one.
        effects.merge(self.schedule(now_ms));
        effects
    }
}
