//! `flamingo-worker`: `agent` runs the node daemon; `rank …` runs a rank
//! program (the agent starts those, torchrun style, from the environment).

mod agent;
mod collective_check;
mod logs;
mod ranks;
mod relay;
mod reporter;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flamingo-worker",
    version,
    about = "flamingo worker agent and rank programs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent until SIGTERM (drain) or SIGINT.
    Agent(Box<agent::AgentConfig>),
    /// Run one rank of a built-in job from torchrun's environment variables.
    #[command(subcommand)]
    Rank(RankProgram),
}

#[derive(Subcommand)]
enum RankProgram {
    /// Verify the collectives, then sweep their bandwidth.
    CollectiveCheck(collective_check::CollectiveCheckArgs),
    /// Train: one rank of a run (`flamingoctl train` starts these).
    Train(train::TrainArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Rank(RankProgram::CollectiveCheck(args)) => {
            let _telemetry = flamingo_common::telemetry::init_tracing("warn", "flamingo-rank");
            collective_check::run(args)
        }
        Command::Rank(RankProgram::Train(args)) => {
            let _telemetry = flamingo_common::telemetry::init_tracing("warn", "flamingo-rank");
            train::run(args)
        }
        Command::Agent(config) => {
            let _telemetry = flamingo_common::telemetry::init_tracing("info", "flamingo-agent");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let shutdown = flamingo_common::telemetry::shutdown_on_signals();
                // SIGUSR1 drains too: under Slurm it is the warning before a
                // time limit or preemption (`scancel --signal=USR1`).
                let mut usr1 =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
                let draining = shutdown.clone();
                tokio::spawn(async move {
                    if usr1.recv().await.is_some() {
                        tracing::info!("SIGUSR1: draining");
                        draining.cancel();
                    }
                });
                agent::run(*config, shutdown).await
            })
        }
    }
}
