//! A real Slurm cluster on this machine for the tests: Debian's munged,
//! slurmctld and one `slurmd -N nodeX` per node, on free ports, all
//! children of the test (in the foreground), configured in a temporary
//! folder. Dropping it cancels every job and stops every daemon, including
//! the step daemons (slurmstepd) its jobs started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct SlurmCluster {
    dir: PathBuf,
    conf: PathBuf,
    nodes: u32,
    daemons: Vec<(String, Child)>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(flamingo_common::net::free_local_port()?)
}

fn daemon(command: &mut Command, name: &str, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {name} (Debian: slurm-wlm, munge)"))
}

/// Starts munged with a fresh key under `dir/munge`; returns it and its socket.
fn start_munge(dir: &Path) -> anyhow::Result<(Child, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o700))?;
    let key = dir.join("munge/munge.key");
    let mut bytes = vec![0u8; 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut bytes))?;
    std::fs::write(&key, bytes)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let socket = dir.join("munge/munge.socket");
    let mut munged = daemon(
        Command::new("munged")
            .arg("--foreground")
            .arg("--force")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!(
                "--pid-file={}",
                dir.join("munge/munged.pid").display()
            ))
            .arg(format!(
                "--seed-file={}",
                dir.join("munge/munged.seed").display()
            ))
            .arg(format!(
                "--log-file={}",
                dir.join("log/munged.log").display()
            )),
        "munged",
        &dir.join("log/munged.out"),
    )?;
    if let Err(error) = wait(Duration::from_secs(10), || socket.exists()) {
        let _ = munged.kill();
        let _ = munged.wait();
        return Err(error.context("munged did not create its socket"));
    }
    Ok((munged, socket))
}

/// slurm.conf for one controller and `names` nodes of `cpus` CPUs, all on
/// this machine, on free ports.
fn slurm_conf(dir: &Path, socket: &Path, names: &[String], cpus: u32) -> anyhow::Result<String> {
    let controller_port = free_port()?;
    let mut conf = format!(
        "ClusterName=flamingotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={controller_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
",
        socket = socket.display(),
        dir = dir.display()
    );
    for name in names {
        conf.push_str(&format!(
            "NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={} CPUs={cpus} RealMemory=1000 State=UNKNOWN\n",
            free_port()?
        ));
    }
    conf.push_str(&format!(
        "PartitionName=debug Nodes={} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
        names.join(",")
    ));
    Ok(conf)
}

impl SlurmCluster {
    /// Starts munged, slurmctld and `nodes` slurmd (each with `cpus`
    /// CPUs) with their state under `dir`; returns once every node is idle.
    pub fn start(dir: &Path, nodes: u32, cpus: u32) -> anyhow::Result<Self> {
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the Slurm tests run slurmd, which needs root (CI runs as root)");
        }
        let dir = dir.join("slurm-cluster");
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let (munged, socket) = start_munge(&dir)?;
        let mut cluster = Self {
            conf: dir.join("slurm.conf"),
            dir: dir.clone(),
            nodes,
            daemons: vec![("munged".into(), munged)],
        };
        let names: Vec<String> = (1..=nodes).map(|i| format!("node{i}")).collect();
        std::fs::write(&cluster.conf, slurm_conf(&dir, &socket, &names, cpus)?)?;

        let controller = daemon(
            Command::new("slurmctld")
                .env("SLURM_CONF", &cluster.conf)
                .args(["-D", "-c"]),
            "slurmctld",
            &dir.join("log/slurmctld.out"),
        )?;
        cluster.daemons.push(("slurmctld".into(), controller));
        for name in &names {
            let node = daemon(
                Command::new("slurmd")
                    .env("SLURM_CONF", &cluster.conf)
                    .args(["-D", "-N", name]),
                "slurmd",
                &dir.join(format!("log/slurmd-{name}.out")),
            )?;
            cluster.daemons.push((format!("slurmd {name}"), node));
        }
        let ready = wait(Duration::from_secs(60), || {
            let idle = cluster
                .output("sinfo", &["-h", "-N", "-o", "%N %T"])
                .map(|text| text.lines().filter(|l| l.ends_with(" idle")).count())
                .unwrap_or(0);
            idle == nodes as usize
        });
        if ready.is_err() {
            bail!(
                "the Slurm nodes did not become idle; sinfo: {:?}; slurmctld log ends:\n{}",
                cluster.output("sinfo", &["-N"]),
                flamingo_launch::local::tail(&dir.join("log/slurmctld.log"), 20)
            );
        }
        Ok(cluster)
    }

    /// `SLURM_CONF` for Slurm's commands (and flamingoctl's).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// A Slurm command (sbatch, scontrol, …) against this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", &self.conf);
        command
    }

    /// Runs a Slurm command; its stdout, or an error with its stderr.
    pub fn output(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = self.command(program).args(args).output()?;
        if !output.status.success() {
            bail!(
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Cancels every job, waits until Slurm has none, then stops the daemons
    /// and any step daemon they left.
    pub fn stop(&mut self) {
        if self.daemons.is_empty() {
            return;
        }
        let _ = self.command("scancel").args(["--user=root"]).status();
        let _ = wait(Duration::from_secs(60), || {
            self.output("squeue", &["-h", "-o", "%i"])
                .map(|text| text.trim().is_empty())
                .unwrap_or(true)
        });
        while let Some((_, mut child)) = self.daemons.pop() {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let started = Instant::now();
            while child.try_wait().ok().flatten().is_none()
                && started.elapsed() < Duration::from_secs(15)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in leftovers(&self.dir) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = wait(Duration::from_secs(10), || leftovers(&self.dir).is_empty());
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Processes of the cluster under `dir` still alive: its daemons, the step
/// daemons its slurmd started (they carry its SLURM_CONF), and what they ran.
pub fn leftovers(dir: &Path) -> Vec<u32> {
    let marker = dir.display().to_string();
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own && flamingo_launch::local::process_alive(pid))
        .filter(|pid| {
            let read =
                |what: &str| std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
            let environ = String::from_utf8_lossy(&read("environ")).into_owned();
            cmdline.contains(&marker)
                || environ
                    .split('\0')
                    .any(|var| var.starts_with("SLURM_CONF=") && var.contains(&marker))
        })
        .collect()
}

fn wait(timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
