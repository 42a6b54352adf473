//! The evaluation suite's errors: each names the file, field or example it
//! is about and says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A dataset file (or folder) is missing or malformed.
    #[error("{}: {message}", path.display())]
    Dataset { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] flamingo_model::ModelError),
    #[error(transparent)]
    Preprocess(#[from] flamingo_preprocess::PreprocessError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("collective: {0}")]
    Collective(#[from] flamingo_collectives::CollectiveError),
    /// A rank's predictions could not be read after the gather.
    #[error("the predictions of rank {rank} cannot be read: {message}")]
    Gather { rank: usize, message: String },
    /// Predictions that cannot be scored by `metric`.
    #[error("{metric}: {message}")]
    Metric {
        metric: &'static str,
        message: String,
    },
    /// Settings that cannot run; `field` is the flag.
    #[error("--{field}: {message}")]
    Settings {
        field: &'static str,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, EvalError>;
