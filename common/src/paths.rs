//! Where flamingo keeps local state: `$FLAMINGO_HOME`, else `~/.flamingo`.

use std::path::PathBuf;

pub const HOME_ENV: &str = "FLAMINGO_HOME";

/// Root of flamingo's local state (local cluster, logs).
pub fn flamingo_home() -> PathBuf {
    if let Some(home) = std::env::var_os(HOME_ENV) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    user_home.join(".flamingo")
}

/// State directory of the local cluster started by `flamingoctl up`.
pub fn local_cluster_dir() -> PathBuf {
    flamingo_home().join("cluster")
}
