//! The client's errors, each naming the coordinator or the record at fault.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("coordinator address '{address}' is not a URL (e.g. http://127.0.0.1:7070)")]
    BadAddress { address: String },
    /// The connection, not the request, failed.
    #[error(
        "cannot reach coordinator at {address} ({cause}); is the cluster up? try: flamingoctl up"
    )]
    Unreachable { address: String, cause: String },
    /// The coordinator refused or failed the request (its message).
    #[error("{}", status.message())]
    Call {
        address: String,
        status: tonic::Status,
    },
    /// An answer that cannot be decoded (a mismatched coordinator).
    #[error("coordinator at {address}: {message}")]
    Answer { address: String, message: String },
    #[error("job {job}: {message}")]
    Job { job: String, message: String },
    /// This process's TLS credentials cannot be used.
    #[error("credentials: {message}")]
    Credentials { message: String },
    /// A local file (the cluster record, an output) failed.
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

impl ClientError {
    /// A failed call: `Unreachable` when the transport, not the request,
    /// was the problem.
    pub fn from_status(address: &str, status: tonic::Status) -> Self {
        if status.code() == tonic::Code::Unavailable && status.message().contains("transport") {
            Self::Unreachable {
                address: address.to_string(),
                cause: status.message().to_string(),
            }
        } else {
            Self::Call {
                address: address.to_string(),
                status,
            }
        }
    }

    /// The gRPC code of a refused call, if it was one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Call { status, .. } => Some(status.code()),
            Self::Unreachable { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
