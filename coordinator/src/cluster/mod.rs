//! The coordinator's pure core: nodes and jobs in memory, and every state
//! transition as a function that returns the effects to carry out (records
//! to persist, events to publish, messages for agents). No I/O here, so the
//! rules — gang scheduling, failing a job when a rank fails, losing a node —
//! are unit-tested directly. The transitions are grouped by what they are
//! about: placing jobs ([`scheduling`]), ranks' starts, exits and progress
//! ([`ranks`]), checkpoints and the end of a job ([`lifecycle`]), and nodes
//! ([`nodes`]).

mod lifecycle;
mod nodes;
mod ranks;
mod scheduling;

use std::collections::{BTreeMap, BTreeSet};

use flamingo_common::{EventKind, JobEvent, JobId, JobRecord, JobState, NodeId, NodeRecord};
use flamingo_proto::v1 as pb;

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
    /// at once): nothing is placed on them until they attach again, and
    /// they are lost if they do not within the detach grace.
    pub detached: BTreeSet<NodeId>,
    /// When each node is written off unless its agent is heard from. Kept
    /// in memory, not in etcd: heartbeats cost no etcd write, and a
    /// coordinator that starts (or takes over) gives every node a full
    /// lease.
    pub liveness: BTreeMap<NodeId, Liveness>,
    /// Per job attempt, how many ranks have not started and not exited
    /// cleanly (so that a report costs the same at rank 10 as at rank
    /// 30,000). A hint: when it reaches 0 it is counted again.
    pub counts: std::collections::HashMap<(JobId, u32), RankCounts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankCounts {
    pub unstarted: u32,
    pub unfinished: u32,
}

impl RankCounts {
    pub fn of(job: &JobRecord) -> Self {
        let mut counts = Self {
            unstarted: 0,
            unfinished: 0,
        };
        for rank in &job.ranks {
            if rank.state == flamingo_common::RankState::Assigned {
                counts.unstarted += 1;
            }
            if !(rank.state == flamingo_common::RankState::Exited && rank.exit_code == Some(0)) {
                counts.unfinished += 1;
            }
        }
        counts
    }
}

/// A node's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Lost unless heard from before this (unix ms).
    pub deadline_ms: i64,
    /// When its agent's stream closed, while it stays closed.
    pub detached_ms: Option<i64>,
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
    pub(super) fn event(
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

    /// Slots held on each node by live ranks (one pass over every job's
    /// ranks; look nodes up in it rather than asking per node).
    pub fn used_slots(&self) -> std::collections::HashMap<NodeId, u32> {
        let mut used = std::collections::HashMap::with_capacity(self.nodes.len());
        for job in self.jobs.values() {
            for rank in job.live_ranks() {
                *used.entry(rank.node.clone()).or_insert(0) += 1;
            }
        }
        used
    }

    pub fn free_slots(&self, node: &NodeRecord) -> u32 {
        let used: u32 = self
            .jobs
            .values()
            .map(|job| job.slots_held_on(&node.node_id))
            .sum();
        node.slots.saturating_sub(used)
    }
}

#[cfg(test)]
mod tests;
