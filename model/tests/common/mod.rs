//! Shared by the parity tests: runs a reference script from
//! `tests/reference/` with the venv's Python (scripts/test.sh installs the
//! packages they import) and fails with the script's stderr if it breaks.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn python() -> PathBuf {
    std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs `tests/reference/<script> <out>`.
pub fn run_reference(script: &str, out: &Path) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let output = Command::new(python())
        .arg(&path)
        .arg(out)
        .output()
        .expect("the venv python runs");
    assert!(
        output.status.success(),
        "{script} failed (scripts/test.sh installs the reference packages):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the script into a fresh temporary directory and returns it.
pub fn reference_dir(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    run_reference(script, dir.path());
    dir
}

/// Runs a script that writes one safetensors file `file_name` and reads it.
pub fn reference_weights(
    script: &str,
    file_name: &str,
) -> (tempfile::TempDir, flamingo_model::Weights) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join(file_name);
    run_reference(script, &out);
    let weights =
        flamingo_model::Weights::read_safetensors(&out).expect("reference safetensors reads");
    (dir, weights)
}

/// Same shape, and no element further than `tolerance` from the reference.
pub fn assert_close(actual: &tch::Tensor, expected: &tch::Tensor, tolerance: f64, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what}: shapes differ");
    let difference = (actual - expected).abs().max().double_value(&[]);
    assert!(
        difference <= tolerance,
        "{what}: max abs difference {difference}"
    );
}
