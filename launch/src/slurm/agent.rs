//! `flamingoctl slurm agent`: one node's agent inside a Slurm job, as the
//! job's `srun` step starts it on every node.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use super::script::command_line;
use crate::local;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    #[arg(long)]
    pub job_dir: PathBuf,
    #[arg(long)]
    pub coordinator: String,
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// The allocation's shared data-service replica: each node also starts
    /// its own replica for its ranks, and this one stands in for it.
    #[arg(long)]
    pub data_service: Option<String>,
}

/// This node's own data-service replica on loopback (the job's
/// data-service certificate, which names 127.0.0.1): its ranks stream their
/// slices from it, so batches cross the network only from storage to the
/// node. It dies with the agent that replaces this process. Returns its
/// endpoint.
fn node_replica(
    args: &AgentArgs,
    pki: &flamingo_security::Pki,
    node: &str,
) -> anyhow::Result<String> {
    let issued = pki.ensure(
        &flamingo_security::Identity::service("data-service"),
        crate::pki::VALIDITY,
        &["127.0.0.1".to_string(), "localhost".to_string()],
    )?;
    let tls = flamingo_security::TlsFiles::new(&pki.ca_cert(), &issued.cert, &issued.key);
    let port = flamingo_common::net::free_local_port()?;
    let mut command = Command::new(local::binary("flamingo-data-service")?);
    command
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--allow-prefix=/")
        .args(tls.args());
    flamingo_common::ranks::Tie::FOREGROUND_RANK.apply(&mut command);
    let log = args
        .job_dir
        .join("logs")
        .join(format!("data-service-{node}.log"));
    local::spawn(command, &log, false)?;
    let endpoint = format!("http://127.0.0.1:{port}");
    local::wait_for_port(&endpoint, std::time::Duration::from_secs(20)).with_context(|| {
        format!(
            "the node's data service did not start; its log ends:\n{}",
            local::tail(&log, 15)
        )
    })?;
    Ok(endpoint)
}

/// `flamingoctl slurm agent`: one node's agent, as srun starts it. Named
/// after the Slurm node, bound to the address on its route to the
/// coordinator; replaces this process.
pub fn exec_agent(args: &AgentArgs) -> anyhow::Error {
    let run = || -> anyhow::Result<Command> {
        let node = std::env::var("SLURMD_NODENAME").or_else(|_| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|name| name.trim().to_string())
        })?;
        // The route to the first coordinator (several under leader
        // election share a network).
        let first = flamingo_security::addresses(&args.coordinator)
            .into_iter()
            .next()
            .unwrap_or_default();
        let peer = first
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let address = flamingo_common::net::route_address(peer)
            .with_context(|| format!("finding the route to the coordinator {peer}"))?;
        let mut command = Command::new(local::binary("flamingo-worker")?);
        command
            .arg("agent")
            .arg(format!("--coordinator={}", args.coordinator))
            .arg(format!("--node-id={node}"))
            .arg(format!("--address={address}"))
            .arg(format!("--listen={address}:0"))
            .arg(format!("--cpu-slots={}", args.slots))
            .arg(format!(
                "--state-dir={}",
                args.job_dir.join("agents").join(&node).display()
            ))
            .arg("--drain-timeout-seconds=150");
        // This node's certificate, from the job's CA (the job folder is on
        // the shared filesystem, mode 0700).
        let file = super::records::JobFile::load(&args.job_dir)?;
        let pki = flamingo_security::Pki::open(&file.pki_dir(&args.job_dir))?;
        let issued = pki.ensure(
            &flamingo_security::Identity::node(&node),
            crate::pki::VALIDITY,
            &[address.to_string()],
        )?;
        command.args(
            flamingo_security::TlsFiles::new(&pki.ca_cert(), &issued.cert, &issued.key).args(),
        );
        if let Some(shared) = &args.data_service {
            let replicas = match node_replica(args, &pki, &node) {
                Ok(own) => format!("{own},{shared}"),
                Err(error) => {
                    eprintln!("flamingo agent: {error:#}; the ranks read from {shared}");
                    shared.clone()
                }
            };
            command.env("FLAMINGO_DATA_SERVICE", replicas);
        }
        Ok(command)
    };
    match run() {
        Ok(mut command) => {
            use std::os::unix::process::CommandExt;
            eprintln!("flamingo agent: {}", command_line(&command));
            anyhow::Error::from(command.exec()).context("starting flamingo-worker agent")
        }
        Err(error) => error,
    }
}
