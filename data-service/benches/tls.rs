//! Data-service batches per second over mutual TLS against plain text, in
//! one run on one machine: two replicas of the release build on the same
//! synthetic LAION shards (224 px, uint8, as training streams them), one
//! started with the cluster's certificates and one with `--insecure`,
//! streamed from alternately. Each round streams a new seed, so every batch
//! is prepared once and then sent, as training streams them (the target:
//! TLS / plain at least 0.9); then the same seed again, answered from the
//! replicas' batch cache: transport alone, the worst case for TLS.
//!
//! `bench/tls.sh` (or `cargo bench -p flamingo-data-service --bench tls --
//! --batches N --rounds R --threads T`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flamingo_data::batch::Cursor;
use flamingo_data::client::{BatchStream, StreamConfig};
use flamingo_data::convert::ImageFormat;
use flamingo_security::{Identity, Pki, RankToken, TlsFiles};

struct Replica(Child, u16);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[String], threads: usize) -> anyhow::Result<Replica> {
    let port = flamingo_common::net::free_local_port()?;
    let child = Command::new(env!("CARGO_BIN_EXE_flamingo-data-service"))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--threads={threads}"))
        .args(["--read-ahead", "4"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the data service did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Replica(child, port))
}

/// Batches per second streaming `batches` batches of `batch_size`.
async fn stream(
    port: u16,
    spec: &str,
    seed: u64,
    batch_size: u32,
    batches: usize,
) -> anyhow::Result<f64> {
    let mut stream = BatchStream::start(StreamConfig {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        split: true,
        spec_toml: spec.to_string(),
        seed,
        rank: 0,
        world_size: 1,
        batch_size,
        image_format: ImageFormat::Uint8,
        cursor: Cursor::default(),
        end_epoch: 0,
        buffer_depth: 4,
        reconnect_for: Duration::from_secs(10),
    });
    // The first batch pays for the connection and the dataset's opening.
    stream
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no batch"))??;
    let started = Instant::now();
    for _ in 0..batches {
        stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    }
    Ok(batches as f64 / started.elapsed().as_secs_f64())
}

fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|arg| arg == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (batches, rounds) = (flag("--batches", 40), flag("--rounds", 3));
    let threads = flag(
        "--threads",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let batch_size = flag("--batch-size", 32) as u32;
    let dir = tempfile::tempdir()?;
    let spec = flamingo_data::synthetic::write_laion_fixture(dir.path(), 4, 256, 0)
        .await?
        .replace("image_size = 16", "image_size = 224");
    let pki = Pki::init(&dir.path().join("pki"))?;
    let day = Duration::from_secs(86_400);
    let service = pki.issue(
        &Identity::service("data-service"),
        day,
        &["127.0.0.1".into()],
    )?;
    let node = pki.issue(&Identity::node("bench"), day, &[])?;
    let prefix = format!("--allow-prefix={}", dir.path().display());
    let secure = TlsFiles::new(&pki.ca_cert(), &service.cert, &service.key);
    let tls_replica = start(&[secure.args(), vec![prefix.clone()]].concat(), threads)?;
    let plain_replica = start(&[prefix, "--insecure".into()], threads)?;
    // The rank's side: the node's certificate and an attempt's credential.
    let token = RankToken::mint(&pki.rank_secret()?, "bench", 0, 3600);
    let client = TlsFiles::new(&pki.ca_cert(), &node.cert, &node.key);
    println!(
        "data-service stream, {batches} batches × {batch_size} samples (224 px, uint8) per round, {threads} preprocessing thread(s) per replica"
    );
    let (mut plain_total, mut tls_total) = (0.0, 0.0);
    let (mut plain_cached, mut tls_cached) = (0.0, 0.0);
    for round in 1..=rounds {
        let seed = round as u64;
        for (name, _) in client.env() {
            std::env::remove_var(name);
        }
        std::env::remove_var(flamingo_security::ENV_RANK_TOKEN);
        let plain = stream(plain_replica.1, &spec, seed, batch_size, batches).await?;
        let plain_again = stream(plain_replica.1, &spec, seed, batch_size, batches).await?;
        for (name, path) in client.env() {
            std::env::set_var(name, path);
        }
        std::env::set_var(flamingo_security::ENV_RANK_TOKEN, &token);
        let tls = stream(tls_replica.1, &spec, seed, batch_size, batches).await?;
        let tls_again = stream(tls_replica.1, &spec, seed, batch_size, batches).await?;
        println!(
            "round {round}: prepared: plain {plain:.2}, mutual TLS {tls:.2} batches/s (ratio {:.3}); cached: plain {plain_again:.2}, TLS {tls_again:.2} batches/s (ratio {:.3})",
            tls / plain,
            tls_again / plain_again
        );
        plain_total += plain;
        tls_total += tls;
        plain_cached += plain_again;
        tls_cached += tls_again;
    }
    let ratio = tls_total / plain_total;
    println!(
        "cached (transport only, {:.0} MB/s plain): plain {:.2} batches/s, mutual TLS {:.2} batches/s; TLS / plain = {:.3}",
        plain_cached / rounds as f64 * f64::from(batch_size) * 3.0 * 224.0 * 224.0 / 1e6,
        plain_cached / rounds as f64,
        tls_cached / rounds as f64,
        tls_cached / plain_cached
    );
    println!(
        "summary (batches prepared as training streams them): plain {:.2} batches/s, mutual TLS {:.2} batches/s; TLS / plain = {ratio:.3} (target >= 0.90: {})",
        plain_total / rounds as f64,
        tls_total / rounds as f64,
        if ratio >= 0.9 { "met" } else { "NOT met" }
    );
    Ok(())
}
