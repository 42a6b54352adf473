//! `flamingo-data-service`: serves ready training batches over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use flamingo_data::store::StorageOptions;
use server::{serve, DataService, ServiceConfig};

mod access;
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
    /// The most samples in one global batch (batch size × world size) a
    /// stream may ask for.
    #[arg(long, env = "FLAMINGO_DATA_MAX_GLOBAL_BATCH", default_value_t = 65_536)]
    max_global_batch: u64,
    /// Requests per second one client (one certificate, or one address
    /// without TLS) may send, in bursts of twice as many; past it the
    /// service answers RESOURCE_EXHAUSTED at once. 0 turns it off.
    #[arg(
        long = "max-requests-per-second",
        env = "FLAMINGO_DATA_MAX_REQUESTS_PER_SECOND",
        default_value_t = 1000
    )]
    max_requests_per_second: u32,
    /// Endpoint of an S3-compatible server for s3:// URLs.
    #[arg(long, env = "FLAMINGO_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Storage locations this service reads (local folders, or URL
    /// prefixes like s3://bucket/laion/), repeatable; default
    /// $FLAMINGO_HOME/data. A spec naming anything else is refused.
    #[arg(
        long = "allow-prefix",
        env = "FLAMINGO_DATA_ALLOW_PREFIX",
        value_delimiter = ','
    )]
    allow_prefix: Vec<String>,
    /// Also read http(s):// sources.
    #[arg(long)]
    allow_http: bool,
    /// The cluster's rank key (hex): ranks' credentials are checked with
    /// it; default `rank.secret` next to --tls-ca.
    #[arg(long = "rank-secret-file", env = "FLAMINGO_RANK_SECRET_FILE")]
    rank_secret_file: Option<std::path::PathBuf>,
    /// Where to serve Prometheus `/metrics` (samples prepared, images
    /// decoded, streams and batches served); none by default.
    #[arg(long, env = "FLAMINGO_DATA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    tls: flamingo_security::TlsFiles,
}

impl Args {
    fn access(&self) -> anyhow::Result<access::Access> {
        let prefixes = if self.allow_prefix.is_empty() {
            vec![flamingo_common::paths::flamingo_home()
                .join("data")
                .display()
                .to_string()]
        } else {
            self.allow_prefix.clone()
        };
        let secret_file = self.rank_secret_file.clone().or_else(|| {
            let path = self.tls.ca.as_ref()?.parent()?.join("rank.secret");
            path.exists().then_some(path)
        });
        let rank_secret = secret_file
            .map(|path| flamingo_security::read_secret(&path))
            .transpose()?;
        Ok(access::Access {
            prefixes,
            allow_http: self.allow_http,
            secure: self.tls.ca.is_some(),
            rank_secret,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = flamingo_common::telemetry::init_tracing("info", "flamingo-data-service");
    let mut config = ServiceConfig {
        read_ahead: args.read_ahead,
        max_global_batch: args.max_global_batch,
        max_requests_per_second: args.max_requests_per_second,
        storage: StorageOptions {
            s3_endpoint: args.s3_endpoint.clone(),
        },
        ..ServiceConfig::default()
    };
    if let Some(threads) = args.threads {
        config.threads = threads;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let tls = args.tls.server("data service", &args.listen)?;
        let access = args.access()?;
        tracing::info!(prefixes = ?access.prefixes, tls = tls.is_some(), "data service access");
        let service = Arc::new(DataService::new(config)?);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", args.listen))?;
        tracing::info!(address = %listener.local_addr()?, "data service listening");
        let shutdown = flamingo_common::telemetry::shutdown_on_signals();
        if let Some(address) = args.metrics_listen {
            serve_metrics(address, service.clone(), shutdown.clone()).await?;
        }
        serve(service, access, tls, listener, async move {
            shutdown.cancelled().await
        })
        .await
    })
}

/// Prometheus `/metrics` on `address` until `stop`.
async fn serve_metrics(
    address: SocketAddr,
    service: Arc<DataService>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("--metrics-listen {address}: cannot listen: {error}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving Prometheus /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = service.prometheus_text();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(())
}
