//! `flamingoctl up` and `down`: a local cluster in the background.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_proto::v1 as pb;

use crate::client;
use crate::local::{self, AgentSpec, ClusterState, CoordinatorSpec, EtcdSpec};

pub struct UpOptions {
    pub nodes: u32,
    pub slots_per_node: u32,
    pub port: u16,
    pub lease_ttl_seconds: u32,
}

fn step(label: &str) {
    eprint!("{label:<40}");
}

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
    let mut started: Vec<u32> = Vec::new();
    let result = async {
        step("etcd");
        let etcd = EtcdSpec {
            data_dir: state_dir.join("etcd"),
            client_port: flamingo_common::net::free_local_port()?,
            peer_port: flamingo_common::net::free_local_port()?,
        };
        let etcd_log = logs.join("etcd.log");
        let etcd_child = local::spawn_etcd(&etcd, &etcd_log, true)?;
        started.push(etcd_child.id());
        local::wait_for_port(&etcd.endpoint(), Duration::from_secs(20)).with_context(|| {
            format!(
                "etcd did not start; its log ends:\n{}",
                local::tail(&etcd_log, 15)
            )
        })?;
        eprintln!("up at {}", etcd.endpoint());

        step("coordinator");
        let port = if options.port != 0
            && std::net::TcpListener::bind(("127.0.0.1", options.port)).is_ok()
        {
            options.port
        } else {
            flamingo_common::net::free_local_port()?
        };
        let http_port = if std::net::TcpListener::bind(("127.0.0.1", 7080)).is_ok() {
            7080
        } else {
            flamingo_common::net::free_local_port()?
        };
        let coordinator = CoordinatorSpec {
            port,
            http_port,
            etcd_endpoint: etcd.endpoint(),
            lease_ttl_seconds: options.lease_ttl_seconds,
            heartbeat_interval_ms: 1000.min(options.lease_ttl_seconds * 250),
            extra_args: Vec::new(),
        };
        let coordinator_log = logs.join("coordinator.log");
        let coordinator_child = local::spawn_coordinator(&coordinator, &coordinator_log, true)?;
        started.push(coordinator_child.id());
        local::wait_for_port(&coordinator.endpoint(), Duration::from_secs(20)).with_context(
            || {
                format!(
                    "the coordinator did not start; its log ends:\n{}",
                    local::tail(&coordinator_log, 15)
                )
            },
        )?;
        eprintln!(
            "up at {} (dashboard {})",
            coordinator.endpoint(),
            coordinator.dashboard()
        );

        step("data service");
        let data_port = flamingo_common::net::free_local_port()?;
        let data_log = logs.join("data-service.log");
        let data_child = local::spawn_data_service(data_port, &data_log, true)?;
        started.push(data_child.id());
        let data_service = format!("http://127.0.0.1:{data_port}");
        local::wait_for_port(&data_service, Duration::from_secs(20)).with_context(|| {
            format!(
                "the data service did not start; its log ends:\n{}",
                local::tail(&data_log, 15)
            )
        })?;
        eprintln!("up at {data_service}");

        step(&format!(
            "{} agent(s) × {} slot(s)",
            options.nodes, options.slots_per_node
        ));
        let ports_per_node = 16u16;
        let first_port =
            flamingo_common::net::free_local_port_range(ports_per_node * options.nodes as u16)?;
        let mut agent_pids = Vec::new();
        for index in 0..options.nodes {
            let node_id = format!("node-{index}");
            let spec = AgentSpec {
                node_id: node_id.clone(),
                coordinator: coordinator.endpoint(),
                slots: options.slots_per_node,
                state_dir: state_dir.join("agents").join(&node_id),
                rendezvous_port_first: first_port + index as u16 * ports_per_node,
                rendezvous_port_count: ports_per_node,
                drain_timeout_seconds: 3,
                kill_grace_seconds: 3,
                metrics_port: Some(flamingo_common::net::free_local_port()?),
                extra_args: Vec::new(),
            };
            let child = local::spawn_agent(&spec, &logs.join(format!("{node_id}.log")), true)?;
            started.push(child.id());
            agent_pids.push(child.id());
        }
        let mut job_client = client::connect(&coordinator.endpoint()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = job_client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|status| client::call_error(&coordinator.endpoint(), status))?
                .into_inner()
                .nodes;
            if nodes.len() as u32 >= options.nodes {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} agents registered within 30 s; see {}",
                    nodes.len(),
                    options.nodes,
                    logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("registered");
        let state = ClusterState {
            coordinator: coordinator.endpoint(),
            etcd_endpoint: etcd.endpoint(),
            etcd_pid: etcd_child.id(),
            coordinator_pid: coordinator_child.id(),
            agent_pids,
            data_service: Some(data_service),
            data_service_pid: Some(data_child.id()),
            dashboard: Some(coordinator.dashboard()),
            nodes: options.nodes,
            slots_per_node: options.slots_per_node,
            state_dir: state_dir.to_path_buf(),
        };
        state.save()?;
        anyhow::Ok(state)
    }
    .await;
    match result {
        Ok(state) => {
            eprintln!(
                "local cluster up in {:.1}s: {} node(s) × {} slot(s); state and logs in {}",
                started_at.elapsed().as_secs_f64(),
                state.nodes,
                state.slots_per_node,
                state_dir.display()
            );
            if let Some(dashboard) = &state.dashboard {
                eprintln!("dashboard: {dashboard}");
            }
            Ok(state)
        }
        Err(error) => {
            eprintln!("failed");
            started.reverse();
            local::terminate(&started, Duration::from_secs(5));
            Err(error)
        }
    }
}

/// Stops agents (which stop their ranks), then the coordinator, then etcd.
pub fn down(state_dir: &Path) -> anyhow::Result<Option<ClusterState>> {
    let Some(state) = ClusterState::load(state_dir)? else {
        return Ok(None);
    };
    step("agents");
    local::terminate(&state.agent_pids, Duration::from_secs(15));
    eprintln!("stopped");
    if let Some(pid) = state.data_service_pid {
        step("data service");
        local::terminate(&[pid], Duration::from_secs(10));
        eprintln!("stopped");
    }
    step("coordinator");
    local::terminate(&[state.coordinator_pid], Duration::from_secs(10));
    eprintln!("stopped");
    step("etcd");
    local::terminate(&[state.etcd_pid], Duration::from_secs(10));
    eprintln!("stopped");
    let survivors: Vec<u32> = state
        .agent_pids
        .iter()
        .chain([&state.coordinator_pid, &state.etcd_pid])
        .chain(state.data_service_pid.as_ref())
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
