//! Running a Python baseline script: the venv's interpreter and the JSON
//! line the script prints last (shared by the benchmarks that compare with
//! the Python OpenFlamingo).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// `explicit`, else the venv's python (`$FLAMINGO_VENV`), else `python3`.
pub fn python(explicit: Option<&Path>) -> PathBuf {
    explicit.map(Path::to_path_buf).unwrap_or_else(|| {
        std::env::var_os("FLAMINGO_VENV")
            .map(|venv| PathBuf::from(venv).join("bin/python"))
            .unwrap_or_else(|| PathBuf::from("python3"))
    })
}

/// Runs `python script args…` with `threads` OpenMP threads and parses the
/// last line it prints as JSON.
pub fn run(
    python: &Path,
    script: &Path,
    args: &[&std::ffi::OsStr],
    threads: i32,
) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(python)
        .arg(script)
        .args(args)
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "the Python baseline {} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .context("the Python baseline printed nothing")?,
    )?)
}
