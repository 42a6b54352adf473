//! Placing jobs: FIFO gang scheduling with reserve-and-backfill, and
//! elastic jobs growing back when nodes return.

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

    /// Forgets a job whose submission could not be stored (its slots, if
    /// it was placed, free with it).
    pub fn withdraw(&mut self, job_id: &JobId) {
        self.jobs.remove(job_id);
        self.progress_ms.remove(job_id);
    }

    /// Places pending jobs in submission order with backfill. A job that
    /// fits now runs; one that waits for busy nodes holds (reserves) the
    /// nodes it will take first, and jobs behind it run only on other
    /// nodes — so they never delay it (no starvation), but they are not
    /// blocked by it either (Slurm's reserve-and-backfill, without run-time
    /// estimates). A job that cannot fit the registered cluster at all
    /// holds nothing and says so in its message until nodes arrive.
    pub fn schedule(&mut self, now_ms: i64) -> Effects {
        let mut effects = Effects::default();
        let mut pending: Vec<(i64, JobId)> = self
            .jobs
            .values()
            .filter(|job| job.state == JobState::Pending)
            .map(|job| (job.created_unix_ms, job.id.clone()))
            .collect();
        pending.sort();
        if pending.is_empty() {
            effects.merge(self.grow(now_ms));
            return effects;
        }
        let mut used = self.used_slots();
        let free = |used: &std::collections::HashMap<NodeId, u32>,
                    node: &flamingo_common::NodeRecord| {
            node.slots
                .saturating_sub(used.get(&node.node_id).copied().unwrap_or(0))
        };
        let mut reserved: BTreeSet<NodeId> = BTreeSet::new();
        for (_, job_id) in pending {
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            let slots = job.spec.slots_per_node;
            let fewest = job.spec.fewest_nodes();
            // Nodes that could ever hold one node of this job.
            let able = self
                .nodes
                .values()
                .filter(|node| !node.draining && node.slots >= slots)
                .count() as u32;
            if able < fewest {
                let reason = format!(
                    "cannot fit the registered cluster: needs {fewest} node(s) with {slots} slot(s); \
                     {able} registered node(s) have that many (it starts when enough nodes register)"
                );
                self.wait_reason(&job_id, reason, &mut effects);
                continue;
            }
            let excluded = job.excluded_nodes();
            let capacity = |leave_out: &[NodeId]| -> Vec<NodeCapacity> {
                self.nodes
                    .values()
                    .map(|node| NodeCapacity {
                        node_id: node.node_id.clone(),
                        free_slots: free(&used, node),
                        schedulable: !node.draining
                            && !leave_out.contains(&node.node_id)
                            && !self.detached.contains(&node.node_id)
                            && !reserved.contains(&node.node_id),
                    })
                    .collect()
            };
            // Placement tries only sizes the free nodes allow: the work
            // stays proportional to the cluster, not to what was asked.
            let free_now = capacity(&[])
                .iter()
                .filter(|node| node.schedulable && node.free_slots >= slots)
                .count() as u32;
            let most = job.spec.nodes.min(free_now);
            // Nodes that failed the job repeatedly are used only when
            // nothing else fits; an elastic job takes as many nodes as fit,
            // down to its minimum.
            let chosen = (fewest <= most)
                .then(|| {
                    (fewest..=most).rev().find_map(|nodes| {
                        place(&capacity(&excluded), nodes, slots)
                            .or_else(|| place(&capacity(&[]), nodes, slots))
                    })
                })
                .flatten();
            let Some(chosen) = chosen else {
                let holding = self.reserve_for(&job_id, fewest, &reserved, &used);
                let reason = format!(
                    "waiting for {fewest} node(s) with {slots} free slot(s); \
                     holding {} for it, jobs behind it run elsewhere",
                    holding
                        .iter()
                        .map(NodeId::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                reserved.extend(holding);
                self.wait_reason(&job_id, reason, &mut effects);
                continue;
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
                let reason = format!(
                    "waiting for a free rendezvous port on {}",
                    master_node.node_id
                );
                self.wait_reason(&job_id, reason, &mut effects);
                continue;
            };
            let job = self.jobs.get_mut(&job_id).expect("job listed above");
            job.message.clear();
            let slots = job.spec.slots_per_node;
            for node_id in &chosen {
                *used.entry(node_id.clone()).or_insert(0) += slots;
            }
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
            // At most 16 nodes named: an event, not a placement dump.
            let mut named = chosen
                .iter()
                .take(16)
                .map(NodeId::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if chosen.len() > 16 {
                named.push_str(&format!(" and {} more", chosen.len() - 16));
            }
            let message = format!(
                "scheduled {} rank(s) on {named}; master {}:{}",
                job.ranks.len(),
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

    /// The `count` nodes a waiting job takes first as they free up (the
    /// ones with the most free slots now), outside those already held.
    fn reserve_for(
        &self,
        job_id: &JobId,
        count: u32,
        held: &BTreeSet<NodeId>,
        used: &std::collections::HashMap<NodeId, u32>,
    ) -> Vec<NodeId> {
        let slots = self.jobs[job_id].spec.slots_per_node;
        let mut candidates: Vec<(u32, &NodeId)> = self
            .nodes
            .values()
            .filter(|node| !node.draining && node.slots >= slots && !held.contains(&node.node_id))
            .map(|node| {
                let taken = used.get(&node.node_id).copied().unwrap_or(0);
                (node.slots.saturating_sub(taken), &node.node_id)
            })
            .collect();
        candidates.sort_by(|left, right| right.0.cmp(&left.0).then_with(|| left.1.cmp(right.1)));
        candidates
            .into_iter()
            .take(count as usize)
            .map(|(_, node_id)| node_id.clone())
            .collect()
    }

    /// Says why a pending job waits (stored with it when the reason
    /// changes; `status` shows it as the job's message).
    fn wait_reason(&mut self, job_id: &JobId, reason: String, effects: &mut Effects) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.message != reason {
            job.message = reason;
            effects.jobs_changed.insert(job_id.clone());
        }
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
        if candidates.is_empty() {
            return effects;
        }
        let used_slots = self.used_slots();
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
                        && node
                            .slots
                            .saturating_sub(used_slots.get(&node.node_id).copied().unwrap_or(0))
                            >= job.spec.slots_per_node
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
