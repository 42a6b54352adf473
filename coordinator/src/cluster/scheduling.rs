//! Placing jobs: strict FIFO gang scheduling, and elastic jobs growing
//! back when nodes return.

use std::collections::BTreeSet;

use flamingo_common::{EventKind, JobId, JobRecord, JobState, NodeId, RankRecord, RankState};

use super::nodes::{start_message, stop_attempts};
use super::{Cluster, Effects, CHECKPOINT_GRACE_SECONDS};
use crate::placement::{global_rank, pick_port, place, NodeCapacity};

impl Cluster {
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
    pub(super) fn grow(&mut self, now_ms: i64) -> Effects {
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
}
