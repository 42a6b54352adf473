//! bench-train-step: samples/s of flamingo's training step against the
//! Python OpenFlamingo step on the same random weights and batch, same
//! threads, one process each (no FSDP on either side), one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use flamingo_engine::batch::TrainBatch;
use flamingo_engine::schedule::{Kind, Schedule};
use flamingo_engine::trainer::{AdamWConfigSerde, Strategy, TrainConfig, Trainer};
use flamingo_model::{load_flamingo, ModelSpec, Weights};

#[derive(Debug, Parser)]
#[command(about = "Training step throughput against the Python OpenFlamingo step")]
struct Args {
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
    /// Our strategy (one process): no_shard, shard_grad_op or full.
    #[arg(long, default_value = "no_shard")]
    strategy: Strategy,
}

fn python() -> PathBuf {
    std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn ours(dir: &Path, args: &Args) -> anyhow::Result<f64> {
    let (batch, steps) = (args.batch, args.steps);
    let spec = ModelSpec::from_file(&dir.join("model.toml"))?;
    let (model, tokenizer) = load_flamingo(&spec)?;
    let config = TrainConfig {
        strategy: args.strategy,
        schedule: Schedule {
            kind: Kind::Constant,
            base_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1000,
        },
        weight_decay: 0.1,
        adamw: AdamWConfigSerde::default(),
        max_grad_norm: 1.0,
        loss_multiplier_laion: 1.0,
        loss_multiplier_mmc4: 1.0,
        gradient_accumulation_steps: 1,
        freeze_lm_embeddings: false,
        amp_bf16: false,
        gradient_checkpointing: args.gradient_checkpointing,
    };
    let mut trainer = Trainer::new(model, &tokenizer, None, config)?;
    let mut saved = Weights::read_safetensors(&dir.join("batch.safetensors"))?;
    let mut take = |key: &str| saved.remove(key).with_context(|| format!("batch.{key}"));
    let train_batch = TrainBatch {
        vision_x: take("vision_x")?,
        input_ids: take("input_ids")?,
        attention_mask: take("attention_mask")?,
        labels: take("labels")?,
        samples: batch,
    };
    trainer.micro_step(Some(&train_batch), None)?; // warm-up
    let started = Instant::now();
    for _ in 0..steps {
        trainer.micro_step(Some(&train_batch), None)?;
    }
    Ok((batch * steps) as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads as i32);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("train_step/reference.py");
    println!("Training step (forward, backward, clip, AdamW): samples/s, batch {} of 32 tokens + 1 image, {} thread(s)", args.batch, args.threads);
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
        let output = Command::new(python())
            .arg(&script)
            .arg(dir.path())
            .arg(size)
            .arg(args.threads.to_string())
            .arg(args.batch.to_string())
            .arg(args.steps.to_string())
            .arg(if args.gradient_checkpointing {
                "checkpoint"
            } else {
                "plain"
            })
            .env("OMP_NUM_THREADS", args.threads.to_string())
            .output()
            .context("running the Python reference")?;
        if !output.status.success() {
            bail!(
                "reference.py {size} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
        let python_rate = value["samples_per_second"].as_f64().unwrap_or(0.0);
        let our_rate = ours(dir.path(), &args)?;
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
