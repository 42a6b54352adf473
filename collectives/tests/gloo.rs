//! Multi-process tests of the Gloo collectives: this test binary re-runs
//! itself once per rank (the `rank_entry` test, selected by an environment
//! variable) with torchrun's variables, and every rank checks its results
//! against values it computes locally.

use std::process::{Command, Stdio};
use std::time::Duration;

use flamingo_collectives::{shard_range, Backend, ProcessGroup, ProcessGroupConfig, ReduceOp};
use tch::{Kind, Tensor};

const SCENARIO_ENV: &str = "FLAMINGO_COLLECTIVES_TEST_SCENARIO";

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    let difference = (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        difference < 1e-6,
        "{what}: got {actual:?} expected {expected:?} (max diff {difference})"
    );
}

fn check_all(group: &ProcessGroup) {
    let rank = group.rank();
    let world = group.world_size();
    let world_f = world as f64;

    // all_reduce: sum, avg, max over rank-dependent values.
    let base = Tensor::arange(7, (Kind::Float, tch::Device::Cpu));
    let summed = &base + rank as f64;
    group
        .all_reduce(&summed, ReduceOp::Sum)
        .expect("all_reduce sum");
    let expected_sum = &base * world_f + world_f * (world_f - 1.0) / 2.0;
    assert_close(&summed, &expected_sum, "all_reduce sum");

    let averaged = &base + rank as f64;
    group
        .all_reduce(&averaged, ReduceOp::Avg)
        .expect("all_reduce avg");
    assert_close(&averaged, &(&expected_sum / world_f), "all_reduce avg");

    let maximum = &base * (rank as f64 + 1.0);
    group
        .all_reduce(&maximum, ReduceOp::Max)
        .expect("all_reduce max");
    assert_close(&maximum, &(&base * world_f), "all_reduce max");

    let integers = Tensor::from_slice(&[rank, 1i64]);
    group
        .all_reduce(&integers, ReduceOp::Sum)
        .expect("all_reduce i64");
    assert_eq!(
        Vec::<i64>::try_from(&integers).expect("i64 vec"),
        vec![world * (world - 1) / 2, world]
    );

    // all_gather_into_tensor: block i of the output is rank i's input.
    let input = Tensor::full([5], rank as f64, (Kind::Float, tch::Device::Cpu));
    let output = Tensor::zeros([5 * world], (Kind::Float, tch::Device::Cpu));
    group
        .all_gather_into_tensor(&output, &input)
        .expect("all_gather_into_tensor");
    let expected_gather = Tensor::arange(world, (Kind::Float, tch::Device::Cpu))
        .repeat_interleave_self_int(5, 0, None);
    assert_close(&output, &expected_gather, "all_gather_into_tensor");

    // reduce_scatter_tensor: rank r keeps slice r of the sum.
    let scatter_input =
        Tensor::arange(3 * world, (Kind::Float, tch::Device::Cpu)) * (rank as f64 + 1.0);
    let scatter_output = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
    group
        .reduce_scatter_tensor(&scatter_output, &scatter_input, ReduceOp::Sum)
        .expect("reduce_scatter sum");
    let factor = world_f * (world_f + 1.0) / 2.0;
    let expected_slice =
        Tensor::arange_start(3 * rank, 3 * rank + 3, (Kind::Float, tch::Device::Cpu)) * factor;
    assert_close(&scatter_output, &expected_slice, "reduce_scatter sum");

    let scatter_avg = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
    group
        .reduce_scatter_tensor(&scatter_avg, &scatter_input, ReduceOp::Avg)
        .expect("reduce_scatter avg");
    assert_close(
        &scatter_avg,
        &(&expected_slice / world_f),
        "reduce_scatter avg",
    );

    // Sizes that do not divide by the world size (FSDP's padded flat shards).
    for total in [1i64, 10, 13, 1001] {
        let full = Tensor::arange(total, (Kind::Float, tch::Device::Cpu)) * 0.5;
        let (start, end) = shard_range(total, world, rank);
        let shard_len = flamingo_collectives::shard_len(total, world);
        let shard = Tensor::zeros([shard_len], (Kind::Float, tch::Device::Cpu));
        shard
            .narrow(0, 0, end - start)
            .copy_(&full.narrow(0, start, end - start));
        let gathered = group
            .all_gather_flat(&shard, total)
            .expect("all_gather_flat");
        assert_close(&gathered, &full, &format!("all_gather_flat total {total}"));

        let contribution = &full * (rank as f64 + 1.0);
        let reduced = group
            .reduce_scatter_flat(&contribution, ReduceOp::Avg)
            .expect("reduce_scatter_flat");
        let expected = Tensor::zeros([shard_len], (Kind::Float, tch::Device::Cpu));
        expected
            .narrow(0, 0, end - start)
            .copy_(&(full.narrow(0, start, end - start) * ((world_f + 1.0) / 2.0)));
        assert_close(
            &reduced,
            &expected,
            &format!("reduce_scatter_flat total {total}"),
        );
    }

    // broadcast from the last rank.
    let broadcast = Tensor::full([4], rank as f64, (Kind::Double, tch::Device::Cpu));
    group.broadcast(&broadcast, world - 1).expect("broadcast");
    assert_close(
        &broadcast,
        &Tensor::full([4], (world - 1) as f64, (Kind::Double, tch::Device::Cpu)),
        "broadcast",
    );

    // reduce into each rank in turn: only the root's result is defined.
    for root in 0..world {
        let reduced = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)) + rank as f64;
        group.reduce(&reduced, root, ReduceOp::Sum).expect("reduce");
        if rank == root {
            let expected = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)) * world_f
                + world_f * (world_f - 1.0) / 2.0;
            assert_close(&reduced, &expected, &format!("reduce to {root}"));
        }
    }

    // Asynchronous forms: two collectives in flight at once.
    let gather_out = Tensor::zeros([2 * world], (Kind::Float, tch::Device::Cpu));
    let gather_in = Tensor::full([2], rank as f64, (Kind::Float, tch::Device::Cpu));
    let gather_work = group
        .all_gather_into_tensor_async(&gather_out, &gather_in)
        .expect("async all_gather");
    let reduce_value = Tensor::ones([3], (Kind::Float, tch::Device::Cpu));
    let reduce_work = group
        .all_reduce_async(&reduce_value, ReduceOp::Sum)
        .expect("async all_reduce");
    gather_work.wait().expect("wait all_gather");
    reduce_work.wait().expect("wait all_reduce");
    assert_close(
        &gather_out,
        &Tensor::arange(world, (Kind::Float, tch::Device::Cpu))
            .repeat_interleave_self_int(2, 0, None),
        "async all_gather",
    );
    assert_close(
        &reduce_value,
        &Tensor::full([3], world_f, (Kind::Float, tch::Device::Cpu)),
        "async all_reduce",
    );

    group.barrier().expect("barrier");
}

fn check_bad_arguments(group: &ProcessGroup) {
    let input = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
    let wrong = Tensor::zeros(
        [4 * group.world_size() + 1],
        (Kind::Float, tch::Device::Cpu),
    );
    let error = group
        .all_gather_into_tensor(&wrong, &input)
        .expect_err("mismatched all_gather sizes must fail");
    assert!(error.to_string().contains("world_size × input"), "{error}");
    let error = group
        .reduce_scatter_tensor(&input, &wrong, ReduceOp::Sum)
        .expect_err("mismatched reduce_scatter sizes must fail");
    assert!(error.to_string().contains("world_size × output"), "{error}");
    let error = group
        .broadcast(&input, group.world_size())
        .expect_err("root outside the world must fail");
    assert!(error.to_string().contains("outside"), "{error}");
    assert!(!error.is_retryable());
    group.barrier().expect("barrier after bad arguments");
}

/// Rank 1 leaves right after the rendezvous; rank 0's all-reduce must fail
/// within the group timeout instead of hanging.
fn check_dead_peer(group: &ProcessGroup) {
    if group.rank() == 1 {
        println!("rank 1 leaving early");
        std::process::exit(0);
    }
    let started = std::time::Instant::now();
    let tensor = Tensor::ones([1024], (Kind::Float, tch::Device::Cpu));
    let error = group
        .all_reduce(&tensor, ReduceOp::Sum)
        .expect_err("all_reduce with a dead peer must fail");
    assert!(error.is_retryable());
    assert!(
        started.elapsed() < group.timeout() + Duration::from_secs(20),
        "the error came only after {:?}",
        started.elapsed()
    );
    println!("dead peer error: {error}");
}

/// 4 ranks as 2 nodes × 2: node groups {0,1} {2,3} and local-rank groups
/// {0,2} {1,3}; each sums only its own members' values.
fn check_subgroups(group: &ProcessGroup) {
    let rank = group.rank();
    let (node, local) = (rank / 2, rank % 2);
    let within = group
        .subgroup(&format!("node-{node}/"), local, 2)
        .expect("node group");
    let across = group
        .subgroup(&format!("local-{local}/"), node, 2)
        .expect("local-rank group");
    let value = Tensor::from_slice(&[(rank + 1) as f32]);
    within.all_reduce(&value, ReduceOp::Sum).expect("node sum");
    let node_members = [2 * node + 1, 2 * node + 2];
    assert_eq!(
        value.double_value(&[0]),
        (node_members[0] + node_members[1]) as f64
    );
    let value = Tensor::from_slice(&[(rank + 1) as f32]);
    across
        .all_reduce(&value, ReduceOp::Sum)
        .expect("local-rank sum");
    assert_eq!(value.double_value(&[0]), ((local + 1) + (local + 3)) as f64);
    // The parent group still works alongside.
    let value = Tensor::from_slice(&[1f32]);
    group.all_reduce(&value, ReduceOp::Sum).expect("world sum");
    assert_eq!(value.double_value(&[0]), 4.0);
}

#[test]
fn rank_entry() {
    let Ok(scenario) = std::env::var(SCENARIO_ENV) else {
        return; // run directly by `cargo test`: nothing to do
    };
    let timeout = Duration::from_secs(if scenario == "dead-peer" { 5 } else { 60 });
    let config = ProcessGroupConfig::from_env(Backend::Gloo, timeout).expect("torchrun env");
    let group = ProcessGroup::new(&config).expect("process group");
    assert_eq!(group.rank(), config.rank);
    match scenario.as_str() {
        "all" => check_all(&group),
        "bad-arguments" => check_bad_arguments(&group),
        "dead-peer" => check_dead_peer(&group),
        "subgroups" => check_subgroups(&group),
        other => panic!("unknown scenario {other}"),
    }
}

fn run_world(world_size: usize, scenario: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let port = flamingo_free_port();
    let children = flamingo_common::ranks::spawn_local_world(world_size as u32, port, |_| {
        let mut command = Command::new(&exe);
        command
            .args(["--exact", "rank_entry", "--nocapture", "--test-threads=1"])
            .env(SCENARIO_ENV, scenario)
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    })
    .expect("spawn ranks");
    let mut failures = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().expect("wait rank");
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success()
            || !(stdout.contains("1 passed") || stdout.contains("leaving early"))
        {
            failures.push(format!(
                "rank {rank} {}:\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn flamingo_free_port() -> u16 {
    // Outside the ephemeral range: the other tests' Gloo sockets, running
    // alongside, cannot take it before rank 0's store binds it.
    flamingo_common::net::free_local_port().expect("free port")
}

#[test]
fn gloo_two_ranks_match_local_reference() {
    run_world(2, "all");
}

#[test]
fn gloo_four_ranks_match_local_reference() {
    run_world(4, "all");
}

#[test]
fn subgroups_reduce_only_their_members() {
    run_world(4, "subgroups");
}

#[test]
fn bad_arguments_are_errors_not_aborts() {
    run_world(2, "bad-arguments");
}

#[test]
fn dead_peer_is_an_error_not_a_hang() {
    run_world(2, "dead-peer");
}

#[test]
fn nccl_without_a_gpu_is_a_clear_error() {
    let config = ProcessGroupConfig {
        backend: Backend::Nccl,
        master_addr: "127.0.0.1".into(),
        master_port: flamingo_free_port(),
        rank: 0,
        world_size: 1,
        local_hostname: None,
        timeout: Duration::from_secs(10),
        store_prefix: "nccl_test/".into(),
    };
    let error = ProcessGroup::new(&config).expect_err("no GPU here (or no cuda feature)");
    let message = error.to_string();
    assert!(
        message.contains("cuda` cargo feature") || message.contains("no GPUs found"),
        "{message}"
    );
    assert!(
        !message.contains("frame #"),
        "no C++ stack trace in the message: {message}"
    );
}
