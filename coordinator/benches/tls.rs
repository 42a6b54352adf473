//! The control plane over mutual TLS against plain text, in one run on one
//! machine: etcd and the coordinator (release build) started twice — with
//! the cluster's certificates (etcd with `--client-cert-auth`), and plain
//! with `--insecure` — and the same calls made to each in turn:
//! - a new connection and one `ListNodes` (what every flamingoctl command
//!   pays, the TLS handshake included), 50 times;
//! - `Launch` of a job that waits (an etcd write per job), 100 times;
//! - `GetJob` from 8 concurrent clients on open connections, for 3 s.
//!
//! `bench/tls.sh` runs it after the data-stream bench (or `cargo bench -p
//! flamingo-coordinator --bench tls`).

use std::time::{Duration, Instant};

use flamingo_client::Session;
use flamingo_common::{JobKind, JobSpec};
use flamingo_launch::local::{self, CoordinatorSpec, EtcdSpec};
use flamingo_launch::pki::ClusterCredentials;
use flamingo_security::ClientTls;

struct Cluster {
    children: Vec<std::process::Child>,
    endpoint: String,
    tls: Option<ClientTls>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(
    dir: &std::path::Path,
    credentials: Option<&ClusterCredentials>,
) -> anyhow::Result<Cluster> {
    let free = flamingo_common::net::free_local_port;
    let etcd = EtcdSpec {
        data_dir: dir.join("etcd"),
        client_port: free()?,
        peer_port: free()?,
        tls: credentials.map(|credentials| credentials.etcd.clone()),
    };
    let etcd_child = local::spawn_etcd(&etcd, &dir.join("etcd.log"), false)?;
    local::wait_for_port(&etcd.endpoint(), Duration::from_secs(20))?;
    let insecure = flamingo_security::TlsFiles {
        insecure: true,
        ..Default::default()
    };
    let spec = CoordinatorSpec {
        port: free()?,
        http_port: free()?,
        etcd_endpoint: etcd.endpoint(),
        lease_ttl_seconds: 10,
        heartbeat_interval_ms: 1000,
        tls: credentials.map_or(insecure, |credentials| credentials.coordinator.clone()),
        // The bench measures the transport, not the per-client limit: its
        // clients share the admin certificate and send tens of thousands
        // of requests a second.
        extra_args: vec!["--max-requests-per-second=0".into()],
    };
    let coordinator = local::spawn_coordinator(&spec, &dir.join("coordinator.log"), false)?;
    local::wait_for_port(&spec.endpoint(), Duration::from_secs(20))?;
    let tls = match credentials {
        Some(credentials) => credentials.admin.client()?,
        None => None,
    };
    Ok(Cluster {
        children: vec![coordinator, etcd_child],
        endpoint: spec.endpoint(),
        tls,
    })
}

fn waiting_job() -> JobSpec {
    JobSpec {
        name: "bench".into(),
        nodes: 1,
        slots_per_node: 1,
        min_nodes: 0,
        kind: JobKind::CollectiveCheck {
            min_bytes: 1,
            max_bytes: 1,
            backend: None,
        },
        env: Default::default(),
        policy: Default::default(),
        submitter: String::new(),
    }
}

/// (connects per second, launches per second, GetJob per second)
async fn measure(cluster: &Cluster) -> anyhow::Result<(f64, f64, f64)> {
    let open = || Session::open_with(&cluster.endpoint, cluster.tls.as_ref());
    open().await?.nodes().await?;
    let started = Instant::now();
    for _ in 0..50 {
        open().await?.nodes().await?;
    }
    let connects = 50.0 / started.elapsed().as_secs_f64();
    let mut session = open().await?;
    let started = Instant::now();
    let mut last = String::new();
    for _ in 0..100 {
        last = session.launch(&waiting_job()).await?.id.0;
    }
    let launches = 100.0 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut session = open().await?;
        let job = last.clone();
        tasks.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < deadline {
                if session.job(&job).await.is_ok() {
                    calls += 1;
                }
            }
            calls
        }));
    }
    let mut calls = 0;
    for task in tasks {
        calls += task.await?;
    }
    Ok((connects, launches, calls as f64 / 3.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let coordinator = std::path::Path::new(env!("CARGO_BIN_EXE_flamingo-coordinator"));
    std::env::set_var("FLAMINGO_BIN_DIR", coordinator.parent().expect("a folder"));
    let dir = tempfile::tempdir()?;
    let credentials = ClusterCredentials::prepare(&dir.path().join("pki"), &[])?;
    let (plain_dir, tls_dir) = (dir.path().join("plain"), dir.path().join("tls"));
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::create_dir_all(&tls_dir)?;
    let plain = start(&plain_dir, None)?;
    let secure = start(&tls_dir, Some(&credentials))?;
    println!("control plane: etcd + coordinator, plain text (--insecure) against mutual TLS");
    let mut totals = [[0.0f64; 3]; 2];
    for round in 1..=2 {
        let p = measure(&plain).await?;
        let t = measure(&secure).await?;
        println!(
            "round {round}: connect+call {:.1} vs {:.1}/s, launch {:.1} vs {:.1}/s, GetJob {:.0} vs {:.0}/s (plain vs TLS)",
            p.0, t.0, p.1, t.1, p.2, t.2
        );
        for (i, (a, b)) in [(p.0, t.0), (p.1, t.1), (p.2, t.2)].into_iter().enumerate() {
            totals[0][i] += a;
            totals[1][i] += b;
        }
    }
    for (i, what) in [
        "new connection + ListNodes",
        "Launch (etcd write)",
        "GetJob, 8 clients",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "summary: {what}: plain {:.1}/s, mutual TLS {:.1}/s; TLS / plain = {:.3}",
            totals[0][i] / 2.0,
            totals[1][i] / 2.0,
            totals[1][i] / totals[0][i]
        );
    }
    Ok(())
}
