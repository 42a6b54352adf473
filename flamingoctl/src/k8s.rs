//! `flamingoctl launch --scheduler k8s`: the Kubernetes objects that run a
//! flamingo job, applied through the API server of the current kubeconfig
//! context (server-side apply), or rendered as YAML with `--dry-run` (for
//! `kubectl apply -f -`).
//!
//! The control plane (once per namespace; applying it again changes
//! nothing): a ServiceAccount with a Role to read pods, etcd (a StatefulSet
//! with a volume), the coordinator (Deployment + Service for gRPC, the
//! dashboard and `/metrics`) and a data-service replica. Per job: a headless
//! Service and an Indexed Job of worker agents, one pod per node, GPUs
//! requested as `nvidia.com/gpu` with NCCL's network settings and a memory
//! `/dev/shm`; and a launcher Job that submits the job to the coordinator
//! with the same flags (`flamingoctl launch … --wait`). Paths in the flags
//! must exist inside the pods: mount the data with `--volume-claim`.

use anyhow::Context;
use serde_json::{json, Value};

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

const COORDINATOR: &str = "flamingo-coordinator";
const ETCD: &str = "flamingo-etcd";
const DATA_SERVICE: &str = "flamingo-data-service";

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

fn metadata(name: &str, flags: &K8sFlags, component: &str) -> Value {
    json!({
        "name": name,
        "namespace": flags.namespace,
        "labels": {
            "app.kubernetes.io/name": "flamingo",
            "app.kubernetes.io/component": component,
        },
    })
}

fn selector(component: &str) -> Value {
    json!({ "app.kubernetes.io/name": "flamingo", "app.kubernetes.io/component": component })
}

fn data_volume(flags: &K8sFlags) -> (Vec<Value>, Vec<Value>) {
    match &flags.volume_claim {
        Some(claim) => (
            vec![json!({ "name": "data", "persistentVolumeClaim": { "claimName": claim } })],
            vec![json!({ "name": "data", "mountPath": "/data" })],
        ),
        None => (Vec::new(), Vec::new()),
    }
}

fn service(
    name: &str,
    flags: &K8sFlags,
    component: &str,
    ports: &[(&str, u16)],
    headless: bool,
) -> Value {
    let mut spec = json!({
        "selector": selector(component),
        "ports": ports.iter().map(|(port_name, port)| json!({
            "name": port_name, "port": port, "targetPort": port, "protocol": "TCP",
        })).collect::<Vec<_>>(),
    });
    if headless {
        spec["clusterIP"] = json!("None");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, flags, component),
        "spec": spec,
    })
}

/// The shared control plane.
pub fn control_plane(flags: &K8sFlags) -> Vec<Value> {
    let (volumes, mounts) = data_volume(flags);
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata("flamingo", flags, "control-plane"),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata("flamingo", flags, "control-plane"),
            "rules": [
                { "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"] },
                // The launcher deletes its job's agents when the job ends.
                { "apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "delete"] },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata("flamingo", flags, "control-plane"),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "flamingo" },
            "subjects": [{ "kind": "ServiceAccount", "name": "flamingo", "namespace": flags.namespace }],
        }),
        service(ETCD, flags, "etcd", &[("client", 2379)], true),
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": metadata(ETCD, flags, "etcd"),
            "spec": {
                "serviceName": ETCD,
                "replicas": 1,
                "selector": { "matchLabels": selector("etcd") },
                "template": {
                    "metadata": { "labels": selector("etcd") },
                    "spec": {
                        "containers": [{
                            "name": "etcd",
                            "image": flags.image,
                            "command": ["etcd"],
                            "args": [
                                "--name=flamingo",
                                "--data-dir=/var/lib/etcd",
                                "--listen-client-urls=http://0.0.0.0:2379",
                                format!("--advertise-client-urls=http://{ETCD}:2379"),
                            ],
                            "ports": [{ "containerPort": 2379, "name": "client" }],
                            "volumeMounts": [{ "name": "etcd-data", "mountPath": "/var/lib/etcd" }],
                        }],
                    },
                },
                "volumeClaimTemplates": [{
                    "metadata": { "name": "etcd-data" },
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": { "requests": { "storage": "1Gi" } },
                    },
                }],
            },
        }),
        service(
            COORDINATOR,
            flags,
            "coordinator",
            &[("grpc", 7070), ("http", 7080)],
            false,
        ),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(COORDINATOR, flags, "coordinator"),
            "spec": {
                "replicas": 1,
                // Never two coordinators at once.
                "strategy": { "type": "Recreate" },
                "selector": { "matchLabels": selector("coordinator") },
                "template": {
                    "metadata": { "labels": selector("coordinator") },
                    "spec": {
                        "serviceAccountName": "flamingo",
                        "containers": [{
                            "name": "coordinator",
                            "image": flags.image,
                            "command": ["flamingo-coordinator"],
                            "args": [
                                "--listen=0.0.0.0:7070",
                                "--http-listen=0.0.0.0:7080",
                                format!("--etcd-endpoints=http://{ETCD}:2379"),
                                "--metrics-dir=/var/lib/flamingo/metrics",
                                // Shards and models live on the nodes' volume.
                                "--no-path-checks",
                            ],
                            "ports": [
                                { "containerPort": 7070, "name": "grpc" },
                                { "containerPort": 7080, "name": "http" },
                            ],
                            "readinessProbe": { "tcpSocket": { "port": 7070 }, "periodSeconds": 5 },
                            "volumeMounts": [{ "name": "metrics", "mountPath": "/var/lib/flamingo" }],
                        }],
                        "volumes": [{ "name": "metrics", "emptyDir": {} }],
                    },
                },
            },
        }),
        service(
            DATA_SERVICE,
            flags,
            "data-service",
            &[("grpc", 7090)],
            false,
        ),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(DATA_SERVICE, flags, "data-service"),
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": selector("data-service") },
                "template": {
                    "metadata": { "labels": selector("data-service") },
                    "spec": {
                        "containers": [{
                            "name": "data-service",
                            "image": flags.image,
                            "command": ["flamingo-data-service"],
                            "args": ["--listen=0.0.0.0:7090"],
                            "ports": [{ "containerPort": 7090, "name": "grpc" }],
                            "volumeMounts": mounts,
                        }],
                        "volumes": volumes,
                    },
                },
            },
        }),
    ]
}

/// The job's agents and its launcher.
pub fn job_objects(job: &K8sJob, flags: &K8sFlags) -> Vec<Value> {
    let name = object_name(&job.name);
    let agents = format!("flamingo-{name}-agents");
    let (volumes, mounts) = data_volume(flags);
    let mut volumes = volumes;
    volumes.push(json!({ "name": "shm", "emptyDir": { "medium": "Memory" } }));
    let mut mounts = mounts;
    mounts.push(json!({ "name": "shm", "mountPath": "/dev/shm" }));
    let mut resources = json!({});
    if flags.gpus_per_node > 0 {
        resources = json!({
            "limits": { "nvidia.com/gpu": flags.gpus_per_node },
            "requests": { "nvidia.com/gpu": flags.gpus_per_node },
        });
    }
    let component = format!("agents-{name}");
    let agent = json!({
        "name": "agent",
        "image": flags.image,
        "command": ["flamingo-worker"],
        "args": [
            "agent",
            format!("--coordinator=http://{COORDINATOR}:7070"),
            format!("--node-id={name}-$(JOB_COMPLETION_INDEX)"),
            "--address=$(POD_IP)",
            format!("--cpu-slots={}", job.slots_per_node),
            "--listen=0.0.0.0:7071",
            "--rendezvous-ports=29500:100",
            "--metrics-listen=0.0.0.0:9100",
            "--state-dir=/var/lib/flamingo/agent",
        ],
        "env": [
            { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
            { "name": "NCCL_SOCKET_IFNAME", "value": "eth0" },
            { "name": "GLOO_SOCKET_IFNAME", "value": "eth0" },
            { "name": "NCCL_DEBUG", "value": "WARN" },
        ],
        "ports": [
            { "containerPort": 7071, "name": "logs" },
            { "containerPort": 9100, "name": "metrics" },
        ],
        "resources": resources,
        "volumeMounts": mounts,
    });
    let mut launch = vec![
        format!("--coordinator=http://{COORDINATOR}:7070"),
        "launch".to_string(),
    ];
    launch.extend(job.launch_args.iter().cloned());
    if !job.launch_args.iter().any(|arg| arg == "--wait") {
        launch.push("--wait".into());
    }
    // When the job ends, its agents' pods go too.
    launch.push(format!("--delete-k8s-job={agents}"));
    // Train jobs stream their batches from the namespace's data service.
    if !job
        .launch_args
        .iter()
        .any(|arg| arg.starts_with("--data_service"))
    {
        launch.push(format!("--data_service=http://{DATA_SERVICE}:7090"));
    }
    let (launcher_volumes, launcher_mounts) = data_volume(flags);
    vec![
        service(
            &agents,
            flags,
            &component,
            &[("logs", 7071), ("metrics", 9100)],
            true,
        ),
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(&agents, flags, &component),
            "spec": {
                "completionMode": "Indexed",
                "completions": job.nodes,
                "parallelism": job.nodes,
                // A lost pod is the coordinator's business (it restarts the
                // group elsewhere); Kubernetes replaces the pod.
                "backoffLimit": job.nodes * 4,
                "template": {
                    "metadata": { "labels": selector(&component) },
                    "spec": {
                        "subdomain": agents,
                        "restartPolicy": "OnFailure",
                        "terminationGracePeriodSeconds": 60,
                        "containers": [agent],
                        "volumes": volumes,
                    },
                },
            },
        }),
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(&format!("flamingo-{name}-launch"), flags, "launcher"),
            "spec": {
                "backoffLimit": 2,
                "template": {
                    "metadata": { "labels": selector("launcher") },
                    "spec": {
                        "restartPolicy": "Never",
                        "serviceAccountName": "flamingo",
                        "containers": [{
                            "name": "launch",
                            "image": flags.image,
                            "command": ["flamingoctl"],
                            "args": launch,
                            "volumeMounts": launcher_mounts,
                        }],
                        "volumes": launcher_volumes,
                    },
                },
            },
        }),
    ]
}

/// Every object, as one multi-document YAML stream.
pub fn render(job: &K8sJob, flags: &K8sFlags) -> anyhow::Result<String> {
    let mut out = String::new();
    for object in objects(job, flags) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&object)?);
    }
    Ok(out)
}

/// Every object, in the order they are applied: the control plane, then
/// the job's.
pub fn objects(job: &K8sJob, flags: &K8sFlags) -> Vec<Value> {
    control_plane(flags)
        .into_iter()
        .chain(job_objects(job, flags))
        .collect()
}

/// The API server of the kubeconfig's current context (`$KUBECONFIG`,
/// `~/.kube/config`), or of the pod's service account inside a cluster.
pub async fn client() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await.map_err(|error| {
        anyhow::anyhow!(
            "no Kubernetes cluster to apply to ({error}): set KUBECONFIG or ~/.kube/config, or add --dry-run and pipe the objects to `kubectl apply -f -`"
        )
    })?;
    Ok(kube::Client::try_from(config)?)
}

/// Deletes a Job and its pods (the agents' Job when their job ended).
pub async fn delete_job(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    use kube::api::{Api, DeleteParams};
    let api: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), namespace);
    api.delete(name, &DeleteParams::background())
        .await
        .with_context(|| format!("deleting Job {namespace}/{name}"))?;
    Ok(())
}

/// Applies `objects` in order with server-side apply (field manager
/// `flamingoctl`, taking over fields another manager set); returns one line
/// per object. Applying the same objects again changes nothing.
pub async fn apply(client: &kube::Client, objects: &[Value]) -> anyhow::Result<Vec<String>> {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let params = PatchParams::apply("flamingoctl").force();
    let mut applied = Vec::new();
    for object in objects {
        let field = |name: &str| -> anyhow::Result<&str> {
            object
                .pointer(name)
                .and_then(Value::as_str)
                .with_context(|| format!("a rendered object has no {name}: {object}"))
        };
        let (api_version, kind) = (field("/apiVersion")?, field("/kind")?);
        let (namespace, name) = (field("/metadata/namespace")?, field("/metadata/name")?);
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            &format!("{}s", kind.to_ascii_lowercase()),
        );
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        let dynamic: DynamicObject = serde_json::from_value(object.clone())?;
        api.patch(name, &params, &Patch::Apply(&dynamic))
            .await
            .map_err(|error| {
                let hint = match &error {
                    kube::Error::Api(status) if status.code == 404 => format!(
                        "; does the namespace exist? kubectl create namespace {namespace}"
                    ),
                    kube::Error::Api(status) if status.message.contains("immutable") => format!(
                        "; a {kind} of that name exists from an earlier launch: kubectl -n {namespace} delete {} {name}",
                        kind.to_ascii_lowercase()
                    ),
                    _ => String::new(),
                };
                anyhow::anyhow!("applying {kind} {namespace}/{name}: {error}{hint}")
            })?;
        applied.push(format!("{kind} {namespace}/{name} applied"));
    }
    Ok(applied)
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
            },
        )
    }

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
        let objects = objects(&job, &flags);
        let (client, seen) = api_server(None).await;
        let lines = apply(&client, &objects).await.unwrap();
        assert_eq!(lines.len(), objects.len());
        assert_eq!(lines[0], "ServiceAccount flamingo/flamingo applied");
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
        let objects = objects(&job, &flags);
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
        let error = apply(&client, &objects(&job, &flags)).await.unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains("ServiceAccount flamingo/flamingo")
                && text.contains("kubectl create namespace flamingo"),
            "{text}"
        );
    }
}
