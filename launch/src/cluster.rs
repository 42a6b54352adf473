//! `flamingoctl up` and `down`: a local cluster in the background — etcd, a
//! coordinator (or several under leader election, `--coordinators`), a
//! data-service replica and N agents as detached processes,
//! recorded in `<state dir>/cluster.json` ([`ClusterState`]).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_client::cluster::ClusterState;
use flamingo_proto::v1 as pb;

use crate::local::{self, AgentSpec, CoordinatorSpec, EtcdSpec};
use crate::pki::ClusterCredentials;

/// The admin's CA, certificate and key, for the cluster record.
fn admin_files(admin: &flamingo_security::TlsFiles) -> Option<[std::path::PathBuf; 3]> {
    Some([admin.ca.clone()?, admin.cert.clone()?, admin.key.clone()?])
}

pub struct UpOptions {
    pub nodes: u32,
    pub slots_per_node: u32,
    pub port: u16,
    pub lease_ttl_seconds: u32,
    /// Storage the data service may read; default `<state dir>/work`
    /// and `<state dir>/data`.
    pub allow_prefixes: Vec<String>,
    /// Let admins launch command jobs.
    pub allow_command_jobs: bool,
    /// Coordinators: more than one elect a leader, the rest stand by.
    pub coordinators: u32,
    /// One data-service replica for the whole cluster instead of one per
    /// node.
    pub one_data_service: bool,
}

fn step(label: &str) {
    eprint!("{label:<40}");
}

/// Starts the cluster; on any failure whatever was started is stopped.
pub async fn up(state_dir: &Path, options: &UpOptions) -> anyhow::Result<ClusterState> {
    if options.nodes == 0 || options.slots_per_node == 0 {
        bail!("--nodes and --slots-per-node must be at least 1");
    }
    if let Some(existing) = ClusterState::load(state_dir)? {
        if local::process_alive(existing.coordinator_pid) {
            bail!(
                "a local cluster is already up in {} (coordinator {} pid {}); run `flamingoctl down` first",
                state_dir.display(),
                existing.coordinator,
                existing.coordinator_pid
            );
        }
    }
    let logs = state_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let started_at = Instant::now();
    let credentials = ClusterCredentials::prepare(&state_dir.join("pki"), &[])?;
    let mut starting = Starting {
        state_dir,
        logs: &logs,
        options,
        credentials,
        pids: Vec::new(),
    };
    match starting.start().await {
        Ok(state) => {
            eprintln!(
                "local cluster up in {:.1}s: {} node(s) × {} slot(s); state and logs in {}",
                started_at.elapsed().as_secs_f64(),
                state.nodes,
                state.slots_per_node,
                state_dir.display()
            );
            if let Some(dashboard) = &state.dashboard {
                match starting.credentials.pki.dashboard_token() {
                    Ok(token) => eprintln!("dashboard: {dashboard}login?token={token}"),
                    Err(_) => eprintln!("dashboard: {dashboard}"),
                }
            }
            Ok(state)
        }
        Err(error) => {
            eprintln!("failed");
            starting.pids.reverse();
            local::terminate(&starting.pids, Duration::from_secs(5));
            Err(error)
        }
    }
}

/// A cluster being started: what is up so far.
struct Starting<'a> {
    state_dir: &'a Path,
    logs: &'a Path,
    options: &'a UpOptions,
    credentials: ClusterCredentials,
    pids: Vec<u32>,
}

impl Starting<'_> {
    async fn start(&mut self) -> anyhow::Result<ClusterState> {
        let (etcd, etcd_pid) = self.etcd()?;
        let (coordinator, coordinator_pid) = self.coordinator(&etcd)?;
        let (standbys, standby_pids) = self.standbys(&coordinator)?;
        let addresses = std::iter::once(coordinator.endpoint())
            .chain(standbys.iter().map(CoordinatorSpec::endpoint))
            .collect::<Vec<_>>()
            .join(",");
        let (data_services, data_service_pids) = self.data_services()?;
        let agent_pids = self.agents(&addresses, &data_services)?;
        self.wait_registered(&addresses).await?;
        let state = ClusterState {
            coordinator: addresses,
            etcd_endpoint: etcd.endpoint(),
            etcd_pid,
            coordinator_pid,
            standby_pids,
            agent_pids,
            data_services,
            data_service_pids,
            dashboard: Some(coordinator.dashboard()),
            nodes: self.options.nodes,
            slots_per_node: self.options.slots_per_node,
            state_dir: self.state_dir.to_path_buf(),
            pki: Some(self.credentials.pki.dir().to_path_buf()),
            admin: admin_files(&self.credentials.admin),
        };
        state.save()?;
        Ok(state)
    }

    /// Waits for a started service's port; a failure shows its log's end.
    fn wait_up(&self, what: &str, endpoint: &str, log: &Path) -> anyhow::Result<()> {
        local::wait_for_port(endpoint, Duration::from_secs(20)).with_context(|| {
            format!(
                "{what} did not start; its log ends:\n{}",
                local::tail(log, 15)
            )
        })
    }

    fn etcd(&mut self) -> anyhow::Result<(EtcdSpec, u32)> {
        step("etcd");
        let etcd = EtcdSpec {
            data_dir: self.state_dir.join("etcd"),
            client_port: flamingo_common::net::free_local_port()?,
            peer_port: flamingo_common::net::free_local_port()?,
            tls: Some(self.credentials.etcd.clone()),
        };
        let log = self.logs.join("etcd.log");
        let child = local::spawn_etcd(&etcd, &log, true)?;
        self.pids.push(child.id());
        self.wait_up("etcd", &etcd.endpoint(), &log)?;
        eprintln!("up at {}", etcd.endpoint());
        Ok((etcd, child.id()))
    }

    fn coordinator(&mut self, etcd: &EtcdSpec) -> anyhow::Result<(CoordinatorSpec, u32)> {
        step("coordinator");
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        let port = match self.options.port {
            port if port != 0 && free(port) => port,
            _ => flamingo_common::net::free_local_port()?,
        };
        let http_port = match free(7080) {
            true => 7080,
            false => flamingo_common::net::free_local_port()?,
        };
        let coordinator = CoordinatorSpec {
            port,
            http_port,
            etcd_endpoint: etcd.endpoint(),
            lease_ttl_seconds: self.options.lease_ttl_seconds,
            heartbeat_interval_ms: 1000.min(self.options.lease_ttl_seconds * 250),
            tls: self.credentials.coordinator.clone(),
            extra_args: self
                .options
                .allow_command_jobs
                .then(|| "--allow-command-jobs".to_string())
                .into_iter()
                .chain((self.options.coordinators > 1).then(|| "--leader-election".to_string()))
                .collect(),
        };
        let log = self.logs.join("coordinator.log");
        let child = local::spawn_coordinator(&coordinator, &log, true)?;
        self.pids.push(child.id());
        self.wait_up("the coordinator", &coordinator.endpoint(), &log)?;
        eprintln!(
            "up at {} (dashboard {})",
            coordinator.endpoint(),
            coordinator.dashboard()
        );
        Ok((coordinator, child.id()))
    }

    /// The standby coordinators (`--coordinators` beyond the first), on
    /// the next free ports; they listen only once one of them leads.
    fn standbys(
        &mut self,
        leader: &CoordinatorSpec,
    ) -> anyhow::Result<(Vec<CoordinatorSpec>, Vec<u32>)> {
        let count = self.options.coordinators.saturating_sub(1);
        if count == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        step(&format!("{count} standby coordinator(s)"));
        let mut specs = Vec::new();
        let mut pids = Vec::new();
        for index in 1..=count {
            let spec = CoordinatorSpec {
                port: flamingo_common::net::free_local_port()?,
                http_port: flamingo_common::net::free_local_port()?,
                ..leader.clone()
            };
            let log = self.logs.join(format!("coordinator-{index}.log"));
            let child = local::spawn_coordinator(&spec, &log, true)?;
            self.pids.push(child.id());
            pids.push(child.id());
            specs.push(spec);
        }
        eprintln!(
            "standing by at {}",
            specs
                .iter()
                .map(CoordinatorSpec::endpoint)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok((specs, pids))
    }

    /// A data-service replica per node (node k's ranks read from replica
    /// k), or one for all with `one_data_service`.
    fn data_services(&mut self) -> anyhow::Result<(Vec<String>, Vec<u32>)> {
        let count = match self.options.one_data_service {
            true => 1,
            false => self.options.nodes,
        };
        step(&format!("{count} data service replica(s)"));
        let prefixes = if self.options.allow_prefixes.is_empty() {
            ["work", "data"]
                .iter()
                .map(|dir| self.state_dir.join(dir).display().to_string())
                .collect()
        } else {
            self.options.allow_prefixes.clone()
        };
        let mut endpoints = Vec::new();
        let mut pids = Vec::new();
        for index in 0..count {
            let port = flamingo_common::net::free_local_port()?;
            let log = match self.options.one_data_service {
                true => self.logs.join("data-service.log"),
                false => self.logs.join(format!("data-service-node-{index}.log")),
            };
            let child = local::spawn_data_service(
                port,
                &self.credentials.data_service,
                &prefixes,
                &log,
                true,
            )?;
            self.pids.push(child.id());
            pids.push(child.id());
            let endpoint = format!("http://127.0.0.1:{port}");
            self.wait_up("the data service", &endpoint, &log)?;
            endpoints.push(endpoint);
        }
        eprintln!("up at {}", endpoints.join(", "));
        Ok((endpoints, pids))
    }

    /// The agents; node k's ranks read from data-service replica k (the
    /// only one with `one_data_service`), the others standing in for it.
    fn agents(&mut self, coordinators: &str, replicas: &[String]) -> anyhow::Result<Vec<u32>> {
        let options = self.options;
        step(&format!(
            "{} agent(s) × {} slot(s)",
            options.nodes, options.slots_per_node
        ));
        let ports_per_node = 16u16;
        let first_port =
            flamingo_common::net::free_local_port_range(ports_per_node * options.nodes as u16)?;
        let mut pids = Vec::new();
        for index in 0..options.nodes {
            let node_id = format!("node-{index}");
            let spec = AgentSpec {
                node_id: node_id.clone(),
                coordinator: coordinators.to_string(),
                slots: options.slots_per_node,
                state_dir: self.state_dir.join("agents").join(&node_id),
                rendezvous_port_first: first_port + index as u16 * ports_per_node,
                rendezvous_port_count: ports_per_node,
                drain_timeout_seconds: 3,
                kill_grace_seconds: 3,
                metrics_port: Some(flamingo_common::net::free_local_port()?),
                tls: self.credentials.node(&node_id)?,
                extra_args: vec![format!(
                    "--data-service={}",
                    (0..replicas.len())
                        .map(|k| replicas[(index as usize + k) % replicas.len()].as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )],
            };
            let log = self.logs.join(format!("{node_id}.log"));
            let child = local::spawn_agent(&spec, &log, true)?;
            self.pids.push(child.id());
            pids.push(child.id());
        }
        Ok(pids)
    }

    async fn wait_registered(&self, coordinator: &str) -> anyhow::Result<()> {
        let admin = self.credentials.admin.client()?;
        let mut session = flamingo_client::Session::open_with(coordinator, admin.as_ref()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes: Vec<pb::Node> = session.nodes().await?;
            if nodes.len() as u32 >= self.options.nodes {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} agents registered within 30 s; see {}",
                    nodes.len(),
                    self.options.nodes,
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("registered");
        Ok(())
    }
}

/// Stops agents (which stop their ranks), then the data service, the
/// coordinator and etcd; `None` when no cluster is recorded.
pub fn down(state_dir: &Path) -> anyhow::Result<Option<ClusterState>> {
    let Some(state) = ClusterState::load(state_dir)? else {
        return Ok(None);
    };
    let stop = |label: &str, pids: &[u32], grace: u64| {
        step(label);
        local::terminate(pids, Duration::from_secs(grace));
        eprintln!("stopped");
    };
    stop("agents", &state.agent_pids, 15);
    if !state.data_service_pids.is_empty() {
        stop("data service", &state.data_service_pids, 10);
    }
    let coordinators: Vec<u32> = std::iter::once(state.coordinator_pid)
        .chain(state.standby_pids.iter().copied())
        .collect();
    stop("coordinator", &coordinators, 10);
    stop("etcd", &[state.etcd_pid], 10);
    let survivors: Vec<u32> = state
        .agent_pids
        .iter()
        .chain(&coordinators)
        .chain([&state.etcd_pid])
        .chain(&state.data_service_pids)
        .copied()
        .filter(|&pid| local::process_alive(pid))
        .collect();
    if !survivors.is_empty() {
        bail!("processes {survivors:?} survived SIGKILL; check them by hand");
    }
    std::fs::remove_file(ClusterState::path(state_dir))
        .with_context(|| format!("removing {}", ClusterState::path(state_dir).display()))?;
    // etcd's data goes with the cluster: a new `up` starts clean.
    let _ = std::fs::remove_dir_all(state_dir.join("etcd"));
    Ok(Some(state))
}
