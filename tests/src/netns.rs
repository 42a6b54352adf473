//! Real multi-host networking on one machine: every host (the control
//! plane, each node) in its own network namespace with its own address on
//! a Linux bridge, so agents, ranks and the coordinator talk over real
//! non-loopback addresses (`MASTER_ADDR` included), and faults are real:
//! nftables drops for partitions, `tc netem` for latency and loss.
//!
//! Making namespaces needs root (CI runs as root); [`Network::unavailable`]
//! says why they cannot be made here, and the tests say so and skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use flamingo_launch::local::{self, EtcdSpec};
use flamingo_launch::pki::ClusterCredentials;

/// Runs `ip`/`nft`/`tc` and fails with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A bridge and one namespace per host, removed on drop.
pub struct Network {
    tag: String,
    bridge: String,
    /// The first three octets of the subnet (`10.a.b`).
    subnet: String,
    hosts: Vec<String>,
}

impl Network {
    /// Why namespaces cannot be made here (`None`: they can).
    pub fn unavailable() -> Option<String> {
        // SAFETY: a plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root: network namespaces need CAP_NET_ADMIN".into());
        }
        for tool in ["ip", "nft"] {
            let found = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                return Some(format!(
                    "{tool} is missing (scripts/setup.sh installs iproute2 and nftables)"
                ));
            }
        }
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let probe = format!(
            "flprobe{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let made = run("ip", &["netns", "add", &probe]);
        let _ = run("ip", &["netns", "del", &probe]);
        made.err()
            .map(|error| format!("cannot make a network namespace: {error}"))
    }

    /// Namespaces for `hosts` on a fresh bridge; host i gets
    /// `10.a.b.(10 + i)`, this process (the root namespace) `10.a.b.1`.
    pub fn create(hosts: &[&str]) -> anyhow::Result<Self> {
        // Unique per network: a deleted namespace's links go away
        // asynchronously, so names are never reused within a process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let serial = (std::process::id() * 8 + next) % 60000;
        let tag = format!("{serial:x}");
        let network = Self {
            bridge: format!("flb{tag}"),
            subnet: format!("10.{}.{}", 200 + (serial / 250) % 50, serial % 250),
            hosts: hosts.iter().map(|host| host.to_string()).collect(),
            tag,
        };
        run("ip", &["link", "add", &network.bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}.1/24", network.subnet),
                "dev",
                &network.bridge,
            ],
        )?;
        run("ip", &["link", "set", &network.bridge, "up"])?;
        for (index, host) in hosts.iter().enumerate() {
            let namespace = network.namespace(host);
            let (outside, inside) = (
                format!("fv{}x{index}", network.tag),
                format!("fp{}x{index}", network.tag),
            );
            run("ip", &["netns", "add", &namespace])?;
            run(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside,
                ],
            )?;
            run("ip", &["link", "set", &inside, "netns", &namespace])?;
            run("ip", &["link", "set", &outside, "master", &network.bridge])?;
            run("ip", &["link", "set", &outside, "up"])?;
            let address = format!("{}/24", network.ip(host));
            run(
                "ip",
                &["-n", &namespace, "addr", "add", &address, "dev", &inside],
            )?;
            run("ip", &["-n", &namespace, "link", "set", &inside, "up"])?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        Ok(network)
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|known| known == host)
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    fn namespace(&self, host: &str) -> String {
        format!("fl{}-{host}", self.tag)
    }

    /// The host's address.
    pub fn ip(&self, host: &str) -> String {
        format!("{}.{}", self.subnet, 10 + self.index(host))
    }

    /// Every host's address, and this process's.
    pub fn addresses(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|host| self.ip(host))
            .chain([format!("{}.1", self.subnet)])
            .collect()
    }

    /// `command` run inside `host`'s namespace (program, arguments,
    /// environment and folder kept).
    pub fn inside(&self, host: &str, command: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.namespace(host)])
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(name, value),
                None => wrapped.env_remove(name),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Waits until something listens on `port` of `host`'s loopback.
    pub fn wait_inside(&self, host: &str, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
        while run(
            "ip",
            &["netns", "exec", &self.namespace(host), "bash", "-c", &probe],
        )
        .is_err()
        {
            if started.elapsed() > timeout {
                bail!("nothing listens on port {port} in {host} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Drops everything between `host` and `peers` (both ways), in `host`'s
    /// namespace.
    pub fn partition(&self, host: &str, peers: &[&str]) -> anyhow::Result<()> {
        let namespace = self.namespace(host);
        let addresses: Vec<String> = peers.iter().map(|peer| self.ip(peer)).collect();
        let set = addresses.join(", ");
        let rules = format!(
            "table inet partition {{\n chain input {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n chain output {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("flamingo-partition-{namespace}.nft"));
        std::fs::write(&file, rules)?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &namespace,
                "nft",
                "-f",
                file.to_str().unwrap_or_default(),
            ],
        )
    }

    /// Removes `host`'s partition.
    pub fn heal(&self, host: &str) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.namespace(host),
                "nft",
                "delete",
                "table",
                "inet",
                "partition",
            ],
        )
    }

    /// Drops `percent` % of `host`'s packets at random, both ways
    /// (nftables; loss without netem).
    pub fn lossy(&self, host: &str, percent: u32) -> anyhow::Result<()> {
        let namespace = self.namespace(host);
        let rules = format!(
            "table inet loss {{\n chain input {{ type filter hook input priority 0; iifname != \"lo\" numgen random mod 100 < {percent} drop; }}\n chain output {{ type filter hook output priority 0; oifname != \"lo\" numgen random mod 100 < {percent} drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("flamingo-loss-{namespace}.nft"));
        std::fs::write(&file, rules)?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &namespace,
                "nft",
                "-f",
                file.to_str().unwrap_or_default(),
            ],
        )
    }

    /// `tc netem` on `host`'s link (for example `delay 100ms loss 1%`);
    /// an error when the kernel has no netem.
    pub fn netem(&self, host: &str, spec: &str) -> anyhow::Result<()> {
        let device = format!("fp{}x{}", self.tag, self.index(host));
        let mut args = vec![
            "-n",
            &self.namespace(host),
            "qdisc",
            "add",
            "dev",
            &device,
            "root",
            "netem",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(spec.split_whitespace().map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("tc", &args)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for (index, host) in self.hosts.iter().enumerate() {
            let _ = run("ip", &["link", "del", &format!("fv{}x{index}", self.tag)]);
            let _ = run("ip", &["netns", "del", &self.namespace(host)]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// A cluster across namespaces: etcd and a coordinator in `control`, an
/// agent in each node's namespace. Everything is killed on drop.
pub struct NetCluster {
    pub network: Network,
    pub dir: PathBuf,
    pub credentials: ClusterCredentials,
    children: Vec<(String, Child)>,
    coordinator_port: u16,
    /// Cluster tests run one at a time (see [`crate::serial_guard`]).
    _serial: std::sync::MutexGuard<'static, ()>,
}

const CONTROL: &str = "control";

impl NetCluster {
    /// `nodes` namespaces `node-0`…, each with an agent of `slots` CPU
    /// slots; node leases of `lease_ttl_seconds`. This process uses the
    /// cluster's admin credential from now on (set before threads start).
    pub fn start(
        dir: &Path,
        nodes: usize,
        slots: u32,
        lease_ttl_seconds: u32,
    ) -> anyhow::Result<Self> {
        let serial = crate::serial_guard();
        let names: Vec<String> = (0..nodes).map(|index| format!("node-{index}")).collect();
        let hosts: Vec<&str> = std::iter::once(CONTROL)
            .chain(names.iter().map(String::as_str))
            .collect();
        let network = Network::create(&hosts)?;
        // Certificates name every address the services are reached at.
        let credentials = ClusterCredentials::prepare(&dir.join("pki"), &network.addresses())?;
        for (name, path) in credentials.admin.env() {
            // SAFETY: called at the start of a test, before its threads.
            unsafe { std::env::set_var(name, path) };
        }
        let mut cluster = Self {
            network,
            dir: dir.to_path_buf(),
            credentials,
            children: Vec::new(),
            coordinator_port: 7070,
            _serial: serial,
        };
        let etcd = EtcdSpec {
            data_dir: dir.join("etcd"),
            client_port: 2379,
            peer_port: 2380,
            tls: Some(cluster.credentials.etcd.clone()),
        };
        let etcd_command = cluster
            .network
            .inside(CONTROL, &local::etcd_command(&etcd)?);
        cluster.spawn("etcd", etcd_command)?;
        cluster
            .network
            .wait_inside(CONTROL, etcd.client_port, Duration::from_secs(20))?;
        let control = cluster.network.ip(CONTROL);
        let mut coordinator = Command::new(local::binary("flamingo-coordinator")?);
        coordinator
            .arg(format!("--listen={control}:{}", cluster.coordinator_port))
            .arg("--http-listen=off")
            .arg(format!("--etcd-endpoints={}", etcd.endpoint()))
            .arg(format!("--lease-ttl-seconds={lease_ttl_seconds}"))
            .arg("--heartbeat-interval-ms=300")
            .arg(format!("--metrics-dir={}", dir.join("metrics").display()))
            .args(cluster.credentials.coordinator.args());
        let coordinator = cluster.network.inside(CONTROL, &coordinator);
        cluster.spawn("coordinator", coordinator)?;
        cluster.wait_listening(&cluster.coordinator(), Duration::from_secs(30))?;
        for name in &names {
            let address = cluster.network.ip(name);
            let mut agent = Command::new(local::binary("flamingo-worker")?);
            agent
                .arg("agent")
                .arg(format!("--coordinator={}", cluster.coordinator()))
                .arg(format!("--node-id={name}"))
                .arg(format!("--address={address}"))
                .arg(format!("--listen={address}:0"))
                .arg(format!("--cpu-slots={slots}"))
                .arg(format!(
                    "--state-dir={}",
                    dir.join("agents").join(name).display()
                ))
                .arg("--rendezvous-ports=29500:8")
                .arg("--drain-timeout-seconds=5")
                .arg("--kill-grace-seconds=2")
                .args(cluster.credentials.node(name)?.args());
            let agent = cluster.network.inside(name, &agent);
            cluster.spawn(name, agent)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, name: &str, mut command: Command) -> anyhow::Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Waits until `endpoint` accepts connections from this namespace.
    fn wait_listening(&self, endpoint: &str, timeout: Duration) -> anyhow::Result<()> {
        local::wait_for_port(endpoint, timeout).map_err(|error| {
            anyhow::anyhow!(
                "{error}; the coordinator's log ends:\n{}",
                local::tail(&self.dir.join("coordinator.log"), 20)
            )
        })
    }

    /// The coordinator's address on the bridge.
    pub fn coordinator(&self) -> String {
        format!(
            "http://{}:{}",
            self.network.ip(CONTROL),
            self.coordinator_port
        )
    }

    /// A node's address.
    pub fn ip(&self, host: &str) -> String {
        self.network.ip(host)
    }

    /// Cuts `node` off from the control plane (both ways).
    pub fn partition_from_control(&self, node: &str) -> anyhow::Result<()> {
        self.network.partition(node, &[CONTROL])
    }

    /// A session as the cluster's admin.
    pub async fn session(&self) -> anyhow::Result<flamingo_client::Session> {
        let admin = self.credentials.admin.client()?;
        Ok(flamingo_client::Session::open_with(&self.coordinator(), admin.as_ref()).await?)
    }

    /// Waits until `count` nodes are registered.
    pub async fn wait_for_nodes(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        loop {
            if let Ok(mut session) = self.session().await {
                if let Ok(nodes) = session.nodes().await {
                    if nodes.len() >= count {
                        return Ok(());
                    }
                }
            }
            if started.elapsed() > timeout {
                bail!("fewer than {count} nodes registered within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        // Agents first (their ranks die with them), the control plane last.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
