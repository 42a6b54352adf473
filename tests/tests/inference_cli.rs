//! `flamingoctl score` and `generate` on released-format files written by
//! the Python libraries (see model/tests/reference/released_format_reference.py):
//! token ids and greedy tokens exactly, log-probabilities to 1e-4, as the
//! Python OpenFlamingo computes them from the same PNG images.

use std::path::{Path, PathBuf};
use std::process::Command;

use flamingo_tests::ClusterSandbox;

fn reference(dir: &Path) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/reference/released_format_reference.py");
    let python = std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let output = Command::new(python)
        .arg(&script)
        .arg(dir)
        .output()
        .expect("the venv python runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(dir.join("cli_reference.json")).expect("reference written");
    serde_json::from_str(&text).expect("reference is JSON")
}

fn flamingoctl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ClusterSandbox::binary("flamingoctl"))
        .args(args)
        .arg("--model")
        .arg(dir.join("model.toml"))
        .arg("--image")
        .arg(dir.join("photo0.png"))
        .arg("--image")
        .arg(dir.join("photo1.png"))
        .output()
        .expect("flamingoctl runs")
}

/// Runs flamingoctl with `args`; it must succeed; its stdout as JSON.
fn json_run(dir: &Path, args: &[&str]) -> serde_json::Value {
    let output = flamingoctl(dir, args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

#[test]
fn score_and_generate_match_open_flamingo() {
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path());
    let prompt = expected["prompt"].as_str().unwrap();

    let scored = json_run(dir.path(), &["score", "--prompt", prompt, "--json"]);
    assert_eq!(scored["token_ids"], expected["token_ids"]);
    let ours = scored["logprobs"].as_array().unwrap();
    let theirs = expected["logprobs"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(
        ours.len() + 1,
        scored["token_ids"].as_array().unwrap().len()
    );
    for (index, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let difference = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
        assert!(difference <= 1e-4, "logprob {index}: {a} vs {b}");
    }

    let generated = json_run(
        dir.path(),
        &[
            "generate",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "5",
            "--json",
        ],
    );
    assert_eq!(generated["token_ids"], expected["generated"]);
    assert_eq!(generated["text"], expected["text"]);

    let beams = json_run(
        dir.path(),
        &[
            "generate",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "5",
            "--num-beams",
            "3",
            "--length-penalty",
            "0.8",
            "--json",
        ],
    );
    assert_eq!(beams["token_ids"], expected["beam3"]);
    assert_eq!(beams["text"], expected["beam3_text"]);

    // As text: only the new tokens, unless the prompt is asked for.
    let text = |extra: &[&str]| {
        let mut args = vec!["generate", "--prompt", prompt, "--max-new-tokens", "5"];
        args.extend_from_slice(extra);
        let output = flamingoctl(dir.path(), &args);
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_string()
    };
    let new_text = expected["text"].as_str().expect("text");
    assert_eq!(text(&[]), new_text.trim_end());
    assert_eq!(
        text(&["--show-prompt"]),
        format!("{prompt}{new_text}").trim_end()
    );
}

#[test]
fn bf16_gives_fp32_greedy_tokens_and_close_logprobs() {
    // Reduced precision on the CPU (what `--device cuda --dtype bf16` runs
    // on a GPU): the same greedy tokens as OpenFlamingo in fp32, and
    // log-probabilities within bf16's rounding.
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path());
    let prompt = expected["prompt"].as_str().unwrap();
    for dtype in ["bf16", "fp16"] {
        let generated = json_run(
            dir.path(),
            &[
                "generate",
                "--prompt",
                prompt,
                "--max-new-tokens",
                "5",
                "--dtype",
                dtype,
                "--json",
            ],
        );
        assert_eq!(generated["token_ids"], expected["generated"], "{dtype}");

        let scored = json_run(
            dir.path(),
            &["score", "--prompt", prompt, "--dtype", dtype, "--json"],
        );
        let ours = scored["logprobs"].as_array().unwrap();
        let theirs = expected["logprobs"].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len());
        let worst = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 0.15, "{dtype}: logprobs differ by up to {worst}");
        assert!(worst > 0.0, "{dtype}: the weights were not converted");
    }
}

#[test]
fn bad_inputs_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    reference(dir.path());
    let mismatch = flamingoctl(
        dir.path(),
        &["score", "--prompt", "<image>only one", "--json"],
    );
    assert!(!mismatch.status.success());
    let stderr = String::from_utf8_lossy(&mismatch.stderr);
    assert!(
        stderr.contains("the prompt has 1 <image> token(s) but 2 --image file(s) were given"),
        "{stderr}"
    );
    let zero = flamingoctl(
        dir.path(),
        &[
            "generate",
            "--prompt",
            "<image>a<image>b",
            "--num-beams",
            "0",
        ],
    );
    assert!(String::from_utf8_lossy(&zero.stderr)
        .contains("--num-beams and --max-new-tokens must be at least 1"));
    let dtype = flamingoctl(
        dir.path(),
        &["score", "--prompt", "<image>a<image>b", "--dtype", "int8"],
    );
    assert!(String::from_utf8_lossy(&dtype.stderr)
        .contains("'int8' is not a dtype (fp32, bf16 or fp16)"));
    let device = flamingoctl(
        dir.path(),
        &[
            "score",
            "--prompt",
            "<image>a<image>b",
            "--device",
            "cuda:7",
        ],
    );
    let stderr = String::from_utf8_lossy(&device.stderr);
    assert!(
        !device.status.success() && stderr.contains("--device cuda:7: this machine has"),
        "{stderr}"
    );
    let missing = Command::new(ClusterSandbox::binary("flamingoctl"))
        .args([
            "score",
            "--model",
            "/nonexistent/model.toml",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("/nonexistent/model.toml") && stderr.contains("model spec file"),
        "{stderr}"
    );
}

/// `flamingoctl model convert` rewrites OpenFlamingo's `checkpoint.pt` and
/// a sharded `pytorch_model.bin` as safetensors that the Python
/// safetensors library reads back equal (names, dtypes — bf16 and fp16
/// kept — shapes, values); past --max-shard-gb it shards with an index as
/// save_pretrained does.
#[test]
fn model_convert_writes_safetensors_that_torch_reads_back_equal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/reference/convert_reference.py");
    let python = std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let run_python = |command: &str| {
        let output = Command::new(&python)
            .arg(&script)
            .arg(command)
            .arg(dir.path())
            .output()
            .expect("the venv python runs");
        assert!(
            output.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run_python("make");
    let convert = |args: &[&str]| {
        let output = Command::new(ClusterSandbox::binary("flamingoctl"))
            .args(["--json", "model", "convert"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("flamingoctl runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON")
    };
    let checkpoint = convert(&["checkpoint.pt"]);
    assert_eq!(checkpoint["tensors"], 4, "{checkpoint}");
    // Every tensor in a file of its own: three files and the index.
    let lm = convert(&["lm", "--max-shard-gb", "0.00000001"]);
    assert_eq!(lm["files"].as_array().map(Vec::len), Some(4), "{lm}");
    run_python("check");
    // The converted folder loads as the LM did: safetensors first.
    assert!(dir.path().join("lm/model.safetensors.index.json").exists());

    let refused = Command::new(ClusterSandbox::binary("flamingoctl"))
        .args(["model", "convert", "checkpoint.pt", "--out", "x.bin"])
        .current_dir(dir.path())
        .output()
        .expect("flamingoctl runs");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("*.safetensors"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
