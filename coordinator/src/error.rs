//! Coordinator errors and their one mapping to gRPC status codes.

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("etcd: {action}: {message}")]
    Etcd { action: String, message: String },
    #[error(
        "etcd key {key} holds a record that does not decode ({message}); fix or delete the key"
    )]
    Corrupt { key: String, message: String },
    #[error(
        "this coordinator is no longer the leader (its leadership key in etcd is gone or another \
         coordinator's); nothing more is written by it — the new leader carries on"
    )]
    Deposed,
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("node {0} is not registered (its lease may have expired); register again")]
    NodeNotRegistered(String),
    #[error(
        "agent protocol version {agent} does not match the coordinator's {coordinator}; \
         run the same flamingo release on agents and coordinator"
    )]
    ProtocolMismatch { agent: u32, coordinator: u32 },
    #[error(transparent)]
    Invalid(#[from] flamingo_common::CommonError),
    #[error(
        "job {job_id}: attempt {attempt} was superseded (the job is {state} at attempt \
         {current_attempt}); this rank is being stopped"
    )]
    StaleAttempt {
        job_id: String,
        attempt: u32,
        current_attempt: u32,
        state: String,
    },
    /// The metrics archive (`--metrics-store`) failed at `place`.
    #[error("metrics archive: {place}: {message}")]
    Archive { place: String, message: String },
    #[error("metrics of job {job_id}: {message}")]
    Metrics { job_id: String, message: String },
    #[error("rank {rank} of job {job_id}: {message}")]
    Logs {
        job_id: String,
        rank: u32,
        message: String,
    },
}

impl CoordinatorError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Etcd { .. } | Self::Logs { .. })
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(error: CoordinatorError) -> Self {
        let message = error.to_string();
        match error {
            CoordinatorError::Etcd { .. }
            | CoordinatorError::Deposed
            | CoordinatorError::Logs { .. }
            | CoordinatorError::Metrics { .. }
            | CoordinatorError::Archive { .. } => tonic::Status::unavailable(message),
            CoordinatorError::Corrupt { .. } => tonic::Status::data_loss(message),
            CoordinatorError::JobNotFound(_) | CoordinatorError::NodeNotRegistered(_) => {
                tonic::Status::not_found(message)
            }
            CoordinatorError::ProtocolMismatch { .. } | CoordinatorError::StaleAttempt { .. } => {
                tonic::Status::failed_precondition(message)
            }
            CoordinatorError::Invalid(_) => tonic::Status::invalid_argument(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_codes() {
        let mismatch = CoordinatorError::ProtocolMismatch {
            agent: 2,
            coordinator: 1,
        };
        assert!(!mismatch.is_retryable());
        assert_eq!(
            tonic::Status::from(mismatch).code(),
            tonic::Code::FailedPrecondition
        );
        let etcd = CoordinatorError::Etcd {
            action: "write".into(),
            message: "down".into(),
        };
        assert!(etcd.is_retryable());
        assert_eq!(tonic::Status::from(etcd).code(), tonic::Code::Unavailable);
        assert_eq!(
            tonic::Status::from(CoordinatorError::JobNotFound("x".into())).code(),
            tonic::Code::NotFound
        );
    }
}
