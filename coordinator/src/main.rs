//! `flamingo-coordinator`: parse flags, set up tracing, serve until SIGTERM/SIGINT.

use clap::Parser;
use tokio_util::sync::CancellationToken;

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
    flamingo_common::telemetry::init_tracing("info");
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let signal_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        signal_shutdown.cancel();
    });
    flamingo_coordinator::run(cli.config, shutdown).await
}
