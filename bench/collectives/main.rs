//! `bench-collectives`: our c10d Gloo binding against PyTorch's
//! `torch.distributed` gloo backend, same torch, same sizes, same number of
//! ranks, in one run. Both sides run the same protocol per (op, size): two
//! warm-up calls, then 5 blocks of a barrier and N timed calls; a block's
//! time is the slowest rank's mean and the fastest block counts. Rounds
//! alternate between the two so machine noise hits both alike; the best
//! round counts. Prints bus bandwidth for each and the ratio ours / torch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig, ReduceOp};
use flamingo_common::bandwidth::{bus_factor, human_bytes};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Parser, Clone)]
#[command(about = "Gloo collectives: flamingo's binding vs torch.distributed")]
struct Args {
    /// Ranks (processes) per measurement.
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Message sizes in bytes, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,16384,262144,1048576,4194304,16777216,67108864"
    )]
    sizes: Vec<u64>,
    /// Operations, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all_reduce,all_gather,reduce_scatter"
    )]
    ops: Vec<String>,
    /// Alternating rounds per implementation; the best round counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Python with torch (default: the venv's, from $FLAMINGO_VENV).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Internal: run as one rank of our side.
    #[arg(long, hide = true)]
    rank_mode: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sample {
    op: String,
    bytes: u64,
    seconds: f64,
}

/// Timed blocks per (op, size); the fastest block's mean counts, which
/// filters out the scheduler noise of a small shared machine.
const BLOCKS: u32 = 5;
/// 1 MiB all-reduces before the sweep, on both sides.
const WARMUP_CALLS: u32 = 50;

fn iterations_for(bytes: u64) -> u32 {
    ((64u64 << 20) / bytes.max(1)).clamp(2, 40) as u32
}

fn time_op(
    group: &ProcessGroup,
    iterations: u32,
    op: impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    op()?;
    op()?;
    let mut best = f64::MAX;
    for _ in 0..BLOCKS {
        group.barrier()?;
        let started = Instant::now();
        for _ in 0..iterations {
            op()?;
        }
        let mean = started.elapsed().as_secs_f64() / f64::from(iterations);
        best = best.min(group.all_reduce_scalar(mean, ReduceOp::Max)?);
    }
    Ok(best)
}

fn rank_main(args: &Args) -> anyhow::Result<()> {
    tch::set_num_threads(1);
    let config = ProcessGroupConfig::from_env(Backend::Gloo, Duration::from_secs(300))?;
    let group = ProcessGroup::new(&config)?;
    let world = group.world_size();
    // Settle first: the first collectives after the rendezvous run slow
    // (connection set-up, page faults, the peer still starting up).
    let settle = Tensor::ones([1 << 18], (Kind::Float, tch::Device::Cpu));
    for _ in 0..WARMUP_CALLS {
        group.all_reduce(&settle, ReduceOp::Sum)?;
    }
    group.barrier()?;
    for op_name in &args.ops {
        for &size in &args.sizes {
            let count = ((size / 4) as i64 / world).max(1) * world;
            let iterations = iterations_for(size);
            let seconds = match op_name.as_str() {
                "all_reduce" => {
                    let buffer = Tensor::ones([count], (Kind::Float, tch::Device::Cpu));
                    time_op(&group, iterations, || {
                        Ok(group.all_reduce(&buffer, ReduceOp::Sum)?)
                    })?
                }
                "all_gather" => {
                    let shard = Tensor::ones([count / world], (Kind::Float, tch::Device::Cpu));
                    let output = Tensor::empty([count], (Kind::Float, tch::Device::Cpu));
                    time_op(&group, iterations, || {
                        Ok(group.all_gather_into_tensor(&output, &shard)?)
                    })?
                }
                "reduce_scatter" => {
                    let full = Tensor::ones([count], (Kind::Float, tch::Device::Cpu));
                    let output = Tensor::empty([count / world], (Kind::Float, tch::Device::Cpu));
                    time_op(&group, iterations, || {
                        Ok(group.reduce_scatter_tensor(&output, &full, ReduceOp::Sum)?)
                    })?
                }
                other => bail!("unknown op {other}"),
            };
            if group.rank() == 0 {
                let sample = Sample {
                    op: op_name.clone(),
                    bytes: count as u64 * 4,
                    seconds,
                };
                println!("{}", serde_json::to_string(&sample)?);
            }
        }
    }
    group.barrier()?;
    Ok(())
}

/// Starts `ranks` processes of `program` with torchrun's environment and
/// returns rank 0's samples.
fn run_world(
    args: &Args,
    program: &PathBuf,
    program_args: &[String],
) -> anyhow::Result<Vec<Sample>> {
    let port = flamingo_common::net::free_local_port()?;
    let children = flamingo_common::ranks::spawn_local_world(args.ranks as u32, port, |env| {
        let mut command = Command::new(program);
        command
            .args(program_args)
            .env("GLOO_SOCKET_IFNAME", "lo")
            .env("OMP_NUM_THREADS", "1")
            .stdout(if env.rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        for &size in &args.sizes {
            command.env(
                format!("BENCH_ITERATIONS_{size}"),
                iterations_for(size).to_string(),
            );
        }
        command
    })
    .with_context(|| format!("starting {}", program.display()))?;
    let mut samples = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "{} rank {rank} failed: {}",
                program.display(),
                output.status
            );
        }
        if rank == 0 {
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                samples.push(
                    serde_json::from_str(line)
                        .with_context(|| format!("bad sample line '{line}'"))?,
                );
            }
        }
    }
    Ok(samples)
}

fn geometric_mean(values: &[f64]) -> f64 {
    (values.iter().map(|value| value.ln()).sum::<f64>() / values.len().max(1) as f64).exp()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rank_mode {
        return rank_main(&args);
    }
    let exe = std::env::current_exe()?;
    let python = args.python.clone().unwrap_or_else(|| {
        std::env::var_os("FLAMINGO_VENV")
            .map(|venv| PathBuf::from(venv).join("bin/python"))
            .unwrap_or_else(|| PathBuf::from("python3"))
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("collectives/torch_gloo.py");
    let sizes: Vec<String> = args.sizes.iter().map(u64::to_string).collect();
    let ours_args = vec![
        "--rank-mode".to_string(),
        format!("--ranks={}", args.ranks),
        format!("--sizes={}", sizes.join(",")),
        format!("--ops={}", args.ops.join(",")),
    ];
    let torch_args = vec![
        script.display().to_string(),
        sizes.join(","),
        args.ops.join(","),
    ];
    // (op, bytes) -> best seconds for (ours, torch)
    let mut best: BTreeMap<(String, u64), (f64, f64)> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..args.rounds {
        eprintln!(
            "round {}/{}: flamingo ({} ranks)",
            round + 1,
            args.rounds,
            args.ranks
        );
        for sample in run_world(&args, &exe, &ours_args)? {
            let entry = best
                .entry((sample.op, sample.bytes))
                .or_insert((f64::MAX, f64::MAX));
            entry.0 = entry.0.min(sample.seconds);
        }
        eprintln!(
            "round {}/{}: torch.distributed gloo ({} ranks)",
            round + 1,
            args.rounds,
            args.ranks
        );
        for sample in run_world(&args, &python, &torch_args)? {
            let entry = best
                .entry((sample.op, sample.bytes))
                .or_insert((f64::MAX, f64::MAX));
            entry.1 = entry.1.min(sample.seconds);
        }
    }
    println!(
        "Gloo collectives, {} ranks, fp32; busbw in GB/s (nccl-tests convention); ratio = ours / torch (>1: ours faster)\n",
        args.ranks
    );
    println!(
        "{:<15} {:>10} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "op", "size", "ours (us)", "torch (us)", "ours busbw", "torch busbw", "ratio"
    );
    let mut per_op: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for op in &args.ops {
        for ((sample_op, bytes), (ours, torch)) in best.iter().filter(|((name, _), _)| name == op) {
            let factor = bus_factor(sample_op, args.ranks as u32);
            let ours_bw = *bytes as f64 / ours / 1e9 * factor;
            let torch_bw = *bytes as f64 / torch / 1e9 * factor;
            let ratio = torch / ours;
            per_op.entry(op.clone()).or_default().push(ratio);
            println!(
                "{:<15} {:>10} {:>12.1} {:>12.1} {:>12.3} {:>12.3} {:>7.3}",
                sample_op,
                human_bytes(*bytes),
                ours * 1e6,
                torch * 1e6,
                ours_bw,
                torch_bw,
                ratio
            );
        }
    }
    println!();
    for (op, ratios) in &per_op {
        let geomean = geometric_mean(ratios);
        let large: Vec<f64> = ratios.iter().rev().take(3).copied().collect();
        let large_geomean = geometric_mean(&large);
        println!(
            "{op:<15} ratio geomean over all sizes {geomean:.3}, over the 3 largest {large_geomean:.3}"
        );
    }
    eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
