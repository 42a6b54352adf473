//! The coordinator: job API for flamingoctl, node API for worker agents,
//! gang scheduling, failure detection through etcd leases, and all state in
//! etcd so a restarted coordinator carries running jobs on.

pub mod admission;
pub mod archive;
pub mod auth;
pub mod cluster;
pub mod dashboard_auth;
mod error;
mod grpc;
pub mod http;
pub mod leadership;
pub mod metrics;
pub mod placement;
pub mod service;
mod store;

use std::net::SocketAddr;

pub use error::CoordinatorError;
use flamingo_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

/// Resolved, validated coordinator configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "FLAMINGO_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    pub listen: SocketAddr,
    /// etcd endpoints, comma separated.
    #[arg(
        long = "etcd-endpoints",
        env = "FLAMINGO_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix for everything flamingo stores in etcd.
    #[arg(long, env = "FLAMINGO_ETCD_PREFIX", default_value = "/flamingo")]
    pub etcd_prefix: String,
    /// A node whose agent misses heartbeats this long is lost.
    #[arg(long, env = "FLAMINGO_LEASE_TTL_SECONDS", default_value_t = 10)]
    pub lease_ttl_seconds: u32,
    /// How often agents send heartbeats.
    #[arg(long, env = "FLAMINGO_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u32,
    /// Do not check a train job's local model and shard paths on submission
    /// (for a coordinator that cannot see the nodes' shared filesystem).
    #[arg(long, env = "FLAMINGO_NO_PATH_CHECKS")]
    pub no_path_checks: bool,
    /// Where jobs' metric reports are kept (one JSON-lines file per job);
    /// default $FLAMINGO_HOME/metrics.
    #[arg(long, env = "FLAMINGO_METRICS_DIR")]
    pub metrics_dir: Option<std::path::PathBuf>,
    /// Also keep the metrics folder in object storage (s3://bucket/prefix,
    /// gs://, az://, file://): synced every --metrics-sync-seconds, and
    /// restored from there at start-up (a new machine gets the curves back).
    #[arg(long, env = "FLAMINGO_METRICS_STORE")]
    pub metrics_store: Option<String>,
    #[arg(long, env = "FLAMINGO_METRICS_SYNC_SECONDS", default_value_t = 10)]
    pub metrics_sync_seconds: u64,
    /// Address the dashboard, its data API and Prometheus `/metrics` listen
    /// on; `off` for none.
    #[arg(
        long,
        env = "FLAMINGO_HTTP_LISTEN",
        default_value = "127.0.0.1:7080",
        value_parser = parse_http_listen
    )]
    pub http_listen: HttpListen,
    /// Mutual TLS for the gRPC API and for etcd (the cluster CA, this
    /// coordinator's certificate and key); `--insecure` for plain text on
    /// loopback.
    #[command(flatten)]
    pub tls: flamingo_security::TlsFiles,
    /// Revoked certificate serials, one per line (re-read every 2 s);
    /// default: `revoked` next to --tls-ca.
    #[arg(long = "tls-revoked", env = "FLAMINGO_TLS_REVOKED")]
    pub tls_revoked: Option<std::path::PathBuf>,
    /// The key rank credentials are signed with (hex); default
    /// `rank.secret` next to --tls-ca.
    #[arg(long = "rank-secret-file", env = "FLAMINGO_RANK_SECRET_FILE")]
    pub rank_secret_file: Option<std::path::PathBuf>,
    /// Accept command jobs (`flamingoctl launch -- <cmd>`), from admins
    /// only. Off by default: a command job runs any program on every node.
    #[arg(long, env = "FLAMINGO_ALLOW_COMMAND_JOBS")]
    pub allow_command_jobs: bool,
    /// The dashboard's token (a file); default `dashboard.token` next to
    /// --tls-ca. Every dashboard, API and /metrics request needs it.
    #[arg(long = "dashboard-token-file", env = "FLAMINGO_DASHBOARD_TOKEN_FILE")]
    pub dashboard_token_file: Option<std::path::PathBuf>,
    /// Host names the dashboard answers to besides 127.0.0.1, localhost,
    /// ::1 and the listen address (requests naming others are refused:
    /// DNS rebinding), repeatable.
    #[arg(long = "http-host", env = "FLAMINGO_HTTP_HOSTS", value_delimiter = ',')]
    pub http_hosts: Vec<String>,
    #[command(flatten)]
    pub limits: Limits,
    /// How long a finished job stays in etcd (seconds). Then its record
    /// moves to the metrics folder (and archive): `status`, `metrics` and
    /// the dashboard still show it, `list` no longer does, and etcd holds
    /// only live and recent jobs. 0 keeps them in etcd forever.
    #[arg(long = "job-retention-seconds", env = "FLAMINGO_JOB_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600)]
    pub job_retention_seconds: u64,
    /// Run as one of several coordinators on the same etcd and prefix: one
    /// leads (elected through etcd), the others stand by without listening
    /// and take over when the leader's lease lapses. Every write of the
    /// leader is fenced by its leadership; a deposed leader exits.
    #[arg(long = "leader-election", env = "FLAMINGO_LEADER_ELECTION")]
    pub leader_election: bool,
    /// The leader's lease: a standby takes over about this long after the
    /// leader dies (Kubernetes controllers use 15 s; at least 2).
    #[arg(
        long = "leader-lease-seconds",
        env = "FLAMINGO_LEADER_LEASE_SECONDS",
        default_value_t = 2
    )]
    pub leader_lease_seconds: u32,
}

/// What one request may ask of the coordinator; checked at `Launch` with
/// errors that name the field and the limit.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// The most nodes one job may ask for.
    #[arg(
        long = "max-job-nodes",
        env = "FLAMINGO_MAX_JOB_NODES",
        default_value_t = 4096
    )]
    pub max_job_nodes: u32,
    /// The most ranks one job may run on a node.
    #[arg(
        long = "max-slots-per-node",
        env = "FLAMINGO_MAX_SLOTS_PER_NODE",
        default_value_t = 256
    )]
    pub max_slots_per_node: u32,
    /// The most shards a dataset pattern of a train job may name (counted
    /// before it is expanded).
    #[arg(long = "max-shards", env = "FLAMINGO_MAX_SHARDS", default_value_t = flamingo_common::brace::DEFAULT_MAX_SHARDS)]
    pub max_shards: u64,
    /// The largest job spec in bytes (JSON, as stored in etcd; etcd refuses
    /// requests over 1.5 MiB).
    #[arg(long = "max-spec-bytes", env = "FLAMINGO_MAX_SPEC_BYTES", default_value_t = 1 << 20)]
    pub max_spec_bytes: usize,
    /// Requests per second one client (one certificate: a node, a user, a
    /// service) may send, in bursts of twice as many; past it the
    /// coordinator answers RESOURCE_EXHAUSTED at once. 0 turns it off.
    #[arg(
        long = "max-requests-per-second",
        env = "FLAMINGO_MAX_REQUESTS_PER_SECOND",
        default_value_t = 1000
    )]
    pub max_requests_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_job_nodes: 4096,
            max_slots_per_node: 256,
            max_shards: flamingo_common::brace::DEFAULT_MAX_SHARDS,
            max_spec_bytes: 1 << 20,
            max_requests_per_second: 1000,
        }
    }
}

/// Where the coordinator's HTTP server listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

fn parse_http_listen(text: &str) -> Result<HttpListen, flamingo_common::CommonError> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(HttpListen(None));
    }
    text.parse()
        .map(|address| HttpListen(Some(address)))
        .map_err(|error| {
            flamingo_common::CommonError::invalid(
                "http-listen",
                format!("'{text}': {error} (an address like 127.0.0.1:7080, or off)"),
            )
        })
}

impl Config {
    /// A file next to the CA certificate, unless `flag` names one.
    fn beside_ca(
        &self,
        flag: &Option<std::path::PathBuf>,
        name: &str,
    ) -> Option<std::path::PathBuf> {
        flag.clone().or_else(|| {
            let dir = self.tls.ca.as_ref()?.parent()?;
            let path = dir.join(name);
            path.exists().then_some(path)
        })
    }

    /// Authentication and authorization from the TLS flags.
    fn auth(&self) -> anyhow::Result<std::sync::Arc<auth::Auth>> {
        let secure = self.tls.ca.is_some();
        let rank_secret = match self.beside_ca(&self.rank_secret_file, "rank.secret") {
            Some(path) => Some(flamingo_security::read_secret(&path)?),
            None if secure => anyhow::bail!(
                "--rank-secret-file: not given and no rank.secret next to --tls-ca (flamingoctl up writes one)"
            ),
            None => None,
        };
        let agent_tls = self.tls.client()?;
        Ok(auth::Auth::new(
            secure,
            self.beside_ca(&self.tls_revoked, "revoked")
                .or_else(|| Some(self.tls.ca.as_ref()?.parent()?.join("revoked"))),
            rank_secret,
            self.allow_command_jobs,
            agent_tls,
        ))
    }

    /// The dashboard's token and host names.
    fn dashboard_access(&self) -> anyhow::Result<dashboard_auth::DashboardAccess> {
        let token = match self.beside_ca(&self.dashboard_token_file, "dashboard.token") {
            Some(path) => Some(std::sync::Arc::new(
                std::fs::read_to_string(&path)
                    .map_err(|error| anyhow::anyhow!("--dashboard-token-file {}: {error}", path.display()))?
                    .trim()
                    .to_string(),
            )),
            None if self.tls.ca.is_some() => anyhow::bail!(
                "--dashboard-token-file: not given and no dashboard.token next to --tls-ca (flamingoctl up writes one)"
            ),
            None => None,
        };
        let mut hosts: Vec<String> = ["127.0.0.1", "localhost", "::1"].map(String::from).to_vec();
        if let Some(address) = self.http_listen.0 {
            hosts.push(address.ip().to_string());
        }
        hosts.extend(self.http_hosts.iter().cloned());
        Ok(dashboard_auth::DashboardAccess {
            token,
            hosts: std::sync::Arc::new(hosts),
        })
    }

    /// Where jobs' metric files are kept on this machine.
    pub fn metrics_dir(&self) -> std::path::PathBuf {
        self.metrics_dir
            .clone()
            .unwrap_or_else(|| flamingo_common::paths::flamingo_home().join("metrics"))
    }

    pub fn validate(&self) -> Result<(), flamingo_common::CommonError> {
        use flamingo_common::CommonError;
        if self.lease_ttl_seconds < 2 {
            return Err(CommonError::invalid(
                "lease-ttl-seconds",
                "must be at least 2",
            ));
        }
        if u64::from(self.heartbeat_interval_ms) * 2 > u64::from(self.lease_ttl_seconds) * 1000 {
            return Err(CommonError::invalid(
                "heartbeat-interval-ms",
                "must be at most half the lease TTL, or nodes expire between heartbeats",
            ));
        }
        if self.etcd_endpoints.is_empty() {
            return Err(CommonError::invalid(
                "etcd-endpoints",
                "give at least one endpoint",
            ));
        }
        Ok(())
    }
}

impl service::Coordinator {
    pub fn lease_ttl_seconds(&self) -> u32 {
        self.config().lease_ttl_seconds
    }
    pub fn heartbeat_interval_ms(&self) -> u32 {
        self.config().heartbeat_interval_ms
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    // The archive first: what it holds must be on disk before any job's
    // curves are read or appended to.
    let archive = match &config.metrics_store {
        Some(url) => {
            let archive = archive::Archive::open(url)
                .map_err(|error| anyhow::anyhow!("--metrics-store: {error}"))?;
            let restored = archive
                .restore(&config.metrics_dir())
                .await
                .map_err(|error| anyhow::anyhow!("restoring metrics from the archive: {error}"))?;
            tracing::info!(url = archive.url(), restored, "metrics archive");
            Some(std::sync::Arc::new(archive))
        }
        None => None,
    };
    let tls = config.tls.server("coordinator", &config.listen)?;
    let auth = config.auth()?;
    let mut store = service::connect_store(&config).await?;
    // Under leader election nothing is read or served before this
    // coordinator leads; from then on, losing the lead stops it.
    let lost = match config.leader_election {
        true => {
            let identity = config.listen.to_string();
            let elected = leadership::lead(
                store.client(),
                store.prefix(),
                &identity,
                config.leader_lease_seconds,
                &shutdown,
            )
            .await?;
            let Some(fence) = elected else {
                return Ok(());
            };
            let lost = fence.lost.clone();
            store = store.fenced(fence);
            Some(lost)
        }
        false => None,
    };
    if let Some(lost) = lost.clone() {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => {
                    tracing::error!("leadership lost: this coordinator stops serving");
                    shutdown.cancel();
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
    auth.watch_revocations(std::time::Duration::from_secs(2));
    let coordinator = service::Coordinator::start(config.clone(), store).await?;
    let syncer = archive.map(|archive| {
        let (dir, shutdown) = (config.metrics_dir(), shutdown.clone());
        let every = std::time::Duration::from_secs(config.metrics_sync_seconds.max(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                let stopping = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = ticker.tick() => false,
                };
                if let Err(error) = archive.sync(&dir).await {
                    tracing::warn!(%error, "metrics archive sync failed; retrying at the next");
                }
                if stopping {
                    break;
                }
            }
        })
    });
    let watcher = tokio::spawn(coordinator.clone().watch_liveness(shutdown.clone()));
    let hangs = tokio::spawn(coordinator.clone().watch_hangs(shutdown.clone()));
    let flusher = tokio::spawn(coordinator.clone().flush_loop(shutdown.clone()));
    let metrics_writer = tokio::spawn(coordinator.clone().metrics_loop(shutdown.clone()));
    // Curves of jobs nobody reports to or looks at leave memory after ten
    // minutes (their files stay).
    let evictions = {
        let (coordinator, shutdown) = (coordinator.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticker.tick() => {
                        let dropped = coordinator
                            .metrics_store()
                            .evict_idle(std::time::Duration::from_secs(600));
                        if dropped > 0 {
                            tracing::debug!(dropped, "idle jobs' curves left memory");
                        }
                    }
                }
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", config.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "coordinator listening");
    let http = match config.http_listen.0 {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address).await.map_err(|error| {
                anyhow::anyhow!(
                    "cannot listen on {address} for the dashboard: {error} (choose another with --http-listen, or --http-listen off)"
                )
            })?;
            tracing::info!(dashboard = %format!("http://{}/", listener.local_addr()?), "dashboard listening");
            let app = http::router(coordinator.clone(), config.dashboard_access()?);
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "dashboard server failed");
                }
            }))
        }
        None => None,
    };
    // Bounds on what one client can ask: requests per second per client,
    // calls in flight per connection, a deadline on producing each answer
    // (streams' bodies are not cut), and message sizes set on purpose —
    // requests are small (a spec is at most --max-spec-bytes), a rank's
    // metrics batch up to 4 MiB, answers page under 4 MiB.
    let limiter = flamingo_security::RateLimiter::new(
        flamingo_security::RateBudget::per_second(config.limits.max_requests_per_second),
        "coordinator",
        "--max-requests-per-second",
    );
    let mut server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .timeout(std::time::Duration::from_secs(60));
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    // A spec up to 4 MiB (or past a raised --max-spec-bytes) reaches
    // admission, which names the limit; bigger is refused by the transport.
    let spec_limit = config.limits.max_spec_bytes.saturating_mul(2);
    server
        .layer(flamingo_security::RateLimitLayer::new(Some(limiter)))
        .add_service(
            pb::job_service_server::JobServiceServer::new(grpc::JobApi(
                coordinator.clone(),
                auth.clone(),
            ))
            .max_decoding_message_size(spec_limit.max(4 << 20))
            .max_encoding_message_size(4 << 20),
        )
        .add_service(
            pb::node_service_server::NodeServiceServer::new(grpc::NodeApi(coordinator, auth))
                .max_decoding_message_size(4 << 20)
                .max_encoding_message_size(4 << 20),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        )
        .await?;
    shutdown.cancel();
    let _ = watcher.await;
    let _ = hangs.await;
    let _ = flusher.await;
    let _ = metrics_writer.await;
    let _ = evictions.await;
    if let Some(syncer) = syncer {
        let _ = syncer.await;
    }
    if let Some(http) = http {
        let _ = http.await;
    }
    if lost.is_some_and(|lost| lost.is_cancelled()) {
        anyhow::bail!("{}", CoordinatorError::Deposed);
    }
    Ok(())
}
