//! The credentials a cluster's processes start with: the cluster CA (in
//! `<state>/pki`, mode 0700) and one certificate per service, per node and
//! for the admin who started the cluster. Issued once and reused while
//! valid (another `up` renews what is about to expire).

use std::path::Path;
use std::time::Duration;

use flamingo_security::{Identity, Issued, Pki, Role, TlsFiles};

use crate::{LaunchError, Result};

/// Services, nodes and the admin: 30 days.
pub const VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// A cluster's CA and the service and admin credentials.
#[derive(Debug, Clone)]
pub struct ClusterCredentials {
    pub pki: Pki,
    pub coordinator: TlsFiles,
    pub data_service: TlsFiles,
    pub etcd: TlsFiles,
    pub admin: TlsFiles,
    /// Extra names the service certificates carry (hostnames other
    /// machines dial).
    hosts: Vec<String>,
}

fn error(error: flamingo_security::SecurityError) -> LaunchError {
    LaunchError::Credentials {
        message: error.to_string(),
    }
}

impl ClusterCredentials {
    /// Creates (or reuses) the CA in `dir` and the service and admin
    /// certificates. Service certificates name 127.0.0.1, localhost and
    /// `hosts`.
    pub fn prepare(dir: &Path, hosts: &[String]) -> Result<Self> {
        let pki = Pki::init(dir).map_err(error)?;
        let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        names.extend(hosts.iter().cloned());
        let files = |identity: Identity| -> Result<TlsFiles> {
            let issued = pki.ensure(&identity, VALIDITY, &names).map_err(error)?;
            Ok(files(&pki, &issued))
        };
        Ok(Self {
            coordinator: files(Identity::service("coordinator"))?,
            data_service: files(Identity::service("data-service"))?,
            etcd: files(Identity::service("etcd"))?,
            admin: files(Identity::user(&admin_name(), Role::Admin))?,
            pki: pki.clone(),
            hosts: names,
        })
    }

    /// Node `node_id`'s certificate (its id in the SAN).
    pub fn node(&self, node_id: &str) -> Result<TlsFiles> {
        let issued = self
            .pki
            .ensure(&Identity::node(node_id), VALIDITY, &self.hosts)
            .map_err(error)?;
        Ok(files(&self.pki, &issued))
    }
}

fn files(pki: &Pki, issued: &Issued) -> TlsFiles {
    TlsFiles::new(&pki.ca_cert(), &issued.cert, &issued.key)
}

/// The user who starts the cluster: `$USER`, else `admin`.
fn admin_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|name| Identity::user(name, Role::Admin).validate().is_ok())
        .unwrap_or_else(|| "admin".to_string())
}

/// A job API session with the admin credential of `credentials`.
pub async fn admin_session(
    credentials: &ClusterCredentials,
    address: &str,
) -> anyhow::Result<flamingo_client::Session> {
    let tls = credentials.admin.client().map_err(error)?;
    Ok(flamingo_client::Session::open_with(address, tls.as_ref()).await?)
}
