//! c10d collectives on `tch` tensors: `ProcessGroupGloo` on CPU and, with the
//! `cuda` feature, `ProcessGroupNCCL` on GPU, both rendezvousing through
//! c10d's `TCPStore` exactly as `torch.distributed.init_process_group` does.
//!
//! Every operation has a timeout, so a dead peer surfaces as an error rather
//! than a hang, and C++ exceptions come back as [`CollectiveError`]s.

mod group;
mod sharding;

pub use group::{Backend, ProcessGroup, ProcessGroupConfig, ReduceOp, Work};
pub use sharding::{pad_to_multiple, shard_len, shard_range};

/// Errors from setting up a process group or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("environment variable {var}: {message}")]
    Environment { var: &'static str, message: String },
    #[error("process group init (rank {rank} of {world_size}, store {master_addr}:{master_port}): {message}")]
    Init {
        rank: i64,
        world_size: i64,
        master_addr: String,
        master_port: u16,
        message: String,
    },
    #[error("{op}: {message}")]
    InvalidArgument { op: &'static str, message: String },
    #[error("{op} failed on rank {rank}: {message}")]
    Collective {
        op: &'static str,
        rank: i64,
        message: String,
    },
}

impl CollectiveError {
    /// A failed collective usually means a peer died or the network broke:
    /// the job may be retried from its last checkpoint. Bad arguments and a
    /// broken environment will fail again the same way.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Collective { .. } | Self::Init { .. })
    }
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;
