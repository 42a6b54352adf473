//! The record of a local cluster (`<state dir>/cluster.json`): what
//! `flamingoctl up` started, for `down` and for finding the coordinator and
//! the data service.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ClientError, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// The coordinator's address; under leader election every
    /// coordinator's, comma separated (clients use the one that answers).
    pub coordinator: String,
    pub etcd_endpoint: String,
    pub etcd_pid: u32,
    pub coordinator_pid: u32,
    /// The other coordinators under leader election (`up --coordinators`).
    #[serde(default)]
    pub standby_pids: Vec<u32>,
    pub agent_pids: Vec<u32>,
    /// The data-service replicas (`http://127.0.0.1:port`): node k's at k
    /// (its ranks read from it), or one for every node (`up
    /// --one-data-service`).
    #[serde(default)]
    pub data_services: Vec<String>,
    #[serde(default)]
    pub data_service_pids: Vec<u32>,
    /// The coordinator's dashboard (`http://127.0.0.1:port/`).
    #[serde(default)]
    pub dashboard: Option<String>,
    pub nodes: u32,
    pub slots_per_node: u32,
    pub state_dir: PathBuf,
    /// The cluster's certificate authority folder.
    #[serde(default)]
    pub pki: Option<PathBuf>,
    /// The admin credential of the user who ran `up` (CA, certificate,
    /// key): flamingoctl uses it when `FLAMINGO_TLS_*` are not set.
    #[serde(default)]
    pub admin: Option<[PathBuf; 3]>,
}

impl ClusterState {
    /// Points this process's `FLAMINGO_TLS_*` at the admin credential of
    /// the local cluster in `state_dir`, unless they are already set.
    /// Called first thing in `main`, before any thread starts.
    pub fn use_admin_credentials(state_dir: &Path) {
        if std::env::var_os(flamingo_security::ENV_CERT).is_some() {
            return;
        }
        if let Ok(Some(Self {
            admin: Some([ca, cert, key]),
            ..
        })) = Self::load(state_dir)
        {
            std::env::set_var(flamingo_security::ENV_CA, ca);
            std::env::set_var(flamingo_security::ENV_CERT, cert);
            std::env::set_var(flamingo_security::ENV_KEY, key);
        }
    }
}

impl ClusterState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("cluster.json")
    }

    /// The record in `state_dir`, if there is one.
    pub fn load(state_dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(state_dir);
        let failed = |message: String| ClientError::File {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
                failed(format!(
                    "not a flamingo cluster record ({error}); remove it"
                ))
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(failed(format!("cannot read it: {error}"))),
        }
    }

    /// Writes the record (whole, through a rename).
    pub fn save(&self) -> Result<()> {
        let path = Self::path(&self.state_dir);
        let temporary = path.with_extension("json.tmp");
        let failed = |error: std::io::Error| ClientError::File {
            path: path.display().to_string(),
            message: format!("cannot write it: {error}"),
        };
        let bytes = serde_json::to_vec_pretty(self).expect("a cluster record serializes");
        std::fs::write(&temporary, bytes).map_err(failed)?;
        std::fs::rename(&temporary, &path).map_err(failed)
    }
}
