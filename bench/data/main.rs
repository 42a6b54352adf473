//! bench-data: preprocessing throughput (samples/s per core) of the data
//! service against OpenFlamingo's Python pipeline (webdataset + PIL +
//! open_clip transform + Hugging Face fast tokenizer) on the same shards,
//! the same machine, one run; then our scaling with threads. With
//! `--replicas 1,2`: throughput of a job's data path against the number of
//! data-service replicas instead (see `replicas.rs`).

mod replicas;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use flamingo_data::order::SampleRef;
use flamingo_data::prepare::{Decisions, Preparer};
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;
use rayon::prelude::*;

#[derive(Debug, Parser)]
#[command(about = "Preprocessing throughput against OpenFlamingo's Python pipeline")]
struct Args {
    #[arg(long, default_value_t = 256)]
    laion_samples: usize,
    #[arg(long, default_value_t = 96)]
    mmc4_samples: usize,
    /// Thread counts for our scaling table (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Timed repetitions, Python's and ours taking turns; each side's best
    /// counts.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long)]
    python: Option<PathBuf>,
    /// Measure ours only (for profiling); no ratio is printed.
    #[arg(long)]
    no_python: bool,
    /// Replica counts: measure a 4-rank job's samples/s served by this many
    /// data-service processes of one thread each (against 1 replica)
    /// instead of the Python comparison.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<usize>,
}

fn python(args: &Args) -> PathBuf {
    args.python.clone().unwrap_or_else(|| {
        std::env::var_os("FLAMINGO_VENV")
            .map(|venv| PathBuf::from(venv).join("bin/python"))
            .unwrap_or_else(|| PathBuf::from("python3"))
    })
}

fn reference(args: &Args, command: &[&str]) -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/reference.py");
    let output = Command::new(python(args))
        .arg(&script)
        .args(command)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .context("running the Python reference")?;
    if !output.status.success() {
        bail!(
            "reference.py {command:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Our read + preprocess of one whole shard on a pool of `threads`.
struct Ours {
    opened: Arc<Dataset>,
    preparer: Arc<Preparer>,
    pool: rayon::ThreadPool,
    refs: Vec<SampleRef>,
}

impl Ours {
    /// Opens the shard and runs one untimed pass (first-use costs: the
    /// threads' buffers, the page cache).
    async fn new(dir: &Path, dataset: &str, threads: usize) -> anyhow::Result<Self> {
        let spec = DataSpec::from_toml(
            &format!(
                "dataset = \"{dataset}\"\nshards = \"{dataset}-00000.tar\"\ntokenizer = \"lm\"\n"
            ),
            Some(dir),
        )?;
        let storage = Storage::default();
        let opened = Dataset::open(&spec, &storage).await?;
        let preparer = Arc::new(Preparer::new(&spec)?);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let count = opened.shards[0].index.samples.len() as u64;
        let refs = (0..count)
            .map(|sample| SampleRef { shard: 0, sample })
            .collect();
        let ours = Self {
            opened,
            preparer,
            pool,
            refs,
        };
        ours.round().await?;
        Ok(ours)
    }

    /// One timed pass: samples kept and samples per second.
    async fn round(&self) -> anyhow::Result<(usize, f64)> {
        let started = Instant::now();
        let raws = self.opened.read(&self.refs).await?;
        let kept = self.pool.install(|| {
            raws.par_iter()
                .filter(|raw| match raw {
                    Ok(raw) => self
                        .preparer
                        .prepare(
                            raw,
                            Decisions {
                                flip: true,
                                drop_if_single_image: false,
                            },
                        )
                        .is_ok(),
                    Err(_) => false,
                })
                .count()
        });
        Ok((kept, kept as f64 / started.elapsed().as_secs_f64()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if args.threads.is_empty() {
        let mut list = vec![1];
        if cores > 1 {
            list.push(cores);
        }
        list
    } else {
        args.threads.clone()
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().display().to_string();
    eprintln!(
        "writing fixture shards ({} LAION pairs, {} MMC4 documents of 3 photos)…",
        args.laion_samples, args.mmc4_samples
    );
    reference(
        &args,
        &[
            "make",
            &path,
            &args.laion_samples.to_string(),
            &args.mmc4_samples.to_string(),
        ],
    )?;
    if !args.replicas.is_empty() {
        return replicas::run(dir.path(), &args.replicas, args.rounds.min(3)).await;
    }
    println!("Preprocessing throughput: samples/s; Python = OpenFlamingo's pipeline in one process, one thread");
    println!("ratio = ours per core / Python per core (>1: ours faster)\n");
    println!(
        "{:<8} {:>8} {:>12} {:>12} {:>8}",
        "dataset", "threads", "ours (/s)", "per core", "ratio"
    );
    for dataset in ["laion", "mmc4"] {
        // Rounds alternate between Python and ours, so that a drift in the
        // machine's speed (a shared VM's neighbours) weighs on both sides
        // alike; the best round of each counts.
        let mut python_rate = f64::NAN;
        let mut ours = Vec::new();
        for threads in &threads {
            ours.push(Ours::new(dir.path(), dataset, *threads).await?);
        }
        let mut ours_best = vec![(0usize, 0.0f64); threads.len()];
        for _ in 0..args.rounds {
            if !args.no_python {
                let output = reference(&args, &["time", &path, dataset])?;
                let value: serde_json::Value = serde_json::from_str(output.trim())?;
                let rate = value["samples"].as_f64().unwrap_or(0.0)
                    / value["seconds"].as_f64().unwrap_or(1.0);
                python_rate = if python_rate.is_nan() {
                    rate
                } else {
                    python_rate.max(rate)
                };
            }
            for (best, ours) in ours_best.iter_mut().zip(&ours) {
                let (kept, rate) = ours.round().await?;
                *best = (kept, best.1.max(rate));
            }
        }
        if !args.no_python {
            println!(
                "{:<8} {:>8} {:>12.1} {:>12.1} {:>8}",
                dataset, "python", python_rate, python_rate, "1.000"
            );
        }
        for ((kept, rate), threads) in ours_best.into_iter().zip(&threads) {
            let per_core = rate / *threads as f64;
            println!(
                "{:<8} {:>8} {:>12.1} {:>12.1} {:>8.3}",
                dataset,
                threads,
                rate,
                per_core,
                per_core / python_rate
            );
            if kept == 0 {
                bail!("{dataset}: no sample was kept; the comparison is meaningless");
            }
        }
    }
    Ok(())
}
