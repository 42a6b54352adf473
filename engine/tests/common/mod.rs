//! Shared by the tests that compare with a Python reference script from
//! `tests/reference/` (the venv's Python; scripts/test.sh installs what they
//! import).

use std::path::{Path, PathBuf};

/// Runs `tests/reference/<script> <out>`; fails with the script's stderr.
pub fn run_reference(script: &str, out: &Path) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    flamingo_common::testing::run_python(&path, &[out.as_os_str()]);
}
