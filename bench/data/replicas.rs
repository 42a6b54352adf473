//! `bench-data --replicas 1,2`: aggregate preprocessing throughput of a
//! job's data path against the number of data-service replicas, each a real
//! `flamingo-data-service` process limited to one preprocessing thread,
//! serving a 4-rank job over mutual TLS from judged shards (`data index
//! --accept`), so that the replicas split each batch instead of each
//! preparing all of it. The baseline is one replica, measured in the same
//! run; each K also checks that the ranks receive the same batches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_data::batch::Cursor;
use flamingo_data::client::{BatchStream, StreamConfig};
use flamingo_data::convert::ImageFormat;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;
use flamingo_security::{Identity, Pki, Role, TlsFiles};

const WORLD: u32 = 4;
const PER_RANK: u32 = 8;
/// Copies of the fixture shard: the job reads them all each epoch.
const SHARDS: usize = 4;

/// One replica process, killed when dropped.
struct Replica {
    child: Child,
    port: u16,
}

impl Replica {
    /// Replica `index`, pinned to CPU `index` (modulo the CPUs): one
    /// preprocessing thread, and its other threads on the same CPU.
    fn start(binary: &Path, tls: &TlsFiles, data: &Path, index: usize) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let port = flamingo_common::net::free_local_port()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu = index % cpus;
        let log = std::fs::File::create(data.join(format!("replica-{index}.log")))?;
        let mut command = Command::new(binary);
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--threads", "1", "--read-ahead", "4"])
            .args(["--allow-prefix", &data.display().to_string()])
            .args(tls.args())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: only sched_setaffinity, async-signal-safe, between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let replica = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("the data service did not listen on {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(replica)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// CPU seconds the process has used (user + system).
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }
}

/// CPU seconds process `pid` has used (user + system), from its stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after ")".
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|index| fields.get(*index)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hertz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hertz.max(1.0)
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, the replicas' certificate and a submitter's (set in this
/// process's `FLAMINGO_TLS_*`, which the batch client reads).
fn credentials(dir: &Path) -> anyhow::Result<TlsFiles> {
    let pki = Pki::init(&dir.join("pki"))?;
    let day = Duration::from_secs(86_400);
    let service = pki.issue(
        &Identity::service("data-service"),
        day,
        &["127.0.0.1".to_string()],
    )?;
    let user = pki.issue(&Identity::user("bench", Role::Submitter), day, &[])?;
    for (name, path) in TlsFiles::new(&pki.ca_cert(), &user.cert, &user.key).env() {
        std::env::set_var(name, path);
    }
    Ok(TlsFiles::new(&pki.ca_cert(), &service.cert, &service.key))
}

/// The fixture's LAION shard copied `SHARDS` times, judged; the spec.
async fn judged_spec(dir: &Path) -> anyhow::Result<String> {
    let source = dir.join("laion-00000.tar");
    for shard in 1..SHARDS {
        std::fs::copy(&source, dir.join(format!("laion-{shard:05}.tar")))?;
    }
    let spec = DataSpec::from_toml(
        &format!(
            "dataset = \"laion\"\nshards = \"laion-{{00000..{:05}}}.tar\"\ntokenizer = \"lm\"\n",
            SHARDS - 1
        ),
        Some(dir),
    )?;
    let dataset = Dataset::open(&spec, &Storage::default()).await?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let judged =
        flamingo_data::accept::judge_dataset(&spec, &dataset, threads, false, |_, _| {}).await?;
    eprintln!(
        "judged {} shards ({} samples) in {:.1}s",
        judged.judged_shards,
        dataset.samples(),
        started.elapsed().as_secs_f64()
    );
    Ok(spec.to_toml())
}

/// One job of `WORLD` ranks over `endpoints` for `epochs` epochs, read in
/// lockstep as training reads: samples delivered, seconds, and every
/// rank's keys in order.
async fn job(
    endpoints: &[String],
    spec: &str,
    epochs: u64,
) -> anyhow::Result<(usize, f64, Vec<Vec<String>>)> {
    let started = Instant::now();
    let mut streams: Vec<BatchStream> = (0..WORLD)
        .map(|rank| {
            BatchStream::start(StreamConfig {
                endpoints: endpoints.to_vec(),
                split: true,
                spec_toml: spec.to_string(),
                seed: 7,
                rank,
                world_size: WORLD,
                batch_size: PER_RANK,
                image_format: ImageFormat::Uint8,
                cursor: Cursor::default(),
                end_epoch: epochs,
                buffer_depth: 2,
                reconnect_for: Duration::from_secs(30),
            })
        })
        .collect();
    let mut keys = vec![Vec::new(); WORLD as usize];
    let mut samples = 0;
    loop {
        let mut ended = 0;
        for (rank, stream) in streams.iter_mut().enumerate() {
            match tokio::time::timeout(Duration::from_secs(120), stream.next())
                .await
                .context("no batch within two minutes")?
            {
                Some(batch) => {
                    let batch = batch?;
                    samples += batch.keys.len();
                    keys[rank].extend(batch.keys);
                }
                None => ended += 1,
            }
        }
        if ended == streams.len() {
            return Ok((samples, started.elapsed().as_secs_f64(), keys));
        }
        if ended != 0 {
            bail!("{ended} of {WORLD} ranks ended early");
        }
    }
}

/// Runs the table for `counts` replicas, `rounds` rounds each (the counts
/// taking turns, best round counts).
pub async fn run(dir: &Path, counts: &[usize], rounds: usize) -> anyhow::Result<()> {
    let binary: PathBuf = std::env::current_exe()?.with_file_name("flamingo-data-service");
    if !binary.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p flamingo-data-service` \
             (bench/data.sh does)",
            binary.display()
        );
    }
    let tls = credentials(dir)?;
    let spec = judged_spec(dir).await?;
    const EPOCHS: u64 = 6;
    let mut best = vec![0.0f64; counts.len()];
    let mut cpu_per_sample = vec![f64::INFINITY; counts.len()];
    let mut client_per_sample = vec![f64::INFINITY; counts.len()];
    let mut reference: Option<Vec<Vec<String>>> = None;
    let mut delivered = 0;
    for round in 0..rounds {
        for (slot, count) in counts.iter().enumerate() {
            let replicas = (0..*count)
                .map(|index| Replica::start(&binary, &tls, dir, index))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let endpoints: Vec<String> = replicas.iter().map(Replica::endpoint).collect();
            let before: f64 = replicas.iter().map(Replica::cpu_seconds).sum();
            let client_before = cpu_seconds(std::process::id());
            let (samples, seconds, keys) = job(&endpoints, &spec, EPOCHS).await?;
            let cpu: f64 = replicas.iter().map(Replica::cpu_seconds).sum::<f64>() - before;
            let client = cpu_seconds(std::process::id()) - client_before;
            drop(replicas);
            let rate = samples as f64 / seconds;
            eprintln!(
                "round {}/{rounds}: {count} replica(s) {samples} samples in {seconds:.2}s \
                 ({rate:.1}/s), replicas' CPU {cpu:.2}s, ranks' CPU {client:.2}s",
                round + 1
            );
            cpu_per_sample[slot] = cpu_per_sample[slot].min(cpu / samples.max(1) as f64);
            client_per_sample[slot] = client_per_sample[slot].min(client / samples.max(1) as f64);
            match &reference {
                None => reference = Some(keys),
                Some(expected) if *expected != keys => {
                    bail!("{count} replicas delivered other batches than the first run")
                }
                Some(_) => {}
            }
            delivered = samples;
            best[slot] = best[slot].max(rate);
        }
    }
    println!(
        "\nAggregate preprocessing throughput, {WORLD} ranks x {PER_RANK} samples, LAION, \
         {delivered} samples per job ({EPOCHS} epochs), each replica one thread, mutual TLS;"
    );
    println!(
        "each replica pinned to its own CPU of {} (the ranks' client shares them);",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "ratio = against 1 replica in this run (best of {rounds} rounds each); replica CPU = \
         the replicas' CPU time per sample, summed; ranks' CPU = the receiving side's\n"
    );
    println!(
        "{:>8} {:>14} {:>8} {:>22} {:>20}",
        "replicas", "samples/s", "ratio", "replica CPU ms/sample", "ranks' CPU ms/sample"
    );
    let baseline = counts
        .iter()
        .position(|count| *count == 1)
        .map_or(best[0], |slot| best[slot]);
    for (((count, rate), cpu), client) in counts
        .iter()
        .zip(&best)
        .zip(&cpu_per_sample)
        .zip(&client_per_sample)
    {
        println!(
            "{count:>8} {rate:>14.1} {:>8.3} {:>22.3} {:>20.3}",
            rate / baseline,
            cpu * 1000.0,
            client * 1000.0
        );
    }
    Ok(())
}
