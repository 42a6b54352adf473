//! Slurm: `flamingoctl launch --scheduler slurm` renders
//! deploy/slurm/flamingo.sbatch for the job into a folder every node sees and
//! submits it ([`script`]); inside the allocation `flamingoctl slurm run`
//! starts the control plane and one agent per node (`srun … flamingoctl
//! slurm agent`, [`agent`]), launches the job and follows it, and turns
//! Slurm's warning signal into a checkpoint and a requeue ([`allocation`]).
//! `status`, `stop`, `wait` and `logs` find a Slurm job through its folder
//! by either id ([`records`], [`follow`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{LaunchError, Result};

pub mod agent;
pub mod allocation;
pub mod follow;
pub mod records;
pub mod script;

pub use records::{find, rank_log, ControlPlane, JobFile, Record, SlurmState};
pub use script::{submit, Submission, Submitted};

#[derive(Debug, Clone, clap::Args)]
pub struct SlurmFlags {
    /// Slurm: the partition (sbatch --partition).
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm: generic resources per node, e.g. gpu:8 (sbatch --gres).
    #[arg(long)]
    pub gres: Option<String>,
    /// Slurm: the time limit, e.g. 2-00:00:00 (sbatch --time).
    #[arg(long)]
    pub time: Option<String>,
    /// Slurm: the account charged (sbatch --account).
    #[arg(long)]
    pub account: Option<String>,
    /// Slurm: seconds before the time limit at which every rank checkpoints
    /// and the job is requeued (sbatch --signal=B:USR1@S).
    #[arg(long, default_value_t = 300)]
    pub signal_seconds: u32,
    /// Slurm: another sbatch option, e.g. --sbatch-arg=--qos=high (repeatable).
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Slurm: an existing etcd for the job's coordinator (default: one
    /// started for the job, its data in the job's folder).
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
    /// Slurm: the network interface other nodes reach the first node on
    /// (default: the first one that is up, other than loopback).
    #[arg(long)]
    pub interface: Option<String>,
    /// Slurm: a folder every node sees, for the jobs' folders (default
    /// $FLAMINGO_HOME/slurm, i.e. ~/.flamingo/slurm).
    #[arg(long, env = "FLAMINGO_SLURM_DIR")]
    pub slurm_dir: Option<PathBuf>,
}

/// The flags `launch` strips before the job's own launch runs inside the
/// allocation: the scheduler's, and the submitting side's.
pub const FLAGS_WITH_VALUE: [&str; 12] = [
    "--scheduler",
    "--partition",
    "--gres",
    "--time",
    "--account",
    "--signal-seconds",
    "--sbatch-arg",
    "--etcd-endpoints",
    "--interface",
    "--slurm-dir",
    "--coordinator",
    "--state-dir",
];
pub const BARE_FLAGS: [&str; 5] = ["--dry-run", "--wait", "--follow", "-f", "--json"];

/// Where Slurm jobs' folders go: the flag, `$FLAMINGO_SLURM_DIR`, else
/// `$FLAMINGO_HOME/slurm`.
pub fn slurm_dir(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FLAMINGO_SLURM_DIR").map(PathBuf::from))
        .unwrap_or_else(|| flamingo_common::paths::flamingo_home().join("slurm"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// A Slurm client command (sbatch, srun, scontrol, scancel).
fn slurm_command(program: &str) -> Result<Command> {
    which(program)
        .map(Command::new)
        .ok_or_else(|| LaunchError::NotFound {
            what: format!("{program} (on PATH)"),
            hint: "--scheduler slurm needs Slurm's client commands (Debian: slurm-client)".into(),
        })
}
