//! bench-data: preprocessing throughput (samples/s per core) of the data
//! service against OpenFlamingo's Python pipeline (webdataset + PIL +
//! open_clip transform + Hugging Face fast tokenizer) on the same shards,
//! the same machine, one run; then our scaling with threads.

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
    /// Timed repetitions; the best counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    python: Option<PathBuf>,
    /// Measure ours only (for profiling); no ratio is printed.
    #[arg(long)]
    no_python: bool,
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

/// Samples per second of our read + preprocess over the whole shard.
async fn ours(
    dir: &Path,
    dataset: &str,
    threads: usize,
    rounds: usize,
) -> anyhow::Result<(usize, f64)> {
    let spec = DataSpec::from_toml(
        &format!("dataset = \"{dataset}\"\nshards = \"{dataset}-00000.tar\"\ntokenizer = \"lm\"\n"),
        Some(dir),
    )?;
    let storage = Storage::default();
    let opened = Dataset::open(&spec, &storage).await?;
    let preparer = Arc::new(Preparer::new(&spec)?);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let count = opened.shards[0].index.samples.len() as u64;
    let refs: Vec<SampleRef> = (0..count)
        .map(|sample| SampleRef { shard: 0, sample })
        .collect();
    let mut best = f64::INFINITY;
    let mut kept = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let raws = opened.read(&refs).await?;
        kept = pool.install(|| {
            raws.par_iter()
                .filter(|raw| match raw {
                    Ok(raw) => preparer
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
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok((kept, kept as f64 / best))
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
    println!("Preprocessing throughput: samples/s; Python = OpenFlamingo's pipeline in one process, one thread");
    println!("ratio = ours per core / Python per core (>1: ours faster)\n");
    println!(
        "{:<8} {:>8} {:>12} {:>12} {:>8}",
        "dataset", "threads", "ours (/s)", "per core", "ratio"
    );
    for dataset in ["laion", "mmc4"] {
        let mut python_rate = f64::NAN;
        for _ in 0..if args.no_python { 0 } else { args.rounds } {
            let output = reference(&args, &["time", &path, dataset])?;
            let value: serde_json::Value = serde_json::from_str(output.trim())?;
            let rate =
                value["samples"].as_f64().unwrap_or(0.0) / value["seconds"].as_f64().unwrap_or(1.0);
            python_rate = if python_rate.is_nan() {
                rate
            } else {
                python_rate.max(rate)
            };
        }
        if !args.no_python {
            println!(
                "{:<8} {:>8} {:>12.1} {:>12.1} {:>8}",
                dataset, "python", python_rate, python_rate, "1.000"
            );
        }
        for threads in &threads {
            let (kept, rate) = ours(dir.path(), dataset, *threads, args.rounds).await?;
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
