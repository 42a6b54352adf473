//! `flamingoctl slurm run` and `slurm agent`: what a Slurm batch job
//! submitted by `launch --scheduler slurm` runs (see
//! `flamingo_launch::slurm`).

use std::path::PathBuf;
use std::process::ExitCode;

use flamingo_launch::slurm::{agent, allocation};

#[derive(Debug, clap::Subcommand)]
pub enum SlurmCommand {
    /// The batch job's body: control plane, agents, launch, follow, requeue.
    Run {
        #[arg(long)]
        job_dir: PathBuf,
    },
    /// One node's agent (srun starts one per node).
    Agent(agent::AgentArgs),
}

pub async fn run(command: SlurmCommand) -> anyhow::Result<ExitCode> {
    match command {
        SlurmCommand::Run { job_dir } => {
            let code = allocation::run_in_allocation(&job_dir).await?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        // Replaces this process; returns only when it could not.
        SlurmCommand::Agent(args) => Err(agent::exec_agent(&args)),
    }
}
