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
pub use session::Session;
