//! flamingoctl as a library: the local-cluster process launcher (shared with
//! the test sandbox), coordinator client helpers, and the commands.

pub mod client;
pub mod commands;
pub mod data;
pub mod eval;
pub mod inference;
pub mod k8s;
pub mod local;
pub mod render;
pub mod slurm;
pub mod tensorboard;
pub mod train;
pub mod up;
