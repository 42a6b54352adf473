//! The coordinator's pure core: nodes and jobs in memory, and every state
//! transition as a function that returns the effects to carry out (records
//! to persist, events to publish, messages for agents). No I/O here, so the
//! rules — gang scheduling, failing a job when a rank fails, losing a node —
//! are unit-tested directly.

use std::collections::{BTreeMap, BTreeSet};

use flamingo_common::{
    CheckpointRecord, EventKind, JobEvent, JobId, JobRecord, JobSpec, JobState, NodeId, NodeRecord,
    RankRecord, RankState,
};
use flamingo_proto::v1 as pb;

use crate::placement::{global_rank, pick_port, place, NodeCapacity};

/// What a transition asks the I/O layer to do, in order.
#[derive(Debug, Default)]
pub struct Effects {
    pub jobs_changed: BTreeSet<JobId>,
    pub events: Vec<JobEvent>,
    pub messages: Vec<(NodeId, pb::CoordinatorMessage)>,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.jobs_changed.extend(other.jobs_changed);
        self.events.extend(other.events);
        self.messages.extend(other.messages);
    }
}

/// How a rank ended, as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankOutcome {
    Started {
        pid: u32,
    },
    Exited {
        exit_code: i32,
        signal: i32,
        result_json: Option<String>,
    },
    FailedToStart {
        message: String,
    },
}

#[derive(Debug, Default)]
pub struct Cluster {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub jobs: BTreeMap<JobId, JobRecord>,
    /// When each running job last reported a step (in memory only: a
    /// restarted coordinator gives every job a fresh hang timeout).
    pub progress_ms: BTreeMap<JobId, i64>,
    /// When this coordinator started.
    pub booted_ms: i64,
    /// Registered nodes whose agent's stream closed (a dead agent closes it
    /// at once, long before its lease expires): nothing is placed on them
    /// until they attach again.
    pub detached: BTreeSet<NodeId>,
}

/// How long ranks asked to checkpoint and stop get before SIGKILL.
pub const CHECKPOINT_GRACE_SECONDS: u32 = 300;

/// Why a checkpoint commit was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitRefused {
    UnknownJob,
    /// The attempt was superseded by a restart, or the job ended.
    Stale {
        current_attempt: u32,
        state: JobState,
    },
}

impl Cluster {
    fn event(
        job: &mut JobRecord,
        now_ms: i64,
        kind: EventKind,
        message: String,
        effects: &mut Effects,
    ) {
        let event = JobEvent {
            job_id: job.id.clone(),
            seq: job.next_event_seq,
            unix_ms: now_ms,
            message,
            state: job.state,
            kind,
        };
        job.next_event_seq += 1;
        effects.jobs_changed.insert(job.id.clone());
        effects.events.push(event);
    }

    pub fn free_slots(&self, node: &NodeRecord) -> u32 {
        let used: u32 = self
            .jobs
            .values()
            .map(|job| job.slots_held_on(&node.node_id))
            .sum();
        node.slots.saturating_sub(used)
    }

    /// A new job enters the queue and scheduling runs.
    pub fn submit(&mut self, job: JobRecord, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        let mut job = job;
        let spec = &job.spec;
        let message = format!(
            "submitted {} on {} node(s) × {} slot(s)",
            spec.kind.label(),
            spec.nodes,
            spec.slots_per_node
        );
        Self::event(
            &mut job,
            now_ms,
            EventKind::Submitted,
            message,
            &mut effects,
        );
        self.jobs.insert(job.id.clone(), job);
        effects.merge(self.schedule(now_ms));
        effects
    }

    /// Places pending jobs in submission order; the first that does not fit
    /// blocks the ones behind it (strict FIFO gang scheduling: a large job is
    /// never starved by a stream of small ones).
    pub fn schedule(&mut self, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        let mut pending: Vec<(i64, JobId)> = self
            .jobs
            .values()
            .filter(|job| job.state == JobState::Pending)
            .map(|job| (job.created_unix_ms, job.id.clone()))
            .collect();
        pending.sort();
        for (_, job_id) in pending {
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            let excluded = job.excluded_nodes();
            let capacity = |leave_out: &[NodeId]| -> Vec<NodeCapacity> {
                self.nodes
                    .values()
                    .map(|node| NodeCapacity {
                        node_id: node.node_id.clone(),
                        free_slots: self.free_slots(node),
                        schedulable: !node.draining
                            && !leave_out.contains(&node.node_id)
                            && !self.detached.contains(&node.node_id),
                    })
                    .collect()
            };
            // Nodes that failed the job repeatedly are used only when
            // nothing else fits; an elastic job takes as many nodes as fit,
            // down to its minimum.
            let slots = job.spec.slots_per_node;
            let chosen = (job.spec.fewest_nodes()..=job.spec.nodes)
                .rev()
                .find_map(|nodes| {
                    place(&capacity(&excluded), nodes, slots)
                        .or_else(|| place(&capacity(&[]), nodes, slots))
                });
            let Some(chosen) = chosen else {
                break;
            };
            let master_node = self.nodes[&chosen[0]].clone();
            let taken: Vec<u16> = self
                .jobs
                .values()
                .filter(|other| {
                    other.state == JobState::Running
                        && other.ranks.first().map(|rank| &rank.node) == Some(&master_node.node_id)
                })
                .map(|other| other.master_port)
                // A restart takes a fresh port: the last attempt's may be
                // held by a dying process or in TIME_WAIT.
                .chain((job.attempt > 0).then_some(job.master_port))
                .collect();
            let Some(port) = pick_port(
                master_node.rendezvous_port_first,
                master_node.rendezvous_port_count,
                &taken,
            ) else {
                break;
            };
            let job = self.jobs.get_mut(&job_id).expect("job listed above");
            let slots = job.spec.slots_per_node;
            job.ranks = chosen
                .iter()
                .enumerate()
                .flat_map(|(node_rank, node_id)| {
                    (0..slots).map(move |local_rank| RankRecord {
                        rank: global_rank(node_rank as u32, slots, local_rank),
                        local_rank,
                        node: node_id.clone(),
                        state: RankState::Assigned,
                        exit_code: None,
                        signal: None,
                        pid: None,
                        message: String::new(),
                    })
                })
                .collect();
            job.state = JobState::Running;
            job.started_unix_ms = Some(now_ms);
            job.placed_nodes = chosen.len() as u32;
            job.growing = false;
            self.progress_ms.insert(job_id.clone(), now_ms);
            job.master_addr = master_node.address.clone();
            job.master_port = port;
            let message = format!(
                "scheduled {} rank(s) on {}; master {}:{}",
                job.ranks.len(),
                chosen
                    .iter()
                    .map(NodeId::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                job.master_addr,
                job.master_port
            );
            Self::event(job, now_ms, EventKind::Scheduled, message, &mut effects);
            for node_id in &chosen {
                effects
                    .messages
                    .push((node_id.clone(), start_message(job, node_id)));
            }
        }
        effects.merge(self.grow(now_ms));
        effects
    }

    /// Running elastic jobs below their size, when enough free nodes for at
    /// least one more node of theirs exist (after every pending job was
    /// considered): each is asked to checkpoint and stop (SIGTERM, as a
    /// preemption), and is then requeued and placed on more nodes.
    fn grow(&mut self, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        let any_pending = self.jobs.values().any(|job| job.state == JobState::Pending);
        if any_pending {
            return effects;
        }
        let candidates: Vec<JobId> = self
            .jobs
            .values()
            .filter(|job| {
                job.state == JobState::Running
                    && job.spec.elastic()
                    && !job.growing
                    && job.placed_nodes < job.spec.nodes
            })
            .map(|job| job.id.clone())
            .collect();
        for job_id in candidates {
            let job = &self.jobs[&job_id];
            let used: BTreeSet<&NodeId> = job.ranks.iter().map(|rank| &rank.node).collect();
            let excluded = job.excluded_nodes();
            let spare = self
                .nodes
                .values()
                .filter(|node| {
                    !node.draining
                        && !self.detached.contains(&node.node_id)
                        && !used.contains(&node.node_id)
                        && !excluded.contains(&node.node_id)
                        && self.free_slots(node) >= job.spec.slots_per_node
                })
                .count() as u32;
            if spare == 0 {
                continue;
            }
            let target = (job.placed_nodes + spare).min(job.spec.nodes);
            let job = self.jobs.get_mut(&job_id).expect("listed above");
            job.growing = true;
            let nodes = job.live_nodes();
            let message = format!(
                "growing from {} to {target} node(s): checkpoint, then restart on more nodes",
                job.placed_nodes
            );
            Self::event(job, now_ms, EventKind::Grow, message, &mut effects);
            effects.messages.extend(nodes.into_iter().map(|node_id| {
                (
                    node_id,
                    stop_attempts(
                        &job.id,
                        "checkpoint and stop: the job grows".into(),
                        job.attempt + 1,
                        false,
                        CHECKPOINT_GRACE_SECONDS,
                    ),
                )
            }));
        }
        effects
    }

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
        let Some(record) = job.ranks.iter_mut().find(|record| record.rank == rank) else {
            return effects;
        };
        match outcome {
            RankOutcome::Started { pid } => {
                if record.state == RankState::Assigned {
                    record.state = RankState::Running;
                    record.pid = Some(pid);
                    let message = format!("rank {rank} started on {} (pid {pid})", record.node);
                    Self::event(job, now_ms, EventKind::RankStarted, message, &mut effects);
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
                record.state = RankState::Exited;
                record.exit_code = Some(exit_code);
                record.signal = (signal != 0).then_some(signal);
                let node = record.node.clone();
                if rank == 0 && result_json.is_some() {
                    job.result_json = result_json;
                }
                let failed = exit_code != 0 || signal != 0;
                if job.state == JobState::Running
                    && job.spec.kind.restartable()
                    && exit_code == flamingo_common::jobs::PREEMPTED_EXIT_CODE
                    && signal == 0
                {
                    effects.merge(Self::requeue(job, &node, now_ms));
                    effects.merge(self.schedule(now_ms));
                    return effects;
                }
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
                if job.state == JobState::Running && failed {
                    effects.merge(Self::fail_or_restart(job, description, &[node], now_ms));
                } else {
                    effects.jobs_changed.insert(job_id.clone());
                    if job.state == JobState::Running
                        && job.ranks.iter().all(|rank| {
                            rank.state == RankState::Exited && rank.exit_code == Some(0)
                        })
                    {
                        let message = format!("all {} rank(s) exited with code 0", job.ranks.len());
                        effects.merge(Self::finish(job, JobState::Succeeded, message, now_ms));
                    }
                }
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
            }
        }
        if !effects.jobs_changed.is_empty() {
            effects.merge(self.schedule(now_ms));
        }
        effects
    }

    /// A failure of a running job: a training job restarts its whole group
    /// from the last committed checkpoint while restarts remain (the old
    /// ranks are killed at once, the job queues again and is re-placed,
    /// avoiding nodes that keep failing); any other job, or one out of
    /// restarts, fails.
    fn fail_or_restart(
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
    fn requeue(job: &mut JobRecord, node: &NodeId, now_ms: i64) -> Effects {
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
        if !effects.jobs_changed.is_empty() {
            effects.merge(self.schedule(now_ms));
        }
        effects
    }

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
    fn finish(job: &mut JobRecord, state: JobState, message: String, now_ms: i64) -> Effects {
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

    /// A node vanished (its lease expired, or its agent restarted): its ranks
    /// are lost and their jobs fail.
    pub fn node_lost(&mut self, node_id: &NodeId, reason: &str, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        self.nodes.remove(node_id);
        self.detached.remove(node_id);
        for job in self.jobs.values_mut() {
            let mut touched = false;
            for rank in job.ranks.iter_mut() {
                if &rank.node == node_id && rank.state.is_live() {
                    rank.state = RankState::Lost;
                    rank.message = format!("node {node_id} lost: {reason}");
                    touched = true;
                }
            }
            if !touched {
                continue;
            }
            if job.state == JobState::Running {
                let message = format!("node {node_id} lost: {reason}");
                Self::event(
                    job,
                    now_ms,
                    EventKind::NodeLost,
                    message.clone(),
                    &mut effects,
                );
                effects.merge(Self::fail_or_restart(
                    job,
                    message,
                    std::slice::from_ref(node_id),
                    now_ms,
                ));
            } else {
                effects.jobs_changed.insert(job.id.clone());
            }
        }
        effects.merge(self.schedule(now_ms));
        effects
    }

    /// Level-triggered reconciliation on every heartbeat: re-send starts the
    /// agent has not acted on (e.g. after a coordinator restart), and stops
    /// for ranks of jobs that are over or unknown.
    pub fn heartbeat(
        &mut self,
        node_id: &NodeId,
        running: &BTreeSet<(JobId, u32, u32)>,
        grace_ms: i64,
        now_ms: i64,
    ) -> Effects {
        let mut effects = Effects::default();
        let mut told: BTreeSet<&JobId> = BTreeSet::new();
        for (job_id, attempt, _) in running {
            let job = self.jobs.get(job_id);
            let over = job.is_none_or(|job| job.state.is_terminal());
            let superseded = job.is_some_and(|job| *attempt < job.attempt);
            if (over || superseded) && told.insert(job_id) {
                let before_attempt = match job {
                    Some(job) if !over => job.attempt,
                    _ => 0,
                };
                effects.messages.push((
                    node_id.clone(),
                    stop_attempts(
                        job_id,
                        "job is no longer running this attempt".into(),
                        before_attempt,
                        superseded,
                        0,
                    ),
                ));
            }
        }
        for job in self.jobs.values_mut() {
            let assigned_here = job
                .ranks
                .iter()
                .any(|rank| &rank.node == node_id && rank.state == RankState::Assigned);
            if job.state == JobState::Running && assigned_here {
                let missing = job.ranks.iter().any(|rank| {
                    &rank.node == node_id
                        && rank.state == RankState::Assigned
                        && !running.contains(&(job.id.clone(), job.attempt, rank.rank))
                });
                let waited = job
                    .started_unix_ms
                    .is_some_and(|started| now_ms - started > grace_ms);
                if missing && waited {
                    effects
                        .messages
                        .push((node_id.clone(), start_message(job, node_id)));
                }
            }
            // A finished job whose rank the node no longer runs: the process
            // is gone even if its exit report never arrived.
            let settled = job
                .finished_unix_ms
                .is_some_and(|finished| now_ms - finished > grace_ms);
            if job.state.is_terminal() && settled {
                for rank in job.ranks.iter_mut() {
                    if &rank.node == node_id
                        && rank.state.is_live()
                        && !running.contains(&(job.id.clone(), job.attempt, rank.rank))
                    {
                        rank.state = RankState::Lost;
                        rank.message = "not running on its node after the job ended".into();
                        effects.jobs_changed.insert(job.id.clone());
                    }
                }
            }
        }
        if !effects.jobs_changed.is_empty() {
            effects.merge(self.schedule(now_ms));
        }
        effects
    }

    /// Every start message a freshly attached agent should see.
    pub fn starts_for(&self, node_id: &NodeId) -> Vec<pb::CoordinatorMessage> {
        self.jobs
            .values()
            .filter(|job| {
                job.state == JobState::Running
                    && job
                        .ranks
                        .iter()
                        .any(|rank| &rank.node == node_id && rank.state == RankState::Assigned)
            })
            .map(|job| start_message(job, node_id))
            .collect()
    }
}

fn start_message(job: &JobRecord, node_id: &NodeId) -> pb::CoordinatorMessage {
    let spec: &JobSpec = &job.spec;
    let node_rank = job
        .ranks
        .iter()
        .find(|rank| &rank.node == node_id)
        .map(|rank| rank.rank / spec.slots_per_node)
        .unwrap_or(0);
    let ranks = job
        .ranks
        .iter()
        .filter(|rank| &rank.node == node_id && rank.state == RankState::Assigned)
        .map(|rank| pb::RankAssignment {
            job_id: job.id.0.clone(),
            spec: Some(pb::JobSpec::from(spec)),
            rank: rank.rank,
            local_rank: rank.local_rank,
            world_size: job.ranks.len() as u32,
            local_world_size: spec.slots_per_node,
            node_rank,
            master_addr: job.master_addr.clone(),
            master_port: u32::from(job.master_port),
            attempt: job.attempt,
            resume_from: job
                .latest_checkpoint()
                .map(|checkpoint| checkpoint.path.clone())
                .unwrap_or_default(),
        })
        .collect();
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Start(pb::StartRanks {
            ranks,
        })),
    }
}

fn stop_message(job_id: &JobId, reason: &str) -> pb::CoordinatorMessage {
    stop_attempts(job_id, reason.to_string(), 0, false, 0)
}

/// Stops the job's ranks of attempts before `before_attempt` (0: all):
/// SIGKILL at once when `kill_now`, else SIGTERM and SIGKILL after
/// `grace_seconds` (0: the agent's default grace).
fn stop_attempts(
    job_id: &JobId,
    reason: String,
    before_attempt: u32,
    kill_now: bool,
    grace_seconds: u32,
) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Stop(pb::StopJob {
            job_id: job_id.0.clone(),
            reason,
            before_attempt,
            kill_now,
            grace_seconds,
        })),
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
