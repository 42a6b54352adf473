//! The processes of a cluster on one machine: etcd, a coordinator, agents
//! and a data-service replica, each from a spec, with its output in a log.
//! `flamingoctl up` starts them detached (see [`crate::cluster`]); a Slurm
//! job starts them inside its allocation; the test sandbox starts the same
//! processes and keeps their handles.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flamingo_security::TlsFiles;

use crate::{LaunchError, Result};

/// Where the flamingo binaries are: `$FLAMINGO_BIN_DIR`, else next to the
/// running executable (cargo puts all workspace binaries in one folder).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLAMINGO_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(|error| LaunchError::NotFound {
        what: "the running executable".into(),
        hint: error.to_string(),
    })?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    // Test binaries live in target/<profile>/deps; the binaries one level up.
    if dir.ends_with("deps") {
        return Ok(dir.parent().unwrap_or(dir).to_path_buf());
    }
    Ok(dir.to_path_buf())
}

pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        return Err(LaunchError::NotFound {
            what: path.display().to_string(),
            hint: "build it with `cargo build --workspace` or set FLAMINGO_BIN_DIR".into(),
        });
    }
    Ok(path)
}

/// The etcd binary: `$FLAMINGO_ETCD_BIN`, else `etcd` on PATH, else Debian's.
pub fn etcd_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLAMINGO_ETCD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let candidates = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|path| path.exists())
        .ok_or_else(|| LaunchError::NotFound {
            what: "etcd".into(),
            hint: "install Debian's etcd-server (scripts/setup.sh does) or set FLAMINGO_ETCD_BIN"
                .into(),
        })
}

fn log_file(path: &Path) -> Result<(File, File)> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|file| Ok((file.try_clone()?, file)))
        .map_err(|source| LaunchError::file(path, "opening the log", source))?;
    Ok(file)
}

/// Spawns `command` with output to `log`; `detach` puts it in its own
/// session so it outlives flamingoctl and a terminal's Ctrl-C.
pub fn spawn(mut command: Command, log: &Path, detach: bool) -> Result<Child> {
    let (stdout, stderr) = log_file(log)?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    if detach {
        flamingo_common::ranks::Tie::DAEMON.apply(&mut command);
    }
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .spawn()
        .map_err(|source| LaunchError::Spawn { program, source })
}

#[derive(Debug, Clone)]
pub struct EtcdSpec {
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// etcd's certificate: clients need one from the same CA
    /// (`--client-cert-auth`). `None`: plain text (tests of `--insecure`).
    pub tls: Option<TlsFiles>,
}

impl EtcdSpec {
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }
}

/// What keeps etcd's database from growing forever: history older than
/// five minutes compacted (as Kubernetes' API server does; the coordinator
/// watches only recent revisions and reconciles if it falls behind), and a
/// quota (2 GiB, etcd's default made explicit) past which writes fail
/// loudly instead of filling the disk. Every etcd flamingo starts gets
/// these (Slurm and Kubernetes too).
pub const ETCD_BOUNDS: [&str; 3] = [
    "--auto-compaction-mode=periodic",
    "--auto-compaction-retention=5m",
    "--quota-backend-bytes=2147483648",
];

pub fn spawn_etcd(spec: &EtcdSpec, log: &Path, detach: bool) -> Result<Child> {
    spawn(etcd_command(spec)?, log, detach)
}

/// The command that runs a one-member etcd as `spec` says (`spawn_etcd`
/// runs it; a Slurm job adds its own flags first).
pub fn etcd_command(spec: &EtcdSpec) -> Result<Command> {
    let client = spec.endpoint();
    let peer = format!("http://127.0.0.1:{}", spec.peer_port);
    let mut command = Command::new(etcd_binary()?);
    command
        .arg("--name=flamingo")
        .arg(format!("--data-dir={}", spec.data_dir.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=flamingo={peer}"))
        .args(ETCD_BOUNDS)
        .env_remove("ETCDCTL_API");
    if let Some(TlsFiles {
        ca: Some(ca),
        cert: Some(cert),
        key: Some(key),
        ..
    }) = &spec.tls
    {
        command
            .arg(format!("--cert-file={}", cert.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--trusted-ca-file={}", ca.display()))
            .arg("--client-cert-auth");
    }
    Ok(command)
}

#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    pub port: u16,
    /// The dashboard's port (its data API and Prometheus `/metrics` too).
    pub http_port: u16,
    pub etcd_endpoint: String,
    pub lease_ttl_seconds: u32,
    pub heartbeat_interval_ms: u32,
    /// The coordinator's certificate (its client credential for etcd and
    /// the agents too); `insecure` for plain text.
    pub tls: TlsFiles,
    /// More flags for the coordinator.
    pub extra_args: Vec<String>,
}

impl CoordinatorSpec {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn dashboard(&self) -> String {
        format!("http://127.0.0.1:{}/", self.http_port)
    }
}

pub fn spawn_coordinator(spec: &CoordinatorSpec, log: &Path, detach: bool) -> Result<Child> {
    let mut command = Command::new(binary("flamingo-coordinator")?);
    command
        .arg(format!("--listen=127.0.0.1:{}", spec.port))
        .arg(format!("--http-listen=127.0.0.1:{}", spec.http_port))
        .arg(format!("--etcd-endpoints={}", spec.etcd_endpoint))
        .arg(format!("--lease-ttl-seconds={}", spec.lease_ttl_seconds))
        .arg(format!(
            "--heartbeat-interval-ms={}",
            spec.heartbeat_interval_ms
        ))
        .args(spec.tls.args());
    // Jobs' metrics next to the coordinator's log (the cluster's folder).
    if let Some(dir) = log.parent() {
        command.arg(format!("--metrics-dir={}", dir.join("metrics").display()));
    }
    command.args(&spec.extra_args);
    spawn(command, log, detach)
}

/// A data-service replica on `port`, serving the storage under
/// `allow_prefixes`.
pub fn spawn_data_service(
    port: u16,
    tls: &TlsFiles,
    allow_prefixes: &[String],
    log: &Path,
    detach: bool,
) -> Result<Child> {
    let mut command = Command::new(binary("flamingo-data-service")?);
    command
        .arg(format!("--listen=127.0.0.1:{port}"))
        .args(tls.args())
        .args(
            allow_prefixes
                .iter()
                .map(|prefix| format!("--allow-prefix={prefix}")),
        );
    spawn(command, log, detach)
}

#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub node_id: String,
    pub coordinator: String,
    pub slots: u32,
    pub state_dir: PathBuf,
    pub rendezvous_port_first: u16,
    pub rendezvous_port_count: u16,
    pub drain_timeout_seconds: u64,
    pub kill_grace_seconds: u64,
    /// Where the agent serves Prometheus `/metrics` (none: it does not).
    pub metrics_port: Option<u16>,
    /// The node's certificate (its id in the SAN).
    pub tls: TlsFiles,
    pub extra_args: Vec<String>,
}

pub fn spawn_agent(spec: &AgentSpec, log: &Path, detach: bool) -> Result<Child> {
    let mut command = Command::new(binary("flamingo-worker")?);
    command
        .arg("agent")
        .arg(format!("--coordinator={}", spec.coordinator))
        .arg(format!("--node-id={}", spec.node_id))
        .arg(format!("--cpu-slots={}", spec.slots))
        .arg(format!("--state-dir={}", spec.state_dir.display()))
        .arg(format!(
            "--rendezvous-ports={}:{}",
            spec.rendezvous_port_first, spec.rendezvous_port_count
        ))
        .arg(format!(
            "--drain-timeout-seconds={}",
            spec.drain_timeout_seconds
        ))
        .arg(format!("--kill-grace-seconds={}", spec.kill_grace_seconds))
        .args(
            spec.metrics_port
                .map(|port| format!("--metrics-listen=127.0.0.1:{port}")),
        )
        .args(spec.tls.args())
        .args(&spec.extra_args);
    spawn(command, log, detach)
}

/// The last `lines` lines of a log file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `endpoint` accepts TCP connections.
pub fn wait_for_port(endpoint: &str, timeout: Duration) -> Result<()> {
    let address = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string();
    let started = Instant::now();
    loop {
        if std::net::TcpStream::connect(&address).is_ok() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(LaunchError::Timeout {
                what: format!("{endpoint} to accept connections"),
                seconds: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` is a live process (not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL after `grace`; returns once every pid is gone.
pub fn terminate(pids: &[u32], grace: Duration) {
    for &pid in pids {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let started = Instant::now();
    while pids.iter().any(|&pid| process_alive(pid)) && started.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids.iter().filter(|&&pid| process_alive(pid)) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let started = Instant::now();
    while pids.iter().any(|&pid| process_alive(pid)) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Daemons started by `up` were re-parented to init; give it a moment to
    // reap them so nothing, not even a zombie, is listed after `down`.
    let started = Instant::now();
    while pids
        .iter()
        .any(|&pid| Path::new(&format!("/proc/{pid}")).exists())
        && started.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}
