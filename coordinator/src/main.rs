//! `flamingo-coordinator`: parse flags, set up tracing, serve until SIGTERM/SIGINT.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "flamingo-coordinator",
    version,
    about = "flamingo's control plane"
)]
struct Cli {
    #[command(flatten)]
    config: flamingo_coordinator::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flamingo_common::telemetry::init_tracing("info", "flamingo-coordinator");
    let cli = Cli::parse();
    let shutdown = flamingo_common::telemetry::shutdown_on_signals();
    flamingo_coordinator::run(cli.config, shutdown).await
}
