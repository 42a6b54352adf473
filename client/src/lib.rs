//! A client of flamingo's coordinator, for `flamingoctl`, the launchers
//! (a Slurm job follows its own coordinator) and the tests: where the
//! coordinator is ([`address`], the local cluster's record in [`cluster`]),
//! the job API as a [`Session`], and how jobs, nodes, metrics and scores are
//! shown ([`render`]). Errors say what was tried and what to do.

pub mod address;
pub mod cluster;
pub mod error;
pub mod render;
pub mod session;

pub use error::{ClientError, Result};

/// The largest message flamingoctl sends or accepts (tonic's default, set
/// on purpose): the coordinator pages anything that could be larger.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
pub use session::Session;
