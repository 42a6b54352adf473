//! Conversions between the domain types and `flamingo.v1` messages. Decoding
//! checks every field and names the one that is wrong.

use std::collections::BTreeMap;

use flamingo_proto::v1 as pb;

use crate::jobs::{DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES};
use crate::{
    CheckpointRecord, CommonError, EventKind, JobEvent, JobId, JobKind, JobPolicy, JobRecord,
    JobSpec, JobState, NodeId, RankRecord, RankState,
};

impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = CommonError;
    fn try_from(spec: pb::JobSpec) -> Result<Self, CommonError> {
        let kind = match spec.kind {
            Some(pb::job_spec::Kind::CollectiveCheck(check)) => JobKind::CollectiveCheck {
                min_bytes: if check.min_bytes == 0 {
                    DEFAULT_MIN_BYTES
                } else {
                    check.min_bytes
                },
                max_bytes: if check.max_bytes == 0 {
                    DEFAULT_MAX_BYTES
                } else {
                    check.max_bytes
                },
                backend: (!check.backend.is_empty()).then_some(check.backend),
            },
            Some(pb::job_spec::Kind::Command(command)) => JobKind::Command { argv: command.argv },
            Some(pb::job_spec::Kind::Train(train)) => JobKind::Train {
                config_json: train.config_json,
            },
            None => {
                return Err(CommonError::invalid(
                    "spec.kind",
                    "missing; choose a job kind (collective-check, or a command after --)",
                ))
            }
        };
        let spec = JobSpec {
            name: spec.name,
            nodes: spec.nodes,
            slots_per_node: spec.slots_per_node,
            min_nodes: spec.min_nodes,
            kind,
            env: spec.env.into_iter().collect::<BTreeMap<_, _>>(),
            policy: spec.policy.map(JobPolicy::from).unwrap_or_default(),
            submitter: spec.submitter,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(spec: &JobSpec) -> Self {
        let kind = match &spec.kind {
            JobKind::CollectiveCheck {
                min_bytes,
                max_bytes,
                backend,
            } => pb::job_spec::Kind::CollectiveCheck(pb::CollectiveCheck {
                min_bytes: *min_bytes,
                max_bytes: *max_bytes,
                backend: backend.clone().unwrap_or_default(),
            }),
            JobKind::Command { argv } => {
                pb::job_spec::Kind::Command(pb::Command { argv: argv.clone() })
            }
            JobKind::Train { config_json } => pb::job_spec::Kind::Train(pb::Train {
                config_json: config_json.clone(),
            }),
        };
        pb::JobSpec {
            name: spec.name.clone(),
            nodes: spec.nodes,
            slots_per_node: spec.slots_per_node,
            min_nodes: spec.min_nodes,
            kind: Some(kind),
            env: spec.env.clone().into_iter().collect(),
            policy: Some(pb::JobPolicy::from(&spec.policy)),
            submitter: spec.submitter.clone(),
        }
    }
}

impl From<pb::JobPolicy> for JobPolicy {
    fn from(policy: pb::JobPolicy) -> Self {
        JobPolicy {
            max_restarts: policy.max_restarts,
            hang_timeout_seconds: policy.hang_timeout_seconds,
            keep_checkpoints: policy.keep_checkpoints,
            keep_every_checkpoint_steps: policy.keep_every_checkpoint_steps,
            exclude_node_after_failures: policy.exclude_node_after_failures,
        }
    }
}

impl From<&JobPolicy> for pb::JobPolicy {
    fn from(policy: &JobPolicy) -> Self {
        pb::JobPolicy {
            max_restarts: policy.max_restarts,
            hang_timeout_seconds: policy.hang_timeout_seconds,
            keep_checkpoints: policy.keep_checkpoints,
            keep_every_checkpoint_steps: policy.keep_every_checkpoint_steps,
            exclude_node_after_failures: policy.exclude_node_after_failures,
        }
    }
}

impl From<&CheckpointRecord> for pb::Checkpoint {
    fn from(checkpoint: &CheckpointRecord) -> Self {
        pb::Checkpoint {
            step: checkpoint.step,
            path: checkpoint.path.clone(),
            unix_ms: checkpoint.unix_ms,
            attempt: checkpoint.attempt,
            data_cursor_json: checkpoint.data_cursor_json.clone(),
        }
    }
}

impl From<pb::Checkpoint> for CheckpointRecord {
    fn from(checkpoint: pb::Checkpoint) -> Self {
        CheckpointRecord {
            step: checkpoint.step,
            path: checkpoint.path,
            unix_ms: checkpoint.unix_ms,
            attempt: checkpoint.attempt,
            data_cursor_json: checkpoint.data_cursor_json,
        }
    }
}

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Stopped => pb::JobState::Stopped,
        }
    }
}

pub fn job_state_from_pb(raw: i32) -> Result<JobState, CommonError> {
    match pb::JobState::try_from(raw) {
        Ok(pb::JobState::Pending) => Ok(JobState::Pending),
        Ok(pb::JobState::Running) => Ok(JobState::Running),
        Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Ok(JobState::Failed),
        Ok(pb::JobState::Stopped) => Ok(JobState::Stopped),
        _ => Err(CommonError::invalid(
            "job.state",
            format!("unknown value {raw}"),
        )),
    }
}

impl From<RankState> for pb::RankState {
    fn from(state: RankState) -> Self {
        match state {
            RankState::Assigned => pb::RankState::Assigned,
            RankState::Running => pb::RankState::Running,
            RankState::Exited => pb::RankState::Exited,
            RankState::Lost => pb::RankState::Lost,
        }
    }
}

pub fn rank_state_from_pb(raw: i32) -> Result<RankState, CommonError> {
    match pb::RankState::try_from(raw) {
        Ok(pb::RankState::Assigned) => Ok(RankState::Assigned),
        Ok(pb::RankState::Running) => Ok(RankState::Running),
        Ok(pb::RankState::Exited) => Ok(RankState::Exited),
        Ok(pb::RankState::Lost) => Ok(RankState::Lost),
        _ => Err(CommonError::invalid(
            "rank.state",
            format!("unknown value {raw}"),
        )),
    }
}

impl From<&RankRecord> for pb::RankStatus {
    fn from(rank: &RankRecord) -> Self {
        pb::RankStatus {
            rank: rank.rank,
            local_rank: rank.local_rank,
            node: rank.node.0.clone(),
            state: pb::RankState::from(rank.state) as i32,
            exit_code: rank.exit_code.unwrap_or(-1),
            signal: rank.signal.unwrap_or(0),
            pid: rank.pid.unwrap_or(0),
            message: rank.message.clone(),
        }
    }
}

impl From<&JobRecord> for pb::Job {
    fn from(job: &JobRecord) -> Self {
        pb::Job {
            id: job.id.0.clone(),
            spec: Some(pb::JobSpec::from(&job.spec)),
            state: pb::JobState::from(job.state) as i32,
            ranks: job.ranks.iter().map(pb::RankStatus::from).collect(),
            master_addr: job.master_addr.clone(),
            master_port: u32::from(job.master_port),
            message: job.message.clone(),
            result_json: job.result_json.clone().unwrap_or_default(),
            created_unix_ms: job.created_unix_ms,
            started_unix_ms: job.started_unix_ms.unwrap_or(0),
            finished_unix_ms: job.finished_unix_ms.unwrap_or(0),
            attempt: job.attempt,
            checkpoints: job.checkpoints.iter().map(pb::Checkpoint::from).collect(),
            last_step: job.last_step,
            excluded_nodes: job
                .excluded_nodes()
                .into_iter()
                .map(|node| node.0)
                .collect(),
            restarts: job.restarts.clone(),
            placed_nodes: job.placed_nodes,
        }
    }
}

impl TryFrom<pb::Job> for JobRecord {
    type Error = CommonError;
    fn try_from(job: pb::Job) -> Result<Self, CommonError> {
        let spec = JobSpec::try_from(
            job.spec
                .ok_or_else(|| CommonError::invalid("job.spec", "missing"))?,
        )?;
        let spec_limit = spec.policy.exclude_node_after_failures.max(1);
        let ranks = job
            .ranks
            .into_iter()
            .map(|rank| {
                Ok(RankRecord {
                    rank: rank.rank,
                    local_rank: rank.local_rank,
                    node: NodeId(rank.node),
                    state: rank_state_from_pb(rank.state)?,
                    exit_code: (rank.exit_code >= 0).then_some(rank.exit_code),
                    signal: (rank.signal != 0).then_some(rank.signal),
                    pid: (rank.pid != 0).then_some(rank.pid),
                    message: rank.message,
                })
            })
            .collect::<Result<Vec<_>, CommonError>>()?;
        Ok(JobRecord {
            id: JobId(job.id),
            spec,
            state: job_state_from_pb(job.state)?,
            ranks,
            master_addr: job.master_addr,
            master_port: u16::try_from(job.master_port)
                .map_err(|_| CommonError::invalid("job.master_port", "exceeds 65535"))?,
            message: job.message,
            result_json: (!job.result_json.is_empty()).then_some(job.result_json),
            created_unix_ms: job.created_unix_ms,
            started_unix_ms: (job.started_unix_ms != 0).then_some(job.started_unix_ms),
            finished_unix_ms: (job.finished_unix_ms != 0).then_some(job.finished_unix_ms),
            next_event_seq: 0,
            attempt: job.attempt,
            checkpoints: job
                .checkpoints
                .into_iter()
                .map(CheckpointRecord::from)
                .collect(),
            last_step: job.last_step,
            // Only the nodes at the limit travel; that is what clients show.
            node_failures: job
                .excluded_nodes
                .into_iter()
                .map(|node| (NodeId(node), spec_limit))
                .collect(),
            restarts: job.restarts,
            placed_nodes: job.placed_nodes,
            growing: false,
        })
    }
}

impl From<&JobEvent> for pb::JobEvent {
    fn from(event: &JobEvent) -> Self {
        pb::JobEvent {
            job_id: event.job_id.0.clone(),
            seq: event.seq,
            unix_ms: event.unix_ms,
            message: event.message.clone(),
            state: pb::JobState::from(event.state) as i32,
            kind: event.kind.as_str().to_string(),
        }
    }
}

impl TryFrom<pb::JobEvent> for JobEvent {
    type Error = CommonError;
    fn try_from(event: pb::JobEvent) -> Result<Self, CommonError> {
        Ok(JobEvent {
            job_id: JobId(event.job_id),
            seq: event.seq,
            unix_ms: event.unix_ms,
            message: event.message,
            state: job_state_from_pb(event.state)?,
            kind: EventKind::parse(&event.kind),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_round_trips_through_protobuf() {
        let mut job = JobRecord::new(
            JobId("job-1".into()),
            JobSpec {
                submitter: String::new(),
                name: "check".into(),
                nodes: 2,
                slots_per_node: 2,
                kind: JobKind::CollectiveCheck {
                    min_bytes: 1024,
                    max_bytes: 4096,
                    backend: Some("gloo".into()),
                },
                env: BTreeMap::from([("A".to_string(), "b".to_string())]),
                policy: JobPolicy::default(),
                min_nodes: 0,
            },
            42,
        );
        job.state = JobState::Running;
        job.ranks.push(RankRecord {
            rank: 3,
            local_rank: 1,
            node: NodeId("node-1".into()),
            state: RankState::Exited,
            exit_code: Some(0),
            signal: None,
            pid: Some(77),
            message: String::new(),
        });
        job.master_port = 29500;
        let back = JobRecord::try_from(pb::Job::from(&job)).expect("decodes");
        assert_eq!(back, job);
    }

    #[test]
    fn missing_kind_is_named() {
        let error = JobSpec::try_from(pb::JobSpec {
            nodes: 1,
            slots_per_node: 1,
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.to_string().contains("spec.kind"), "{error}");
    }
}
