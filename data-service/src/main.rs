//! `flamingo-data-service`: serves ready training batches over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use flamingo_data::store::StorageOptions;
use server::{serve, DataService, ServiceConfig};

mod server;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "flamingo's data service: LAION and MMC4 shards to ready, resumable batches"
)]
struct Args {
    /// Address to serve on (port 0 picks a free port; the chosen address
    /// is logged).
    #[arg(long, env = "FLAMINGO_DATA_LISTEN", default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Preprocessing threads (default: all cores).
    #[arg(long, env = "FLAMINGO_DATA_THREADS")]
    threads: Option<usize>,
    /// Global batches each stream prepares ahead of its rank.
    #[arg(long, default_value_t = 4)]
    read_ahead: usize,
    /// Endpoint of an S3-compatible server for s3:// URLs.
    #[arg(long, env = "FLAMINGO_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = flamingo_common::telemetry::init_tracing("info", "flamingo-data-service");
    let mut config = ServiceConfig {
        read_ahead: args.read_ahead,
        storage: StorageOptions {
            s3_endpoint: args.s3_endpoint,
        },
        ..ServiceConfig::default()
    };
    if let Some(threads) = args.threads {
        config.threads = threads;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let service = Arc::new(DataService::new(config)?);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", args.listen))?;
        tracing::info!(address = %listener.local_addr()?, "data service listening");
        let shutdown = flamingo_common::telemetry::shutdown_on_signals();
        serve(service, listener, async move { shutdown.cancelled().await }).await
    })
}
