//! The launchers' errors: each names the program, file or service at fault
//! and says what to do. (Whole commands — `up`, a Slurm job's supervisor,
//! a Kubernetes apply — report with `anyhow` at their top level.)

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    /// The cluster's certificates cannot be issued or read.
    #[error("cluster credentials: {message}")]
    Credentials { message: String },
    /// A program or file that should be there is not.
    #[error("{what} not found; {hint}")]
    NotFound { what: String, hint: String },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}: {source}")]
    File {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A record in a job's folder that cannot be read.
    #[error("{path}: {message}; was the folder written by another flamingo version?")]
    Record { path: String, message: String },
    #[error("timed out after {seconds:.0} s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
    /// A setting that cannot work; `field` is its flag.
    #[error("--{field}: {message}")]
    Setting {
        field: &'static str,
        message: String,
    },
    /// A scheduler command (sbatch, scontrol, kubectl's API) failed.
    #[error("{command}: {message}")]
    Scheduler { command: String, message: String },
    #[error(transparent)]
    Client(#[from] flamingo_client::ClientError),
}

impl LaunchError {
    pub fn file(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        Self::File {
            path: path.display().to_string(),
            what,
            source,
        }
    }
}

pub type Result<T, E = LaunchError> = std::result::Result<T, E>;
