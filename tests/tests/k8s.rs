//! `flamingoctl launch --scheduler k8s --dry-run` renders Kubernetes
//! objects that validate against the Kubernetes 1.34 schemas
//! (`kubernetes-validate --strict`, offline, from the test venv), for a GPU
//! training job and a CPU collective check.

use std::process::Command;

use flamingo_common::testing::venv_bin;
use flamingo_tests::flamingoctl;

fn render(dir: &std::path::Path, args: &[&str]) -> String {
    // The CA in the test's folder, not the user's $FLAMINGO_HOME.
    let pki = dir.join("k8s-pki").display().to_string();
    let mut all = vec!["launch", "--scheduler", "k8s", "--dry-run", "--pki", &pki];
    all.extend_from_slice(args);
    flamingoctl(dir, &all)
}

fn validate(dir: &std::path::Path, name: &str, yaml: &str) {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("written");
    let output = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "-k", "1.34.0"])
        .arg(&path)
        .output()
        .expect("kubernetes-validate runs (scripts/setup.sh installs it in the venv)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{name}:\n{report}");
    assert_eq!(
        report.matches(" passed for resource ").count(),
        yaml.matches("\nkind: ").count() + usize::from(yaml.starts_with("kind: ")),
        "every object validated:\n{report}"
    );
}

#[test]
fn rendered_objects_validate_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().expect("temp dir");
    let train = render(
        dir.path(),
        &[
            "--nodes",
            "4",
            "--slots-per-node",
            "8",
            "--gpus-per-node",
            "8",
            "--name",
            "OF 3B",
            "--volume-claim",
            "flamingo-data",
            "--image",
            "registry/flamingo:1",
            "--config",
            "/data/job.toml",
            "--checkpoint_steps",
            "500",
            "--coordinators",
            "3",
        ],
    );
    validate(dir.path(), "train.yaml", &train);
    for expected in [
        // Three coordinators under leader election.
        "replicas: 3",
        "- --leader-election",
        "kind: StatefulSet",
        "name: flamingo-of-3b-agents",
        "completionMode: Indexed",
        "completions: 4",
        "nvidia.com/gpu: 8",
        "claimName: flamingo-data",
        "image: registry/flamingo:1",
        "- --node-id=of-3b-$(JOB_COMPLETION_INDEX)",
        "- --config",
        "- /data/job.toml",
        // A data-service replica on every node; agents reach their
        // node's first.
        "kind: DaemonSet",
        "internalTrafficPolicy: Local",
        "value: https://flamingo-data-service-local:7090,https://flamingo-data-service:7090",
    ] {
        assert!(
            train.contains(expected),
            "{expected} missing from:\n{train}"
        );
    }
    assert!(
        !train.contains("--dry-run") && !train.contains("--gpus-per-node"),
        "the launcher gets no scheduler flags"
    );
    hardened(&train, 4);

    let check = render(
        dir.path(),
        &[
            "--nodes",
            "2",
            "--slots-per-node",
            "1",
            "--job",
            "collective-check",
        ],
    );
    validate(dir.path(), "check.yaml", &check);
    assert!(!check.contains("nvidia.com/gpu"));
    let single = render(
        dir.path(),
        &[
            "--nodes",
            "1",
            "--job",
            "collective-check",
            "--one-data-service",
        ],
    );
    validate(dir.path(), "single.yaml", &single);
    assert!(
        !single.contains("kind: DaemonSet")
            && !single.contains("flamingo-data-service-local")
            && single.contains("value: https://flamingo-data-service:7090"),
        "{single}"
    );

    // Without --dry-run nothing is applied, and it says what to do.
    let output = Command::new(flamingo_tests::ClusterSandbox::binary("flamingoctl"))
        .args([
            "launch",
            "--scheduler",
            "k8s",
            "--nodes",
            "1",
            "--job",
            "collective-check",
        ])
        .output()
        .expect("flamingoctl runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--dry-run"));
}

/// Every pod runs as the image's non-root user with nothing extra; every
/// container has limits; etcd and each link run over TLS from the
/// rendered Secrets; NetworkPolicies fence the pods in.
fn hardened(yaml: &str, nodes: usize) {
    let objects = parse_all(yaml);
    let mut pods = 0;
    for object in &objects {
        let Some(pod) = object.pointer("/spec/template/spec") else {
            continue;
        };
        pods += 1;
        let kind = object["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{kind}");
        assert_eq!(pod["securityContext"]["runAsUser"], 10001, "{kind}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{kind}"
        );
        for container in pod["containers"].as_array().expect("containers") {
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{kind}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{kind}");
            assert_eq!(
                security["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{kind}"
            );
            assert!(
                container["resources"]["limits"]["memory"].is_string(),
                "{kind}: no memory limit"
            );
            assert!(
                container["resources"]["requests"]["cpu"].is_string(),
                "{kind}: no cpu request"
            );
            let args = container["args"].to_string();
            assert!(
                !args.contains("http://"),
                "{kind} has a plain-text URL: {args}"
            );
        }
    }
    assert_eq!(pods, 5, "etcd, coordinator, data service, agents, launcher");
    let kinds: Vec<&str> = objects
        .iter()
        .filter_map(|object| object["kind"].as_str())
        .collect();
    assert!(
        kinds
            .iter()
            .filter(|kind| **kind == "NetworkPolicy")
            .count()
            >= 5,
        "{kinds:?}"
    );
    let deny = objects
        .iter()
        .find(|object| object["metadata"]["name"] == "flamingo-default-deny")
        .expect("a default-deny policy");
    assert_eq!(deny["spec"]["ingress"], serde_json::json!([]));
    let etcd_policy = objects
        .iter()
        .find(|object| {
            object["kind"] == "NetworkPolicy" && object["metadata"]["name"] == "flamingo-etcd"
        })
        .expect("etcd's policy");
    assert_eq!(
        etcd_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
            ["app.kubernetes.io/component"],
        "coordinator"
    );
    let job_secret = objects
        .iter()
        .find(|object| object["kind"] == "Secret" && object["metadata"]["name"] != "flamingo-tls")
        .expect("the job's Secret");
    for index in 0..nodes {
        let cert = job_secret["stringData"][format!("node-{index}.pem")]
            .as_str()
            .expect("node cert");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    }
    assert!(yaml.contains("--client-cert-auth"));
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/Dockerfile"))
            .expect("the Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|line| line.trim() == "USER 10001:10001"),
        "the image runs as root"
    );
}

/// Every document of a YAML stream, read by the venv's Python (the tests
/// carry no YAML crate).
fn parse_all(doc: &str) -> Vec<serde_json::Value> {
    let output = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin.read()) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(doc.as_bytes())?;
            child.wait_with_output()
        })
        .expect("python reads YAML");
    serde_json::from_slice(&output.stdout).expect("JSON")
}
