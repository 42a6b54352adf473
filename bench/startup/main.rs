//! bench-startup: what starting a sharded training job costs each rank, on
//! an OpenFlamingo-shaped random model (CLIP ViT-L/14 under a decoder of
//! about 0.7B: `--size 1b`), at 1, 2 and 4 ranks, three ways in one run:
//!
//! - **Python**: the Python OpenFlamingo under torch FSDP as its train.py
//!   sets it up (every rank builds the whole model from the released files,
//!   loads the resumed `checkpoint.pt`, wraps with FULL_SHARD);
//! - **whole**: our loading path before shard-only loading (every rank
//!   reads and materialises every weight, then keeps its shards under
//!   `full`);
//! - **shards**: every rank reads only the byte ranges of the shards it
//!   keeps, from the same model converted to safetensors
//!   (`flamingoctl model convert`).
//!
//! For each rank: its peak resident memory (`VmHWM` of `/proc/self/status`),
//! the bytes it read while loading (`rchar` of `/proc/self/io`), the seconds
//! from its process's start to the end of its first training step, and the
//! losses of its first steps. A side whose ranks do not fit in this
//! machine's memory is stopped (SIGKILL) when `MemAvailable` falls under
//! 1.5 GiB and reported as not fitting.
//!
//! `--forward 3b` then loads an OpenFlamingo-3B-shaped model (MPT-1B's
//! 24 × 2048 with cross-attention after every layer) at `--forward-world`
//! ranks by shards only and runs a forward pass of one batch: each rank's
//! peak RSS against the model's fp32 size, and the loss against the Python
//! model's loss on the same batch (`--forward-whole`: also our path reading
//! every weight, at the same ranks).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig};
use flamingo_common::train::{RecomputePolicy, Strategy};
use flamingo_engine::batch::TrainBatch;
use flamingo_engine::run::{peak_rss, read_bytes};
use flamingo_engine::trainer::Trainer;
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec, Weights};
use train_config::bench_config;

#[path = "../baseline.rs"]
mod baseline;
#[path = "../train_config.rs"]
mod train_config;

#[derive(Debug, Parser)]
#[command(
    about = "Start-up time, memory and reads per rank: shard-only loading against whole loading and the Python OpenFlamingo under torch FSDP"
)]
struct Args {
    /// Model shape of bench/model/reference.py (1b: CLIP ViT-L/14 + a
    /// 24 × 1536 MPT-shaped decoder, about 1.1B parameters).
    #[arg(long, default_value = "1b")]
    size: String,
    /// Rank counts to measure (0 alone: none, only --forward).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    worlds: Vec<usize>,
    /// Samples per rank per step (32 tokens and one image each).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Steps per rank; their losses are compared.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also load this shape (e.g. 3b) by shards only and run one forward.
    #[arg(long)]
    forward: Option<String>,
    /// Ranks for --forward.
    #[arg(long, default_value_t = 4)]
    forward_world: usize,
    /// `FLAMINGO_GLOO_GATHER_PIECE` for the --forward ranks: the next
    /// unit is prefetched only while it and the unit in use hold at most
    /// this many values whole (0: the engine's default, 32 Mi).
    #[arg(long, default_value_t = 1 << 24)]
    forward_gather_piece: u64,
    /// With --forward, also try our path reading every weight (it does not
    /// fit at 4 ranks in 24 GiB: its ranks are stopped when memory runs out).
    #[arg(long)]
    forward_whole: bool,
    /// Which sides to run at each world size.
    #[arg(long, value_delimiter = ',', default_value = "python,whole,shards")]
    sides: Vec<String>,
    /// Keep the model files in this folder and reuse them on the next run
    /// (one subfolder per size), instead of a temporary folder.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Internal: run one of our ranks on this model.toml.
    #[arg(long, hide = true)]
    rank_spec: Option<PathBuf>,
    /// Internal: read every weight whole (our path before shard-only loading).
    #[arg(long, hide = true)]
    whole: bool,
    /// Internal: a forward pass of one batch instead of training steps.
    #[arg(long, hide = true)]
    forward_only: bool,
}

/// One rank's measurements (the JSON line each rank prints last).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RankCost {
    rank: u64,
    /// The peak once the model is loaded and sharded, before the first step.
    load_peak_rss_bytes: u64,
    /// The peak over the whole run.
    peak_rss_bytes: u64,
    load_read_bytes: u64,
    first_step_seconds: f64,
    losses: Vec<f64>,
}

/// One side at one world size: every rank's cost, or why it was not run.
enum Side {
    Ran(Vec<RankCost>),
    /// Stopped when the machine's available memory fell under
    /// [`MEMORY_FLOOR`].
    DoesNotFit {
        available: u64,
    },
    /// Not asked for (`--sides`).
    Skipped,
}

impl Side {
    fn ranks(&self) -> Option<&[RankCost]> {
        match self {
            Side::Ran(ranks) => Some(ranks),
            Side::DoesNotFit { .. } | Side::Skipped => None,
        }
    }
    fn max(&self, value: impl Fn(&RankCost) -> f64) -> Option<f64> {
        self.ranks()
            .map(|ranks| ranks.iter().map(value).fold(0.0, f64::max))
    }
    fn losses(&self) -> Option<&[f64]> {
        self.ranks()
            .and_then(|ranks| ranks.first())
            .map(|rank| &rank.losses[..])
    }
}

fn proc_value(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .unwrap_or(0)
}

/// The memory the kernel says new processes can have, in bytes.
fn mem_available() -> u64 {
    proc_value("/proc/meminfo", "MemAvailable:") * 1024
}

/// Seconds since this process started (its start time in `/proc`, so the
/// loader and the libraries' start-up count).
fn process_age() -> f64 {
    let started = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            fields.get(19)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0);
    // SAFETY: sysconf reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    uptime - started / ticks
}

/// One of our ranks: load, shard under `full`, step (or one forward).
fn our_rank(spec_path: &Path, args: &Args) -> anyhow::Result<()> {
    let group = ProcessGroup::new(&ProcessGroupConfig::from_env(
        Backend::Gloo,
        Duration::from_secs(1800),
    )?)?;
    let before = read_bytes();
    let spec = ModelSpec::from_file(spec_path)?;
    let options = LoadOptions {
        lazy: !args.whole,
        ..LoadOptions::default()
    };
    let (model, tokenizer) = load_flamingo_with(&spec, options)?;
    let config = bench_config(Strategy::Full, true, false, RecomputePolicy::None);
    let mut trainer = Trainer::new(model, &tokenizer, Some(&group), config)?;
    let load_read_bytes = read_bytes() - before;
    let load_peak_rss_bytes = peak_rss();
    let dir = spec_path.parent().context("the spec's folder")?;
    let mut saved = Weights::read_safetensors(&dir.join("batch.safetensors"))?;
    let mut take = |key: &str| saved.remove(key).with_context(|| format!("batch.{key}"));
    let batch = TrainBatch {
        vision_x: take("vision_x")?,
        input_ids: take("input_ids")?,
        attention_mask: take("attention_mask")?,
        labels: take("labels")?,
        samples: args.batch,
    };
    let mut losses = Vec::new();
    let mut first_step_seconds = 0.0;
    if args.forward_only {
        losses.push(trainer.loss(&batch)?);
        first_step_seconds = process_age();
    } else {
        for step in 0..args.steps {
            let report = trainer
                .micro_step(Some(&batch), None)?
                .context("one micro-batch per step")?;
            losses.push(report.loss_laion.context("a LAION loss")?);
            if step == 0 {
                first_step_seconds = process_age();
            }
        }
    }
    let cost = RankCost {
        rank: group.rank() as u64,
        load_peak_rss_bytes,
        peak_rss_bytes: peak_rss(),
        load_read_bytes,
        first_step_seconds,
        losses,
    };
    println!("{}", serde_json::to_string(&cost)?);
    Ok(())
}

/// Starts `world` copies of `command` with torchrun's variables; returns
/// every rank's last stdout line, parsed. While they run, a watchdog kills
/// them all (SIGKILL) if the machine's available memory falls under
/// [`MEMORY_FLOOR`]: a side that does not fit is reported, not swapped or
/// left to the kernel's OOM killer.
fn run_ranks(world: usize, command: impl Fn() -> Command, what: &str) -> anyhow::Result<Side> {
    let port = flamingo_common::net::free_local_port()?;
    let children = flamingo_common::ranks::spawn_local_world(world as u32, port, |_| {
        let mut rank = command();
        rank.stdout(Stdio::piped()).stderr(Stdio::piped());
        rank
    })
    .with_context(|| format!("starting {what} ranks"))?;
    let pids: Vec<i32> = children.iter().map(|child| child.id() as i32).collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut lowest = u64::MAX;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let available = mem_available();
                lowest = lowest.min(available);
                if available < MEMORY_FLOOR {
                    for &pid in &pids {
                        // SAFETY: kill(2) on our own children, not yet reaped.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    return Some(lowest);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    };
    let outputs: Vec<_> = children
        .into_iter()
        .map(|child| child.wait_with_output())
        .collect::<Result<_, _>>()?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(available) = watchdog.join().expect("the watchdog") {
        return Ok(Side::DoesNotFit { available });
    }
    let mut ranks = Vec::new();
    for (rank, output) in outputs.into_iter().enumerate() {
        if !output.status.success() {
            bail!(
                "{what} rank {rank} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        ranks.push(
            serde_json::from_str::<RankCost>(line)
                .with_context(|| format!("{what} rank {rank} printed {line:?}"))?,
        );
    }
    Ok(Side::Ran(ranks))
}

/// The available memory under which the ranks are stopped.
const MEMORY_FLOOR: u64 = 3 << 29;

/// The model files of `size` in `dir` (built once), with a copy of the spec
/// that names safetensors conversions of the two pickles; returns the
/// build's JSON line (parameters, the Python loss of the batch).
fn model_files(dir: &Path, size: &str, batch: usize) -> anyhow::Result<serde_json::Value> {
    let built = dir.join("built.json");
    if let Ok(text) = std::fs::read_to_string(&built) {
        return Ok(serde_json::from_str(&text)?);
    }
    std::fs::create_dir_all(dir)?;
    eprintln!("building the {size} model in {} (Python)…", dir.display());
    let python = baseline::python(None);
    let script = script();
    let value = baseline::run(
        &python,
        &script,
        &[
            "build".as_ref(),
            dir.as_os_str(),
            size.as_ref(),
            batch.to_string().as_ref(),
        ],
        2,
    )?;
    let mut spec = std::fs::read_to_string(dir.join("model.toml"))?;
    for (pickle, converted) in [
        ("clip.bin", "clip.safetensors"),
        ("checkpoint.pt", "checkpoint.safetensors"),
    ] {
        eprintln!("converting {pickle} to {converted}…");
        let files = flamingo_model::convert::convert(
            &dir.join(pickle),
            Some(&dir.join(converted)),
            flamingo_model::convert::DEFAULT_MAX_SHARD_BYTES,
            |_, _| {},
        )?
        .files;
        // The file, or the index of its shards.
        let written = files.last().context("converted files")?;
        let name = written
            .file_name()
            .context("a file name")?
            .to_string_lossy();
        spec = spec.replace(pickle, &name);
    }
    std::fs::write(dir.join("model-st.toml"), spec)?;
    std::fs::write(&built, value.to_string())?;
    Ok(value)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("startup/reference.py")
}

/// Runs `world` ranks (see [`run_ranks`]), saying so first.
fn side(world: usize, command: impl Fn() -> Command, what: &str) -> anyhow::Result<Side> {
    eprintln!("{what}: {world} rank(s)…");
    run_ranks(world, command, what)
}

fn gib(bytes: f64) -> f64 {
    bytes / f64::from(1u32 << 30)
}

fn max_relative_difference(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
        .fold(0.0, f64::max)
}

fn print_side(world: usize, name: &str, side: &Side) {
    match side {
        Side::Ran(ranks) => {
            let max = |value: fn(&RankCost) -> f64| ranks.iter().map(value).fold(0.0, f64::max);
            let losses = ranks[0]
                .losses
                .iter()
                .map(|loss| format!("{loss:.6}"))
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "{world:>5} {name:<8} {:>13.2} {:>13.2} {:>13.2} {:>14.1}  {losses}",
                gib(max(|r| r.load_peak_rss_bytes as f64)),
                gib(max(|r| r.peak_rss_bytes as f64)),
                gib(max(|r| r.load_read_bytes as f64)),
                max(|r| r.first_step_seconds),
            );
        }
        Side::DoesNotFit { available } => println!(
            "{world:>5} {name:<8} does not fit: stopped with {:.2} GiB of memory left",
            gib(*available as f64)
        ),
        Side::Skipped => {}
    }
}

fn training(args: &Args, root: &Path) -> anyhow::Result<()> {
    let dir = root.join(format!("{}-batch{}", args.size, args.batch));
    let built = model_files(&dir, &args.size, args.batch)?;
    let parameters = built["parameters"].as_u64().unwrap_or(0);
    let weights = 4.0 * parameters as f64;
    println!(
        "{}: {parameters} parameters, {:.2} GiB in fp32; batch {} of 32 tokens + 1 image per rank, {} thread(s) per rank, {} steps",
        args.size,
        gib(weights),
        args.batch,
        args.threads,
        args.steps
    );
    println!("Python = OpenFlamingo 2.0.1 under torch FSDP (FULL_SHARD, gloo), as train.py; whole = our path reading every weight; shards = ours reading only each rank's shards");
    println!("per rank (the largest over ranks): peak RSS (VmHWM) once loaded and sharded and over the whole run, bytes read while loading, seconds from process start to the end of the first step\n");
    println!(
        "{:>5} {:<8} {:>13} {:>13} {:>13} {:>14}  losses (rank 0)",
        "ranks", "path", "load RSS GiB", "peak RSS GiB", "read GiB", "first step s"
    );
    let threads = args.threads.to_string();
    let python = baseline::python(None);
    let python_rank = || {
        let mut command = Command::new(&python);
        command
            .arg(script())
            .args(["rank".as_ref(), dir.as_os_str()])
            .args([&args.size, &threads, &args.steps.to_string()])
            .env("OMP_NUM_THREADS", &threads);
        command
    };
    let our_rank = |spec: &str, whole: bool| {
        let mut command = Command::new(std::env::current_exe().expect("this program"));
        command
            .args(["--threads", &threads, "--steps", &args.steps.to_string()])
            .args(["--batch", &args.batch.to_string()])
            .arg("--rank-spec")
            .arg(dir.join(spec))
            .args(whole.then_some("--whole"))
            .env("OMP_NUM_THREADS", &threads);
        command
    };
    let mut summary = Vec::new();
    for &world in args.worlds.iter().filter(|&&world| world > 0) {
        let run = |name: &str, command: &dyn Fn() -> Command| {
            if args.sides.iter().any(|side| side == name) {
                side(world, command, name)
            } else {
                Ok(Side::Skipped)
            }
        };
        let sides = [
            run("python", &python_rank)?,
            run("whole", &|| our_rank("model.toml", true))?,
            run("shards", &|| our_rank("model-st.toml", false))?,
        ];
        for (name, side) in ["Python", "whole", "shards"].iter().zip(&sides) {
            print_side(world, name, side);
        }
        summary.push((world, sides));
    }
    println!("\nratios: shards against whole (peak RSS, losses) and the weights (read), Python against shards (first step)");
    println!(
        "{:>5} {:>16} {:>19} {:>18} {:>20} {:>18}",
        "ranks",
        "RSS shards/whole",
        "read shards/weights",
        "loss rel diff max",
        "first step Py/shards",
        "loss Py/shards max"
    );
    for (world, [python, whole, shards]) in &summary {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.3}", a / b),
            _ => "-".to_string(),
        };
        let rss = |side: &Side| side.max(|r| r.peak_rss_bytes as f64);
        let first = |side: &Side| side.max(|r| r.first_step_seconds);
        let loss_difference = |a: &Side, b: &Side| match (a.losses(), b.losses()) {
            (Some(a), Some(b)) => format!("{:.2e}", max_relative_difference(a, b)),
            _ => "-".to_string(),
        };
        println!(
            "{world:>5} {:>16} {:>19} {:>18} {:>20} {:>18}",
            ratio(rss(shards), rss(whole)),
            ratio(shards.max(|r| r.load_read_bytes as f64), Some(weights)),
            loss_difference(shards, whole),
            ratio(first(python), first(shards)),
            loss_difference(python, shards),
        );
    }
    Ok(())
}

fn forward(args: &Args, size: &str, root: &Path) -> anyhow::Result<()> {
    let dir = root.join(format!("{size}-batch{}", args.batch));
    let built = model_files(&dir, size, args.batch)?;
    let parameters = built["parameters"].as_u64().unwrap_or(0);
    let fp32 = 4.0 * parameters as f64;
    let python_loss = built["loss"].as_f64().unwrap_or(f64::NAN);
    let threads = args.threads.to_string();
    let forward_rank = |spec: &str, whole: bool| {
        let mut command = Command::new(std::env::current_exe().expect("this program"));
        command
            .args(["--threads", &threads, "--batch", &args.batch.to_string()])
            .arg("--forward-only")
            .arg("--rank-spec")
            .arg(dir.join(spec))
            .args(whole.then_some("--whole"))
            .env("OMP_NUM_THREADS", &threads);
        if args.forward_gather_piece > 0 {
            command.env(
                "FLAMINGO_GLOO_GATHER_PIECE",
                args.forward_gather_piece.to_string(),
            );
        }
        command
    };
    let shards = side(
        args.forward_world,
        || forward_rank("model-st.toml", false),
        "shards forward",
    )?;
    println!(
        "\n{size}: {parameters} parameters, {:.2} GiB in fp32; {} ranks, one forward of a batch of {}, the loss against the Python model's; \
         the next unit prefetched while the two hold at most {} values (--forward-gather-piece)",
        gib(fp32),
        args.forward_world,
        args.batch,
        match args.forward_gather_piece {
            0 => "32 Mi (the default)".to_string(),
            piece => piece.to_string(),
        }
    );
    println!(
        "{:>5} {:<8} {:>13} {:>13} {:>10} {:>13} {:>12} {:>12} {:>10}",
        "rank",
        "path",
        "load RSS GiB",
        "peak RSS GiB",
        "RSS/fp32",
        "read GiB",
        "loss",
        "Python loss",
        "rel diff"
    );
    let print = |name: &str, side: &Side| match side {
        Side::Ran(ranks) => {
            for rank in ranks {
                let loss = rank.losses.first().copied().unwrap_or(f64::NAN);
                println!(
                    "{:>5} {name:<8} {:>13.2} {:>13.2} {:>10.3} {:>13.2} {:>12.6} {:>12.6} {:>10.2e}",
                    rank.rank,
                    gib(rank.load_peak_rss_bytes as f64),
                    gib(rank.peak_rss_bytes as f64),
                    rank.peak_rss_bytes as f64 / fp32,
                    gib(rank.load_read_bytes as f64),
                    loss,
                    python_loss,
                    (loss - python_loss).abs() / python_loss.abs()
                );
            }
        }
        Side::DoesNotFit { available } => println!(
            "{:>5} {name:<8} does not fit: stopped with {:.2} GiB of memory left",
            "all",
            gib(*available as f64)
        ),
        Side::Skipped => {}
    };
    print("shards", &shards);
    if args.forward_whole {
        let whole = side(
            args.forward_world,
            || forward_rank("model.toml", true),
            "whole forward",
        )?;
        print("whole", &whole);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads as i32);
    if let Some(spec) = &args.rank_spec {
        return our_rank(spec, &args);
    }
    let temporary = tempfile::tempdir()?;
    let root = args.keep.clone().unwrap_or_else(|| temporary.path().into());
    if args.worlds.iter().any(|&world| world > 0) {
        training(&args, &root)?;
    }
    if let Some(size) = &args.forward {
        forward(&args, size, &root)?;
    }
    Ok(())
}
