//! Jobs as the coordinator stores them in etcd (JSON) and as every service
//! reasons about them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{CommonError, JobId, NodeId};

/// Exit status of a training rank that checkpointed and stopped on SIGTERM
/// (`EX_TEMPFAIL`, a preemption): the coordinator requeues its job instead
/// of counting a failure.
pub const PREEMPTED_EXIT_CODE: i32 = 75;

/// Default sweep of the collective check: 1 KiB to 256 MiB, like
/// nccl-tests' `-b 1K -e 256M`.
pub const DEFAULT_MIN_BYTES: u64 = 1 << 10;
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// The most nodes any job may span, and ranks any node may run, whatever
/// a coordinator is configured to allow (`nodes × slots` stays below 2^31).
pub const MAX_NODES: u32 = 1 << 16;
pub const MAX_SLOTS_PER_NODE: u32 = 1 << 14;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum JobKind {
    /// Verify the collectives, then sweep their bandwidth.
    CollectiveCheck {
        min_bytes: u64,
        max_bytes: u64,
        /// `None` picks NCCL on GPU slots and Gloo otherwise.
        backend: Option<String>,
    },
    /// Run `argv` once per rank with torchrun's environment.
    Command { argv: Vec<String> },
    /// Train: every rank runs the FSDP engine on this resolved run
    /// configuration (the JSON `flamingoctl train` writes).
    Train { config_json: String },
}

impl JobKind {
    pub fn label(&self) -> &'static str {
        match self {
            JobKind::CollectiveCheck { .. } => "collective-check",
            JobKind::Command { .. } => "command",
            JobKind::Train { .. } => "train",
        }
    }

    /// Whether a failure restarts the group from its last checkpoint (a
    /// training run) rather than ending the job.
    pub fn restartable(&self) -> bool {
        matches!(self, JobKind::Train { .. })
    }
}

/// What the coordinator does about failures and checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobPolicy {
    /// Restarts of the whole group from the last committed checkpoint
    /// before the job fails (train jobs).
    pub max_restarts: u32,
    /// No step progress for this long is a hang (0 = not watched).
    pub hang_timeout_seconds: u32,
    /// Committed checkpoints kept: the newest `keep_checkpoints`…
    pub keep_checkpoints: u32,
    /// …plus those at multiples of this step (0 = none).
    pub keep_every_checkpoint_steps: u32,
    /// A node with this many rank failures in the job is left out while
    /// other nodes can take its place (0 = never).
    pub exclude_node_after_failures: u32,
}

impl Default for JobPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            hang_timeout_seconds: 600,
            keep_checkpoints: 2,
            keep_every_checkpoint_steps: 0,
            exclude_node_after_failures: 2,
        }
    }
}

/// A checkpoint every rank wrote and the coordinator committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub path: String,
    pub unix_ms: i64,
    pub attempt: u32,
    /// The data cursor saved with it (JSON, per dataset).
    pub data_cursor_json: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    /// The most nodes the job runs on.
    pub nodes: u32,
    pub slots_per_node: u32,
    /// Elastic train jobs: the fewest nodes it runs on (0 = `nodes`).
    #[serde(default)]
    pub min_nodes: u32,
    pub kind: JobKind,
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub policy: JobPolicy,
    /// Who launched it: the coordinator sets it from the caller's
    /// credential, whatever the request says.
    #[serde(default)]
    pub submitter: String,
}

impl JobSpec {
    /// Ranks at full size (saturating: [`Self::validate`] bounds both).
    pub fn world_size(&self) -> u32 {
        self.nodes.saturating_mul(self.slots_per_node)
    }

    /// The fewest nodes the job may run on.
    pub fn fewest_nodes(&self) -> u32 {
        if self.min_nodes == 0 {
            self.nodes
        } else {
            self.min_nodes
        }
    }

    /// Whether the job runs on a varying number of nodes.
    pub fn elastic(&self) -> bool {
        self.fewest_nodes() < self.nodes
    }

    /// Rejects specs that can never run, naming the field.
    pub fn validate(&self) -> Result<(), CommonError> {
        if self.nodes == 0 {
            return Err(CommonError::invalid("nodes", "must be at least 1"));
        }
        if self.slots_per_node == 0 {
            return Err(CommonError::invalid("slots_per_node", "must be at least 1"));
        }
        // Hard bounds whatever a coordinator allows: the world size fits a
        // u32 with room to spare.
        if self.nodes > MAX_NODES {
            return Err(CommonError::invalid(
                "nodes",
                format!(
                    "{} is more than the most any job may use ({MAX_NODES})",
                    self.nodes
                ),
            ));
        }
        if self.slots_per_node > MAX_SLOTS_PER_NODE {
            return Err(CommonError::invalid(
                "slots_per_node",
                format!(
                    "{} is more than the most any node may run ({MAX_SLOTS_PER_NODE})",
                    self.slots_per_node
                ),
            ));
        }
        if self.min_nodes > self.nodes {
            return Err(CommonError::invalid(
                "min_nodes",
                format!(
                    "{} is more than nodes = {}; write --nodes MIN:MAX with MIN <= MAX",
                    self.min_nodes, self.nodes
                ),
            ));
        }
        if self.elastic() && !self.kind.restartable() {
            return Err(CommonError::invalid(
                "min_nodes",
                "only training jobs run on a varying number of nodes (they reshard from their checkpoint)",
            ));
        }
        match &self.kind {
            JobKind::CollectiveCheck {
                min_bytes,
                max_bytes,
                backend,
            } => {
                if *min_bytes == 0 || min_bytes > max_bytes {
                    return Err(CommonError::invalid(
                        "collective_check.min_bytes",
                        format!("must be in [1, max_bytes = {max_bytes}], got {min_bytes}"),
                    ));
                }
                if let Some(name) = backend {
                    if name != "gloo" && name != "nccl" {
                        return Err(CommonError::invalid(
                            "collective_check.backend",
                            format!("'{name}' is not gloo or nccl"),
                        ));
                    }
                }
            }
            JobKind::Command { argv } => {
                if argv.first().is_none_or(|program| program.is_empty()) {
                    return Err(CommonError::invalid(
                        "command.argv",
                        "is empty; give the program to run after `--`",
                    ));
                }
            }
            JobKind::Train { config_json } => {
                let value: serde_json::Value =
                    serde_json::from_str(config_json).map_err(|error| {
                        CommonError::invalid("train.config_json", format!("not JSON: {error}"))
                    })?;
                if !value.is_object() {
                    return Err(CommonError::invalid(
                        "train.config_json",
                        "must be an object of run settings",
                    ));
                }
            }
        }
        if self.policy.keep_checkpoints == 0 {
            return Err(CommonError::invalid(
                "policy.keep_checkpoints",
                "must be at least 1 (the latest checkpoint is what a restart resumes from)",
            ));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(CommonError::invalid(
                    "env",
                    format!("'{key}' is not a valid variable name"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Stopped
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "Pending",
            JobState::Running => "Running",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Stopped => "Stopped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankState {
    Assigned,
    Running,
    Exited,
    Lost,
}

impl RankState {
    /// The process may still exist (and hold its slot).
    pub fn is_live(self) -> bool {
        matches!(self, RankState::Assigned | RankState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RankState::Assigned => "Assigned",
            RankState::Running => "Running",
            RankState::Exited => "Exited",
            RankState::Lost => "Lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    pub rank: u32,
    pub local_rank: u32,
    pub node: NodeId,
    pub state: RankState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub pid: Option<u32>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Stored compactly (see [`compact_ranks`]): a record's size grows by
    /// a byte or two per rank, not by a JSON object per rank.
    #[serde(with = "compact_ranks")]
    pub ranks: Vec<RankRecord>,
    pub master_addr: String,
    pub master_port: u16,
    pub message: String,
    pub result_json: Option<String>,
    pub created_unix_ms: i64,
    pub started_unix_ms: Option<i64>,
    pub finished_unix_ms: Option<i64>,
    /// Sequence number the next event gets.
    pub next_event_seq: u64,
    /// Which start of the group this is (+1 per restart).
    #[serde(default)]
    pub attempt: u32,
    /// Committed checkpoints still kept, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointRecord>,
    /// The last step rank 0 reported (not persisted on every step).
    #[serde(default)]
    pub last_step: u64,
    /// Rank failures per node in this job.
    #[serde(default)]
    pub node_failures: BTreeMap<NodeId, u32>,
    /// One line per restart: when, why, and where it resumed.
    #[serde(default)]
    pub restarts: Vec<String>,
    /// Nodes the current attempt runs on.
    #[serde(default)]
    pub placed_nodes: u32,
    /// An elastic job asked to checkpoint and stop so that it restarts on
    /// more nodes.
    #[serde(default)]
    pub growing: bool,
}

impl JobRecord {
    pub fn new(id: JobId, spec: JobSpec, created_unix_ms: i64) -> Self {
        Self {
            id,
            spec,
            state: JobState::Pending,
            ranks: Vec::new(),
            master_addr: String::new(),
            master_port: 0,
            message: String::new(),
            result_json: None,
            created_unix_ms,
            started_unix_ms: None,
            finished_unix_ms: None,
            next_event_seq: 0,
            attempt: 0,
            checkpoints: Vec::new(),
            last_step: 0,
            node_failures: BTreeMap::new(),
            restarts: Vec::new(),
            placed_nodes: 0,
            growing: false,
        }
    }

    /// The checkpoint a restart resumes from.
    pub fn latest_checkpoint(&self) -> Option<&CheckpointRecord> {
        self.checkpoints.last()
    }

    /// Nodes the policy leaves out of this job's placement.
    pub fn excluded_nodes(&self) -> Vec<NodeId> {
        let limit = self.spec.policy.exclude_node_after_failures;
        self.node_failures
            .iter()
            .filter(|(_, failures)| limit > 0 && **failures >= limit)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Ranks whose process may still be alive.
    pub fn live_ranks(&self) -> impl Iterator<Item = &RankRecord> {
        self.ranks.iter().filter(|rank| rank.state.is_live())
    }

    /// Nodes that may still run one of its ranks.
    pub fn live_nodes(&self) -> std::collections::BTreeSet<NodeId> {
        self.live_ranks().map(|rank| rank.node.clone()).collect()
    }

    /// Slots this job still holds on `node`.
    pub fn slots_held_on(&self, node: &NodeId) -> u32 {
        self.ranks_on(node)
            .iter()
            .filter(|rank| rank.state.is_live())
            .count() as u32
    }

    /// The ranks placed on `node`. Placement lays ranks out node-major,
    /// `slots_per_node` to a node, nodes in id order, so the node's block
    /// is found by binary search (a lookup per heartbeat stays cheap at
    /// 32,768 ranks). Blocks of another size are scanned.
    pub fn ranks_on(&self, node: &NodeId) -> &[RankRecord] {
        let slots = self.spec.slots_per_node as usize;
        if slots > 0 && self.ranks.len().is_multiple_of(slots) {
            let (mut low, mut high) = (0, self.ranks.len() / slots);
            while low < high {
                let middle = (low + high) / 2;
                match self.ranks[middle * slots].node.cmp(node) {
                    std::cmp::Ordering::Less => low = middle + 1,
                    std::cmp::Ordering::Greater => high = middle,
                    std::cmp::Ordering::Equal => {
                        let block = &self.ranks[middle * slots..(middle + 1) * slots];
                        if block.iter().all(|rank| &rank.node == node) {
                            return block;
                        }
                        break;
                    }
                }
            }
            if low >= high {
                return &[];
            }
        }
        let Some(first) = self.ranks.iter().position(|rank| &rank.node == node) else {
            return &[];
        };
        let count = self.ranks[first..]
            .iter()
            .take_while(|rank| &rank.node == node)
            .count();
        &self.ranks[first..first + count]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: JobId,
    pub seq: u64,
    pub unix_ms: i64,
    pub message: String,
    pub state: JobState,
    /// What happened, for the dashboard's timeline (events stored before
    /// kinds existed read as `other`).
    #[serde(default)]
    pub kind: EventKind,
}

/// The kinds of job events the dashboard marks on its timeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Submitted,
    Scheduled,
    RankStarted,
    RankExited,
    Restart,
    Preempted,
    Grow,
    Checkpoint,
    SamplesSkipped,
    NodeLost,
    Finished,
    /// A checkpoint's benchmark scores arrived (`flamingoctl eval --job`).
    Eval,
    #[default]
    Other,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        EventKind::Submitted,
        EventKind::Scheduled,
        EventKind::RankStarted,
        EventKind::RankExited,
        EventKind::Restart,
        EventKind::Preempted,
        EventKind::Grow,
        EventKind::Checkpoint,
        EventKind::SamplesSkipped,
        EventKind::NodeLost,
        EventKind::Finished,
        EventKind::Eval,
        EventKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Submitted => "submitted",
            EventKind::Scheduled => "scheduled",
            EventKind::RankStarted => "rank_started",
            EventKind::RankExited => "rank_exited",
            EventKind::Restart => "restart",
            EventKind::Preempted => "preempted",
            EventKind::Grow => "grow",
            EventKind::Checkpoint => "checkpoint",
            EventKind::SamplesSkipped => "samples_skipped",
            EventKind::NodeLost => "node_lost",
            EventKind::Finished => "finished",
            EventKind::Eval => "eval",
            EventKind::Other => "other",
        }
    }

    /// The kind named by `text` (`other` for names this build does not
    /// know, so newer peers' events still show).
    pub fn parse(text: &str) -> EventKind {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .unwrap_or(EventKind::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: JobKind) -> JobSpec {
        JobSpec {
            submitter: String::new(),
            name: String::new(),
            nodes: 2,
            slots_per_node: 2,
            kind,
            env: BTreeMap::new(),
            policy: JobPolicy::default(),
            min_nodes: 0,
        }
    }

    fn rank(rank: u32, slots: u32, node: &str, state: RankState) -> RankRecord {
        RankRecord {
            rank,
            local_rank: rank % slots,
            node: NodeId(node.to_string()),
            state,
            exit_code: None,
            signal: None,
            pid: None,
            message: String::new(),
        }
    }

    #[test]
    fn ranks_are_stored_compactly_and_read_back_whole() {
        let mut job = JobRecord::new(
            JobId("job-1".into()),
            spec(JobKind::Command {
                argv: vec!["true".into()],
            }),
            0,
        );
        let states = [
            RankState::Running,
            RankState::Exited,
            RankState::Lost,
            RankState::Assigned,
        ];
        job.ranks = (0..4096u32)
            .map(|n| {
                rank(
                    n,
                    8,
                    &format!("node-{:04}", n / 8),
                    states[(n % 4) as usize],
                )
            })
            .collect();
        for record in job.ranks.iter_mut() {
            if record.state == RankState::Exited {
                record.exit_code = Some(0);
            }
        }
        job.ranks[5].exit_code = Some(3);
        job.ranks[9].exit_code = None;
        job.ranks[9].signal = Some(9);
        job.ranks[10].message = "node node-0001 lost: gone".into();
        for record in job
            .ranks
            .iter_mut()
            .filter(|r| r.state == RankState::Running)
        {
            record.pid = Some(40_000 + record.rank);
        }
        let json = serde_json::to_string(&job).expect("serialises");
        assert!(
            json.len() < 4096 * 16,
            "{} bytes for 4096 ranks",
            json.len()
        );
        let back: JobRecord = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, job);

        // A layout placement never makes is stored as the list.
        job.ranks.swap(0, 1);
        let back: JobRecord =
            serde_json::from_str(&serde_json::to_string(&job).expect("serialises")).expect("reads");
        assert_eq!(back, job);

        // Records written as a list of rank objects still read.
        let mut old: serde_json::Value = serde_json::to_value(&job).expect("value");
        old["ranks"] = serde_json::json!([{
            "rank": 0, "local_rank": 0, "node": "n", "state": "Running",
            "exit_code": null, "signal": null, "pid": 7, "message": ""
        }]);
        let back: JobRecord = serde_json::from_value(old).expect("reads the old form");
        assert_eq!(back.ranks[0].pid, Some(7));
    }

    #[test]
    fn ranks_on_finds_each_nodes_block() {
        let mut job = JobRecord::new(
            JobId("job-1".into()),
            spec(JobKind::Command {
                argv: vec!["true".into()],
            }),
            0,
        );
        job.spec.slots_per_node = 3;
        let nodes = ["a", "b", "c", "d", "e"];
        job.ranks = nodes
            .iter()
            .enumerate()
            .flat_map(|(block, node)| {
                (0..3).map(move |local| RankRecord {
                    rank: block as u32 * 3 + local,
                    local_rank: local,
                    node: NodeId(node.to_string()),
                    state: RankState::Assigned,
                    exit_code: None,
                    signal: None,
                    pid: None,
                    message: String::new(),
                })
            })
            .collect();
        for (block, node) in nodes.iter().enumerate() {
            let ranks: Vec<u32> = job
                .ranks_on(&NodeId(node.to_string()))
                .iter()
                .map(|rank| rank.rank)
                .collect();
            let first = block as u32 * 3;
            assert_eq!(ranks, vec![first, first + 1, first + 2], "{node}");
        }
        assert!(job.ranks_on(&NodeId("0".into())).is_empty());
        assert!(job.ranks_on(&NodeId("bb".into())).is_empty());
        assert!(job.ranks_on(&NodeId("z".into())).is_empty());
        // A record whose blocks are not whole is scanned.
        job.ranks.pop();
        assert_eq!(job.ranks_on(&NodeId("e".into())).len(), 2);
        assert_eq!(job.ranks_on(&NodeId("a".into())).len(), 3);
    }

    #[test]
    fn validation_names_the_field() {
        let mut zero_nodes = spec(JobKind::Command {
            argv: vec!["true".into()],
        });
        zero_nodes.nodes = 0;
        assert!(zero_nodes
            .validate()
            .unwrap_err()
            .to_string()
            .contains("invalid nodes"));
        let empty = spec(JobKind::Command { argv: vec![] });
        assert!(empty
            .validate()
            .unwrap_err()
            .to_string()
            .contains("command.argv"));
        let bad_backend = spec(JobKind::CollectiveCheck {
            min_bytes: 1024,
            max_bytes: 2048,
            backend: Some("mpi".into()),
        });
        assert!(bad_backend
            .validate()
            .unwrap_err()
            .to_string()
            .contains("collective_check.backend"));
        let good = spec(JobKind::CollectiveCheck {
            min_bytes: 1024,
            max_bytes: 2048,
            backend: None,
        });
        good.validate().expect("valid spec");
        assert_eq!(good.world_size(), 4);
    }

    proptest::proptest! {
        /// Specs as a client could send them (JSON from anyone): decoding
        /// and validating never panics, and what validates has a world size
        /// that fits.
        #[test]
        fn any_spec_json_decodes_or_is_refused_and_never_panics(
            nodes in proptest::prelude::any::<u32>(),
            slots in proptest::prelude::any::<u32>(),
            min_nodes in proptest::prelude::any::<u32>(),
            noise in r#"[{}\[\]\\":,a-z0-9 .-]{0,80}"#,
        ) {
            let text = format!(
                r#"{{"name":"x","nodes":{nodes},"slots_per_node":{slots},"min_nodes":{min_nodes},"kind":{{"type":"command","argv":["true"]}},"env":{{}}}}"#
            );
            let spec: JobSpec = serde_json::from_str(&text).expect("well-formed");
            if spec.validate().is_ok() {
                proptest::prop_assert!(u64::from(nodes) * u64::from(slots) < 1 << 31);
                proptest::prop_assert_eq!(u64::from(spec.world_size()), u64::from(nodes) * u64::from(slots));
            }
            if let Ok(spec) = serde_json::from_str::<JobSpec>(&noise) {
                let _ = spec.validate();
            }
        }
    }
}

/// How a job's ranks are stored in etcd. Placement lays ranks out densely
/// and node-major (rank `r` on the `r / slots`-th node), so the ranks are
/// the node list, one letter of state per rank (`A`ssigned, `R`unning,
/// e`X`ited, `L`ost), and the few ranks with something more to say: an
/// exit other than a clean one, a message; and the process ids while any
/// rank has one. A record laid out
/// otherwise, or one written as a list of rank objects, reads and writes as
/// that list.
pub mod compact_ranks {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{RankRecord, RankState};
    use crate::NodeId;

    #[derive(Serialize, Deserialize)]
    struct Compact {
        slots: u32,
        nodes: Vec<NodeId>,
        states: String,
        /// `[rank, exit code, signal]` for ranks whose exit is not implied
        /// by their state (exited: code 0; others: none).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exits: Vec<(u32, Option<i32>, Option<i32>)>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        messages: Vec<(u32, String)>,
        /// Each rank's process id, 0 for none (omitted when no rank has
        /// one): a coordinator that restarts shows the same processes.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pids: Vec<u32>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Compact(Compact),
        List(Vec<RankRecord>),
    }

    fn letter(state: RankState) -> char {
        match state {
            RankState::Assigned => 'A',
            RankState::Running => 'R',
            RankState::Exited => 'X',
            RankState::Lost => 'L',
        }
    }

    fn compact(ranks: &[RankRecord]) -> Option<Compact> {
        let first = ranks.first()?;
        // The block size: how many ranks the first node holds.
        let slots = ranks
            .iter()
            .take_while(|rank| rank.node == first.node)
            .count();
        if !ranks.len().is_multiple_of(slots) {
            return None;
        }
        let mut nodes = Vec::with_capacity(ranks.len() / slots);
        let mut states = String::with_capacity(ranks.len());
        let mut exits = Vec::new();
        let mut messages = Vec::new();
        let mut pids = Vec::new();
        let any_pid = ranks.iter().any(|rank| rank.pid.is_some());
        for (index, rank) in ranks.iter().enumerate() {
            let block = index / slots;
            if index % slots == 0 {
                nodes.push(rank.node.clone());
            }
            if rank.rank as usize != index
                || rank.local_rank as usize != index % slots
                || rank.node != nodes[block]
            {
                return None;
            }
            states.push(letter(rank.state));
            let implied = if rank.state == RankState::Exited {
                (Some(0), None)
            } else {
                (None, None)
            };
            if (rank.exit_code, rank.signal) != implied {
                exits.push((rank.rank, rank.exit_code, rank.signal));
            }
            if !rank.message.is_empty() {
                messages.push((rank.rank, rank.message.clone()));
            }
            if any_pid {
                pids.push(rank.pid.unwrap_or(0));
            }
        }
        Some(Compact {
            slots: slots as u32,
            nodes,
            states,
            exits,
            messages,
            pids,
        })
    }

    pub fn serialize<S: Serializer>(
        ranks: &[RankRecord],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match compact(ranks) {
            Some(compact) => Stored::Compact(compact).serialize(serializer),
            None => Stored::List(ranks.to_vec()).serialize(serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<RankRecord>, D::Error> {
        let compact = match Stored::deserialize(deserializer)? {
            Stored::List(ranks) => return Ok(ranks),
            Stored::Compact(compact) => compact,
        };
        let slots = compact.slots.max(1) as usize;
        if compact.states.len() != compact.nodes.len() * slots {
            return Err(serde::de::Error::custom(format!(
                "ranks: {} states for {} node(s) × {slots} slot(s)",
                compact.states.len(),
                compact.nodes.len()
            )));
        }
        let mut ranks = Vec::with_capacity(compact.states.len());
        for (index, letter) in compact.states.chars().enumerate() {
            let state = match letter {
                'A' => RankState::Assigned,
                'R' => RankState::Running,
                'X' => RankState::Exited,
                'L' => RankState::Lost,
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "ranks: unknown state '{other}' for rank {index}"
                    )))
                }
            };
            let exit_code = (state == RankState::Exited).then_some(0);
            ranks.push(RankRecord {
                rank: index as u32,
                local_rank: (index % slots) as u32,
                node: compact.nodes[index / slots].clone(),
                state,
                exit_code,
                signal: None,
                pid: None,
                message: String::new(),
            });
        }
        for (rank, exit_code, signal) in compact.exits {
            if let Some(record) = ranks.get_mut(rank as usize) {
                record.exit_code = exit_code;
                record.signal = signal;
            }
        }
        for (rank, message) in compact.messages {
            if let Some(record) = ranks.get_mut(rank as usize) {
                record.message = message;
            }
        }
        for (record, pid) in ranks.iter_mut().zip(compact.pids) {
            record.pid = (pid != 0).then_some(pid);
        }
        Ok(ranks)
    }
}
