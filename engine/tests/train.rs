//! The training step across world sizes and strategies: the same seed and
//! data for 20 steps — `no_shard` on 1 rank, `full` on 2 and 4 ranks,
//! `shard_grad_op` on 2, `hybrid` on 2 emulated nodes of 2 (real
//! processes, Gloo) — give the same losses (1e-4 relative) and the same
//! trainable weights (1e-5); so do the recomputing
//! pass (`--gradient_checkpointing`) and `full` on one rank; `full` on 2
//! ranks keeping its graphs equals `full` recomputing them and `full` with
//! selective recompute (1e-6), as do selective and `auto` recompute on one
//! rank; and the weights move and the loss falls.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig};
use flamingo_common::train::{LrScheduler, RecomputePolicy, Strategy};
use flamingo_data::batch::{Assembler, Cursor};
use flamingo_data::convert::{ImageFormat, RankBatch};
use flamingo_data::pack::ShardWriter;
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;
use flamingo_data::synthetic;
use flamingo_engine::batch::TrainBatch;
use flamingo_engine::optim::AdamWConfig;
use flamingo_engine::schedule::Schedule;
use flamingo_engine::tiny::{write_tiny_model, TinyConfig};
use flamingo_engine::trainer::{RecomputePlan, TrainConfig, Trainer};
use flamingo_model::ModelSpec;

const STEPS: usize = 20;
const LAION_BATCH: usize = 8;
const MMC4_BATCH: usize = 4;
const ROLE: &str = "FLAMINGO_TRAIN_TEST_DIR";

/// Writing a tiny model and loading one seed torch's global generator and
/// draw from it; tests running in parallel threads of this process must not
/// interleave those draws, or two loads of one model start differently.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn load(
    spec: &ModelSpec,
) -> (
    flamingo_model::Flamingo,
    flamingo_preprocess::FlamingoTokenizer,
) {
    load_with(spec, false)
}

/// [`load`], lazily (weights read by range by the sharded trainer) or not.
fn load_with(
    spec: &ModelSpec,
    lazy: bool,
) -> (
    flamingo_model::Flamingo,
    flamingo_preprocess::FlamingoTokenizer,
) {
    let _guard = TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let options = flamingo_model::LoadOptions {
        lazy,
        ..Default::default()
    };
    flamingo_model::load_flamingo_with(spec, options).expect("model loads")
}

fn config(strategy: Strategy) -> TrainConfig {
    TrainConfig {
        strategy,
        schedule: Schedule {
            kind: LrScheduler::Linear,
            base_lr: 3e-3,
            warmup_steps: 2,
            total_steps: STEPS as u64,
        },
        weight_decay: 0.1,
        adamw: AdamWConfig::default(),
        max_grad_norm: 1.0,
        loss_multiplier_laion: 0.2,
        loss_multiplier_mmc4: 1.0,
        gradient_accumulation_steps: 1,
        freeze_lm_embeddings: false,
        amp_bf16: false,
        gradient_checkpointing: false,
        recompute_policy: RecomputePolicy::None,
        activation_budget_gib: 0.0,
        bf16_weight_copies: true,
        cuda_graphs: false,
    }
}

/// Synthetic LAION and MMC4 shards, their tokenizer and a tiny model.
fn fixture(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let storage = Storage::default();
        for (form, samples) in [("laion", 64u64), ("mmc4", 32)] {
            let pattern = format!("{}/{form}-{{}}.tar", dir.display());
            let mut writer = ShardWriter::new(&storage, &pattern, 16);
            for index in 0..samples {
                let (key, members) = if form == "laion" {
                    synthetic::laion_sample(2, index, 32)
                } else {
                    synthetic::mmc4_sample(2, index, 32)
                };
                writer.add(&key, &members).await.expect("sample written");
            }
            writer.finish().await.expect("shards written");
        }
    });
    synthetic::write_tokenizer(&dir.join("tokenizer")).expect("tokenizer");
    let vocab = synthetic::vocabulary().len() as i64 + 2;
    let _guard = TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    write_tiny_model(
        &dir.join("model"),
        &dir.join("tokenizer"),
        vocab,
        TinyConfig::default(),
    )
    .expect("model");
}

fn assembler(dir: &Path, form: &str, runtime: &tokio::runtime::Runtime) -> (Assembler, usize, i64) {
    let shards = ShardWriter::brace_pattern(
        &format!("{}/{form}-{{}}.tar", dir.display()),
        if form == "laion" { 4 } else { 2 },
    );
    let extra = if form == "mmc4" {
        "[mmc4]\nmin_image_kb = 0\n"
    } else {
        ""
    };
    let spec = DataSpec::from_toml(
        &format!(
            "dataset = \"{form}\"\nshards = \"{shards}\"\ntokenizer = \"{}\"\nimage_size = 32\nshuffle_block = 16\n{extra}",
            dir.join("tokenizer").display()
        ),
        None,
    )
    .expect("spec");
    let dataset = runtime
        .block_on(Dataset::open(&spec, &Storage::default()))
        .expect("dataset");
    let preparer = Arc::new(Preparer::new(&spec).expect("preparer"));
    let pad = preparer.pad_token_id();
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool"),
    );
    (
        Assembler::new(dataset, preparer, pool, 0),
        spec.images_per_sample() as usize,
        pad,
    )
}

/// Trains `STEPS` steps of rank `rank` of `group` (or alone) on the fixture;
/// returns the per-step (LAION, MMC4) losses and the final flat weights.
fn train_steps(
    dir: &Path,
    group: Option<&ProcessGroup>,
    config: TrainConfig,
) -> (Vec<(f64, f64)>, tch::Tensor) {
    train_steps_with(dir, group, None, config, false)
}

/// [`train_steps`], with `hybrid`'s (node, replicas) groups when given.
fn train_steps_with(
    dir: &Path,
    group: Option<&ProcessGroup>,
    hybrid: Option<&(ProcessGroup, ProcessGroup)>,
    config: TrainConfig,
    lazy: bool,
) -> (Vec<(f64, f64)>, tch::Tensor) {
    let (losses, weights, _) = train_steps_planned(dir, group, hybrid, config, lazy);
    (losses, weights)
}

thread_local! {
    /// Whether [`train_steps_planned`] runs the graphed step's code with
    /// eager stand-ins for the CUDA graphs.
    static EAGER_GRAPHS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`train_steps_with`], and what `--recompute_policy auto` chose.
fn train_steps_planned(
    dir: &Path,
    group: Option<&ProcessGroup>,
    hybrid: Option<&(ProcessGroup, ProcessGroup)>,
    config: TrainConfig,
    lazy: bool,
) -> (Vec<(f64, f64)>, tch::Tensor, Option<RecomputePlan>) {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank() as usize, g.world_size() as usize));
    let spec = ModelSpec::from_file(&dir.join("model/model.toml")).expect("model spec");
    let (model, tokenizer) = load_with(&spec, lazy);
    if lazy {
        assert!(model.has_unread(), "a lazy load leaves safetensors unread");
    }
    let mut trainer = match (hybrid, group) {
        (Some((node, replicas)), Some(group)) => {
            Trainer::new_hybrid(model, &tokenizer, group, node, replicas, config)
        }
        _ => Trainer::new(model, &tokenizer, group, config),
    }
    .expect("trainer");
    if EAGER_GRAPHS.get() {
        trainer.graph_eagerly_for_tests();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (laion, laion_images, pad) = assembler(dir, "laion", &runtime);
    let (mmc4, mmc4_images, _) = assembler(dir, "mmc4", &runtime);
    let mut cursors = (Cursor::default(), Cursor::default());
    let next = |assembler: &Assembler, cursor: &mut Cursor, size: usize, images: usize| {
        let global = runtime
            .block_on(assembler.batch(*cursor, size))
            .expect("batch");
        *cursor = global.next;
        TrainBatch::from_rank_batch(&RankBatch::from_global(
            &global,
            rank,
            world,
            images,
            pad,
            ImageFormat::Uint8,
        ))
    };
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let laion_batch = next(&laion, &mut cursors.0, LAION_BATCH, laion_images);
        let mmc4_batch = next(&mmc4, &mut cursors.1, MMC4_BATCH, mmc4_images);
        // Before the first update: the forward-only loss (no graph, each
        // unit gathered and released in turn under full and hybrid) is the
        // training step's.
        let forward_only = (step == 0).then(|| {
            (
                trainer.loss(&laion_batch).expect("forward-only loss"),
                trainer.loss(&mmc4_batch).expect("forward-only loss"),
            )
        });
        let report = trainer
            .micro_step(Some(&laion_batch), Some(&mmc4_batch))
            .expect("step")
            .expect("a report every step");
        assert!(!report.skipped && report.grad_norm.is_finite());
        if let Some((laion_loss, mmc4_loss)) = forward_only {
            for (name, forward, stepped) in [
                ("LAION", laion_loss, report.loss_laion.expect("laion")),
                ("MMC4", mmc4_loss, report.loss_mmc4.expect("mmc4")),
            ] {
                assert!(
                    (forward - stepped).abs() <= 1e-6 * stepped.abs(),
                    "{name}: Trainer::loss {forward} vs the step's loss {stepped}"
                );
            }
        }
        losses.push((
            report.loss_laion.expect("laion"),
            report.loss_mmc4.expect("mmc4"),
        ));
    }
    let plan = trainer.recompute_plan();
    (losses, trainer.flat_parameters().expect("weights"), plan)
}

/// Single-process losses for `config` (no process group).
fn losses_in_process(dir: &Path, config: TrainConfig) -> Vec<(f64, f64)> {
    let (losses, weights) = train_steps(dir, None, config);
    assert!(weights.isfinite().all().int64_value(&[]) == 1);
    losses
}

/// Asserts equal losses (1e-4 relative) and weights (1e-5).
fn assert_same_training(
    name: &str,
    expected: &(Vec<(f64, f64)>, tch::Tensor),
    got: &(Vec<(f64, f64)>, tch::Tensor),
) {
    for (step, (a, b)) in expected.0.iter().zip(got.0.iter()).enumerate() {
        for (x, y) in [(a.0, b.0), (a.1, b.1)] {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs(),
                "{name} step {step}: loss {y} vs {x}"
            );
        }
    }
    assert_eq!(expected.0.len(), got.0.len(), "{name}: step count");
    let difference = (&got.1 - &expected.1).abs().max().double_value(&[]);
    assert!(difference <= 1e-5, "{name}: weights differ by {difference}");
}

#[test]
fn recomputing_pass_and_one_rank_full_train_as_the_plain_step() {
    // Unit-by-unit recompute (checkpointing) and `full` on one rank (units
    // gathered from, and released to, this rank's own shards) follow the
    // plain autograd step.
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    let plain = train_steps(dir.path(), None, config(Strategy::NoShard));
    let checkpointed = train_steps(
        dir.path(),
        None,
        TrainConfig {
            gradient_checkpointing: true,
            ..config(Strategy::NoShard)
        },
    );
    assert_same_training("no_shard + gradient_checkpointing", &plain, &checkpointed);
    let full = train_steps(dir.path(), None, config(Strategy::Full));
    assert_same_training("full x1", &plain, &full);
    // With the embedding frozen the text unit has nothing to train.
    let frozen = |strategy| TrainConfig {
        freeze_lm_embeddings: true,
        ..config(strategy)
    };
    let plain_frozen = train_steps(dir.path(), None, frozen(Strategy::NoShard));
    let full_frozen = train_steps(dir.path(), None, frozen(Strategy::Full));
    assert_same_training("full x1, frozen embeddings", &plain_frozen, &full_frozen);
}

/// Equal losses and weights to 1e-6: the same arithmetic kept or done
/// again.
fn assert_same_arithmetic(
    name: &str,
    expected: &(Vec<(f64, f64)>, tch::Tensor),
    got: &(Vec<(f64, f64)>, tch::Tensor),
) {
    assert_eq!(expected.0.len(), got.0.len(), "{name}: step count");
    for ((a, b), (c, d)) in expected.0.iter().zip(&got.0) {
        assert!(
            (a - c).abs() <= 1e-6 * a.abs().max(1.0) && (b - d).abs() <= 1e-6 * b.abs().max(1.0),
            "{name}: losses {:?}, expected {:?}",
            got.0,
            expected.0
        );
    }
    let difference = (&expected.1 - &got.1).abs().max().double_value(&[]);
    assert!(difference <= 1e-6, "{name}: weights differ by {difference}");
}

#[test]
fn selective_and_auto_recompute_train_as_full_recompute() {
    // Selective recompute frees the perceiver's and cross-attention's
    // LayerNorm, GELU, concatenation and gated-residual outputs after each
    // unit's forward and computes them again before its backward; `auto`
    // picks per unit from what it measured on the first micro-batch. Both
    // are the arithmetic of recomputing every unit (1e-6), in fp32 and
    // under bf16 autocast.
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    for amp_bf16 in [false, true] {
        let with = |policy, budget| TrainConfig {
            amp_bf16,
            recompute_policy: policy,
            activation_budget_gib: budget,
            ..config(Strategy::Full)
        };
        let full = train_steps(dir.path(), None, with(RecomputePolicy::Full, 0.0));
        let selective = train_steps(dir.path(), None, with(RecomputePolicy::Selective, 0.0));
        assert_same_arithmetic(&format!("selective, amp {amp_bf16}"), &full, &selective);
        if amp_bf16 {
            continue;
        }
        // The replicated state runs the same unit pass for any policy.
        let replicated = |policy| {
            train_steps(
                dir.path(),
                None,
                TrainConfig {
                    recompute_policy: policy,
                    ..config(Strategy::NoShard)
                },
            )
        };
        assert_same_arithmetic(
            "no_shard, selective",
            &replicated(RecomputePolicy::Full),
            &replicated(RecomputePolicy::Selective),
        );
        // A budget past everything: every unit keeps its graph.
        let (losses, weights, plan) = train_steps_planned(
            dir.path(),
            None,
            None,
            with(RecomputePolicy::Auto, 64.0),
            false,
        );
        let plan = plan.expect("auto decided after its first micro-batch");
        assert!(
            plan.graph_bytes > 0 && plan.selective_bytes > 0 && plan.input == 0,
            "{plan:?}"
        );
        assert_same_arithmetic("auto, all graphs", &full, &(losses, weights));
        // Half of what selective everywhere would keep: some units run
        // again, the others keep their graph or go selective.
        let budget = (plan.graph_bytes - plan.selective_bytes) as f64 / 2.0 / (1u64 << 30) as f64;
        let (losses, weights, mixed) = train_steps_planned(
            dir.path(),
            None,
            None,
            with(RecomputePolicy::Auto, budget),
            false,
        );
        let mixed = mixed.expect("auto decided");
        assert!(
            mixed.input > 0 && mixed.graph + mixed.selective > 0,
            "{mixed:?} at a budget of {budget} GiB"
        );
        assert_same_arithmetic("auto, mixed", &full, &(losses, weights));
    }
}

#[test]
fn bf16_weight_copies_train_as_autocasts_casts() {
    // Under amp_bf16 the Linear weights of the perceiver and the
    // cross-attention are bf16 copies made once per step; autocast casting
    // the fp32 weights at every use is the same arithmetic (1e-6; the two
    // micro-batches of each step are summed in fp32 either way): in the
    // plain step, in the recomputing pass, and under `full` keeping graphs
    // (parked and gathered again) and selectively recomputing.
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    // The weights copied are exactly the trainable modules' matrices.
    let spec = ModelSpec::from_file(&dir.path().join("model/model.toml")).expect("spec");
    let (model, _) = load(&spec);
    let embedding = format!("lang_encoder.{}", model.decoder().input_embedding_name());
    let mut linear = 0;
    for (name, tensor) in model.trainable_parameters(true) {
        let matrix = tensor.dim() == 2 && name.ends_with(".weight") && name != embedding;
        assert_eq!(model.is_linear_weight(&name), matrix, "{name}");
        linear += usize::from(matrix);
    }
    assert!(linear > 0);
    let cases = [
        (Strategy::NoShard, RecomputePolicy::None),
        (Strategy::NoShard, RecomputePolicy::Full),
        (Strategy::Full, RecomputePolicy::None),
        (Strategy::Full, RecomputePolicy::Selective),
    ];
    for (strategy, policy) in cases {
        let with = |copies| TrainConfig {
            amp_bf16: true,
            bf16_weight_copies: copies,
            recompute_policy: policy,
            ..config(strategy)
        };
        let per_use = train_steps(dir.path(), None, with(false));
        let copies = train_steps(dir.path(), None, with(true));
        assert_same_arithmetic(
            &format!("{strategy:?}, {policy:?}: bf16 copies"),
            &per_use,
            &copies,
        );
    }
}

#[test]
fn cuda_graphs_need_a_cuda_device() {
    // The graphed step runs on a GPU only (bench-gpu-step check compares it
    // with the CPU's step there); here it is refused, naming the flag.
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    let spec = ModelSpec::from_file(&dir.path().join("model/model.toml")).expect("spec");
    let (model, tokenizer) = load(&spec);
    let error = Trainer::new(
        model,
        &tokenizer,
        None,
        TrainConfig {
            cuda_graphs: true,
            ..config(Strategy::NoShard)
        },
    )
    .expect_err("no CUDA device here");
    assert!(
        error
            .to_string()
            .starts_with("--cuda_graphs: needs the model on a CUDA device"),
        "{error}"
    );
}

#[test]
fn the_graphed_steps_code_trains_as_the_plain_step() {
    // What --cuda_graphs runs around the graphs (the batch copied into
    // static inputs per shape, the loss scale as a device scalar, the loss
    // read back after the backward, bf16 copies' gradients folded), with
    // eager stand-ins for the graphs: the plain step's arithmetic (1e-6),
    // in fp32 and under amp_bf16, LAION and MMC4 shapes in one step.
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    for amp_bf16 in [false, true] {
        let with = TrainConfig {
            amp_bf16,
            ..config(Strategy::NoShard)
        };
        let plain = train_steps(dir.path(), None, with.clone());
        EAGER_GRAPHS.set(true);
        let graphed = train_steps(dir.path(), None, with);
        EAGER_GRAPHS.set(false);
        assert_same_arithmetic(&format!("graphed code, amp {amp_bf16}"), &plain, &graphed);
    }
}

#[test]
fn amp_bf16_trains_close_to_fp32() {
    // bf16 autocast in the forward pass: the losses follow fp32's within
    // bf16's precision, but are not fp32's (autocast took effect).
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    let fp32 = losses_in_process(dir.path(), config(Strategy::NoShard));
    let amp = losses_in_process(
        dir.path(),
        TrainConfig {
            amp_bf16: true,
            ..config(Strategy::NoShard)
        },
    );
    let mut differs = false;
    for (step, (a, b)) in fp32.iter().zip(&amp).enumerate() {
        for (x, y) in [(a.0, b.0), (a.1, b.1)] {
            assert!(
                (x - y).abs() <= 0.05 * x.abs(),
                "step {step}: amp_bf16 loss {y} vs fp32 {x}"
            );
            differs |= x != y;
        }
    }
    assert!(
        differs,
        "amp_bf16 gave fp32's exact losses: autocast did nothing"
    );
}

/// A multi-rank run's precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Amp {
    Off,
    /// bf16 autocast with bf16 weight copies.
    Copies,
    /// bf16 autocast casting the weights at each use.
    PerUse,
}

/// One rank's run; rank 0 writes the losses and the final weights.
fn run_rank(
    dir: &Path,
    strategy: Strategy,
    (recompute, amp): (RecomputePolicy, Amp),
    lazy: bool,
    out: &Path,
) {
    let group = match std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse::<i64>().ok())
    {
        Some(world) if world > 1 => Some(
            ProcessGroup::new(
                &ProcessGroupConfig::from_env(Backend::Gloo, Duration::from_secs(60)).expect("env"),
            )
            .expect("process group"),
        ),
        _ => None,
    };
    let rank = group.as_ref().map_or(0, ProcessGroup::rank);
    let hybrid = match (&group, strategy) {
        (Some(group), Strategy::Hybrid) => {
            Some(flamingo_engine::run::hybrid_groups(group).expect("node and replica groups"))
        }
        _ => None,
    };
    let config = TrainConfig {
        recompute_policy: recompute,
        amp_bf16: amp != Amp::Off,
        bf16_weight_copies: amp == Amp::Copies,
        ..config(strategy)
    };
    let (losses, flat) = train_steps_with(dir, group.as_ref(), hybrid.as_ref(), config, lazy);
    if rank == 0 {
        tch::Tensor::write_safetensors(&[("flat", flat)], out.with_extension("safetensors"))
            .expect("weights written");
        std::fs::write(
            out.with_extension("json"),
            serde_json::to_string(&losses).expect("json"),
        )
        .expect("losses written");
    }
}

#[test]
fn rank_entry() {
    let Ok(dir) = std::env::var(ROLE) else {
        return; // run by cargo test directly
    };
    // `full+checkpointing`: the strategy with --gradient_checkpointing;
    // `full+selective`: with --recompute_policy selective;
    // `full+lazy`: the weights loaded lazily, each rank reading its shards;
    // `+pieces` (set on the command as FLAMINGO_GLOO_GATHER_PIECE): every
    // unit over the prefetch limit, so gathered only when used;
    // `+amp`: bf16 autocast with bf16 weight copies, `+amp+per_use`:
    // autocast casting the weights at each use.
    let name = std::env::var("STRATEGY").expect("strategy");
    let name = name.strip_suffix("+pieces").unwrap_or(&name).to_string();
    let (name, amp) = if let Some(name) = name.strip_suffix("+amp+per_use") {
        (name.to_string(), Amp::PerUse)
    } else if let Some(name) = name.strip_suffix("+amp") {
        (name.to_string(), Amp::Copies)
    } else {
        (name, Amp::Off)
    };
    let (name, lazy) = match name.strip_suffix("+lazy") {
        Some(name) => (name.to_string(), true),
        None => (name, false),
    };
    let (name, recompute) = if let Some(name) = name.strip_suffix("+checkpointing") {
        (name.to_string(), RecomputePolicy::Full)
    } else if let Some(name) = name.strip_suffix("+selective") {
        (name.to_string(), RecomputePolicy::Selective)
    } else {
        (name, RecomputePolicy::None)
    };
    let strategy: Strategy = name.parse().expect("strategy name");
    run_rank(
        Path::new(&dir),
        strategy,
        (recompute, amp),
        lazy,
        Path::new(&std::env::var("OUT").expect("out")),
    );
}

fn run_world(
    dir: &Path,
    world: usize,
    strategy: &str,
    name: &str,
) -> (Vec<(f64, f64)>, tch::Tensor) {
    run_world_nodes(dir, world, world, strategy, name)
}

/// [`run_world`] with `per_node` ranks per (emulated) node.
fn run_world_nodes(
    dir: &Path,
    world: usize,
    per_node: usize,
    strategy: &str,
    name: &str,
) -> (Vec<(f64, f64)>, tch::Tensor) {
    let exe = std::env::current_exe().expect("test binary");
    let port = flamingo_common::net::free_local_port().expect("port");
    let out = dir.join(name);
    let children = flamingo_common::ranks::spawn_local_world(world as u32, port, |env| {
        env.split_into_nodes_of(per_node as u32);
        let mut command = Command::new(&exe);
        command
            .args(["--exact", "rank_entry", "--nocapture", "--test-threads=1"])
            .env(ROLE, dir)
            .env("STRATEGY", strategy)
            .env("OUT", &out)
            .env("OMP_NUM_THREADS", "1")
            .envs(
                strategy
                    .ends_with("+pieces")
                    .then_some(("FLAMINGO_GLOO_GATHER_PIECE", "2000")),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    })
    .expect("ranks start");
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().expect("rank ends");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{name} rank {rank} ended {}: {stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let losses: Vec<(f64, f64)> =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).expect("losses"))
            .expect("json");
    let weights = tch::Tensor::read_safetensors(out.with_extension("safetensors"))
        .expect("weights")
        .into_iter()
        .next()
        .expect("flat")
        .1;
    (losses, weights)
}

#[test]
fn a_lazy_load_reads_nothing_until_asked_and_then_equals_the_whole_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    let spec = ModelSpec::from_file(&dir.path().join("model/model.toml")).expect("spec");
    let (whole, _) = load(&spec);
    let (mut lazy, _) = load_with(&spec, true);
    // The frozen tower and the decoder's layers are stand-ins holding one
    // element each (the fresh perceiver and cross-attention, made here,
    // and a resized embedding are whole).
    for (name, tensor) in lazy.named_parameters() {
        let from_files = name.starts_with("vision_encoder.")
            || (name.starts_with("lang_encoder.") && name.contains(".blocks."));
        if from_files {
            assert!(
                lazy.unread(name).is_some() && flamingo_model::weights::is_stand_in(tensor),
                "{name} was read"
            );
        }
    }
    lazy.materialize().expect("read");
    assert!(!lazy.has_unread());
    assert_eq!(
        whole.named_parameters().len(),
        lazy.named_parameters().len()
    );
    for ((name, a), (other, b)) in whole.named_parameters().iter().zip(lazy.named_parameters()) {
        assert_eq!(name, other);
        assert!(a.equal(b), "{name}");
    }
}

#[test]
fn world_sizes_and_strategies_train_identically() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    let single = run_world(dir.path(), 1, "no_shard", "single");
    let mut full = None;
    for (world, strategy) in [(2, "full"), (4, "full"), (2, "shard_grad_op")] {
        let name = format!("{strategy} x{world}");
        let run = run_world(dir.path(), world, strategy, &name.replace(' ', "-"));
        assert_same_training(&name, &single, &run);
        if (world, strategy) == (2, "full") {
            full = Some(run);
        }
    }
    // `full` keeps each unit's graph and gathers its weights again for its
    // backward; with checkpointing it recomputes the unit instead. The
    // same arithmetic: equal to 1e-6.
    let kept = full.expect("full x2 ran");
    let recomputed = run_world(dir.path(), 2, "full+checkpointing", "full-checkpointing-x2");
    assert_same_arithmetic("full x2, recomputed", &kept, &recomputed);
    // Selective: the graphs kept, the weights parked and gathered again,
    // and the cheap outputs computed again after them.
    let selective = run_world(dir.path(), 2, "full+selective", "full-selective-x2");
    assert_same_arithmetic("full x2, selective", &kept, &selective);
    // Under amp_bf16 the units with Linear weights are gathered from bf16
    // copies and their other weights kept whole in fp32 on every rank:
    // autocast's arithmetic, with half the bytes gathered.
    let per_use = run_world(dir.path(), 2, "full+amp+per_use", "full-amp-per-use-x2");
    let copies = run_world(dir.path(), 2, "full+amp", "full-amp-x2");
    assert_same_arithmetic("full x2, amp, bf16 copies", &per_use, &copies);
    // Each rank reading only its shards of the weights (by byte range from
    // the safetensors files) trains exactly as loading them whole; so does
    // gathering every unit (and gathering it again for its backward) only
    // when it is used, none prefetched (a limit of 2,000 values).
    let lazy = run_world(dir.path(), 2, "full+lazy+pieces", "full-lazy-x2");
    assert_eq!(lazy.0, kept.0, "losses of the lazily loaded run");
    assert!(lazy.1.equal(&kept.1), "weights of the lazily loaded run");
    // Two emulated nodes of two ranks: sharded within, replicated across.
    let hybrid = run_world_nodes(dir.path(), 4, 2, "hybrid", "hybrid-2x2");
    assert_same_training("hybrid 2 nodes x 2", &single, &hybrid);
    // The weights moved, and the loss fell over the steps.
    let initial = {
        let spec = ModelSpec::from_file(&dir.path().join("model/model.toml")).expect("spec");
        let (model, tokenizer) = load(&spec);
        Trainer::new(model, &tokenizer, None, config(Strategy::NoShard))
            .expect("trainer")
            .flat_parameters()
            .expect("weights")
    };
    assert!((&single.1 - initial).abs().max().double_value(&[]) > 1e-3);
    let losses = &single.0;
    let first = losses[0].0 + losses[0].1;
    let last = losses[STEPS - 1].0 + losses[STEPS - 1].1;
    assert!(last < first, "loss did not fall: {losses:?}");
}
