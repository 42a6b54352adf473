//! The Kubernetes objects of the control plane and of a job (see the
//! module above for what each is for).

use serde_json::{json, Value};

use super::{object_name, K8sFlags, K8sJob};

const COORDINATOR: &str = "flamingo-coordinator";
const ETCD: &str = "flamingo-etcd";
const DATA_SERVICE: &str = "flamingo-data-service";

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
    [
        rbac(flags),
        etcd(flags),
        coordinator(flags),
        data_service(flags),
    ]
    .concat()
}

/// The account the coordinator and launchers run as, and what it may do.
fn rbac(flags: &K8sFlags) -> Vec<Value> {
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
    ]
}

/// One etcd member with a volume, behind a headless Service.
fn etcd(flags: &K8sFlags) -> Vec<Value> {
    vec![
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
    ]
}

/// The coordinator (never two at once) and its gRPC and HTTP Service.
fn coordinator(flags: &K8sFlags) -> Vec<Value> {
    vec![
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
    ]
}

/// A data-service replica with the data volume.
fn data_service(flags: &K8sFlags) -> Vec<Value> {
    let (volumes, mounts) = data_volume(flags);
    vec![
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
    let (mut volumes, mounts) = data_volume(flags);
    volumes.push(json!({ "name": "shm", "emptyDir": { "medium": "Memory" } }));
    let component = format!("agents-{name}");
    let agent = agent_container(job, flags, &name, mounts);
    let launch = launcher_args(job, &agents);
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

/// An agent pod's container: GPUs as `nvidia.com/gpu`, NCCL's and Gloo's
/// network settings, a memory `/dev/shm`.
fn agent_container(job: &K8sJob, flags: &K8sFlags, name: &str, mut mounts: Vec<Value>) -> Value {
    mounts.push(json!({ "name": "shm", "mountPath": "/dev/shm" }));
    let mut resources = json!({});
    if flags.gpus_per_node > 0 {
        resources = json!({
            "limits": { "nvidia.com/gpu": flags.gpus_per_node },
            "requests": { "nvidia.com/gpu": flags.gpus_per_node },
        });
    }
    json!({
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
    })
}

/// The launcher's `flamingoctl launch` arguments: the job's own, waiting
/// for it, deleting the agents' Job when it ends, and the namespace's data
/// service for train jobs that name none.
fn launcher_args(job: &K8sJob, agents: &str) -> Vec<String> {
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
    launch
}
