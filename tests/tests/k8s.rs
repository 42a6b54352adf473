//! `flamingoctl launch --scheduler k8s --dry-run` renders Kubernetes
//! objects that validate against the Kubernetes 1.34 schemas
//! (`kubernetes-validate --strict`, offline, from the test venv), for a GPU
//! training job and a CPU collective check.

use std::process::Command;

use flamingo_common::testing::venv_bin;
use flamingo_tests::flamingoctl;

fn render(dir: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["launch", "--scheduler", "k8s", "--dry-run"];
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
        ],
    );
    validate(dir.path(), "train.yaml", &train);
    for expected in [
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
        "- --data_service=http://flamingo-data-service:7090",
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
