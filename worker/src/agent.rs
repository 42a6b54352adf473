//! The worker agent, one per node (torchrun's agent, cluster-wide): registers
//! the node's slots, keeps its lease alive with heartbeats, starts and stops
//! ranks as the coordinator says, reports their exits, and drains on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flamingo_common::JobId;
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use flamingo_security::Failover;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ranks::Ranks;
use crate::{logs, reporter};

#[derive(Debug, Clone, clap::Args)]
pub struct AgentConfig {
    /// The coordinator's gRPC address; with several coordinators (leader
    /// election), every one of them, comma separated.
    #[arg(
        long,
        env = "FLAMINGO_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// This node's name in the cluster (default: the hostname).
    #[arg(long, env = "FLAMINGO_NODE_ID")]
    pub node_id: Option<String>,
    /// Address other nodes reach this one at; ranks bind Gloo to it.
    #[arg(long, env = "FLAMINGO_NODE_ADDRESS", default_value = "127.0.0.1")]
    pub address: String,
    /// Slots when the node has no GPU (one rank per slot).
    #[arg(long, env = "FLAMINGO_CPU_SLOTS", default_value_t = 1)]
    pub cpu_slots: u32,
    /// Where rank logs go (default: $FLAMINGO_HOME/agents/<node id>).
    #[arg(long, env = "FLAMINGO_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Listen address of the agent's log service.
    #[arg(long, env = "FLAMINGO_AGENT_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// MASTER_PORT range for jobs whose rank 0 runs here: FIRST:COUNT.
    #[arg(long, env = "FLAMINGO_RENDEZVOUS_PORTS", default_value = "29500:100")]
    pub rendezvous_ports: String,
    /// On SIGTERM, how long running ranks may finish before they are killed.
    #[arg(long, env = "FLAMINGO_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    pub drain_timeout_seconds: u64,
    /// Between SIGTERM and SIGKILL when stopping a rank.
    #[arg(long, env = "FLAMINGO_KILL_GRACE_SECONDS", default_value_t = 5)]
    pub kill_grace_seconds: u64,
    /// Where to serve Prometheus `/metrics` (rank process states); none
    /// when not given.
    #[arg(long, env = "FLAMINGO_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A rank's log past this size is rotated (copied to `rank-<r>.log.1`,
    /// older copies shifted, the live file truncated).
    #[arg(long, env = "FLAMINGO_RANK_LOG_MAX_BYTES", default_value_t = 256 << 20)]
    pub rank_log_max_bytes: u64,
    /// Rotated copies kept per rank log.
    #[arg(long, env = "FLAMINGO_RANK_LOG_KEEP", default_value_t = 3)]
    pub rank_log_keep: u32,
    /// Kill this node's ranks (fencing) when no coordinator has been
    /// reachable for this long: by then the coordinator has declared the
    /// node lost and restarts its jobs elsewhere. 0: the coordinator's
    /// node lease (`--lease-ttl-seconds`, told at registration).
    #[arg(long, env = "FLAMINGO_FENCE_AFTER_SECONDS", default_value_t = 0)]
    pub fence_after_seconds: u64,
    /// This node's data-service replica, then (comma-separated) replicas
    /// that stand in for it while it is down: the node's ranks stream
    /// their whole slices from it over loopback, unless a job names its
    /// own replicas (`--data_service`).
    #[arg(long, env = "FLAMINGO_DATA_SERVICE")]
    pub data_service: Option<String>,
    /// Protocol version to announce (only for testing version checks).
    #[arg(long, hide = true, default_value_t = flamingo_proto::PROTOCOL_VERSION)]
    pub protocol_version: u32,
    /// Mutual TLS: the cluster CA and this node's certificate (its node id
    /// in the SAN), for the coordinator link, the log service and the
    /// node's ranks; `--insecure` for plain text on loopback.
    #[command(flatten)]
    pub tls: flamingo_security::TlsFiles,
}

impl AgentConfig {
    fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_string())
                .unwrap_or_else(|_| "localhost".into())
        })
    }

    fn rendezvous_ports(&self) -> anyhow::Result<(u16, u16)> {
        let parse = || -> Option<(u16, u16)> {
            let (first, count) = self.rendezvous_ports.split_once(':')?;
            Some((first.parse().ok()?, count.parse().ok()?))
        };
        parse()
            .filter(|(first, count)| *count > 0 && first.checked_add(*count - 1).is_some())
            .with_context(|| {
                format!(
                    "--rendezvous-ports '{}': expected FIRST:COUNT, e.g. 29500:100",
                    self.rendezvous_ports
                )
            })
    }
}

/// GPUs this agent may use, which become its slots: those named by
/// `CUDA_VISIBLE_DEVICES` when it is set (Slurm sets it to the allocated
/// ones), else every `/dev/nvidiaN`.
fn gpu_count() -> u32 {
    if let Ok(visible) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return visible
            .split(',')
            .filter(|device| !device.trim().is_empty())
            .count() as u32;
    }
    std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix("nvidia").is_some_and(|rest| {
                        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
                    })
                })
                .count() as u32
        })
        .unwrap_or(0)
}

fn heartbeat(node_id: &str, ranks: &Ranks, draining: bool) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
            node_id: node_id.to_string(),
            running: ranks
                .running()
                .into_iter()
                .map(|(job_id, attempt, rank)| pb::RunningRank {
                    job_id: job_id.0,
                    rank,
                    attempt,
                })
                .collect(),
            draining,
        })),
    }
}

enum SessionEnd {
    /// The coordinator no longer knows this node: register again.
    Unregistered,
    /// Connection trouble: attach again.
    Disconnected,
    Shutdown,
}

/// Runs the agent until `shutdown` (first SIGTERM: drain) completes.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node_id = config.node_id();
    let (port_first, port_count) = config.rendezvous_ports()?;
    let gpus = gpu_count();
    let slots = if gpus > 0 { gpus } else { config.cpu_slots };
    anyhow::ensure!(slots > 0, "--cpu-slots must be at least 1");
    let state_dir = config.state_dir.clone().unwrap_or_else(|| {
        flamingo_common::paths::flamingo_home()
            .join("agents")
            .join(&node_id)
    });
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the agent state dir {}", state_dir.display()))?;
    let client_tls = config.tls.client()?;
    if client_tls.is_none() && !config.tls.insecure {
        anyhow::bail!(
            "--tls-ca, --tls-cert, --tls-key: not given; the agent talks to the coordinator over mutual TLS \
             (flamingoctl up issues the node certificates; `flamingoctl certs issue --node ID` for another machine), \
             or --insecure for plain text on loopback"
        );
    }
    // Every coordinator's address: calls go to the one that answers (the
    // leader, under leader election).
    // HTTP/2 pings every second: a coordinator cut off by the network ends
    // the session within two seconds, and the fencing clock starts.
    let channel = flamingo_security::Failover::with_keep_alive(
        &config.coordinator,
        client_tls.as_ref(),
        flamingo_security::COORDINATOR_NAME,
        Duration::from_secs(2),
        None,
        Some(Duration::from_secs(1)),
    )
    .with_context(|| format!("--coordinator '{}'", config.coordinator))?;
    let client = NodeServiceClient::new(channel);
    let relay = Arc::new(crate::relay::Relay::new(node_id.clone(), client.clone()));
    let (reports_tx, backlog) = reporter::spawn(client.clone(), node_id.clone(), relay.clone());
    let ranks = Ranks::new(
        state_dir.clone(),
        config.address.clone(),
        node_id.clone(),
        config.coordinator.clone(),
        Duration::from_secs(config.kill_grace_seconds),
        reports_tx,
        config.tls.clone(),
    )?
    .with_data_service(config.data_service.clone());
    let servers = CancellationToken::new();
    let (agent_endpoint, log_server) =
        serve_logs(&config, &state_dir, &ranks, &relay, &servers).await?;
    ranks.set_agent_endpoint(&agent_endpoint);
    let relay_task = tokio::spawn(relay.clone().run(servers.clone()));
    tokio::spawn(crate::logs::rotate_logs(
        state_dir.clone(),
        config.rank_log_max_bytes,
        config.rank_log_keep,
        servers.clone(),
    ));
    let draining = CancellationToken::new();
    if let Some(address) = config.metrics_listen {
        let node = (node_id.clone(), slots);
        serve_metrics(address, &ranks, node, &draining, &servers).await?;
    }
    let drain_watch = {
        let (draining, shutdown) = (draining.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            draining.cancel();
        })
    };
    let mut agent = Agent {
        registration: pb::RegisterRequest {
            protocol_version: config.protocol_version,
            node_id: node_id.clone(),
            address: config.address.clone(),
            slots,
            gpu: gpus > 0,
            rendezvous_port_first: u32::from(port_first),
            rendezvous_port_count: u32::from(port_count),
            agent_endpoint,
        },
        config: &config,
        client,
        ranks,
        draining,
        registered: false,
        fence_after: Duration::from_secs(config.fence_after_seconds),
        out_of_touch_since: None,
    };
    let outcome = agent.serve().await;
    agent.stop(&backlog).await;
    servers.cancel();
    let _ = log_server.await;
    let _ = relay_task.await;
    drain_watch.abort();
    tracing::info!(node = %node_id, "agent stopped");
    outcome
}

/// The log service (`AgentService`) on `--listen`; returns the endpoint the
/// coordinator reaches it at and its task.
async fn serve_logs(
    config: &AgentConfig,
    state_dir: &std::path::Path,
    ranks: &Ranks,
    relay: &Arc<crate::relay::Relay>,
    stop: &CancellationToken,
) -> anyhow::Result<(
    String,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
)> {
    let tls = config.tls.server("agent log service", &config.listen)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("agent log service cannot listen on {}", config.listen))?;
    // Listening on every interface: others reach the log service at the
    // node's address.
    let local = listener.local_addr()?;
    let endpoint = if local.ip().is_unspecified() {
        format!("http://{}:{}", config.address, local.port())
    } else {
        format!("http://{local}")
    };
    let service = logs::LogService {
        state_dir: state_dir.to_path_buf(),
        ranks: ranks.clone(),
        secure: tls.is_some(),
        node_id: config.node_id(),
        relay: relay.clone(),
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = tokio::spawn(
        builder
            .add_service(pb::agent_service_server::AgentServiceServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    Ok((endpoint, server))
}

/// Prometheus `/metrics` on `address` (`--metrics-listen`).
async fn serve_metrics(
    address: std::net::SocketAddr,
    ranks: &Ranks,
    (node_id, slots): (String, u32),
    draining: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics-listen {address}: cannot listen"))?;
    let (ranks, draining) = (ranks.clone(), draining.clone());
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = ranks.prometheus_text(&node_id, slots, draining.is_cancelled());
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
    tracing::info!(%address, "serving Prometheus /metrics");
    let stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(())
}

/// The agent's connection to the coordinator.
struct Agent<'a> {
    config: &'a AgentConfig,
    client: NodeServiceClient<Failover>,
    registration: pb::RegisterRequest,
    ranks: Ranks,
    /// Cancelled at the first SIGTERM.
    draining: CancellationToken,
    registered: bool,
    /// Fence the ranks after this long without a coordinator (zero until
    /// the first registration tells the lease).
    fence_after: Duration,
    /// Since when no coordinator has answered (none while attached).
    out_of_touch_since: Option<tokio::time::Instant>,
}

impl Agent<'_> {
    /// Registers and keeps a session with the coordinator until the drain
    /// is done (or the agent must stop).
    async fn serve(&mut self) -> anyhow::Result<()> {
        let config = self.config;
        let node_id = self.registration.node_id.clone();
        let mut interval = Duration::from_millis(1000);
        let mut drain_started: Option<tokio::time::Instant> = None;
        loop {
            if !self.registered {
                tokio::select! {
                    result = register(&self.client, &self.registration) => {
                        let response = result?;
                        interval = Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(100)));
                        if config.fence_after_seconds == 0 {
                            self.fence_after =
                                Duration::from_secs(u64::from(response.lease_ttl_seconds.max(1)));
                        }
                        self.registered = true;
                        tracing::info!(node = %node_id, slots = self.registration.slots, coordinator = %config.coordinator, "registered");
                    }
                    _ = self.draining.cancelled() => return Ok(()),
                }
            }
            let end = session(
                &self.client,
                &node_id,
                &self.ranks,
                interval,
                &self.draining,
                config.drain_timeout_seconds,
                &mut self.out_of_touch_since,
            )
            .await;
            match end {
                SessionEnd::Unregistered => self.registered = false,
                SessionEnd::Disconnected => {
                    let since = *self
                        .out_of_touch_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if !self.fence_after.is_zero()
                        && since.elapsed() >= self.fence_after
                        && !self.ranks.running().is_empty()
                    {
                        let fenced = self.ranks.fence(&format!(
                            "no coordinator reachable for {:.1} s (the node lease is {} s): \
                             the coordinator has given this node's ranks up",
                            since.elapsed().as_secs_f64(),
                            self.fence_after.as_secs()
                        ));
                        tracing::warn!(fenced, "ranks fenced");
                    }
                    // Draining with the coordinator out of reach: the ranks
                    // still get the drain timeout to finish, then the agent
                    // stops without it.
                    if self.draining.is_cancelled() {
                        let started = *drain_started.get_or_insert_with(tokio::time::Instant::now);
                        if self.ranks.running().is_empty()
                            || started.elapsed()
                                >= Duration::from_secs(config.drain_timeout_seconds)
                        {
                            tracing::warn!("draining without the coordinator: stopping");
                            return Ok(());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                SessionEnd::Shutdown => return Ok(()),
            }
        }
    }

    /// The drain finished (or timed out): kill what is left, flush reports,
    /// deregister.
    async fn stop(&self, backlog: &reporter::Backlog) {
        if !self.ranks.running().is_empty() {
            self.ranks.stop_all("agent shutting down");
            let grace = Duration::from_secs(self.config.kill_grace_seconds + 2);
            let deadline = tokio::time::Instant::now() + grace;
            while !self.ranks.running().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while backlog.pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.registered {
            let _ = self
                .client
                .clone()
                .deregister(pb::DeregisterRequest {
                    node_id: self.registration.node_id.clone(),
                })
                .await;
        }
    }
}

/// Registers, retrying while the coordinator is unreachable; a refusal
/// (protocol mismatch, bad slots) is final.
async fn register(
    client: &NodeServiceClient<Failover>,
    registration: &pb::RegisterRequest,
) -> anyhow::Result<pb::RegisterResponse> {
    let mut delay = Duration::from_millis(100);
    loop {
        match client.clone().register(registration.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                anyhow::bail!("the coordinator refused this agent: {}", status.message());
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot register yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn session(
    client: &NodeServiceClient<Failover>,
    node_id: &str,
    ranks: &Ranks,
    interval: Duration,
    draining: &CancellationToken,
    drain_timeout_seconds: u64,
    out_of_touch_since: &mut Option<tokio::time::Instant>,
) -> SessionEnd {
    let (outgoing_tx, outgoing_rx) = mpsc::channel(16);
    let _ = outgoing_tx
        .send(heartbeat(node_id, ranks, draining.is_cancelled()))
        .await;
    let response = client
        .clone()
        .attach(tokio_stream::wrappers::ReceiverStream::new(outgoing_rx))
        .await;
    let mut incoming = match response {
        Ok(response) => {
            // A coordinator answered: in touch again.
            *out_of_touch_since = None;
            response.into_inner()
        }
        Err(status) if status.code() == tonic::Code::NotFound => return SessionEnd::Unregistered,
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "cannot attach to the coordinator");
            return SessionEnd::Disconnected;
        }
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        if draining.is_cancelled() {
            let deadline = match drain_deadline {
                Some(deadline) => deadline,
                None => {
                    tracing::info!("draining: no new ranks; waiting for running ones to finish");
                    // Tell the coordinator first, so that the ranks' exits
                    // (they checkpoint and stop) are not answered with new
                    // ranks on this node.
                    if outgoing_tx
                        .send(heartbeat(node_id, ranks, true))
                        .await
                        .is_err()
                    {
                        return SessionEnd::Disconnected;
                    }
                    ranks.preempt_all();
                    let deadline =
                        tokio::time::Instant::now() + Duration::from_secs(drain_timeout_seconds);
                    drain_deadline = Some(deadline);
                    deadline
                }
            };
            if ranks.running().is_empty() || tokio::time::Instant::now() >= deadline {
                return SessionEnd::Shutdown;
            }
        }
        tokio::select! {
            // Wakes the loop the moment a drain starts.
            _ = draining.cancelled(), if drain_deadline.is_none() => {}
            _ = ticker.tick() => {
                if outgoing_tx.send(heartbeat(node_id, ranks, draining.is_cancelled())).await.is_err() {
                    return SessionEnd::Disconnected;
                }
            }
            message = incoming.message() => match message {
                Ok(Some(message)) => handle(ranks, message, draining.is_cancelled()),
                Ok(None) => return SessionEnd::Disconnected,
                Err(status) if status.code() == tonic::Code::NotFound => return SessionEnd::Unregistered,
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "coordinator stream ended");
                    return SessionEnd::Disconnected;
                }
            },
        }
    }
}

fn handle(ranks: &Ranks, message: pb::CoordinatorMessage, draining: bool) {
    match message.kind {
        Some(pb::coordinator_message::Kind::Start(start)) => {
            for assignment in &start.ranks {
                if draining {
                    tracing::warn!(job = %assignment.job_id, "draining: refusing to start a rank");
                    continue;
                }
                ranks.start(assignment);
            }
        }
        Some(pb::coordinator_message::Kind::Stop(stop)) => {
            ranks.stop_job(
                &JobId(stop.job_id),
                stop.before_attempt,
                stop.kill_now,
                (stop.grace_seconds > 0)
                    .then(|| Duration::from_secs(u64::from(stop.grace_seconds))),
                &stop.reason,
            );
        }
        None => {}
    }
}
