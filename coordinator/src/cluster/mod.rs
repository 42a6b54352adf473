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
