//! The certificates a namespace's flamingo runs with, as Secrets: issued by
//! a CA kept on the machine that renders the objects (`--pki`, default
//! `$FLAMINGO_HOME/k8s/<namespace>/pki`), reused while valid. The control
//! plane's Secret holds the CA certificate, the coordinator's, the data
//! service's and etcd's certificates and the rank key; each job's Secret
//! holds one certificate per agent pod (`node-<index>`, the pod's node id
//! `<job>-<index>` in it) and the launcher's. cert-manager can issue the
//! same Secrets instead (README, "Security").

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use flamingo_security::{Identity, Issued, Pki, Role};

use super::{object_name, K8sFlags, K8sJob};

/// Where the Secrets are mounted in every pod.
pub const TLS_DIR: &str = "/etc/flamingo/tls";
pub const CONTROL_PLANE_SECRET: &str = "flamingo-tls";

/// The contents of the control plane's and one job's Secrets.
#[derive(Debug, Clone)]
pub struct K8sCredentials {
    control_plane: Vec<(String, String)>,
    job: Vec<(String, String)>,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))
}

impl K8sCredentials {
    /// The CA folder for `flags`.
    pub fn pki_dir(flags: &K8sFlags) -> PathBuf {
        flags.pki.clone().unwrap_or_else(|| {
            flamingo_common::paths::flamingo_home()
                .join("k8s")
                .join(&flags.namespace)
                .join("pki")
        })
    }

    /// Issues (or reuses) every certificate `job` and the control plane need.
    pub fn prepare(job: &K8sJob, flags: &K8sFlags) -> anyhow::Result<Self> {
        let pki = Pki::init(&Self::pki_dir(flags))?;
        let validity = crate::pki::VALIDITY;
        let service = |name: &str, services: &[&str]| -> anyhow::Result<Issued> {
            let hosts: Vec<String> = services
                .iter()
                .flat_map(|host| [host.to_string(), format!("{host}.{}.svc", flags.namespace)])
                .collect();
            Ok(pki.ensure(&Identity::service(name), validity, &hosts)?)
        };
        let pair = |file: &str, issued: &Issued| -> anyhow::Result<Vec<(String, String)>> {
            Ok(vec![
                (format!("{file}.pem"), read(&issued.cert)?),
                (format!("{file}.key"), read(&issued.key)?),
            ])
        };
        let ca = ("ca.pem".to_string(), read(&pki.ca_cert())?);
        let mut control_plane = vec![ca.clone()];
        control_plane.extend(pair(
            "coordinator",
            &service("coordinator", &[super::objects::COORDINATOR])?,
        )?);
        control_plane.extend(pair(
            "data-service",
            &service(
                "data-service",
                &[
                    super::objects::DATA_SERVICE,
                    super::objects::DATA_SERVICE_LOCAL,
                ],
            )?,
        )?);
        control_plane.extend(pair("etcd", &service("etcd", &[super::objects::ETCD])?)?);
        control_plane.push(("rank.secret".to_string(), read(&pki.rank_secret_path())?));
        control_plane.push((
            "dashboard.token".to_string(),
            read(&pki.dashboard_token_path())?,
        ));
        let name = object_name(&job.name);
        let mut job_files = vec![ca];
        for index in 0..job.nodes {
            let node = pki.ensure(&Identity::node(&format!("{name}-{index}")), validity, &[])?;
            job_files.extend(pair(&format!("node-{index}"), &node)?);
        }
        // The launcher submits and follows the job: a submitter, not an
        // admin (command jobs need an admin's own credential).
        let launcher = pki.ensure(
            &Identity::user(&format!("launcher-{name}"), Role::Submitter),
            validity,
            &[],
        )?;
        job_files.extend(pair("launcher", &launcher)?);
        Ok(Self {
            control_plane,
            job: job_files,
        })
    }

    /// The control plane's Secret.
    pub fn control_plane_secret(&self, flags: &K8sFlags) -> Value {
        secret(
            CONTROL_PLANE_SECRET,
            flags,
            "control-plane",
            &self.control_plane,
        )
    }

    /// `job`'s Secret.
    pub fn job_secret(&self, job: &K8sJob, flags: &K8sFlags) -> Value {
        let name = job_secret_name(job);
        secret(&name, flags, "launcher", &self.job)
    }
}

pub fn job_secret_name(job: &K8sJob) -> String {
    format!("flamingo-{}-tls", object_name(&job.name))
}

fn secret(name: &str, flags: &K8sFlags, component: &str, files: &[(String, String)]) -> Value {
    let data: serde_json::Map<String, Value> = files
        .iter()
        .map(|(file, text)| (file.clone(), Value::String(text.clone())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": flags.namespace,
            "labels": {
                "app.kubernetes.io/name": "flamingo",
                "app.kubernetes.io/component": component,
            },
        },
        "stringData": data,
    })
}

/// The Secret `name` as a read-only volume, group-readable for the pods'
/// `fsGroup`.
pub fn volume(name: &str) -> (Value, Value) {
    (
        json!({ "name": "tls", "secret": { "secretName": name, "defaultMode": 0o440 } }),
        mount(),
    )
}

/// Where a container sees its pod's `tls` volume.
pub fn mount() -> Value {
    json!({ "name": "tls", "mountPath": TLS_DIR, "readOnly": true })
}

/// `--tls-ca/--tls-cert/--tls-key` for `file` in the mounted Secret.
pub fn tls_args(file: &str) -> Vec<String> {
    vec![
        format!("--tls-ca={TLS_DIR}/ca.pem"),
        format!("--tls-cert={TLS_DIR}/{file}.pem"),
        format!("--tls-key={TLS_DIR}/{file}.key"),
    ]
}
