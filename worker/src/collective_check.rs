//! The `collective-check` rank program: joins the process group from
//! torchrun's environment, verifies all-reduce, all-gather, reduce-scatter
//! and broadcast against locally computed values, then sweeps message sizes
//! and reports time and bandwidth like nccl-tests' `*_perf` tools (the slowest
//! rank's mean time per op). Rank 0 prints the table and writes the report to
//! `$FLAMINGO_RESULT_FILE` for the agent to forward.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_collectives::{
    shard_len, shard_range, Backend, ProcessGroup, ProcessGroupConfig, ReduceOp,
};
use flamingo_common::bandwidth::{bus_factor, render_table, BandwidthRow, CollectiveCheckReport};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, clap::Args)]
pub struct CollectiveCheckArgs {
    /// Smallest message of the sweep, bytes.
    #[arg(long, default_value_t = flamingo_common::jobs::DEFAULT_MIN_BYTES)]
    pub min_bytes: u64,
    /// Largest message of the sweep, bytes.
    #[arg(long, default_value_t = flamingo_common::jobs::DEFAULT_MAX_BYTES)]
    pub max_bytes: u64,
    /// gloo or nccl; default gloo (nccl when CUDA is available and compiled in).
    #[arg(long)]
    pub backend: Option<String>,
    /// Rendezvous and per-collective timeout.
    #[arg(long, default_value_t = 120)]
    pub timeout_seconds: u64,
}

fn device_for(backend: Backend) -> Device {
    match backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => {
            let local_rank: usize = std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            Device::Cuda(local_rank)
        }
    }
}

fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn ensure_close(name: &str, actual: &Tensor, expected: &Tensor) -> anyhow::Result<()> {
    let difference = max_abs_diff(actual, expected);
    if difference > 1e-5 {
        bail!("{name}: result differs from the local reference by {difference}");
    }
    Ok(())
}

/// Correctness checks; returns the names of those that passed.
fn verify(group: &ProcessGroup, device: Device) -> anyhow::Result<Vec<String>> {
    let rank = group.rank();
    let world = group.world_size();
    let world_f = world as f64;
    let options = (Kind::Float, device);

    let values = Tensor::arange(1000, options) + rank as f64;
    group.all_reduce(&values, ReduceOp::Sum)?;
    let expected = Tensor::arange(1000, options) * world_f + world_f * (world_f - 1.0) / 2.0;
    ensure_close("all_reduce", &values, &expected)?;

    // An odd length, so the last shards carry padding.
    let total = 1000 * world + 7;
    let full = Tensor::arange(total, options) * 0.25;
    let (start, end) = shard_range(total, world, rank);
    let shard = Tensor::zeros([shard_len(total, world)], options);
    shard
        .narrow(0, 0, end - start)
        .copy_(&full.narrow(0, start, end - start));
    let gathered = group.all_gather_flat(&shard, total)?;
    ensure_close("all_gather", &gathered, &full)?;

    let contribution = &full * (rank as f64 + 1.0);
    let reduced = group.reduce_scatter_flat(&contribution, ReduceOp::Sum)?;
    let expected_shard = Tensor::zeros([shard_len(total, world)], options);
    expected_shard
        .narrow(0, 0, end - start)
        .copy_(&(full.narrow(0, start, end - start) * (world_f * (world_f + 1.0) / 2.0)));
    ensure_close("reduce_scatter", &reduced, &expected_shard)?;

    let broadcast = Tensor::full([64], rank as f64, options);
    group.broadcast(&broadcast, 0)?;
    ensure_close("broadcast", &broadcast, &Tensor::zeros([64], options))?;
    group.barrier()?;
    Ok([
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "broadcast",
        "barrier",
    ]
    .map(String::from)
    .to_vec())
}

fn sweep_sizes(min_bytes: u64, max_bytes: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut bytes = min_bytes.max(4);
    while bytes <= max_bytes {
        sizes.push(bytes);
        bytes *= 2;
    }
    sizes
}

/// Iterations per size: many for small messages (latency-bound), few for
/// large ones, so the whole sweep stays in seconds.
fn iterations_for(bytes: u64) -> u32 {
    ((64u64 << 20) / bytes.max(1)).clamp(2, 50) as u32
}

fn time_op(
    group: &ProcessGroup,
    iterations: u32,
    mut op: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    op()?; // warm-up: connections, allocations
    group.barrier()?;
    let started = Instant::now();
    for _ in 0..iterations {
        op()?;
    }
    let mean_seconds = started.elapsed().as_secs_f64() / f64::from(iterations);
    // Report the slowest rank, as the collective is only as fast as it.
    Ok(group.all_reduce_scalar(mean_seconds, ReduceOp::Max)?)
}

fn sweep(
    group: &ProcessGroup,
    device: Device,
    args: &CollectiveCheckArgs,
) -> anyhow::Result<Vec<BandwidthRow>> {
    let world = group.world_size();
    let world_u32 = world as u32;
    let mut rows = Vec::new();
    let sizes = sweep_sizes(args.min_bytes, args.max_bytes);
    for op_name in ["all_reduce", "all_gather", "reduce_scatter"] {
        for &bytes in &sizes {
            // Whole float elements, divisible by the world size for the
            // gather/scatter forms (nccl-tests rounds the same way).
            let count = ((bytes / 4) as i64 / world).max(1) * world;
            let iterations = iterations_for(bytes);
            let seconds = match op_name {
                "all_reduce" => {
                    let buffer = Tensor::ones([count], (Kind::Float, device));
                    time_op(group, iterations, || {
                        Ok(group.all_reduce(&buffer, ReduceOp::Sum)?)
                    })?
                }
                "all_gather" => {
                    let input = Tensor::ones([count / world], (Kind::Float, device));
                    let output = Tensor::empty([count], (Kind::Float, device));
                    time_op(group, iterations, || {
                        Ok(group.all_gather_into_tensor(&output, &input)?)
                    })?
                }
                _ => {
                    let input = Tensor::ones([count], (Kind::Float, device));
                    let output = Tensor::empty([count / world], (Kind::Float, device));
                    time_op(group, iterations, || {
                        Ok(group.reduce_scatter_tensor(&output, &input, ReduceOp::Sum)?)
                    })?
                }
            };
            let actual_bytes = count as u64 * 4;
            let algbw = actual_bytes as f64 / seconds / 1e9;
            rows.push(BandwidthRow {
                op: op_name.to_string(),
                bytes: actual_bytes,
                count: count as u64,
                dtype: "float".to_string(),
                time_us: seconds * 1e6,
                algbw_gbps: algbw,
                busbw_gbps: algbw * bus_factor(op_name, world_u32),
            });
            if group.rank() == 0 {
                eprintln!(
                    "{op_name:>14} {:>10} bytes: {:>10.1} us/op, busbw {:.3} GB/s",
                    actual_bytes,
                    seconds * 1e6,
                    algbw * bus_factor(op_name, world_u32)
                );
            }
        }
    }
    Ok(rows)
}

pub fn run(args: CollectiveCheckArgs) -> anyhow::Result<()> {
    if args.min_bytes == 0 || args.min_bytes > args.max_bytes {
        bail!("--min-bytes must be in [1, --max-bytes]");
    }
    let backend: Backend = match args.backend.as_deref() {
        Some(name) => name.parse()?,
        None if tch::Cuda::is_available() && cfg!(feature = "cuda") => Backend::Nccl,
        None => Backend::Gloo,
    };
    let config = ProcessGroupConfig::from_env(backend, Duration::from_secs(args.timeout_seconds))?;
    let device = device_for(backend);
    let group = tracing::info_span!("rendezvous", rank = config.rank, world = config.world_size)
        .in_scope(|| ProcessGroup::new(&config))
        .context("joining the process group")?;
    eprintln!(
        "rank {}/{}: joined {:?} group via {}:{}",
        group.rank(),
        group.world_size(),
        backend,
        config.master_addr,
        config.master_port
    );
    let checks = verify(&group, device).context("correctness checks")?;
    eprintln!(
        "rank {}: correctness checks passed: {}",
        group.rank(),
        checks.join(", ")
    );
    let rows = sweep(&group, device, &args).context("bandwidth sweep")?;
    group.barrier()?;
    if group.rank() == 0 {
        let report = CollectiveCheckReport {
            backend: format!("{backend:?}").to_lowercase(),
            world_size: group.world_size() as u32,
            checks_passed: checks,
            rows,
        };
        match std::env::var("FLAMINGO_RESULT_FILE") {
            // Under an agent the report travels with the exit and
            // `flamingoctl status` prints the table.
            Ok(path) => std::fs::write(&path, serde_json::to_vec(&report)?)
                .with_context(|| format!("writing the report to {path}"))?,
            Err(_) => println!("{}", render_table(&report)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_doubles_from_min_to_max() {
        assert_eq!(sweep_sizes(1024, 8192), vec![1024, 2048, 4096, 8192]);
        assert_eq!(sweep_sizes(1 << 10, 256 << 20).len(), 19);
        assert_eq!(iterations_for(1024), 50);
        assert_eq!(iterations_for(256 << 20), 2);
    }
}
