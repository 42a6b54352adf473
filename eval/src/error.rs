//! The evaluation suite's errors: each names the file, field or example it
//! is about and says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A dataset file is missing or malformed (the message names it).
    #[error("{0}")]
    Dataset(String),
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
    /// Predictions that cannot be scored.
    #[error("{0}")]
    Metric(String),
    /// Settings that cannot run.
    #[error("{0}")]
    Settings(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;
