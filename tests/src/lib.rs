//! A cluster sandbox for integration tests: a real etcd, a coordinator and N
//! worker agents as child processes on free ports in a temporary directory.
//! Everything is killed when the sandbox is dropped. Fault tests use it to
//! SIGKILL and restart real processes.

pub mod netns;
pub mod slurm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_client::Session;
use flamingo_common::{JobRecord, JobState};
use flamingo_launch::local::{self, AgentSpec, CoordinatorSpec, EtcdSpec};
use flamingo_launch::pki::ClusterCredentials;

/// The test process's cluster CA, shared by its sandboxes: created once,
/// and the process's `FLAMINGO_TLS_*` point at its admin credential, so
/// sessions and the `flamingoctl` the tests run authenticate as an admin,
/// as a user's would after `flamingoctl up`.
pub fn credentials() -> &'static ClusterCredentials {
    static CREDENTIALS: std::sync::OnceLock<(tempfile::TempDir, ClusterCredentials)> =
        std::sync::OnceLock::new();
    let (_, credentials) = CREDENTIALS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let credentials = ClusterCredentials::prepare(&dir.path().join("pki"), &[])
            .expect("the test CA is created");
        for (name, path) in credentials.admin.env() {
            std::env::set_var(name, path);
        }
        (dir, credentials)
    });
    credentials
}

/// Cluster tests run one at a time: they time lease expiry and share two
/// cores, so running several clusters at once would only make them flaky.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the cluster-test lock for tests that start clusters another way
/// (through `flamingoctl up`).
pub fn serial_guard() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct SandboxOptions {
    pub nodes: u32,
    pub slots_per_node: u32,
    pub lease_ttl_seconds: u32,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            slots_per_node: 2,
            lease_ttl_seconds: 4,
        }
    }
}

pub struct ClusterSandbox {
    pub dir: tempfile::TempDir,
    etcd: Option<Child>,
    etcd_spec: EtcdSpec,
    coordinator: Option<Child>,
    pub coordinator_spec: CoordinatorSpec,
    /// Under leader election (`start_ha`), the other coordinators.
    standbys: Vec<(CoordinatorSpec, Option<Child>)>,
    agents: BTreeMap<String, Child>,
    /// Each agent's rendezvous port block, kept across restarts.
    agent_blocks: BTreeMap<String, u16>,
    /// Data-service replicas: the process (while up) and its port, kept
    /// across restarts.
    data_services: Vec<(Option<Child>, u16)>,
    /// Each node's `--data-service` list (`replica_per_node`), kept across
    /// agent restarts.
    node_replicas: BTreeMap<String, String>,
    next_port_block: u16,
    port_base: u16,
    slots_per_node: u32,
    _serial: MutexGuard<'static, ()>,
}

const PORTS_PER_NODE: u16 = 8;
const MAX_NODES: u16 = 6;

impl ClusterSandbox {
    pub async fn start(options: SandboxOptions) -> anyhow::Result<Self> {
        Self::start_with(options, 1).await
    }

    /// A sandbox with `coordinators` coordinators under leader election:
    /// the first leads; agents, sessions and `flamingoctl` get every
    /// address.
    pub async fn start_ha(options: SandboxOptions, coordinators: usize) -> anyhow::Result<Self> {
        Self::start_with(options, coordinators).await
    }

    async fn start_with(options: SandboxOptions, coordinators: usize) -> anyhow::Result<Self> {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir()?;
        let credentials = credentials();
        let etcd_spec = EtcdSpec {
            data_dir: dir.path().join("etcd"),
            client_port: flamingo_common::net::free_local_port()?,
            peer_port: flamingo_common::net::free_local_port()?,
            tls: Some(credentials.etcd.clone()),
        };
        let etcd = local::spawn_etcd(&etcd_spec, &dir.path().join("etcd.log"), false)?;
        local::wait_for_port(&etcd_spec.endpoint(), Duration::from_secs(20))?;
        let coordinator_spec = CoordinatorSpec {
            port: flamingo_common::net::free_local_port()?,
            http_port: flamingo_common::net::free_local_port()?,
            etcd_endpoint: etcd_spec.endpoint(),
            lease_ttl_seconds: options.lease_ttl_seconds,
            heartbeat_interval_ms: 300,
            tls: credentials.coordinator.clone(),
            // The fault tests run shell commands as jobs (as an admin).
            extra_args: vec!["--allow-command-jobs".to_string()],
        };
        let mut coordinator_spec = coordinator_spec;
        let mut standbys = Vec::new();
        if coordinators > 1 {
            coordinator_spec
                .extra_args
                .push("--leader-election".to_string());
            for _ in 1..coordinators {
                let spec = CoordinatorSpec {
                    port: flamingo_common::net::free_local_port()?,
                    http_port: flamingo_common::net::free_local_port()?,
                    ..coordinator_spec.clone()
                };
                standbys.push((spec, None));
            }
        }
        let port_base = flamingo_common::net::free_local_port_range(PORTS_PER_NODE * MAX_NODES)?;
        let mut sandbox = Self {
            dir,
            etcd: Some(etcd),
            etcd_spec,
            coordinator: None,
            coordinator_spec,
            standbys,
            agents: BTreeMap::new(),
            agent_blocks: BTreeMap::new(),
            data_services: Vec::new(),
            node_replicas: BTreeMap::new(),
            next_port_block: 0,
            port_base,
            slots_per_node: options.slots_per_node,
            _serial: serial,
        };
        sandbox.start_coordinator()?;
        for index in 0..sandbox.standbys.len() {
            sandbox.start_standby(index)?;
        }
        for index in 0..options.nodes {
            sandbox.add_agent(&format!("node-{index}"), &[])?;
        }
        sandbox.wait_for_nodes(options.nodes as usize).await?;
        Ok(sandbox)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The coordinator's address; under leader election every
    /// coordinator's, comma separated.
    pub fn coordinator_endpoint(&self) -> String {
        std::iter::once(self.coordinator_spec.endpoint())
            .chain(self.standbys.iter().map(|(spec, _)| spec.endpoint()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every coordinator's spec, the first one's first.
    fn coordinator_specs(&self) -> Vec<&CoordinatorSpec> {
        std::iter::once(&self.coordinator_spec)
            .chain(self.standbys.iter().map(|(spec, _)| spec))
            .collect()
    }

    /// Which coordinator leads (listens): 0 for the first, i for the
    /// i-th standby.
    pub fn leader(&self) -> Option<usize> {
        self.coordinator_specs()
            .iter()
            .position(|spec| std::net::TcpStream::connect(("127.0.0.1", spec.port)).is_ok())
    }

    /// The leading coordinator's address.
    pub fn leader_endpoint(&self) -> String {
        let specs = self.coordinator_specs();
        specs[self.leader().unwrap_or(0)].endpoint()
    }

    /// Starts standby `index` (it campaigns; it listens once it leads).
    fn start_standby(&mut self, index: usize) -> anyhow::Result<()> {
        let log = self.path().join(format!("coordinator-{}.log", index + 1));
        let child = local::spawn_coordinator(&self.standbys[index].0, &log, false)?;
        self.standbys[index].1 = Some(child);
        Ok(())
    }

    /// Under leader election: SIGKILLs the leading coordinator and starts
    /// it again (it stands by); returns which one it was.
    pub fn kill_leader(&mut self) -> anyhow::Result<usize> {
        let leader = self.leader().context("no coordinator leads")?;
        if leader == 0 {
            self.kill_coordinator();
            let child = local::spawn_coordinator(
                &self.coordinator_spec,
                &self.path().join("coordinator.log"),
                false,
            )?;
            self.coordinator = Some(child);
        } else {
            if let Some(mut child) = self.standbys[leader - 1].1.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.start_standby(leader - 1)?;
        }
        Ok(leader)
    }

    pub fn etcd_endpoint(&self) -> String {
        self.etcd_spec.endpoint()
    }

    /// Flags the coordinator gets from its next start on (besides
    /// `--allow-command-jobs`, which the sandbox always gives).
    pub fn set_coordinator_args(&mut self, args: &[&str]) {
        self.coordinator_spec.extra_args = std::iter::once("--allow-command-jobs")
            .chain(args.iter().copied())
            .map(String::from)
            .collect();
    }

    /// The coordinator's dashboard (`http://127.0.0.1:port/`).
    pub fn dashboard(&self) -> String {
        let specs = self.coordinator_specs();
        specs[self.leader().unwrap_or(0)].dashboard()
    }

    /// An agent's Prometheus endpoint.
    pub fn agent_metrics(&self, node_id: &str) -> Option<String> {
        let block = *self.agent_blocks.get(node_id)?;
        let port = self.agent_spec(node_id, block).metrics_port?;
        Some(format!("http://127.0.0.1:{port}/metrics"))
    }

    pub fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let child = local::spawn_coordinator(
            &self.coordinator_spec,
            &self.path().join("coordinator.log"),
            false,
        )?;
        self.coordinator = Some(child);
        local::wait_for_port(&self.coordinator_spec.endpoint(), Duration::from_secs(20))?;
        Ok(())
    }

    /// SIGKILLs the coordinator and reaps it.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn agent_spec(&self, node_id: &str, block: u16) -> AgentSpec {
        AgentSpec {
            node_id: node_id.to_string(),
            coordinator: self.coordinator_endpoint(),
            slots: self.slots_per_node,
            state_dir: self.path().join("agents").join(node_id),
            rendezvous_port_first: self.port_base + block * PORTS_PER_NODE,
            rendezvous_port_count: PORTS_PER_NODE - 1,
            drain_timeout_seconds: 5,
            kill_grace_seconds: 2,
            metrics_port: Some(self.port_base + block * PORTS_PER_NODE + PORTS_PER_NODE - 1),
            tls: credentials()
                .node(node_id)
                .expect("the node's certificate is issued"),
            extra_args: Vec::new(),
        }
    }

    pub fn add_agent(&mut self, node_id: &str, extra_args: &[&str]) -> anyhow::Result<()> {
        let block = match self.agent_blocks.get(node_id) {
            Some(block) => *block,
            None => {
                if self.next_port_block >= MAX_NODES {
                    bail!("the sandbox supports at most {MAX_NODES} agents");
                }
                self.next_port_block += 1;
                self.agent_blocks
                    .insert(node_id.to_string(), self.next_port_block - 1);
                self.next_port_block - 1
            }
        };
        let mut spec = self.agent_spec(node_id, block);
        spec.extra_args = extra_args.iter().map(|arg| arg.to_string()).collect();
        if let Some(replicas) = self.node_replicas.get(node_id) {
            spec.extra_args.push(format!("--data-service={replicas}"));
        }
        let child = local::spawn_agent(&spec, &self.agent_log(node_id), false)?;
        self.agents.insert(node_id.to_string(), child);
        Ok(())
    }

    pub fn agent_log(&self, node_id: &str) -> PathBuf {
        self.path().join(format!("agent-{node_id}.log"))
    }

    /// SIGKILLs an agent and reaps it.
    pub fn kill_agent(&mut self, node_id: &str) {
        if let Some(mut child) = self.agents.remove(node_id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn agent_pid(&self, node_id: &str) -> Option<u32> {
        self.agents.get(node_id).map(Child::id)
    }

    /// Waits for an agent process to exit by itself.
    pub fn wait_agent_exit(
        &mut self,
        node_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let child = self
            .agents
            .get_mut(node_id)
            .with_context(|| format!("no agent {node_id}"))?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.agents.remove(node_id);
                return Ok(status);
            }
            if started.elapsed() > timeout {
                bail!("agent {node_id} still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs etcd and reaps it.
    pub fn kill_etcd(&mut self) {
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on its data folder and ports.
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        let child = local::spawn_etcd(&self.etcd_spec, &self.path().join("etcd.log"), false)?;
        self.etcd = Some(child);
        local::wait_for_port(&self.etcd_spec.endpoint(), Duration::from_secs(20))?;
        Ok(())
    }

    /// Starts (or restarts, on the same port) the sandbox's data service;
    /// returns its endpoint.
    pub fn start_data_service(&mut self) -> anyhow::Result<String> {
        self.start_replica(0)
    }

    /// SIGKILLs the data service (its port is kept for a restart).
    pub fn kill_data_service(&mut self) {
        self.kill_replica(0);
    }

    /// Starts (or restarts, on the same port) data-service replica `index`
    /// (`data-service-<index>.log`); returns its endpoint.
    pub fn start_replica(&mut self, index: usize) -> anyhow::Result<String> {
        while self.data_services.len() <= index {
            let port = flamingo_common::net::free_local_port()?;
            self.data_services.push((None, port));
        }
        self.kill_replica(index);
        let port = self.data_services[index].1;
        // The tests' data lives in temporary folders.
        let prefixes = [std::env::temp_dir().display().to_string()];
        let child = local::spawn_data_service(
            port,
            &credentials().data_service,
            &prefixes,
            &self.path().join(format!("data-service-{index}.log")),
            false,
        )?;
        self.data_services[index].0 = Some(child);
        let endpoint = format!("http://127.0.0.1:{port}");
        local::wait_for_port(&endpoint, Duration::from_secs(20))?;
        Ok(endpoint)
    }

    /// SIGKILLs data-service replica `index` (its port is kept).
    pub fn kill_replica(&mut self, index: usize) {
        if let Some((Some(mut child), _)) = self
            .data_services
            .get_mut(index)
            .map(|(child, port)| (child.take(), *port))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A data-service replica for every agent, as `flamingoctl up` deploys
    /// them: replica k for the k-th node (by name), whose agent restarts
    /// naming it first and the others after it. Returns the endpoints.
    pub fn replica_per_node(&mut self) -> anyhow::Result<Vec<String>> {
        let nodes: Vec<String> = self.agents.keys().cloned().collect();
        let endpoints = (0..nodes.len())
            .map(|index| self.start_replica(index))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (index, node) in nodes.iter().enumerate() {
            let list: Vec<&str> = (0..endpoints.len())
                .map(|k| endpoints[(index + k) % endpoints.len()].as_str())
                .collect();
            self.node_replicas.insert(node.clone(), list.join(","));
            self.kill_agent(node);
            self.add_agent(node, &[])?;
        }
        Ok(endpoints)
    }

    /// A channel to the coordinator as `identity` (a certificate issued
    /// for it now by the test CA).
    pub async fn channel_as(
        &self,
        identity: &flamingo_security::Identity,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let pki = &credentials().pki;
        let issued = pki.issue(identity, Duration::from_secs(3600), &[])?;
        let tls = flamingo_security::TlsFiles::new(&pki.ca_cert(), &issued.cert, &issued.key)
            .client()?
            .context("client credentials")?;
        Ok(flamingo_security::endpoint(
            &self.leader_endpoint(),
            Some(&tls),
            flamingo_security::COORDINATOR_NAME,
        )?
        .connect()
        .await?)
    }

    /// A channel to the data service at `endpoint` with node `node_id`'s
    /// certificate (what a rank on that node uses).
    pub async fn data_service_as_node(
        &self,
        endpoint: &str,
        node_id: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let tls = credentials().node(node_id)?.client()?;
        Ok(flamingo_security::endpoint(
            endpoint,
            tls.as_ref(),
            flamingo_security::DATA_SERVICE_NAME,
        )?
        .connect()
        .await?)
    }

    /// The credential the coordinator gives `job_id`'s attempt `attempt`.
    pub fn rank_token(&self, job_id: &str, attempt: u32) -> String {
        let secret = credentials()
            .pki
            .rank_secret()
            .expect("the test CA's rank key");
        flamingo_security::RankToken::mint(&secret, job_id, attempt, 3600)
    }

    pub async fn session(&self) -> anyhow::Result<Session> {
        Ok(Session::open(&self.coordinator_endpoint()).await?)
    }

    pub async fn wait_for_nodes(&self, count: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(mut session) = self.session().await {
                if session.nodes().await.map(|nodes| nodes.len()).unwrap_or(0) >= count {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{count} nodes did not register within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the job until `done` holds (or `timeout` passes).
    pub async fn wait_job(
        &self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&JobRecord) -> bool,
    ) -> anyhow::Result<JobRecord> {
        let started = Instant::now();
        let mut last = None;
        loop {
            if let Ok(mut session) = self.session().await {
                if let Ok(job) = session.job(job_id).await {
                    if done(&job) {
                        return Ok(job);
                    }
                    last = Some(job);
                }
            }
            if started.elapsed() > timeout {
                bail!("job {job_id} did not reach the expected state within {timeout:?}; last seen: {last:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_state(
        &self,
        job_id: &str,
        state: JobState,
        timeout: Duration,
    ) -> anyhow::Result<JobRecord> {
        self.wait_job(job_id, timeout, |job| job.state == state)
            .await
    }

    /// Path of a built workspace binary (flamingoctl, flamingo-worker, …).
    pub fn binary(name: &str) -> PathBuf {
        local::binary(name)
            .expect("workspace binaries are built before the tests (scripts/test.sh)")
    }
}

impl Drop for ClusterSandbox {
    fn drop(&mut self) {
        let mut children: Vec<&mut Child> = self.agents.values_mut().collect();
        if let Some(coordinator) = self.coordinator.as_mut() {
            children.push(coordinator);
        }
        for (_, standby) in self.standbys.iter_mut() {
            children.extend(standby.as_mut());
        }
        if let Some(etcd) = self.etcd.as_mut() {
            children.push(etcd);
        }
        for (replica, _) in self.data_services.iter_mut() {
            children.extend(replica.as_mut());
        }
        for child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The test clusters' dashboard token.
pub fn dashboard_token() -> String {
    credentials()
        .pki
        .dashboard_token()
        .expect("the test CA's dashboard token")
}

/// Whether the process exists (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    local::process_alive(pid)
}

/// Runs `flamingoctl ARGS` in `dir` (with its own state folder, `dir/state`,
/// so no local cluster record from elsewhere is used); panics with its
/// stderr when it fails, else returns its stdout.
pub fn flamingoctl(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(ClusterSandbox::binary("flamingoctl"))
        .current_dir(dir)
        .env("FLAMINGO_STATE_DIR", dir.join("state"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("flamingoctl runs");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `flamingoctl data synth-eval` for `task` into `dir/task`.
pub fn synth_eval(dir: &Path, task: &str, train: &str, test: &str) {
    flamingoctl(
        dir,
        &[
            "data",
            "synth-eval",
            "--dataset",
            task,
            "--out",
            task,
            "--train",
            train,
            "--test",
            test,
        ],
    );
}

/// In `dir`: `samples` synthetic LAION samples in shards of 24 under
/// `data/` (32-pixel images, with the tokenizer in `data/tokenizer`), and a
/// tiny random model whose spec is `tiny/model.toml`.
pub fn synthetic_laion_and_tiny_model(dir: &Path, samples: u64) {
    flamingoctl(
        dir,
        &[
            "data",
            "synth",
            "--form",
            "laion",
            "--out",
            "data",
            "--samples",
            &samples.to_string(),
            "--per-shard",
            "24",
            "--image-size",
            "32",
        ],
    );
    flamingoctl(
        dir,
        &[
            "tiny-model",
            "--tokenizer",
            "data/tokenizer",
            "--out",
            "tiny",
        ],
    );
}

/// Polls `probe` every 250 ms until it gives a value; panics naming `what`
/// after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
