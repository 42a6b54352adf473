//! The data service's errors. Errors about one sample are not here: a bad
//! sample is a [`crate::sample::Reject`], counted and skipped, never an error.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    /// The dataset spec is invalid; `field` names what to fix.
    #[error("dataset spec: {field}: {message}")]
    Spec { field: String, message: String },
    /// A shard named by the spec does not exist.
    #[error(
        "shard {url}: not found ({message}); check the shard pattern and the storage credentials"
    )]
    MissingShard { url: String, message: String },
    /// Object storage failed for a reason other than a missing object.
    #[error("{url}: {message}")]
    Storage { url: String, message: String },
    /// An index file exists but cannot be used.
    #[error("index {url}: {message}; delete it and run `flamingoctl data index` again")]
    Index { url: String, message: String },
    /// The tokenizer a spec names cannot be used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    /// The data service refused a stream: the request is wrong (spec,
    /// missing shard), and retrying cannot help.
    #[error("data service refused the stream: {message}")]
    Refused { message: String },
    /// No replica answered for `seconds`.
    #[error("no data service replica answered for {seconds}s (last error: {last})")]
    Unreachable { seconds: u64, last: String },
    /// Raw pairs or documents to pack that cannot be read (`place` is the
    /// file, and the line when it is one line).
    #[error("{place}: {message}")]
    Source { place: String, message: String },
}

impl DataError {
    pub fn spec(field: &str, message: impl Into<String>) -> Self {
        Self::Spec {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Whether retrying the same request can succeed (storage hiccups), as
    /// opposed to a problem in the request itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Storage { .. })
    }
}

impl From<DataError> for tonic::Status {
    fn from(error: DataError) -> Self {
        let message = error.to_string();
        match error {
            DataError::Spec { .. } | DataError::Tokenizer { .. } | DataError::Source { .. } => {
                tonic::Status::invalid_argument(message)
            }
            DataError::MissingShard { .. } => tonic::Status::not_found(message),
            DataError::Index { .. } => tonic::Status::failed_precondition(message),
            DataError::Storage { .. } | DataError::Unreachable { .. } => {
                tonic::Status::unavailable(message)
            }
            DataError::Refused { .. } => tonic::Status::invalid_argument(message),
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_grpc_codes_and_retryability() {
        let missing = DataError::MissingShard {
            url: "s3://b/x-0003.tar".into(),
            message: "404".into(),
        };
        assert!(!missing.is_retryable());
        assert_eq!(tonic::Status::from(missing).code(), tonic::Code::NotFound);
        let storage = DataError::Storage {
            url: "s3://b/x".into(),
            message: "connection reset".into(),
        };
        assert!(storage.is_retryable());
        assert_eq!(
            tonic::Status::from(storage).code(),
            tonic::Code::Unavailable
        );
        let spec = DataError::spec("mmc4.max_images", "must be at least 1");
        assert_eq!(
            spec.to_string(),
            "dataset spec: mmc4.max_images: must be at least 1"
        );
        assert_eq!(
            tonic::Status::from(spec).code(),
            tonic::Code::InvalidArgument
        );
    }
}
