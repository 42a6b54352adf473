//! bench-train-step: samples/s of flamingo's training step against the
//! Python OpenFlamingo step on the same random weights and batch, same
//! threads, one run. With `--world 1` (the default) one process each, no
//! FSDP. With `--world N` N rank processes each: Python under torch FSDP
//! over gloo as OpenFlamingo's train.py sets it up (full sharding, frozen
//! embeddings), ours under `full` with the same; each with gradient
//! checkpointing and without, and ours without against ours with.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig};
use flamingo_common::train::{RecomputePolicy, Strategy};
use flamingo_engine::batch::TrainBatch;
use flamingo_engine::trainer::Trainer;
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec, Weights};
use train_config::bench_config;

#[path = "../train_config.rs"]
mod train_config;

#[derive(Debug, Parser)]
#[command(about = "Training step throughput against the Python OpenFlamingo step")]
struct Args {
    /// tiny, 100m (MPT), neox (a mid-size GPT-NeoX-family decoder at 224 px,
    /// stepped on a LAION and an MMC4 batch).
    #[arg(long, value_delimiter = ',', default_value = "tiny,100m")]
    sizes: Vec<String>,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Recompute activations in backward on both sides (ours: the unit pass;
    /// Python: torch's non-reentrant checkpoint wrapper on the modules
    /// OpenFlamingo's train.py wraps).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With --world: also run ours with `--recompute_policy selective`
    /// (no Python counterpart), and report each of our settings' peak
    /// memory per rank.
    #[arg(long)]
    selective: bool,
    /// With --world: also run ours under amp_bf16 (keeping graphs), once
    /// with autocast casting the trainable Linear weights at every use and
    /// once with their bf16 copies made once per step, and compare.
    #[arg(long)]
    amp: bool,
    /// Internal: a rank's amp_bf16 setting (`per_use` or `copies`).
    #[arg(long, hide = true)]
    amp_mode: Option<String>,
    /// Our strategy (one process): no_shard, shard_grad_op or full.
    #[arg(long, default_value = "no_shard")]
    strategy: Strategy,
    /// Ranks per side; above 1 both sides shard (see the module docs).
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Also print where our step's time goes (rank 0's seconds per step in
    /// each phase: vision, perceiver, layers forward, head, recompute and
    /// backward, optimizer), with checkpointing and without.
    #[arg(long)]
    phases: bool,
    /// Internal: run one of our ranks on the files in this folder.
    #[arg(long, hide = true)]
    rank_dir: Option<PathBuf>,
}

fn python() -> PathBuf {
    std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Our step on the files in `dir`; with a group, one rank of `world`
/// (under `full` with frozen embeddings). Returns the global samples/s and
/// (with `--phases`) the seconds per step of each phase.
fn ours(
    dir: &Path,
    args: &Args,
    group: Option<&ProcessGroup>,
) -> anyhow::Result<(f64, Vec<(&'static str, f64)>)> {
    let (batch, steps) = (args.batch, args.steps);
    let spec = ModelSpec::from_file(&dir.join("model.toml"))?;
    let sharded = group.is_some();
    // As `flamingoctl train` loads under full: safetensors read by range.
    let options = LoadOptions {
        lazy: sharded,
        ..LoadOptions::default()
    };
    let (model, tokenizer) = load_flamingo_with(&spec, options)?;
    let config = bench_config(
        if sharded {
            Strategy::Full
        } else {
            args.strategy
        },
        sharded,
        false,
        if args.selective && args.rank_dir.is_some() {
            RecomputePolicy::Selective
        } else if args.gradient_checkpointing {
            RecomputePolicy::Full
        } else {
            RecomputePolicy::None
        },
    );
    let config = match args.amp_mode.as_deref() {
        None => config,
        Some(mode) => flamingo_engine::trainer::TrainConfig {
            amp_bf16: true,
            bf16_weight_copies: mode == "copies",
            ..config
        },
    };
    let mut trainer = Trainer::new(model, &tokenizer, group, config)?;
    let mut saved = Weights::read_safetensors(&dir.join("batch.safetensors"))?;
    let mut take = |key: &str| saved.remove(key).with_context(|| format!("batch.{key}"));
    let laion = TrainBatch {
        vision_x: take("vision_x")?,
        input_ids: take("input_ids")?,
        attention_mask: take("attention_mask")?,
        labels: take("labels")?,
        samples: batch,
    };
    // Sizes stepped on an MMC4 batch too (see fsdp_reference.py).
    let mmc4 = match take("mmc4.input_ids") {
        Ok(input_ids) => Some(TrainBatch {
            samples: input_ids.size()[0] as usize,
            input_ids,
            vision_x: take("mmc4.vision_x")?,
            attention_mask: take("mmc4.attention_mask")?,
            labels: take("mmc4.labels")?,
        }),
        Err(_) => None,
    };
    let samples = batch + mmc4.as_ref().map_or(0, |mmc4| mmc4.samples);
    trainer.micro_step(Some(&laion), mmc4.as_ref())?; // warm-up
    if let Some(group) = group {
        group.barrier()?;
    }
    trainer.time_phases(args.phases);
    let started = Instant::now();
    for _ in 0..steps {
        trainer.micro_step(Some(&laion), mmc4.as_ref())?;
    }
    if let Some(group) = group {
        group.barrier()?;
    }
    let world = group.map_or(1, ProcessGroup::world_size) as usize;
    let phases = trainer
        .phase_times()
        .into_iter()
        .map(|(phase, seconds)| (phase, seconds / steps as f64))
        .collect();
    Ok((
        (samples * world * steps) as f64 / started.elapsed().as_secs_f64(),
        phases,
    ))
}

/// Starts `world` copies of `command` with torchrun's variables; returns
/// rank 0's last stdout line.
fn run_ranks(world: usize, command: impl Fn() -> Command, what: &str) -> anyhow::Result<String> {
    let port = flamingo_common::net::free_local_port()?;
    let children = flamingo_common::ranks::spawn_local_world(world as u32, port, |_| {
        let mut rank = command();
        rank.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        rank
    })
    .with_context(|| format!("starting {what} ranks"))?;
    let mut first = String::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "{what} rank {rank} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        if rank == 0 {
            first = String::from_utf8_lossy(&output.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string();
        }
    }
    Ok(first)
}

/// This process's peak resident memory (`VmHWM`), MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Runs our ranks on `dir`: rank 0's JSON line.
fn our_ranks(
    args: &Args,
    dir: &Path,
    (checkpointing, selective): (bool, bool),
    amp_mode: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let line = run_ranks(
        args.world,
        || {
            let mut command = Command::new(std::env::current_exe().expect("this program"));
            command
                .args(["--threads", &args.threads.to_string()])
                .args(["--batch", &args.batch.to_string()])
                .args(["--steps", &args.steps.to_string()])
                .args(args.phases.then_some("--phases"))
                .args(checkpointing.then_some("--gradient-checkpointing"))
                .args(selective.then_some("--selective"))
                .args(amp_mode.map(|mode| format!("--amp-mode={mode}")))
                .arg("--rank-dir")
                .arg(dir)
                .env("OMP_NUM_THREADS", args.threads.to_string());
            command
        },
        "bench-train-step",
    )?;
    Ok(serde_json::from_str(&line)?)
}

/// `--world N`: both sides at N ranks under full sharding, each with
/// gradient checkpointing and without, in one run.
fn sharded(args: &Args, script_dir: &Path) -> anyhow::Result<()> {
    println!("Python = OpenFlamingo 2.0.1 under torch FSDP (FULL_SHARD, gloo), frozen embeddings; ours: full, frozen embeddings");
    println!("ckpt = gradient checkpointing (both sides); ratio = ours / Python; keep/ckpt = ours without checkpointing / ours with\n");
    println!(
        "{:<6} {:>12} {:>11} {:>11} {:>7} {:>11} {:>11} {:>7} {:>10}",
        "size",
        "parameters",
        "py ckpt",
        "ours ckpt",
        "ratio",
        "py keep",
        "ours keep",
        "ratio",
        "keep/ckpt"
    );
    for size in &args.sizes {
        let dir = tempfile::tempdir()?;
        let mut rates = Vec::new();
        let mut phase_times = Vec::new();
        let mut parameters = serde_json::Value::Null;
        let mut peaks = Vec::new();
        for checkpointing in [true, false] {
            let line = run_ranks(
                args.world,
                || {
                    let mut command = Command::new(python());
                    command
                        .arg(script_dir.join("fsdp_reference.py"))
                        .arg(dir.path())
                        .arg(size)
                        .arg(args.threads.to_string())
                        .arg(args.batch.to_string())
                        .arg(args.steps.to_string())
                        .arg(if checkpointing { "checkpoint" } else { "plain" })
                        .env("OMP_NUM_THREADS", args.threads.to_string());
                    command
                },
                "fsdp_reference.py",
            )?;
            let value: serde_json::Value = serde_json::from_str(&line)?;
            parameters = value["parameters"].clone();
            let python_rate = value["samples_per_second"].as_f64().unwrap_or(0.0);
            let value = our_ranks(args, dir.path(), (checkpointing, false), None)?;
            let our_rate = value["samples_per_second"].as_f64().unwrap_or(0.0);
            rates.push((python_rate, our_rate));
            phase_times.push(value["phases"].clone());
            peaks.push(value["peak_rss_mib"].as_f64().unwrap_or(0.0));
        }
        let [(py_ckpt, ours_ckpt), (py_keep, ours_keep)] = rates[..] else {
            bail!("two settings measured");
        };
        println!(
            "{:<6} {:>12} {:>11.2} {:>11.2} {:>7.3} {:>11.2} {:>11.2} {:>7.3} {:>10.3}",
            size,
            parameters,
            py_ckpt,
            ours_ckpt,
            ours_ckpt / py_ckpt,
            py_keep,
            ours_keep,
            ours_keep / py_keep,
            ours_keep / ours_ckpt
        );
        if args.selective {
            let value = our_ranks(args, dir.path(), (false, true), None)?;
            let rate = value["samples_per_second"].as_f64().unwrap_or(0.0);
            let peak = value["peak_rss_mib"].as_f64().unwrap_or(0.0);
            println!(
                "  ours selective {rate:.2} samples/s: {:.3}x ours ckpt, {:.3}x ours keep, {:.3}x py ckpt",
                rate / ours_ckpt,
                rate / ours_keep,
                rate / py_ckpt
            );
            println!(
                "  our rank 0's peak RSS (VmHWM, MiB): ckpt {:.0}, keep {:.0}, selective {peak:.0}",
                peaks[0], peaks[1]
            );
        }
        if args.amp {
            let mut measured = Vec::new();
            for mode in ["per_use", "copies"] {
                let value = our_ranks(args, dir.path(), (false, false), Some(mode))?;
                measured.push((
                    value["samples_per_second"].as_f64().unwrap_or(0.0),
                    value["peak_rss_mib"].as_f64().unwrap_or(0.0),
                ));
            }
            let [(per_use, per_use_peak), (copies, copies_peak)] = measured[..] else {
                bail!("two amp settings measured");
            };
            println!(
                "  ours amp_bf16 (keep): weights cast per use {per_use:.2} samples/s, bf16 copies {copies:.2}: {:.3}x; rank 0's peak RSS {per_use_peak:.0} / {copies_peak:.0} MiB",
                copies / per_use
            );
        }
        if args.phases {
            print_phases(&phase_times);
        }
    }
    Ok(())
}

/// Rank 0's seconds per step in each phase, with checkpointing and without.
fn print_phases(phase_times: &[serde_json::Value]) {
    let (Some(ckpt), Some(keep)) = (
        phase_times.first().and_then(|v| v.as_object()),
        phase_times.get(1).and_then(|v| v.as_object()),
    ) else {
        return;
    };
    println!(
        "  {:<36} {:>9} {:>9}",
        "our phase (s/step, rank 0)", "ckpt", "keep"
    );
    let mut names: Vec<&String> = ckpt.keys().collect();
    names.extend(keep.keys().filter(|name| !ckpt.contains_key(*name)));
    for name in names {
        let seconds = |phases: &serde_json::Map<String, serde_json::Value>| {
            phases
                .get(name)
                .and_then(|v| v.as_f64())
                .map_or("-".to_string(), |s| format!("{s:.3}"))
        };
        println!("  {:<36} {:>9} {:>9}", name, seconds(ckpt), seconds(keep));
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads as i32);
    if let Some(dir) = &args.rank_dir {
        let group = ProcessGroup::new(&ProcessGroupConfig::from_env(
            Backend::Gloo,
            std::time::Duration::from_secs(600),
        )?)?;
        let (rate, phases) = ours(dir, &args, Some(&group))?;
        if group.rank() == 0 {
            let phases: serde_json::Map<String, serde_json::Value> = phases
                .into_iter()
                .map(|(phase, seconds)| (phase.to_string(), seconds.into()))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "samples_per_second": rate,
                    "phases": phases,
                    "peak_rss_mib": peak_rss_mib(),
                })
            );
        }
        return Ok(());
    }
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("train_step");
    println!("Training step (forward, backward, clip, AdamW): samples/s, batch {} of 32 tokens + 1 image per rank, {} thread(s) per rank, {} rank(s)", args.batch, args.threads, args.world);
    if args.sizes.iter().any(|size| size == "neox") {
        println!("neox (GPT-NeoX family, 224 px): also an MMC4 batch of {} per rank, 3 images in 128 tokens, its own forward and backward", (args.batch / 2).max(1));
    }
    if args.world > 1 {
        return sharded(&args, &script_dir);
    }
    println!("Python = OpenFlamingo 2.0.1 in one process, no FSDP; ratio = ours / Python (>1: ours faster)");
    println!(
        "ours: {:?}; gradient checkpointing: {}\n",
        args.strategy,
        if args.gradient_checkpointing {
            "on (both)"
        } else {
            "off (both)"
        }
    );
    println!(
        "{:<6} {:>12} {:>12} {:>12} {:>8}",
        "size", "parameters", "python", "ours", "ratio"
    );
    for size in &args.sizes {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(python());
        command
            .arg(script_dir.join("reference.py"))
            .arg(dir.path())
            .arg(size)
            .arg(args.threads.to_string())
            .arg(args.batch.to_string())
            .arg(args.steps.to_string())
            .env("OMP_NUM_THREADS", args.threads.to_string())
            .arg(if args.gradient_checkpointing {
                "checkpoint"
            } else {
                "plain"
            });
        let output = command.output().context("running the Python reference")?;
        if !output.status.success() {
            bail!(
                "reference.py {size} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let line = String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        let value: serde_json::Value = serde_json::from_str(&line)?;
        let python_rate = value["samples_per_second"].as_f64().unwrap_or(0.0);
        let (our_rate, _) = ours(dir.path(), &args, None)?;
        println!(
            "{:<6} {:>12} {:>12.2} {:>12.2} {:>8.3}",
            size,
            value["parameters"],
            python_rate,
            our_rate,
            our_rate / python_rate
        );
    }
    Ok(())
}
