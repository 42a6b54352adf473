//! `flamingoctl launch --scheduler slurm` on a real Slurm cluster started by
//! the test (munged, slurmctld and two `slurmd -N nodeX` on this machine):
//! a collective check across both nodes, a training job that Slurm's warning
//! signal checkpoints and requeues and that then resumes and finishes, and a
//! running job that `flamingoctl stop` cancels. At the end no Slurm or
//! flamingo process of the test is left.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use flamingo_tests::slurm::{leftovers, SlurmCluster};
use flamingo_tests::ClusterSandbox;
use serde_json::Value;

/// `flamingoctl ARGS` in `dir` against the Slurm cluster, with the jobs'
/// folders under `dir/slurm`.
fn ctl(cluster: &SlurmCluster, dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(ClusterSandbox::binary("flamingoctl"))
        .current_dir(dir)
        .env("SLURM_CONF", cluster.conf())
        .env("FLAMINGO_SLURM_DIR", dir.join("slurm"))
        .env("FLAMINGO_STATE_DIR", dir.join("state"))
        .env("FLAMINGO_HOME", dir.join("home"))
        .args(args)
        .output()
        .expect("flamingoctl runs")
}

fn ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn status(cluster: &SlurmCluster, dir: &Path, id: &str) -> Value {
    let text = ok(&ctl(cluster, dir, &["status", id, "--json"]), "status");
    serde_json::from_str(&text).expect("status --json prints JSON")
}

/// Polls `status` until `done` holds.
fn wait_status(
    cluster: &SlurmCluster,
    dir: &Path,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let value = status(cluster, dir, id);
        if done(&value) {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; last status {value:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Synthetic shards, a tiny model and a job file that trains for a while.
fn prepare(dir: &Path) {
    flamingo_tests::synthetic_laion_and_tiny_model(dir, 96);
    std::fs::write(
        dir.join("job.toml"),
        format!(
            r#"model = "{dir}/tiny/model.toml"
runs_dir = "{dir}/runs"
laion_shards = "{dir}/data/laion-{{00000..00003}}.tar"
batch_size_laion = 2
train_num_samples_laion = 96
num_epochs = 3
warmup_steps = 2
learning_rate = 3e-3
fsdp_sharding_strategy = "full"
checkpoint_steps = 1000
logging_steps = 1
"#,
            dir = dir.display()
        ),
    )
    .expect("job file");
}

#[test]
fn slurm_jobs_run_checkpoint_on_the_warning_signal_requeue_and_stop() {
    let _serial = flamingo_tests::serial_guard();
    let temp = tempfile::Builder::new()
        .prefix("flamingo-slurm-")
        .tempdir()
        .unwrap();
    // FLAMINGO_KEEP_TEST_DIR=1 keeps the folder (logs, Slurm's output) for a look.
    let (dir, _temp) = if std::env::var_os("FLAMINGO_KEEP_TEST_DIR").is_some() {
        let kept = temp.keep();
        eprintln!("keeping {}", kept.display());
        (kept, None)
    } else {
        (temp.path().to_path_buf(), Some(temp))
    };
    let dir = dir.as_path();
    let mut cluster = SlurmCluster::start(dir, 2, 2).unwrap();

    // 1. A collective check on both nodes, followed with --wait.
    let launched = ctl(
        &cluster,
        dir,
        &[
            "launch",
            "--scheduler",
            "slurm",
            "--nodes",
            "2",
            "--job",
            "collective-check",
            "--max-bytes",
            "65536",
            "--name",
            "check",
            "--time",
            "00:10:00",
            "--wait",
        ],
    );
    let out = ok(&launched, "collective check through Slurm");
    assert!(out.contains("busbw GB/s"), "{out}");
    let stderr = String::from_utf8_lossy(&launched.stderr);
    let slurm_id = stderr
        .lines()
        .find_map(|line| line.strip_prefix("submitted Slurm job "))
        .and_then(|rest| rest.split(';').next())
        .expect("the Slurm job id is printed")
        .to_string();
    let check = status(&cluster, dir, &slurm_id);
    assert_eq!(check["state"], "Succeeded", "{check:#}");
    assert_eq!(check["slurm"]["job_id"], slurm_id.as_str());
    assert_eq!(check["world_size"], 2);
    let nodes: Vec<&str> = check["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rank| rank["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node1", "node2"], "one agent per Slurm node");
    // The flamingo id finds the same job, and both ids are shown.
    let flamingo_id = check["id"].as_str().unwrap().to_string();
    let by_flamingo_id = status(&cluster, dir, &flamingo_id);
    assert_eq!(by_flamingo_id["slurm"]["job_id"], slurm_id.as_str());
    let human = ok(&ctl(&cluster, dir, &["status", &flamingo_id]), "status");
    assert!(
        human.contains(&format!("slurm job {slurm_id}: COMPLETED")) && human.contains(&flamingo_id),
        "{human}"
    );
    // Rank logs stay readable after the job's coordinator is gone.
    let log = ok(
        &ctl(&cluster, dir, &["logs", &slurm_id, "--rank", "1"]),
        "logs",
    );
    assert!(log.contains("rank 1: correctness checks passed"), "{log}");

    // 1b. The allocation's agents join an existing coordinator (a local
    // cluster with one node of its own) instead of starting one.
    let up = ok(&ctl(&cluster, dir, &["--json", "up", "--nodes", "1"]), "up");
    let up: Value = serde_json::from_str(&up).unwrap();
    let existing = up["coordinator"].as_str().unwrap().to_string();
    let joined = ctl(
        &cluster,
        dir,
        &[
            "--coordinator",
            &existing,
            "launch",
            "--scheduler",
            "slurm",
            "--nodes",
            "2",
            "--job",
            "collective-check",
            "--max-bytes",
            "4096",
            "--name",
            "joined",
            "--wait",
            "--json",
        ],
    );
    let joined_text = ok(&joined, "collective check on an existing coordinator");
    let joined: Value = serde_json::from_str(&joined_text).unwrap();
    assert_eq!(joined["state"], "Succeeded", "{joined:#}");
    let folder = Path::new(joined["slurm"]["dir"].as_str().unwrap());
    let control: Value =
        serde_json::from_slice(&std::fs::read(folder.join("control-plane.json")).unwrap()).unwrap();
    assert_eq!(control["coordinator"], existing.as_str(), "{control:#}");
    assert!(
        !folder.join("logs/coordinator.log").exists(),
        "no coordinator of its own"
    );
    // It ran on the allocation's agents (the local cluster has one node).
    let ranks: Vec<&str> = joined["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rank| rank["node"].as_str().unwrap())
        .collect();
    assert!(
        ranks.iter().any(|node| ["node1", "node2"].contains(node)),
        "{ranks:?}"
    );
    ok(&ctl(&cluster, dir, &["down"]), "down");

    // 2. Training: USR1 (Slurm's warning before the time limit) makes every
    // rank checkpoint; the job is requeued, resumes there and finishes.
    prepare(dir);
    let launched = ctl(
        &cluster,
        dir,
        &[
            "launch",
            "--scheduler",
            "slurm",
            "--nodes",
            "2",
            "--config",
            "job.toml",
            "--run_name",
            "requeued",
            "--time",
            "00:30:00",
        ],
    );
    let train_id = ok(&launched, "training launch").trim().to_string();
    let running = wait_status(
        &cluster,
        dir,
        &train_id,
        "three steps",
        Duration::from_secs(240),
        |s| s["last_step"].as_u64().unwrap_or(0) >= 3 && s["state"] == "Running",
    );
    assert_eq!(running["slurm"]["state"], "RUNNING");
    assert!(running["checkpoints"].as_array().unwrap().is_empty());
    cluster
        .output("scancel", &["--signal=USR1", "--batch", &train_id])
        .expect("scancel --signal=USR1");
    // Slurm holds a requeued job for two minutes (Reason=BeginTime); an
    // administrator's `scontrol update` lets it start now.
    let started = Instant::now();
    loop {
        let queue = cluster
            .output("squeue", &["-h", "-j", &train_id, "-o", "%T %r"])
            .unwrap_or_default();
        if queue.trim() == "PENDING BeginTime" {
            cluster
                .output(
                    "scontrol",
                    &["update", &format!("JobId={train_id}"), "StartTime=now"],
                )
                .expect("scontrol update StartTime=now");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job was not requeued: {queue}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let finished = ok(&ctl(&cluster, dir, &["wait", &train_id]), "wait");
    assert!(finished.contains("Succeeded"), "{finished}");
    let done = status(&cluster, dir, &train_id);
    assert_eq!(done["state"], "Succeeded", "{done:#}");
    assert_eq!(done["slurm"]["restarts"], 1, "requeued once: {done:#}");
    let checkpoints = done["checkpoints"].as_array().unwrap();
    let saved = checkpoints
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .min()
        .expect("the warning committed a checkpoint");
    assert!((3..72).contains(&saved), "{done:#}");
    let folder = done["slurm"]["dir"].as_str().unwrap();
    let events = std::fs::read_to_string(Path::new(folder).join(format!(
        "metrics/{}.events.jsonl",
        done["id"].as_str().unwrap()
    )))
    .unwrap();
    assert!(events.contains("\"preempted\""), "{events}");
    let output =
        std::fs::read_to_string(Path::new(folder).join(format!("slurm-{train_id}.out"))).unwrap();
    assert!(
        output.contains("requeueing") && output.contains("goes on (Slurm restart 1)"),
        "{output}"
    );
    // Each node ran its own data-service replica, and its ranks streamed
    // from it.
    for node in ["node1", "node2"] {
        let log = Path::new(folder)
            .join("logs")
            .join(format!("data-service-{node}.log"));
        let text = std::fs::read_to_string(&log)
            .unwrap_or_else(|error| panic!("{}: {error}", log.display()));
        assert!(
            text.contains("dataset opened"),
            "{}:\n{text}",
            log.display()
        );
    }
    // The run went on from the checkpoint: steps after it were logged once.
    let log = std::fs::read_to_string(dir.join("runs/requeued/log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps.last(), Some(&72), "{steps:?}");

    // 3. `flamingoctl stop` on a running job: its ranks stop, Slurm lets go.
    let launched = ctl(
        &cluster,
        dir,
        &[
            "launch",
            "--scheduler",
            "slurm",
            "--nodes",
            "2",
            "--name",
            "sleeper",
            "--",
            "sleep",
            "600",
        ],
    );
    let sleeper = ok(&launched, "command launch").trim().to_string();
    wait_status(
        &cluster,
        dir,
        &sleeper,
        "the command running",
        Duration::from_secs(120),
        |s| s["state"] == "Running",
    );
    // A job still in Slurm's queue (submitted held, so it stays there):
    // status and logs say what Slurm says, not that a coordinator is
    // unreachable.
    let queued = ok(
        &ctl(
            &cluster,
            dir,
            &[
                "launch",
                "--scheduler",
                "slurm",
                "--nodes",
                "2",
                "--name",
                "queued",
                "--sbatch-arg=--hold",
                "--",
                "true",
            ],
        ),
        "queued launch",
    )
    .trim()
    .to_string();
    let text = ok(&ctl(&cluster, dir, &["status", &queued]), "queued status");
    assert!(
        text.contains(&format!("slurm job {queued}: PENDING"))
            && text.contains("pending in the queue")
            && text.contains("not launched yet"),
        "{text}"
    );
    let logs = ctl(&cluster, dir, &["logs", &queued, "--rank", "0"]);
    let said = String::from_utf8_lossy(&logs.stderr);
    assert!(
        logs.status.success() && said.contains("PENDING") && said.contains("no logs yet"),
        "{said}"
    );
    let queued_json: Value = serde_json::from_str(&ok(
        &ctl(&cluster, dir, &["--json", "status", &queued]),
        "queued status --json",
    ))
    .unwrap();
    assert_eq!(queued_json["slurm"]["state"], "PENDING", "{queued_json:#}");
    assert!(
        queued_json["slurm"]["queue_position"].as_u64() >= Some(1),
        "{queued_json:#}"
    );
    ok(
        &ctl(&cluster, dir, &["stop", &queued]),
        "stop the queued job",
    );
    let stopped = ok(&ctl(&cluster, dir, &["stop", &sleeper, "--json"]), "stop");
    let stopped: Value = serde_json::from_str(&stopped).unwrap();
    assert_eq!(stopped["state"], "Stopped", "{stopped:#}");
    let slurm_state = stopped["slurm"]["state"].as_str().unwrap_or("gone");
    assert!(
        ["COMPLETED", "CANCELLED", "gone"].contains(&slurm_state),
        "{stopped:#}"
    );
    let queue = cluster.output("squeue", &["-h"]).unwrap();
    assert!(queue.trim().is_empty(), "{queue}");

    let cluster_dir = cluster.dir().to_path_buf();
    cluster.stop();
    let left = leftovers(&cluster_dir);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
