//! The Kubernetes objects of the control plane and of a job (see the
//! module above for what each is for).

use serde_json::{json, Value};

use super::secrets::{self, K8sCredentials, CONTROL_PLANE_SECRET};
use super::{object_name, K8sFlags, K8sJob};

pub(super) const COORDINATOR: &str = "flamingo-coordinator";
pub(super) const ETCD: &str = "flamingo-etcd";
pub(super) const DATA_SERVICE: &str = "flamingo-data-service";
/// The same replicas, each pod reaching only the one on its own node
/// (`internalTrafficPolicy: Local`).
pub(super) const DATA_SERVICE_LOCAL: &str = "flamingo-data-service-local";
/// The uid and gid every container runs as (the image's `flamingo` user).
const UID: u32 = 10001;

/// Every pod: not root, the runtime's seccomp profile, Secrets and volumes
/// readable by the group.
fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// Every container: no privilege escalation, no capabilities, a read-only
/// root filesystem (writable paths are volumes).
fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
    })
}

/// A writable `/tmp` (also `$HOME` in the image).
fn scratch() -> (Value, Value) {
    (
        json!({ "name": "tmp", "emptyDir": {} }),
        json!({ "name": "tmp", "mountPath": "/tmp" }),
    )
}

fn resources(
    cpu_request: &str,
    memory_request: &str,
    cpu_limit: &str,
    memory_limit: &str,
) -> Value {
    json!({
        "requests": { "cpu": cpu_request, "memory": memory_request },
        "limits": { "cpu": cpu_limit, "memory": memory_limit },
    })
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
pub fn control_plane(flags: &K8sFlags, credentials: &K8sCredentials) -> Vec<Value> {
    [
        vec![credentials.control_plane_secret(flags)],
        rbac(flags),
        etcd(flags),
        coordinator(flags),
        data_service(flags),
        network_policies(flags),
    ]
    .concat()
}

fn policy(name: &str, flags: &K8sFlags, pods: Value, ingress: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, flags, "network"),
        "spec": {
            "podSelector": { "matchLabels": pods },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    })
}

fn from_pods(labels: Value) -> Value {
    json!({ "podSelector": { "matchLabels": labels } })
}

/// Nothing reaches a flamingo pod unless a policy below lets it: etcd only
/// from the coordinator; the coordinator's gRPC from flamingo's pods (its
/// dashboard from the namespace); the data service from agent pods.
fn network_policies(flags: &K8sFlags) -> Vec<Value> {
    let flamingo = json!({ "app.kubernetes.io/name": "flamingo" });
    let agents = json!({ "app.kubernetes.io/name": "flamingo", "flamingo/agent": "true" });
    vec![
        policy("flamingo-default-deny", flags, flamingo.clone(), json!([])),
        policy(
            "flamingo-etcd",
            flags,
            selector("etcd"),
            json!([{ "from": [from_pods(selector("coordinator"))], "ports": [{ "port": 2379, "protocol": "TCP" }] }]),
        ),
        policy(
            "flamingo-coordinator",
            flags,
            selector("coordinator"),
            json!([
                { "from": [from_pods(flamingo)], "ports": [{ "port": 7070, "protocol": "TCP" }] },
                { "from": [{ "podSelector": {} }], "ports": [{ "port": 7080, "protocol": "TCP" }] },
            ]),
        ),
        policy(
            "flamingo-data-service",
            flags,
            selector("data-service"),
            json!([{ "from": [from_pods(agents)], "ports": [{ "port": 7090, "protocol": "TCP" }] }]),
        ),
    ]
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
                        "securityContext": pod_security(),
                        "automountServiceAccountToken": false,
                        "containers": [{
                            "name": "etcd",
                            "image": flags.image,
                            "command": ["etcd"],
                            "args": [
                                "--name=flamingo",
                                "--data-dir=/var/lib/etcd/data",
                                "--listen-client-urls=https://0.0.0.0:2379",
                                format!("--advertise-client-urls=https://{ETCD}:2379"),
                                format!("--cert-file={}/etcd.pem", secrets::TLS_DIR),
                                format!("--key-file={}/etcd.key", secrets::TLS_DIR),
                                format!("--trusted-ca-file={}/ca.pem", secrets::TLS_DIR),
                                "--client-cert-auth",
                                crate::local::ETCD_BOUNDS[0],
                                crate::local::ETCD_BOUNDS[1],
                                crate::local::ETCD_BOUNDS[2],
                            ],
                            "ports": [{ "containerPort": 2379, "name": "client" }],
                            "securityContext": container_security(),
                            "resources": resources("100m", "256Mi", "1", "1Gi"),
                            "volumeMounts": [
                                { "name": "etcd-data", "mountPath": "/var/lib/etcd" },
                                secrets::volume(CONTROL_PLANE_SECRET).1,
                                scratch().1,
                            ],
                        }],
                        "volumes": [secrets::volume(CONTROL_PLANE_SECRET).0, scratch().0],
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
                "replicas": flags.coordinators,
                // One coordinator: never two at once. Several: they elect
                // a leader and fence its writes, so pods may overlap.
                "strategy": if flags.coordinators > 1 {
                    json!({ "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1, "maxSurge": 0 } })
                } else {
                    json!({ "type": "Recreate" })
                },
                "selector": { "matchLabels": selector("coordinator") },
                "template": {
                    "metadata": { "labels": selector("coordinator") },
                    "spec": {
                        "serviceAccountName": "flamingo",
                        "automountServiceAccountToken": false,
                        "securityContext": pod_security(),
                        "containers": [{
                            "name": "coordinator",
                            "image": flags.image,
                            "command": ["flamingo-coordinator"],
                            "args": ([
                                vec![
                                    "--listen=0.0.0.0:7070".to_string(),
                                    "--http-listen=0.0.0.0:7080".to_string(),
                                    format!("--etcd-endpoints=https://{ETCD}:2379"),
                                    "--metrics-dir=/var/lib/flamingo/metrics".to_string(),
                                    // Shards and models live on the nodes' volume.
                                    "--no-path-checks".to_string(),
                                    // The dashboard through its Service (or port-forward).
                                    format!("--http-host={COORDINATOR},{COORDINATOR}.{}.svc", flags.namespace),
                                ],
                                // Standbys do not listen: not Ready, so the
                                // Service sends everything to the leader.
                                if flags.coordinators > 1 {
                                    vec!["--leader-election".to_string()]
                                } else {
                                    Vec::new()
                                },
                                secrets::tls_args("coordinator"),
                            ].concat()),
                            "ports": [
                                { "containerPort": 7070, "name": "grpc" },
                                { "containerPort": 7080, "name": "http" },
                            ],
                            "readinessProbe": { "tcpSocket": { "port": 7070 }, "periodSeconds": 5 },
                            "securityContext": container_security(),
                            "resources": resources("250m", "256Mi", "2", "2Gi"),
                            "volumeMounts": [
                                { "name": "metrics", "mountPath": "/var/lib/flamingo" },
                                secrets::volume(CONTROL_PLANE_SECRET).1,
                                scratch().1,
                            ],
                        }],
                        "volumes": [
                            { "name": "metrics", "emptyDir": {} },
                            secrets::volume(CONTROL_PLANE_SECRET).0,
                            scratch().0,
                        ],
                    },
                },
            },
        }),
    ]
}

/// The data service with the data volume: a replica on every node (a
/// DaemonSet; agent pods reach their node's through the `-local` Service,
/// the others through the cluster-wide one), or one for the namespace with
/// `--one-data-service`.
fn data_service(flags: &K8sFlags) -> Vec<Value> {
    let (mut volumes, mut mounts) = data_volume(flags);
    for (volume, mount) in [secrets::volume(CONTROL_PLANE_SECRET), scratch()] {
        volumes.push(volume);
        mounts.push(mount);
    }
    let mut objects = vec![service(
        DATA_SERVICE,
        flags,
        "data-service",
        &[("grpc", 7090)],
        false,
    )];
    if !flags.one_data_service {
        let mut local = service(
            DATA_SERVICE_LOCAL,
            flags,
            "data-service",
            &[("grpc", 7090)],
            false,
        );
        local["spec"]["internalTrafficPolicy"] = json!("Local");
        objects.push(local);
    }
    let mut replicas = json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": metadata(DATA_SERVICE, flags, "data-service"),
            "spec": {
                "selector": { "matchLabels": selector("data-service") },
                "template": {
                    "metadata": { "labels": selector("data-service") },
                    "spec": {
                        "securityContext": pod_security(),
                        "automountServiceAccountToken": false,
                        "containers": [{
                            "name": "data-service",
                            "image": flags.image,
                            "command": ["flamingo-data-service"],
                            "args": ([
                                vec![
                                    "--listen=0.0.0.0:7090".to_string(),
                                    // Only the data volume.
                                    "--allow-prefix=/data".to_string(),
                                ],
                                secrets::tls_args("data-service"),
                            ].concat()),
                            "ports": [{ "containerPort": 7090, "name": "grpc" }],
                            "securityContext": container_security(),
                            "resources": resources("1", "1Gi", "4", "8Gi"),
                            "volumeMounts": mounts,
                        }],
                        "volumes": volumes,
                    },
                },
            },
    });
    if flags.one_data_service {
        replicas["kind"] = json!("Deployment");
        replicas["spec"]["replicas"] = json!(1);
    }
    objects.push(replicas);
    objects
}

/// `FLAMINGO_DATA_SERVICE` for an agent (which passes it to its ranks):
/// the replica on its node first, then the Service that reaches any.
fn data_service_endpoints(flags: &K8sFlags) -> String {
    let shared = format!("https://{DATA_SERVICE}:7090");
    match flags.one_data_service {
        true => shared,
        false => format!("https://{DATA_SERVICE_LOCAL}:7090,{shared}"),
    }
}

/// The job's agents and its launcher.
pub fn job_objects(job: &K8sJob, flags: &K8sFlags, credentials: &K8sCredentials) -> Vec<Value> {
    let name = object_name(&job.name);
    let agents = format!("flamingo-{name}-agents");
    let secret = secrets::job_secret_name(job);
    let (mut volumes, mounts) = data_volume(flags);
    volumes.push(json!({ "name": "shm", "emptyDir": { "medium": "Memory" } }));
    volumes.push(json!({ "name": "state", "emptyDir": {} }));
    volumes.push(secrets::volume(&secret).0);
    volumes.push(scratch().0);
    let component = format!("agents-{name}");
    let agent = agent_container(job, flags, &name, mounts);
    let launch = launcher_args(job, &agents);
    let (mut launcher_volumes, mut launcher_mounts) = data_volume(flags);
    for (volume, mount) in [secrets::volume(&secret), scratch()] {
        launcher_volumes.push(volume);
        launcher_mounts.push(mount);
    }
    let mut agent_labels = selector(&component);
    agent_labels["flamingo/agent"] = json!("true");
    let job_pods = policy(
        &agents,
        flags,
        selector(&component),
        json!([
            // The job's ranks talk to each other on any port (c10d, NCCL).
            { "from": [from_pods(selector(&component))] },
            { "from": [from_pods(selector("coordinator"))], "ports": [{ "port": 7071, "protocol": "TCP" }] },
            { "from": [{ "podSelector": {} }], "ports": [{ "port": 9100, "protocol": "TCP" }] },
        ]),
    );
    vec![
        credentials.job_secret(job, flags),
        job_pods,
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
                    "metadata": { "labels": agent_labels },
                    "spec": {
                        "subdomain": agents,
                        "automountServiceAccountToken": false,
                        "securityContext": pod_security(),
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
                        // The account that may delete the agents' Job.
                        "serviceAccountName": "flamingo",
                        "securityContext": pod_security(),
                        "containers": [{
                            "name": "launch",
                            "image": flags.image,
                            "command": ["flamingoctl"],
                            "args": launch,
                            "env": [
                                { "name": "FLAMINGO_TLS_CA", "value": format!("{}/ca.pem", secrets::TLS_DIR) },
                                { "name": "FLAMINGO_TLS_CERT", "value": format!("{}/launcher.pem", secrets::TLS_DIR) },
                                { "name": "FLAMINGO_TLS_KEY", "value": format!("{}/launcher.key", secrets::TLS_DIR) },
                            ],
                            "securityContext": container_security(),
                            "resources": resources("100m", "128Mi", "1", "512Mi"),
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
    mounts.push(json!({ "name": "state", "mountPath": "/var/lib/flamingo" }));
    mounts.push(secrets::mount());
    mounts.push(scratch().1);
    let mut resources = resources(
        &flags.agent_cpu,
        &flags.agent_memory,
        &flags.agent_cpu,
        &flags.agent_memory,
    );
    if flags.gpus_per_node > 0 {
        resources["limits"]["nvidia.com/gpu"] = json!(flags.gpus_per_node);
        resources["requests"]["nvidia.com/gpu"] = json!(flags.gpus_per_node);
    }
    json!({
        "name": "agent",
        "image": flags.image,
        "command": ["flamingo-worker"],
        "args": [
            "agent",
            format!("--coordinator=https://{COORDINATOR}:7070"),
            format!("--node-id={name}-$(JOB_COMPLETION_INDEX)"),
            "--address=$(POD_IP)",
            format!("--cpu-slots={}", job.slots_per_node),
            "--listen=0.0.0.0:7071",
            "--rendezvous-ports=29500:100",
            "--metrics-listen=0.0.0.0:9100",
            "--state-dir=/var/lib/flamingo/agent",
            format!("--tls-ca={}/ca.pem", secrets::TLS_DIR),
            // Each pod's own certificate: its node id is <job>-<index>.
            format!("--tls-cert={}/node-$(JOB_COMPLETION_INDEX).pem", secrets::TLS_DIR),
            format!("--tls-key={}/node-$(JOB_COMPLETION_INDEX).key", secrets::TLS_DIR),
        ],
        "env": [
            { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
            { "name": "NCCL_SOCKET_IFNAME", "value": "eth0" },
            { "name": "GLOO_SOCKET_IFNAME", "value": "eth0" },
            { "name": "NCCL_DEBUG", "value": "WARN" },
            { "name": "FLAMINGO_DATA_SERVICE", "value": data_service_endpoints(flags) },
        ],
        "ports": [
            { "containerPort": 7071, "name": "logs" },
            { "containerPort": 9100, "name": "metrics" },
        ],
        "securityContext": container_security(),
        "resources": resources,
        "volumeMounts": mounts,
    })
}

/// The launcher's `flamingoctl launch` arguments: the job's own, waiting
/// for it, and deleting the agents' Job when it ends.
fn launcher_args(job: &K8sJob, agents: &str) -> Vec<String> {
    let mut launch = vec![
        format!("--coordinator=https://{COORDINATOR}:7070"),
        "launch".to_string(),
    ];
    launch.extend(job.launch_args.iter().cloned());
    if !job.launch_args.iter().any(|arg| arg == "--wait") {
        launch.push("--wait".into());
    }
    // When the job ends, its agents' pods go too. (Train jobs stream
    // their batches from the data service their agents name.)
    launch.push(format!("--delete-k8s-job={agents}"));
    launch
}
