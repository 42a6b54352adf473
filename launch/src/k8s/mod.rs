//! `flamingoctl launch --scheduler k8s`: the Kubernetes objects that run a
//! flamingo job, applied through the API server of the current kubeconfig
//! context (server-side apply), or rendered as YAML with `--dry-run` (for
//! `kubectl apply -f -`).
//!
//! The control plane (once per namespace; applying it again changes
//! nothing): a ServiceAccount with a Role to read pods, etcd (a StatefulSet
//! with a volume), the coordinator (Deployment + Service for gRPC, the
//! dashboard and `/metrics`) and the data service: a DaemonSet, so every
//! node runs a replica that its agent pods reach through a Service with
//! `internalTrafficPolicy: Local` (the cluster-wide Service stands in when
//! it is down), or one replica with `--one-data-service`. Per job: a headless
//! Service and an Indexed Job of worker agents, one pod per node, GPUs
//! requested as `nvidia.com/gpu` with NCCL's network settings and a memory
//! `/dev/shm`; and a launcher Job that submits the job to the coordinator
//! with the same flags (`flamingoctl launch … --wait`). Paths in the flags
//! must exist inside the pods: mount the data with `--volume-claim`.
//!
//! Secure as the local cluster is: the certificates come as Secrets (see
//! [`secrets`]), etcd and every gRPC link use mutual TLS, every pod runs as
//! uid 10001 with no capabilities, no privilege escalation and a read-only
//! root filesystem, with resource requests and limits; NetworkPolicies let
//! only the coordinator reach etcd, flamingo's pods reach the coordinator,
//! agent pods reach the data service, and a job's agents reach each other.

use serde_json::Value;

mod apply;
mod objects;
mod secrets;

pub use apply::{apply, client, delete_job};
pub use objects::{control_plane, job_objects};
pub use secrets::K8sCredentials;

#[derive(Debug, Clone, clap::Args)]
pub struct K8sFlags {
    /// Namespace of every object.
    #[arg(long, default_value = "flamingo")]
    pub namespace: String,
    /// The container image with flamingo's binaries, etcd and torch
    /// (deploy/Dockerfile builds it).
    #[arg(long, default_value = "flamingo:latest")]
    pub image: String,
    /// GPUs per node (agent pod); 0 for CPU slots.
    #[arg(long, default_value_t = 0)]
    pub gpus_per_node: u32,
    /// A PersistentVolumeClaim mounted at /data in every pod (datasets,
    /// models, runs).
    #[arg(long)]
    pub volume_claim: Option<String>,
    /// Print what would be applied or submitted instead (k8s: the objects;
    /// slurm: the sbatch script).
    #[arg(long)]
    pub dry_run: bool,
    /// The CA the pods' certificates come from (kept on this machine;
    /// default $FLAMINGO_HOME/k8s/<namespace>/pki).
    #[arg(long)]
    pub pki: Option<std::path::PathBuf>,
    /// CPU an agent pod requests and is limited to.
    #[arg(long, default_value = "8")]
    pub agent_cpu: String,
    /// Memory an agent pod requests and is limited to.
    #[arg(long, default_value = "64Gi")]
    pub agent_memory: String,
    /// Coordinator replicas: with more than one they elect a leader through
    /// etcd; only the leader listens, so only it is Ready and behind the
    /// coordinator's Service, and a standby takes over when it dies.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
    pub coordinators: u32,
    /// One data-service replica for the namespace (a Deployment) instead
    /// of one on every node (a DaemonSet) feeding the agent pods there.
    #[arg(long)]
    pub one_data_service: bool,
}

/// What the objects are made from.
#[derive(Debug, Clone)]
pub struct K8sJob {
    pub name: String,
    pub nodes: u32,
    pub slots_per_node: u32,
    /// `flamingoctl launch` arguments for the launcher (without the
    /// scheduler's own flags).
    pub launch_args: Vec<String>,
}

/// A DNS-1123 label from a job name.
pub fn object_name(name: &str) -> String {
    let mut out: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out = out.trim_matches('-').to_string();
    out.truncate(40);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "job".into()
    } else {
        out
    }
}

/// Every object, as one multi-document YAML stream.
pub fn render(job: &K8sJob, flags: &K8sFlags) -> anyhow::Result<String> {
    let mut out = String::new();
    for object in objects(job, flags)? {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object)?);
    }
    Ok(out)
}

/// Every object, in the order they are applied: the control plane, then
/// the job's.
pub fn objects(job: &K8sJob, flags: &K8sFlags) -> anyhow::Result<Vec<Value>> {
    let credentials = K8sCredentials::prepare(job, flags)?;
    Ok(control_plane(flags, &credentials)
        .into_iter()
        .chain(job_objects(job, flags, &credentials))
        .collect())
}

/// The `launch` arguments without the scheduler's own flags (for the
/// launcher pod).
pub fn launch_args(argv: &[String]) -> Vec<String> {
    strip_flags(
        argv,
        &[
            "--scheduler",
            "--namespace",
            "--image",
            "--gpus-per-node",
            "--volume-claim",
            "--coordinator",
        ],
        &["--dry-run"],
    )
}

/// The arguments after `launch` in `argv`, without the flags named (those in
/// `with_value` with their value, as `--flag value` or `--flag=value`);
/// everything after `--` (a command job's argv) is kept as it is.
pub fn strip_flags(argv: &[String], with_value: &[&str], bare: &[&str]) -> Vec<String> {
    let start = argv
        .iter()
        .position(|arg| arg == "launch")
        .map_or(argv.len(), |i| i + 1);
    let mut out = Vec::new();
    let mut skip = false;
    let mut rest = argv[start..].iter();
    for arg in rest.by_ref() {
        if skip {
            skip = false;
            continue;
        }
        if arg == "--" {
            out.push(arg.clone());
            break;
        }
        if bare.contains(&arg.as_str()) {
            continue;
        }
        if with_value.contains(&arg.as_str()) {
            skip = true;
            continue;
        }
        if with_value
            .iter()
            .any(|flag| arg.starts_with(&format!("{flag}=")))
        {
            continue;
        }
        out.push(arg.clone());
    }
    out.extend(rest.cloned());
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(object_name("My_Run 1"), "my-run-1");
        assert_eq!(object_name("--"), "job");
        assert!(object_name(&"x".repeat(80)).len() <= 40);
    }

    #[test]
    fn the_launcher_gets_the_flags_without_the_schedulers() {
        let argv: Vec<String> = [
            "flamingoctl",
            "launch",
            "--scheduler",
            "k8s",
            "--nodes",
            "2",
            "--image=i:1",
            "--dry-run",
            "--config",
            "/data/job.toml",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            launch_args(&argv),
            ["--nodes", "2", "--config", "/data/job.toml"]
        );
    }

    #[test]
    fn a_command_jobs_own_flags_are_kept() {
        let argv: Vec<String> = [
            "flamingoctl",
            "launch",
            "--image",
            "i:1",
            "--",
            "echo",
            "--image",
            "x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(launch_args(&argv), ["--", "echo", "--image", "x"]);
    }

    fn demo() -> (K8sJob, K8sFlags) {
        (
            K8sJob {
                name: "demo".into(),
                nodes: 2,
                slots_per_node: 8,
                launch_args: vec!["--nodes".into(), "2".into()],
            },
            K8sFlags {
                namespace: "flamingo".into(),
                image: "flamingo:1".into(),
                gpus_per_node: 8,
                volume_claim: Some("flamingo-data".into()),
                dry_run: false,
                // One CA folder per call: the tests run in parallel.
                pki: Some(std::env::temp_dir().join(format!(
                    "flamingo-k8s-test-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ))),
                agent_cpu: "8".into(),
                agent_memory: "64Gi".into(),
                coordinators: 3,
                one_data_service: false,
            },
        )
    }

    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, Value)>>>;

    /// A stand-in API server for the client code: records each request
    /// (method, path and query, content type, body) and answers with the
    /// object, or with `failure` as a Kubernetes Status.
    async fn api_server(failure: Option<Value>) -> (kube::Client, Seen) {
        let seen: Seen = Default::default();
        let recorded = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let recorded = recorded.clone();
                let failure = failure.clone();
                async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let object: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    recorded.lock().expect("lock").push((
                        method.to_string(),
                        uri.to_string(),
                        content_type,
                        object.clone(),
                    ));
                    let (status, answer) = match failure {
                        Some(status) => (
                            axum::http::StatusCode::from_u16(
                                status["code"].as_u64().unwrap_or(500) as u16,
                            )
                            .expect("a status code"),
                            status,
                        ),
                        None => (axum::http::StatusCode::OK, object),
                    };
                    (
                        status,
                        [("content-type", "application/json")],
                        answer.to_string(),
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let address = listener.local_addr().expect("an address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{address}").parse().expect("a URL"));
        (kube::Client::try_from(config).expect("a client"), seen)
    }

    #[tokio::test]
    async fn every_object_is_applied_in_order_at_its_resource_path() {
        let (job, flags) = demo();
        let objects = objects(&job, &flags).unwrap();
        let (client, seen) = api_server(None).await;
        let lines = apply(&client, &objects).await.unwrap();
        assert_eq!(lines.len(), objects.len());
        // The Secrets first: the pods mount them.
        assert_eq!(lines[0], "Secret flamingo/flamingo-tls applied");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), objects.len());
        for ((method, uri, content_type, body), object) in seen.iter().zip(&objects) {
            assert_eq!(method, "PATCH");
            assert_eq!(content_type, "application/apply-patch+yaml");
            assert!(
                uri.contains("fieldManager=flamingoctl") && uri.contains("force=true"),
                "{uri}"
            );
            assert_eq!(body, object, "the object is sent as rendered");
        }
        let paths: Vec<&str> = seen
            .iter()
            .map(|(_, uri, _, _)| uri.split('?').next().unwrap())
            .collect();
        for expected in [
            "/api/v1/namespaces/flamingo/secrets/flamingo-tls",
            "/api/v1/namespaces/flamingo/secrets/flamingo-demo-tls",
            "/apis/networking.k8s.io/v1/namespaces/flamingo/networkpolicies/flamingo-etcd",
            "/api/v1/namespaces/flamingo/serviceaccounts/flamingo",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/flamingo/roles/flamingo",
            "/apis/apps/v1/namespaces/flamingo/statefulsets/flamingo-etcd",
            "/apis/apps/v1/namespaces/flamingo/deployments/flamingo-coordinator",
            "/api/v1/namespaces/flamingo/services/flamingo-demo-agents",
            "/apis/batch/v1/namespaces/flamingo/jobs/flamingo-demo-agents",
            "/apis/batch/v1/namespaces/flamingo/jobs/flamingo-demo-launch",
        ] {
            assert!(paths.contains(&expected), "{expected} not in {paths:#?}");
        }
        // The launcher goes last, once what it talks to is there.
        assert_eq!(
            paths.last(),
            Some(&"/apis/batch/v1/namespaces/flamingo/jobs/flamingo-demo-launch")
        );
    }

    #[tokio::test]
    async fn the_agents_job_is_deleted_with_its_pods() {
        let (client, seen) = api_server(Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200
        })))
        .await;
        delete_job(&client, "flamingo", "flamingo-demo-agents")
            .await
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (method, uri, _, body) = &seen[0];
        assert_eq!(method, "DELETE");
        assert_eq!(
            uri.trim_end_matches('?'),
            "/apis/batch/v1/namespaces/flamingo/jobs/flamingo-demo-agents"
        );
        assert_eq!(body["propagationPolicy"], "Background");
    }

    #[test]
    fn the_launcher_deletes_the_agents_when_the_job_ends() {
        let (job, flags) = demo();
        let objects = objects(&job, &flags).unwrap();
        let launcher = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "flamingo-demo-launch")
            .unwrap();
        let spec = &launcher["spec"]["template"]["spec"];
        assert_eq!(spec["serviceAccountName"], "flamingo");
        let args: Vec<&str> = spec["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"--wait"), "{args:?}");
        assert!(
            args.contains(&"--delete-k8s-job=flamingo-demo-agents"),
            "{args:?}"
        );
        let role = objects.iter().find(|o| o["kind"] == "Role").unwrap();
        assert!(role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|rule| rule["resources"][0] == "jobs"
                && rule["verbs"].to_string().contains("delete")));
    }

    #[tokio::test]
    async fn a_missing_namespace_is_named_with_the_fix() {
        let (job, flags) = demo();
        let (client, _) = api_server(Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "namespaces \"flamingo\" not found", "reason": "NotFound", "code": 404
        })))
        .await;
        let error = apply(&client, &objects(&job, &flags).unwrap())
            .await
            .unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains("Secret flamingo/flamingo-tls")
                && text.contains("kubectl create namespace flamingo"),
            "{text}"
        );
    }
}
