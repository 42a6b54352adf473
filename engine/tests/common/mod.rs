//! Shared by the tests that compare with a Python reference script from
//! `tests/reference/` (the venv's Python; scripts/test.sh installs what they
//! import).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `tests/reference/<script> <out>`; fails with the script's stderr.
pub fn run_reference(script: &str, out: &Path) {
    let python = std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let output = Command::new(python)
        .arg(path)
        .arg(out)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
