//! `flamingoctl train` end to end on the synthetic data and a tiny model:
//! two ranks train and checkpoint; all processes are killed with SIGKILL
//! after a checkpoint; the run resumes on one rank (the same global batch)
//! and the following steps' losses equal those of an uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flamingo_tests::ClusterSandbox;

fn flamingoctl(dir: &Path) -> Command {
    let mut command = Command::new(ClusterSandbox::binary("flamingoctl"));
    command.current_dir(dir);
    command
}

fn train_args(run: &str, nproc: u32, per_rank_laion: u32, per_rank_mmc4: u32) -> Vec<String> {
    [
        "train",
        "--nproc",
        &nproc.to_string(),
        "--model",
        "tiny/model.toml",
        "--laion_shards",
        "data/laion-{00000..00003}.tar",
        "--mmc4_shards",
        "data/mmc4-{00000..00001}.tar",
        "--batch_size_laion",
        &per_rank_laion.to_string(),
        "--batch_size_mmc4",
        &per_rank_mmc4.to_string(),
        "--train_num_samples_laion",
        "96",
        "--train_num_samples_mmc4",
        "48",
        "--warmup_steps",
        "2",
        "--learning_rate",
        "3e-3",
        "--lr_scheduler",
        "linear",
        "--logging_steps",
        "1",
        "--checkpoint_steps",
        "4",
        "--run_name",
        run,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs flamingoctl in `dir`; fails the test with its stderr unless it
/// succeeds; returns its stdout.
fn run_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, args: &[S]) -> String {
    let output = flamingoctl(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("flamingoctl runs");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// step → (loss_laion, loss_mmc4), the last line for each step (NaN for a
/// dataset the run does not have).
fn losses(dir: &Path, run: &str) -> std::collections::BTreeMap<u64, (f64, f64)> {
    std::fs::read_to_string(dir.join("runs").join(run).join("log.jsonl"))
        .expect("a log line")
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a log line");
            (
                value["step"].as_u64().expect("a log line"),
                (
                    value["loss_laion"].as_f64().unwrap_or(f64::NAN),
                    value["loss_mmc4"].as_f64().unwrap_or(f64::NAN),
                ),
            )
        })
        .collect()
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_on_another_world_size_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[String]| {
        run_ok(dir.path(), args);
    };
    for form in ["laion", "mmc4"] {
        let size = if form == "laion" { "32" } else { "96" };
        run(&[
            "data",
            "synth",
            "--form",
            form,
            "--out",
            "data",
            "--samples",
            "96",
            "--per-shard",
            if form == "laion" { "24" } else { "48" },
            "--image-size",
            size,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>());
    }
    run(&[
        "tiny-model",
        "--tokenizer",
        "data/tokenizer",
        "--out",
        "tiny",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>());

    // Uninterrupted: 2 ranks × (4 LAION, 2 MMC4): 12 steps.
    run(&train_args("whole", 2, 4, 2));
    let whole = losses(dir.path(), "whole");
    assert_eq!(whole.len(), 12);
    let first = whole[&1].0 + whole[&1].1;
    let last = whole[&12].0 + whole[&12].1;
    assert!(last < first, "the loss falls: {whole:?}");

    // The same run fed by a data-service replica gives the same losses.
    let port = flamingo_common::net::free_local_port().expect("free port");
    // Secure as a cluster's replica: its certificate, the data folder as
    // its only prefix; the ranks show the admin's certificate (this
    // process's FLAMINGO_TLS_*, set by `credentials`).
    let credentials = flamingo_tests::credentials();
    let mut service = Command::new(ClusterSandbox::binary("flamingo-data-service"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(credentials.data_service.args())
        .arg(format!("--allow-prefix={}", dir.path().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("data service starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "data service did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut remote_args = train_args("remote", 2, 4, 2);
    remote_args.extend([
        "--data_service".to_string(),
        format!("http://127.0.0.1:{port}"),
    ]);
    run(&remote_args);
    let _ = service.kill();
    let _ = service.wait();
    let remote = losses(dir.path(), "remote");
    assert_eq!(remote.len(), 12);
    for (step, (a, b)) in &whole {
        let (x, y) = remote[step];
        assert!(
            (a - x).abs() <= 1e-6 * a.abs() && (b - y).abs() <= 1e-6 * b.abs(),
            "step {step}: {remote:?} vs {whole:?}"
        );
    }

    // Interrupted, under `full` (each rank's file holds a range per unit):
    // SIGKILL once the step-4 checkpoint is committed.
    let mut cut_args = train_args("cut", 2, 4, 2);
    cut_args.extend(["--fsdp_sharding_strategy".to_string(), "full".to_string()]);
    let mut child = flamingoctl(dir.path())
        .args(cut_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = dir.path().join("runs/cut/latest");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !latest.exists() {
        assert!(Instant::now() < deadline, "no checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL; the ranks die with it (PDEATHSIG)
    child.wait().unwrap();
    let saved = std::fs::read_to_string(&latest).unwrap();
    let saved_step: u64 = saved
        .trim()
        .rsplit("step-")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((4..12).contains(&saved_step), "{saved}");

    // Resume on 1 rank (the default shard_grad_op) with the same global
    // batch (8 LAION, 4 MMC4).
    run(&train_args("cut", 1, 8, 4));
    let resumed = losses(dir.path(), "cut");
    for step in saved_step + 1..=12 {
        let (a, b) = (whole[&step], resumed[&step]);
        for (x, y) in [(a.0, b.0), (a.1, b.1)] {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs(),
                "step {step}: {y} after resuming vs {x}"
            );
        }
    }
    assert!(dir
        .path()
        .join("runs/cut/checkpoints/step-00000012/manifest.json")
        .exists());

    // Exported in OpenFlamingo's names, the trained parts load as a model
    // spec's checkpoint, and the model scores a prompt with them.
    run(&["export", "runs/cut", "--out", "trained.pt"].map(String::from));
    std::fs::write(
        dir.path().join("trained.toml"),
        "[vision]\narch = \"tiny/clip.json\"\nweights = \"tiny/clip.safetensors\"\n[language]\npath = \"tiny/lm\"\n[flamingo]\ncheckpoint = \"trained.pt\"\n",
    )
    .expect("spec written");
    let (_, members) = flamingo_data::synthetic::laion_sample(77, 0, 32);
    std::fs::write(dir.path().join("held.png"), &members[0].1).expect("image written");
    let scored = run_ok(
        dir.path(),
        &[
            "score",
            "--model",
            "trained.toml",
            "--image",
            "held.png",
            "--prompt",
            "<image>a small red circle",
            "--json",
        ],
    );
    let value: serde_json::Value = serde_json::from_str(&scored).expect("json");
    // <image> a small red circle: 5 tokens, 4 log-probabilities.
    assert_eq!(
        value["logprobs"].as_array().map(Vec::len),
        Some(4),
        "{value}"
    );
}

/// Trains the released-format tiny model (written by the Python libraries)
/// for two steps, exports it, and loads the export into the Python
/// OpenFlamingo: no unexpected keys, every trainable key present, the values
/// ours.
#[test]
fn exports_load_into_the_python_open_flamingo() {
    let dir = tempfile::tempdir().unwrap();
    let python = std::env::var_os("FLAMINGO_VENV")
        .map(|venv| std::path::PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| std::path::PathBuf::from("python3"));
    let reference =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/reference");
    let status = Command::new(&python)
        .arg(reference.join("released_format_reference.py"))
        .arg(dir.path().join("model"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let run = |args: &[&str]| run_ok(dir.path(), args);
    run(&[
        "data",
        "synth",
        "--form",
        "mmc4",
        "--out",
        "data",
        "--samples",
        "16",
        "--per-shard",
        "16",
    ]);
    run(&[
        "train",
        "--model",
        "model/model.toml",
        "--mmc4_shards",
        "data/mmc4-00000.tar",
        "--batch_size_mmc4",
        "4",
        "--train_num_samples_mmc4",
        "8",
        "--warmup_steps",
        "0",
        "--learning_rate",
        "1e-2",
        "--run_name",
        "exported",
    ]);
    run(&["export", "runs/exported", "--out", "export.safetensors"]);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/reference/export_reference.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(dir.path().join("model"))
        .arg(dir.path().join("export.safetensors"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["unexpected"], serde_json::json!([]), "{report}");
    assert_eq!(
        report["missing_trainable"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(report["max_difference"].as_f64(), Some(0.0), "{report}");
}

/// The shape words ("circle", "square", "triangle") of a caption, in order.
fn shapes(caption: &str) -> Vec<&'static str> {
    caption
        .split_whitespace()
        .filter_map(|word| {
            ["circle", "square", "triangle"]
                .into_iter()
                .find(|shape| word.trim_end_matches('s') == *shape)
        })
        .collect()
}

/// A tiny model trained for about three CPU minutes on synthetic LAION
/// shapes (two ranks) shows a falling loss, and its greedy captions of
/// held-out images name the first drawn shape far more often than chance (1
/// in 3; 22 of 24 when this was written); the untrained model's captions
/// name none.
#[test]
fn a_tiny_model_learns_to_caption_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| run_ok(dir.path(), args);
    run(&[
        "data",
        "synth",
        "--form",
        "laion",
        "--out",
        "data",
        "--samples",
        "2048",
        "--per-shard",
        "512",
        "--image-size",
        "32",
    ]);
    run(&[
        "tiny-model",
        "--tokenizer",
        "data/tokenizer",
        "--out",
        "tiny",
        "--lm-width",
        "64",
        "--vision-width",
        "64",
    ]);
    let started = Instant::now();
    run(&[
        "train",
        "--nproc",
        "2",
        "--model",
        "tiny/model.toml",
        "--laion_shards",
        "data/laion-{00000..00003}.tar",
        "--batch_size_laion",
        "16",
        "--train_num_samples_laion",
        "2048",
        "--num_epochs",
        "12",
        "--learning_rate",
        "2e-3",
        "--lr_scheduler",
        "cosine",
        "--warmup_steps",
        "20",
        "--logging_steps",
        "16",
        "--run_name",
        "shapes",
    ]);
    let seconds = started.elapsed().as_secs_f64();
    let log = losses(dir.path(), "shapes");
    let first = log.values().next().expect("a logged step").0;
    let last = log.values().last().expect("a logged step").0;
    assert!(last < 0.3 * first, "the loss falls: {first} → {last}");

    run(&["export", "runs/shapes", "--out", "trained.pt"]);
    std::fs::write(
        dir.path().join("trained.toml"),
        "[vision]\narch = \"tiny/clip.json\"\nweights = \"tiny/clip.safetensors\"\n[language]\npath = \"tiny/lm\"\n[flamingo]\ncheckpoint = \"trained.pt\"\n",
    )
    .expect("spec written");
    // Held-out scenes: another seed than the training shards' (0).
    let (mut right, mut untrained_shapes) = (0, 0);
    let mut seen = Vec::new();
    for index in 0..24 {
        let (_, members) = flamingo_data::synthetic::laion_sample(99, index, 32);
        let member = |extension: &str| {
            members
                .iter()
                .find(|(name, _)| name == extension)
                .map(|(_, bytes)| bytes.clone())
                .expect("a synthetic sample has a png and a txt")
        };
        let truth = String::from_utf8(member("txt")).expect("utf-8 caption");
        let image = dir.path().join(format!("held-{index}.png"));
        std::fs::write(&image, member("png")).expect("image written");
        let caption = |spec: &str| {
            let stdout = run(&[
                "generate",
                "--model",
                spec,
                "--image",
                image.to_str().unwrap(),
                "--prompt",
                "<image>",
                "--max-new-tokens",
                "12",
                "--json",
            ]);
            let value: serde_json::Value = serde_json::from_str(&stdout).expect("json");
            value["text"].as_str().expect("text").to_string()
        };
        let trained = caption("trained.toml");
        if shapes(&trained).first() == shapes(&truth).first() {
            right += 1;
        }
        untrained_shapes += shapes(&caption("tiny/model.toml")).len();
        seen.push(format!("{truth} → {trained}"));
    }
    eprintln!(
        "trained in {seconds:.0}s; {right}/24 captions name the first shape:\n{}",
        seen.join("\n")
    );
    assert!(
        right >= 16,
        "{right}/24 captions name the first shape:\n{}",
        seen.join("\n")
    );

    // The same models through `flamingoctl eval` on a synthetic COCO in
    // Karpathy's layout: the trained one scores far above the untrained one
    // (CIDEr about 205 against 0.4 at 0 shots when this was written), and
    // `--job RUN` evaluates the run's latest checkpoint as the export does.
    run(&[
        "data",
        "synth-eval",
        "--dataset",
        "coco",
        "--out",
        "coco",
        "--train",
        "64",
        "--test",
        "24",
    ]);
    let cider = |model_flag: &str, model: &str, results: &str| -> Vec<f64> {
        run(&[
            "eval",
            model_flag,
            model,
            "--dataset",
            "coco",
            "--data-dir",
            "coco",
            "--shots",
            "0",
            "4",
            "--results",
            results,
        ]);
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(results)).unwrap())
                .unwrap();
        value["coco"]
            .as_array()
            .unwrap()
            .iter()
            .map(|shot| shot["mean"].as_f64().unwrap())
            .collect()
    };
    let untrained = cider("--model", "tiny/model.toml", "untrained.json");
    let trained = cider("--model", "trained.toml", "trained.json");
    eprintln!("COCO-style CIDEr at 0 and 4 shots: trained {trained:?}, untrained {untrained:?}");
    for (trained, untrained) in trained.iter().zip(&untrained) {
        assert!(
            *trained > 50.0 && *trained > 10.0 * untrained,
            "trained CIDEr {trained} is not clearly above untrained {untrained}"
        );
    }
    assert_eq!(cider("--job", "runs/shapes", "job.json"), trained);
    assert_eq!(
        untrained_shapes, 0,
        "the untrained model already names shapes"
    );
}
