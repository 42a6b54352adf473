//! bench-gpu-step: the training step on one GPU.
//!
//! `check`: the CUDA path of the engine against the CPU on a tiny random
//! model and one random batch: the same few steps in fp32 on the CPU, in
//! fp32 on the GPU (plain autograd, and `full` keeping its graphs and with
//! selective recompute), and in bf16 autocast with bf16 frozen weights
//! (checkpointing, selective recompute, `full` keeping graphs; the
//! trainable Linear weights as bf16 copies, and once cast per use as
//! before), and with `--cuda_graphs` (fp32 and bf16). Exits non-zero when
//! the GPU strays from the CPU.
//!
//! `mfu`: throughput and model FLOPs utilisation (`--shape 9b`: the
//! OpenFlamingo-9B shape, an MPT-7B-shaped LM) of an OpenFlamingo-3B
//! shaped random model (CLIP ViT-L/14 at 224 px, MPT-1B: 24 × 2048, 16
//! heads, a 50,280-token vocabulary, cross-attention before every layer)
//! in `amp_bf16` with bf16 frozen weights, gradient checkpointing on (or
//! the recompute policies given), the
//! `<image>`/`<|endofchunk|>` embedding rows training. Model FLOPs are
//! counted by `flamingo_engine::flops` (as PyTorch's `FlopCounterMode`
//! counts them); recomputation is not counted, as MFU conventionally does
//! not.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use flamingo_common::train::{RecomputePolicy, Strategy};
use flamingo_engine::batch::TrainBatch;
use flamingo_engine::flops::FlopModel;
use flamingo_engine::tiny::{write_tiny_model, TinyConfig};
use flamingo_engine::trainer::{TrainConfig, Trainer};
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec};
use flamingo_preprocess::FlamingoTokenizer;
use serde_json::json;
use tch::{Device, Kind, Tensor};

#[path = "../train_config.rs"]
mod train_config;

#[derive(Debug, Parser)]
#[command(about = "The training step on one GPU: CUDA correctness, and MFU of a 3B-shaped model")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
    /// The device under test (`cpu` only to try the command here).
    #[arg(long, global = true, default_value = "cuda", value_parser = flamingo_model::device::parse_device)]
    device: Device,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// The GPU step against the CPU step on a tiny model.
    Check {
        #[arg(long, default_value_t = 4)]
        steps: usize,
    },
    /// Samples/s and MFU of the 3B-shaped (or 9B-shaped) model.
    Mfu {
        /// Samples per step (several: one measurement each, one model load).
        #[arg(long, value_delimiter = ',', default_value = "8")]
        batch: Vec<i64>,
        /// Tokens per sample.
        #[arg(long, default_value_t = 256)]
        tokens: i64,
        /// Images per sample.
        #[arg(long, default_value_t = 4)]
        images: i64,
        /// Optimizer steps timed (two micro-steps each).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Dense bf16 peak of the GPU in TFLOP/s (H100/H200 SXM: 989).
        #[arg(long, default_value_t = 989.4)]
        peak_tflops: f64,
        /// The model's shape: 3b (OpenFlamingo-3B: CLIP ViT-L/14 and an
        /// MPT-1B-shaped LM) or 9b (the same tower and an MPT-7B-shaped LM,
        /// cross-attention every 4th layer).
        #[arg(long, default_value = "3b")]
        shape: String,
        /// Layers of the vision tower, and of the 3b LM (24 for the real
        /// shapes; the 9b LM has 4/3 as many; fewer for a quick try).
        #[arg(long, default_value_t = 24)]
        layers: i64,
        /// Gradient checkpointing: on, off, or both (one load each).
        #[arg(long, value_delimiter = ',', default_value = "true")]
        checkpointing: Vec<bool>,
        /// Recompute policies to measure instead (none, selective, full;
        /// one load each); overrides --checkpointing when given.
        #[arg(long, value_delimiter = ',', value_parser = parse_policy)]
        recompute_policy: Vec<RecomputePolicy>,
        /// bf16 copies of the trainable Linear weights made once per step
        /// (true), autocast's cast at every use (false), or both (one load
        /// each).
        #[arg(long, value_delimiter = ',', default_value = "true")]
        bf16_weight_copies: Vec<bool>,
        /// Run the step through CUDA graphs (`--cuda_graphs`; recompute
        /// policy none only).
        #[arg(long)]
        cuda_graphs: bool,
        /// Where to write the random model (a temporary folder if not given).
        #[arg(long)]
        work: Option<std::path::PathBuf>,
    },
}

/// The random model's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    vision_width: i64,
    vision_layers: i64,
    image: i64,
    patch: i64,
    lm_width: i64,
    lm_heads: i64,
    lm_layers: i64,
    cross_attn_every: i64,
}

fn train_config(strategy: Strategy, amp_bf16: bool, recompute: RecomputePolicy) -> TrainConfig {
    train_config::bench_config(strategy, false, amp_bf16, recompute)
}

fn parse_policy(text: &str) -> Result<RecomputePolicy, String> {
    serde_json::from_value(serde_json::Value::from(text))
        .map_err(|_| format!("'{text}': use {}", RecomputePolicy::NAMES))
}

/// A random interleaved batch: `images` `<image>` tokens per sample, the
/// later ones after an `<|endofchunk|>`, labels masking `<image>`.
fn random_batch(
    tokenizer: &FlamingoTokenizer,
    words: i64,
    batch: i64,
    tokens: i64,
    images: i64,
    image_size: i64,
    seed: i64,
) -> TrainBatch {
    tch::manual_seed(seed);
    let ids = Tensor::randint_low(2, words, [batch, tokens], (Kind::Int64, Device::Cpu));
    let media = i64::from(tokenizer.media_token_id());
    let end_of_chunk = i64::from(tokenizer.end_of_chunk_token_id());
    let stride = tokens / images.max(1);
    for image in 0..images {
        let _ = ids.narrow(1, image * stride, 1).fill_(media);
        if image > 0 {
            let _ = ids.narrow(1, image * stride - 1, 1).fill_(end_of_chunk);
        }
    }
    let labels = ids.masked_fill(&ids.eq(media), -100);
    TrainBatch {
        vision_x: Tensor::randn(
            [batch, images, 1, 3, image_size, image_size],
            (Kind::Float, Device::Cpu),
        ),
        attention_mask: ids.ones_like(),
        input_ids: ids,
        labels,
        samples: batch as usize,
    }
}

/// Losses of `steps` steps and the final trainable values.
fn train(
    spec: &ModelSpec,
    options: LoadOptions,
    config: TrainConfig,
    batch: &TrainBatch,
    steps: usize,
) -> anyhow::Result<(Vec<f64>, Tensor)> {
    let (model, tokenizer) = load_flamingo_with(spec, options)?;
    let mut trainer = Trainer::new(model, &tokenizer, None, config)?;
    let batch = batch.to_device(options.device, options.kind);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let report = trainer
            .micro_step(None, Some(&batch))?
            .context("a report every step")?;
        losses.push(report.loss_mmc4.context("an MMC4 loss")?);
    }
    Ok((losses, trainer.flat_parameters()?.to_device(Device::Cpu)))
}

fn check(device: Device, steps: usize) -> anyhow::Result<()> {
    prepare(device)?;
    let dir = tempfile::tempdir()?;
    flamingo_data::synthetic::write_tokenizer(&dir.path().join("tokenizer"))?;
    let words = flamingo_data::synthetic::vocabulary().len() as i64 + 2;
    let spec_path = write_tiny_model(
        &dir.path().join("model"),
        &dir.path().join("tokenizer"),
        words,
        TinyConfig::default(),
    )?;
    let spec = ModelSpec::from_file(&spec_path)?;
    let (_, tokenizer) = load_flamingo_with(&spec, LoadOptions::default())?;
    let batch = random_batch(&tokenizer, words, 4, 24, 2, 32, 7);
    let cpu = LoadOptions::default();
    prepare(device)?;
    let gpu = LoadOptions {
        device,
        ..LoadOptions::default()
    };
    // bf16 frozen weights need CUDA autocast (it runs layer norms in fp32;
    // the CPU's autocast leaves them mixed, which the CPU kernel refuses).
    let gpu_bf16 = LoadOptions {
        device,
        kind: if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        },
        ..LoadOptions::default()
    };
    let (reference, reference_weights) = train(
        &spec,
        cpu,
        train_config(Strategy::NoShard, false, RecomputePolicy::None),
        &batch,
        steps,
    )?;
    println!("cpu fp32 no_shard losses: {reference:?}");
    let mut failed = false;
    for (name, options, config, loss_tolerance, weight_tolerance) in [
        (
            "cuda fp32 no_shard",
            gpu,
            train_config(Strategy::NoShard, false, RecomputePolicy::None),
            2e-3,
            2e-3,
        ),
        (
            "cuda fp32 full (world 1, graphs kept)",
            gpu,
            train_config(Strategy::Full, false, RecomputePolicy::None),
            2e-3,
            2e-3,
        ),
        (
            "cuda fp32 full (world 1, selective recompute)",
            gpu,
            train_config(Strategy::Full, false, RecomputePolicy::Selective),
            2e-3,
            2e-3,
        ),
        (
            "cuda amp_bf16, bf16 frozen, checkpointing",
            gpu_bf16,
            train_config(Strategy::NoShard, true, RecomputePolicy::Full),
            5e-2,
            f64::INFINITY,
        ),
        (
            "cuda amp_bf16, bf16 frozen, selective recompute",
            gpu_bf16,
            train_config(Strategy::NoShard, true, RecomputePolicy::Selective),
            5e-2,
            f64::INFINITY,
        ),
        (
            "cuda amp_bf16, bf16 frozen, full (world 1, graphs kept)",
            gpu_bf16,
            train_config(Strategy::Full, true, RecomputePolicy::None),
            5e-2,
            f64::INFINITY,
        ),
        (
            "cuda amp_bf16, bf16 frozen, CUDA graphs (no_shard, from the third step replayed)",
            gpu_bf16,
            TrainConfig {
                cuda_graphs: true,
                ..train_config(Strategy::NoShard, true, RecomputePolicy::None)
            },
            5e-2,
            f64::INFINITY,
        ),
        (
            "cuda fp32 no_shard, CUDA graphs",
            gpu,
            TrainConfig {
                cuda_graphs: true,
                ..train_config(Strategy::NoShard, false, RecomputePolicy::None)
            },
            2e-3,
            2e-3,
        ),
        (
            "cuda amp_bf16, bf16 frozen, checkpointing, weights cast per use",
            gpu_bf16,
            TrainConfig {
                bf16_weight_copies: false,
                ..train_config(Strategy::NoShard, true, RecomputePolicy::Full)
            },
            5e-2,
            f64::INFINITY,
        ),
    ] {
        if config.cuda_graphs && !device.is_cuda() {
            println!("SKIP {name}: CUDA graphs need a GPU");
            continue;
        }
        let (losses, weights) = match train(&spec, options, config, &batch, steps) {
            Ok(result) => result,
            Err(error) => {
                failed = true;
                println!("FAIL {name}: {error:#}");
                continue;
            }
        };
        let worst_loss = reference
            .iter()
            .zip(&losses)
            .map(|(a, b)| (a - b).abs() / a.abs())
            .fold(0.0, f64::max);
        let worst_weight = (&weights - &reference_weights)
            .abs()
            .max()
            .double_value(&[]);
        let ok = worst_loss <= loss_tolerance
            && (worst_weight <= weight_tolerance || weight_tolerance.is_infinite())
            && weights.isfinite().all().int64_value(&[]) == 1;
        failed |= !ok;
        println!(
            "{} {name}: losses {losses:?}; worst relative loss difference {worst_loss:.2e} (limit {loss_tolerance:.0e}); worst weight difference {worst_weight:.2e}",
            if ok { "PASS" } else { "FAIL" }
        );
    }
    if failed {
        bail!("the GPU training step differs from the CPU's");
    }
    Ok(())
}

/// The OpenFlamingo-3B shape (CLIP ViT-L/14 widths with `layers` blocks,
/// an MPT-1B-wide LM with `layers` layers, cross-attention in every layer)
/// or the 9B one (an MPT-7B-wide LM: 4096 wide, 32 heads, 4/3 × `layers`
/// layers, cross-attention every 4th) as a random model in `dir`; returns
/// its spec.
fn write_shaped_model(
    dir: &Path,
    (name, layers): (&str, i64),
    words: i64,
) -> anyhow::Result<(ModelSpec, Shape)> {
    let (lm_width, lm_heads, lm_layers, cross_attn_every) = match name {
        "3b" => (2048, 16, layers, 1),
        "9b" => (4096, 32, layers * 4 / 3, 4),
        other => bail!("--shape {other}: use 3b or 9b"),
    };
    let shape = Shape {
        vision_width: 1024,
        vision_layers: layers,
        image: 224,
        patch: 14,
        lm_width,
        lm_heads,
        lm_layers,
        cross_attn_every,
    };
    let started = Instant::now();
    // The LM's vocabulary before OpenFlamingo's three added tokens.
    flamingo_data::synthetic::write_word_level_tokenizer(
        &dir.join("tokenizer"),
        (2..words).map(|id| format!("w{id}")),
    )?;
    let spec_path = write_tiny_model(
        &dir.join("model"),
        &dir.join("tokenizer"),
        words,
        TinyConfig {
            image_size: shape.image,
            patch_size: shape.patch,
            vision_width: shape.vision_width,
            vision_layers: shape.vision_layers,
            vision_heads: 16,
            lm_width: shape.lm_width,
            lm_heads: shape.lm_heads,
            lm_layers: shape.lm_layers,
            cross_attn_every_n_layers: shape.cross_attn_every,
            seed: 0,
            init_scale: 0.1,
        },
    )?;
    eprintln!(
        "wrote the random model in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok((ModelSpec::from_file(&spec_path)?, shape))
}

/// One batch size's timing: seconds of forward and backward, of the
/// optimizer, the last loss, and the seconds per phase of a step.
struct Timing {
    forward_backward: f64,
    optimizer: f64,
    last_loss: f64,
    phases: serde_json::Map<String, serde_json::Value>,
}

/// Times `steps` optimizer steps of two micro-steps each: the first call
/// times forward and backward alone, the second adds the optimizer step.
fn time_steps(
    trainer: &mut Trainer<'_>,
    batch: &TrainBatch,
    steps: usize,
    device: Device,
) -> anyhow::Result<Timing> {
    // Two optimizer steps of warm-up: under --cuda_graphs the first two
    // micro-steps run eagerly and the third captures the graph.
    for _ in 0..4 {
        trainer.micro_step(None, Some(batch))?;
    }
    synchronize(device);
    let (mut forward_backward, mut with_update) = (0.0, 0.0);
    let mut last_loss = f64::NAN;
    for _ in 0..steps {
        let started = Instant::now();
        trainer.micro_step(None, Some(batch))?;
        synchronize(device);
        forward_backward += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let report = trainer.micro_step(None, Some(batch))?;
        synchronize(device);
        with_update += started.elapsed().as_secs_f64();
        last_loss = report.and_then(|r| r.loss_mmc4).unwrap_or(f64::NAN);
    }
    let forward_backward = forward_backward / steps as f64;
    let optimizer = with_update / steps as f64 - forward_backward;
    // Where the time goes: the same steps again, each phase timed (the
    // device synchronised at every phase boundary).
    trainer.time_phases(true);
    for _ in 0..steps {
        trainer.micro_step(None, Some(batch))?;
        trainer.micro_step(None, Some(batch))?;
    }
    let phases = trainer
        .phase_times()
        .into_iter()
        .map(|(name, seconds)| (name.to_string(), json!(seconds / steps as f64)))
        .collect();
    trainer.time_phases(false);
    Ok(Timing {
        forward_backward,
        optimizer,
        last_loss,
        phases,
    })
}

#[allow(clippy::too_many_arguments)]
fn mfu(
    device: Device,
    batch_sizes: &[i64],
    tokens: i64,
    images: i64,
    steps: usize,
    peak_tflops: f64,
    (shape_name, layers): (&str, i64),
    (policies, weight_copies): (&[RecomputePolicy], &[bool]),
    cuda_graphs: bool,
    work: Option<&Path>,
) -> anyhow::Result<()> {
    prepare(device)?;
    let temporary = tempfile::tempdir()?;
    let words = 50_277;
    let (spec, shape) = write_shaped_model(
        work.unwrap_or(temporary.path()),
        (shape_name, layers),
        words,
    )?;
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let settings = policies
        .iter()
        .flat_map(|&policy| weight_copies.iter().map(move |&copies| (policy, copies)));
    for (policy, copies) in settings {
        let started = Instant::now();
        let options = LoadOptions {
            device,
            kind,
            ..LoadOptions::default()
        };
        let (model, tokenizer) = load_flamingo_with(&spec, options)?;
        let flop_model = FlopModel::new(
            &model,
            &format!("lang_encoder.{}", model.decoder().input_embedding_name()),
            true,
            (shape.image / shape.patch).pow(2),
        );
        let parameters: i64 = model
            .named_parameters()
            .iter()
            .map(|(_, tensor)| tensor.numel() as i64)
            .sum();
        // Two micro-steps per optimizer step (see `time_steps`).
        let mut trainer = Trainer::new(
            model,
            &tokenizer,
            None,
            TrainConfig {
                gradient_accumulation_steps: 2,
                bf16_weight_copies: copies,
                cuda_graphs,
                ..train_config(Strategy::NoShard, true, policy)
            },
        )?;
        eprintln!(
            "loaded {parameters} parameters ({} trainable) in {:.0}s",
            trainer.parameter_count(),
            started.elapsed().as_secs_f64()
        );
        for &batch_size in batch_sizes {
            let batch = random_batch(&tokenizer, words, batch_size, tokens, images, 224, 1)
                .to_device(device, kind);
            let timing = time_steps(&mut trainer, &batch, steps, device)?;
            // One micro-batch per optimizer step, as the Python baseline steps.
            let seconds = timing.forward_backward + timing.optimizer;
            let flops = flop_model.batch_flops(batch_size as f64, images as f64, tokens as f64);
            let achieved = flops / seconds / 1e12;
            println!(
                "{}",
                json!({
                    "parameters": parameters,
                    "trainable": trainer.parameter_count(),
                    "shape": shape_name,
                    "batch": batch_size, "tokens": tokens, "images": images, "layers": layers,
                    "step_seconds": seconds,
                    "forward_backward_seconds": timing.forward_backward,
                    "optimizer_seconds": timing.optimizer,
                    "samples_per_second": batch_size as f64 / seconds,
                    "model_tflop_per_step": flops / 1e12,
                    "achieved_tflops": achieved,
                    "mfu": achieved / peak_tflops,
                    "last_loss": timing.last_loss,
                    "skipped_steps": trainer.skipped_steps(),
                    "gradient_checkpointing": policy == RecomputePolicy::Full,
                    "recompute_policy": policy.name(),
                    "bf16_weight_copies": copies,
                    "cuda_graphs": cuda_graphs,
                    "phases_per_step": timing.phases,
                })
            );
        }
        if trainer.skipped_steps() > 0 {
            bail!("steps were skipped (non-finite loss): the timing does not hold");
        }
    }
    Ok(())
}

/// Loads the CUDA runtime for `device` and checks that the GPU exists.
fn prepare(device: Device) -> anyhow::Result<()> {
    flamingo_model::device::prepare(device)?;
    if let Device::Cuda(index) = device {
        let available = tch::Cuda::device_count();
        if index as i64 >= available {
            bail!("--device cuda:{index}: this machine has {available} CUDA device(s) visible to libtorch");
        }
    }
    Ok(())
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.mode {
        Mode::Check { steps } => check(args.device, steps),
        Mode::Mfu {
            batch,
            tokens,
            images,
            steps,
            peak_tflops,
            shape,
            layers,
            checkpointing,
            recompute_policy,
            bf16_weight_copies,
            cuda_graphs,
            work,
        } => mfu(
            args.device,
            &batch,
            tokens,
            images,
            steps,
            peak_tflops,
            (&shape, layers),
            (
                &if recompute_policy.is_empty() {
                    checkpointing
                        .iter()
                        .map(|&on| {
                            if on {
                                RecomputePolicy::Full
                            } else {
                                RecomputePolicy::None
                            }
                        })
                        .collect::<Vec<_>>()
                } else {
                    recompute_policy
                },
                &bf16_weight_copies,
            ),
            cuda_graphs,
            work.as_deref(),
        ),
    }
}
