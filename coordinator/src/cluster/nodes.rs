//! Nodes: lost ones, heartbeats reconciled with what each agent runs, and
//! the messages sent to agents.

use flamingo_common::{EventKind, JobId, JobRecord, JobSpec, JobState, NodeId, RankState};
use flamingo_proto::v1 as pb;

use std::collections::BTreeSet;

use super::{Cluster, Effects, Liveness};

impl Cluster {
    /// The node's agent was heard from (it registered, attached or sent a
    /// heartbeat): it lives for another `lease_ms`.
    pub fn heard_from(&mut self, node_id: &NodeId, lease_ms: i64, now_ms: i64) {
        if self.nodes.contains_key(node_id) {
            self.liveness.insert(
                node_id.clone(),
                Liveness {
                    deadline_ms: now_ms + lease_ms,
                    detached_ms: None,
                },
            );
        }
    }

    /// The node's agent stream closed: nothing more is placed on it, and
    /// unless it attaches again within `grace_ms` it is lost (a dead
    /// agent's connection closes at once; a live one reconnects within
    /// a heartbeat or two).
    pub fn connection_closed(&mut self, node_id: &NodeId, grace_ms: i64, now_ms: i64) {
        if !self.nodes.contains_key(node_id) {
            return;
        }
        self.detached.insert(node_id.clone());
        let liveness = self.liveness.entry(node_id.clone()).or_insert(Liveness {
            deadline_ms: now_ms + grace_ms,
            detached_ms: None,
        });
        liveness.deadline_ms = liveness.deadline_ms.min(now_ms + grace_ms);
        liveness.detached_ms = Some(now_ms);
    }

    /// Nodes past their deadline are lost. Returns them with the effects.
    pub fn expire_nodes(&mut self, lease_ms: i64, now_ms: i64) -> (Vec<NodeId>, Effects) {
        let expired: Vec<(NodeId, Liveness)> = self
            .liveness
            .iter()
            .filter(|(_, liveness)| liveness.deadline_ms <= now_ms)
            .map(|(node, liveness)| (node.clone(), *liveness))
            .collect();
        let mut effects = Effects::default();
        for (node_id, liveness) in &expired {
            let reason = match liveness.detached_ms {
                Some(closed) => format!(
                    "its agent's connection closed {:.1} s ago and it did not come back",
                    (now_ms - closed) as f64 / 1000.0
                ),
                None => format!("no heartbeat for {} s", lease_ms / 1000),
            };
            effects.merge(self.node_lost(node_id, &reason, now_ms));
        }
        (expired.into_iter().map(|(node, _)| node).collect(), effects)
    }

    /// A node vanished (no heartbeat within its lease, or its agent
    /// restarted or shut down): its ranks are lost and their jobs fail.
    pub fn node_lost(&mut self, node_id: &NodeId, reason: &str, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        self.nodes.remove(node_id);
        self.detached.remove(node_id);
        self.liveness.remove(node_id);
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
            let here = job.ranks_on(node_id);
            if here.is_empty() {
                continue;
            }
            let assigned_here = here.iter().any(|rank| rank.state == RankState::Assigned);
            if job.state == JobState::Running && assigned_here {
                let missing = here.iter().any(|rank| {
                    rank.state == RankState::Assigned
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
                let gone: Vec<u32> = job
                    .ranks_on(node_id)
                    .iter()
                    .filter(|rank| {
                        rank.state.is_live()
                            && !running.contains(&(job.id.clone(), job.attempt, rank.rank))
                    })
                    .map(|rank| rank.rank)
                    .collect();
                for number in gone {
                    if let Some(rank) = job.ranks.iter_mut().find(|rank| rank.rank == number) {
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
                        .ranks_on(node_id)
                        .iter()
                        .any(|rank| rank.state == RankState::Assigned)
            })
            .map(|job| start_message(job, node_id))
            .collect()
    }
}

pub(super) fn start_message(job: &JobRecord, node_id: &NodeId) -> pb::CoordinatorMessage {
    let spec: &JobSpec = &job.spec;
    let here = job.ranks_on(node_id);
    let node_rank = here
        .first()
        .map(|rank| rank.rank / spec.slots_per_node.max(1))
        .unwrap_or(0);
    let ranks = here
        .iter()
        .filter(|rank| rank.state == RankState::Assigned)
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
            fallback_checkpoints: job
                .checkpoints
                .iter()
                .rev()
                .skip(1)
                .map(|checkpoint| checkpoint.path.clone())
                .collect(),
            // Stamped on the way out (the API layer holds the key).
            rank_token: String::new(),
        })
        .collect();
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Start(pb::StartRanks {
            ranks,
        })),
    }
}

pub(super) fn stop_message(job_id: &JobId, reason: &str) -> pb::CoordinatorMessage {
    stop_attempts(job_id, reason.to_string(), 0, false, 0)
}

/// Stops the job's ranks of attempts before `before_attempt` (0: all):
/// SIGKILL at once when `kill_now`, else SIGTERM and SIGKILL after
/// `grace_seconds` (0: the agent's default grace).
pub(super) fn stop_attempts(
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
