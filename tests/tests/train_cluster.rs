//! Training jobs on a real local cluster (etcd, coordinator, two agents of
//! two ranks, a data-service replica), launched with `flamingoctl launch`.
//!
//! The chaos test kills, in turn: rank 0 in the middle of a checkpoint save
//! (after the manifest, before the commit), a rank (SIGKILL), a rank's
//! progress (SIGSTOP: a hang), an agent, the data service, the coordinator
//! and etcd. The job must finish; the sample audit must show every sample
//! exactly once per epoch over the steps that were kept; and the final
//! weights must equal those of an uninterrupted run with the same seed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flamingo_common::{JobRecord, JobState, RankState};
use flamingo_tests::{flamingoctl, ClusterSandbox, SandboxOptions};

/// LAION samples in the synthetic set, global batch, epochs.
const SAMPLES: u64 = 192;
const PER_RANK: u64 = 2;
const WORLD: u64 = 4;
const EPOCHS: u64 = 4;
const STEPS: u64 = SAMPLES / (PER_RANK * WORLD) * EPOCHS;

/// Synthetic LAION shards, a tiny model and the job file.
fn prepare(dir: &Path) -> PathBuf {
    flamingo_tests::synthetic_laion_and_tiny_model(dir, SAMPLES);
    let job = dir.join("job.toml");
    let shards = SAMPLES / 24 - 1;
    std::fs::write(
        &job,
        format!(
            r#"model = "{dir}/tiny/model.toml"
runs_dir = "{dir}/runs"
laion_shards = "{dir}/data/laion-{{00000..{shards:05}}}.tar"
batch_size_laion = {PER_RANK}
train_num_samples_laion = {SAMPLES}
num_epochs = {EPOCHS}
warmup_steps = 2
learning_rate = 3e-3
lr_scheduler = "linear"
fsdp_sharding_strategy = "full"
checkpoint_steps = 3
logging_steps = 1
audit_samples = true
"#,
            dir = dir.display()
        ),
    )
    .expect("job file");
    job
}

/// `flamingoctl launch` of the job file on 2-slot nodes, as run `run`;
/// returns the job id.
fn launch(dir: &Path, coordinator: &str, nodes: &str, run: &str, extra: &[&str]) -> String {
    let job_file = dir.join("job.toml");
    let mut args = vec![
        "--coordinator",
        coordinator,
        "launch",
        "--nodes",
        nodes,
        "--slots-per-node",
        "2",
        "--config",
        job_file.to_str().expect("a UTF-8 path"),
        "--run_name",
        run,
    ];
    args.extend_from_slice(extra);
    flamingoctl(dir, &args).trim().to_string()
}

async fn job(sandbox: &ClusterSandbox, id: &str) -> anyhow::Result<JobRecord> {
    Ok(sandbox.session().await?.job(id).await?)
}

/// Waits (through coordinator outages) until `done` holds; fails on a
/// terminal state that is not wanted.
async fn wait_for(
    sandbox: &ClusterSandbox,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    let started = Instant::now();
    let mut last = None;
    loop {
        if let Ok(record) = job(sandbox, id).await {
            if done(&record) {
                return record;
            }
            if record.state.is_terminal() {
                panic!("job ended while waiting for {what}: {record:#?}");
            }
            last = Some(record);
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; last seen {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the job made `steps` more steps in its current attempt and
/// has all ranks running (so the next fault hits a working group).
async fn progress(sandbox: &ClusterSandbox, id: &str, what: &str, steps: u64) -> JobRecord {
    let now = job(sandbox, id).await.expect("job");
    let (attempt, from) = (now.attempt, now.last_step);
    let record = wait_for(sandbox, id, what, Duration::from_secs(120), |record| {
        record.attempt == attempt
            && record.last_step >= from + steps
            && record
                .ranks
                .iter()
                .all(|rank| rank.state == RankState::Running)
    })
    .await;
    assert!(
        record.last_step + 6 < STEPS,
        "the job is too close to its end for the next fault ({what})"
    );
    record
}

fn rank_pid(record: &JobRecord, rank: u32) -> i32 {
    record
        .ranks
        .iter()
        .find(|r| r.rank == rank)
        .and_then(|r| r.pid)
        .expect("a running rank has a pid") as i32
}

/// (dataset, epoch) → keys trained on, from the audit, keeping for each
/// step only the last attempt that ran it (a restart redoes the steps after
/// its checkpoint, possibly with another number of ranks).
fn audited(run_dir: &Path) -> BTreeMap<(String, u64), Vec<String>> {
    /// (attempt, step, dataset, rank, epoch, keys)
    type Line = (u64, u64, String, u64, u64, Vec<String>);
    let mut lines: Vec<Line> = Vec::new();
    for rank in 0..WORLD {
        let Ok(text) = std::fs::read_to_string(run_dir.join(format!("audit/rank-{rank}.jsonl")))
        else {
            continue;
        };
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("audit line");
            let number = |field: &str| value[field].as_u64().expect("audit: a number");
            let dataset = value["dataset"]
                .as_str()
                .expect("audit: dataset")
                .to_string();
            let keys: Vec<String> = value["keys"]
                .as_array()
                .expect("audit: keys")
                .iter()
                .map(|key| key.as_str().expect("audit: a key").to_string())
                .collect();
            lines.push((
                number("attempt"),
                number("step"),
                dataset,
                rank,
                number("epoch"),
                keys,
            ));
        }
    }
    let mut last_attempt: BTreeMap<(u64, String), u64> = BTreeMap::new();
    for (attempt, step, dataset, ..) in &lines {
        let entry = last_attempt.entry((*step, dataset.clone())).or_default();
        *entry = (*entry).max(*attempt);
    }
    let mut epochs: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for (attempt, step, dataset, _, epoch, keys) in lines {
        if last_attempt[&(step, dataset.clone())] == attempt {
            epochs.entry((dataset, epoch)).or_default().extend(keys);
        }
    }
    epochs
}

fn final_parameters(run_dir: &Path) -> tch::Tensor {
    let dir = run_dir.join("checkpoints").join(format!("step-{STEPS:08}"));
    let (manifest, parameters, _, _) =
        flamingo_engine::checkpoint::read(&dir).expect("the final checkpoint reads");
    assert_eq!(manifest.step, STEPS);
    parameters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_job_survives_every_component_dying_with_nothing_lost() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 2,
        lease_ttl_seconds: 4,
    })
    .await
    .expect("sandbox");
    let dir = sandbox.path().to_path_buf();
    let job_file = prepare(&dir);
    // A data-service replica on each node, as `flamingoctl up` deploys
    // them: each node's ranks stream from theirs.
    let replicas = sandbox.replica_per_node().expect("a replica per node");
    let coordinator = sandbox.coordinator_endpoint();
    let hang_timeout: u32 = 10;

    // The job: rank 0 aborts in its first attempt between writing the
    // step-6 manifest and committing it.
    let launched = std::time::Instant::now();
    let id = launch(
        &dir,
        &coordinator,
        "2",
        "chaos",
        &[
            "--max-restarts",
            "8",
            "--hang-timeout",
            &hang_timeout.to_string(),
            "--env",
            "FLAMINGO_FAULT=before-commit:6",
        ],
    );
    let mut causes = Vec::new();

    // 1. The crash mid-save: the restart resumes from step 3, not 6.
    let record = wait_for(
        &sandbox,
        &id,
        "the mid-save crash",
        Duration::from_secs(120),
        |r| r.attempt == 1,
    )
    .await;
    assert!(
        record.restarts[0].contains("resuming from step 3"),
        "{:?}",
        record.restarts
    );
    causes.push("mid-save crash");
    let run_dir = dir.join("runs/chaos");
    let uncommitted = run_dir.join("checkpoints/step-00000006/manifest.json");
    assert!(
        uncommitted.exists(),
        "the step-6 manifest was written before the abort"
    );

    // 2. A rank dies.
    let record = progress(&sandbox, &id, "steps after the mid-save crash", 2).await;
    let killed_at = Instant::now();
    unsafe { libc::kill(rank_pid(&record, 3), libc::SIGKILL) };
    wait_for(
        &sandbox,
        &id,
        "restart after SIGKILL",
        Duration::from_secs(60),
        |r| r.attempt == 2,
    )
    .await;
    let record = progress(&sandbox, &id, "steps after the rank kill", 1).await;
    eprintln!(
        "rank SIGKILL -> first step of the restarted group: {:.1} s",
        killed_at.elapsed().as_secs_f64()
    );
    causes.push("rank SIGKILL");

    // 3. A rank hangs (SIGSTOP): found within the hang timeout.
    let pid = rank_pid(&record, 2);
    let stopped_at = Instant::now();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let record = wait_for(
        &sandbox,
        &id,
        "restart after the hang",
        Duration::from_secs(u64::from(hang_timeout) + 20),
        |r| r.attempt == 3,
    )
    .await;
    let detected = stopped_at.elapsed();
    assert!(record.restarts[2].contains("hang"), "{:?}", record.restarts);
    assert!(
        detected < Duration::from_secs(u64::from(hang_timeout) + 5),
        "hang found after {detected:?}"
    );
    causes.push("hang");

    // 4. An agent dies (its ranks die with it) and comes back.
    progress(&sandbox, &id, "steps after the hang", 2).await;
    sandbox.kill_agent("node-1");
    sandbox.add_agent("node-1", &[]).expect("agent restarts");
    wait_for(
        &sandbox,
        &id,
        "restart after the agent",
        Duration::from_secs(60),
        |r| r.attempt == 4,
    )
    .await;
    causes.push("agent SIGKILL");

    // 5. A node's data-service replica dies and comes back: its ranks go
    // on from their cursors on the other node's, no restart needed.
    progress(&sandbox, &id, "steps after the agent", 2).await;
    sandbox.kill_replica(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    sandbox.start_replica(1).expect("the replica restarts");
    causes.push("data service SIGKILL");

    // 6. The coordinator dies and comes back: the job carries on.
    progress(&sandbox, &id, "steps after the data service", 2).await;
    sandbox.kill_coordinator();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sandbox.start_coordinator().expect("coordinator restarts");
    causes.push("coordinator SIGKILL");

    // 7. etcd dies and comes back.
    progress(&sandbox, &id, "steps after the coordinator", 2).await;
    sandbox.kill_etcd();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sandbox.start_etcd().expect("etcd restarts");
    causes.push("etcd SIGKILL");

    let record = wait_for(&sandbox, &id, "the end", Duration::from_secs(300), |r| {
        r.state == JobState::Succeeded
    })
    .await;
    eprintln!(
        "chaos job: {STEPS} steps in {:.1} s through {causes:?}; restarts: {:#?}",
        launched.elapsed().as_secs_f64(),
        record.restarts
    );
    assert_eq!(
        record.restarts.len(),
        4,
        "only the crash, kill, hang and agent loss restart the group: {:#?}",
        record.restarts
    );
    assert_eq!(record.latest_checkpoint().map(|c| c.step), Some(STEPS));
    assert!(record.checkpoints.len() <= 2, "retention keeps 2");
    let listed = flamingoctl(&dir, &["--coordinator", &coordinator, "checkpoints", &id]);
    assert!(listed.contains(&format!("{STEPS}")), "{listed}");
    // Rank 0's per-step reports were stored by the coordinator and outlived
    // its SIGKILL: the first steps' are there beside the last one's.
    let csv = flamingoctl(
        &dir,
        &["--coordinator", &coordinator, "metrics", &id, "--csv"],
    );
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    assert_eq!(&header[..4], ["step", "rank", "attempt", "unix_ms"]);
    assert!(header.contains(&"loss_laion"), "{header:?}");
    let steps: BTreeSet<u64> = lines
        .map(|line| {
            line.split(',')
                .next()
                .unwrap_or("")
                .parse()
                .expect("a step")
        })
        .collect();
    assert!(steps.contains(&1) && steps.contains(&STEPS), "{steps:?}");

    // Both nodes' replicas served the job.
    for index in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("data-service-{index}.log")))
            .expect("the replica's log");
        assert!(log.contains("dataset opened"), "replica {index}:\n{log}");
    }

    every_sample_once_and_the_weights_of_a_whole_run(
        &dir,
        &job_file,
        &run_dir,
        &["--data_service", &replicas[0]],
    );
}

/// Every sample exactly once per epoch over the kept steps of `run_dir`,
/// and its final weights equal to an uninterrupted run of `job_file` with
/// the same seed (`flamingoctl train` on 4 ranks, with `extra` flags).
fn every_sample_once_and_the_weights_of_a_whole_run(
    dir: &Path,
    job_file: &Path,
    run_dir: &Path,
    extra: &[&str],
) {
    let epochs = audited(run_dir);
    let all: BTreeSet<String> = epochs[&("laion".to_string(), 0)].iter().cloned().collect();
    assert_eq!(all.len() as u64, SAMPLES, "epoch 0 covers the set");
    for epoch in 0..EPOCHS {
        let keys = &epochs[&("laion".to_string(), epoch)];
        let unique: BTreeSet<String> = keys.iter().cloned().collect();
        assert_eq!(keys.len(), unique.len(), "epoch {epoch} repeats a sample");
        assert_eq!(unique, all, "epoch {epoch} misses a sample");
    }
    let mut args = vec![
        "train",
        "--nproc",
        "4",
        "--config",
        job_file.to_str().expect("a UTF-8 path"),
        "--run_name",
        "whole",
    ];
    args.extend_from_slice(extra);
    flamingoctl(dir, &args);
    let whole = final_parameters(&dir.join("runs/whole"));
    let resumed = final_parameters(run_dir);
    let difference = (&whole - &resumed).abs().max().double_value(&[]);
    assert!(
        difference <= 1e-5,
        "final weights differ by {difference} from the uninterrupted run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_checkpoints_and_the_job_moves_to_another() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 3,
        slots_per_node: 2,
        lease_ttl_seconds: 4,
    })
    .await
    .expect("sandbox");
    let dir = sandbox.path().to_path_buf();
    prepare(&dir);
    let coordinator = sandbox.coordinator_endpoint();
    // No periodic checkpoints: the only one before the end is the
    // preemption's. Ranks read their shards in-process this time.
    let id = launch(
        &dir,
        &coordinator,
        "2",
        "drained",
        &["--checkpoint_steps", "1000", "--max-restarts", "0"],
    );
    let record = progress(&sandbox, &id, "first steps", 3).await;
    let nodes: BTreeSet<String> = record.ranks.iter().map(|r| r.node.0.clone()).collect();
    assert_eq!(nodes, BTreeSet::from(["node-0".into(), "node-1".into()]));
    let agent = sandbox.agent_pid("node-1").expect("agent pid") as i32;
    unsafe { libc::kill(agent, libc::SIGTERM) };
    let record = wait_for(&sandbox, &id, "the move", Duration::from_secs(90), |r| {
        r.attempt == 1 && r.state == JobState::Running
    })
    .await;
    let moved: BTreeSet<String> = record.ranks.iter().map(|r| r.node.0.clone()).collect();
    assert_eq!(moved, BTreeSet::from(["node-0".into(), "node-2".into()]));
    let saved = record
        .latest_checkpoint()
        .expect("the preemption committed a checkpoint")
        .step;
    assert!(saved > 0 && saved < STEPS);
    superseded_attempts_cannot_commit(&sandbox, &id).await;
    sandbox
        .wait_agent_exit("node-1", Duration::from_secs(30))
        .expect("the drained agent exits");
    let record = wait_for(&sandbox, &id, "the end", Duration::from_secs(300), |r| {
        r.state == JobState::Succeeded
    })
    .await;
    assert!(record.restarts.is_empty(), "a preemption is not a failure");
    // The job's latest checkpoint exports by job id, as OpenFlamingo's
    // state dict.
    flamingoctl(
        &dir,
        &[
            "--coordinator",
            &coordinator,
            "export",
            &id,
            "--out",
            "drained.safetensors",
        ],
    );
    let exported = tch::Tensor::read_safetensors(dir.join("drained.safetensors"))
        .expect("the export reads back");
    assert!(
        exported
            .iter()
            .any(|(name, _)| name.starts_with("perceiver.")),
        "{:?}",
        exported.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );
    let epochs = audited(&dir.join("runs/drained"));
    for epoch in 0..EPOCHS {
        let keys = &epochs[&("laion".to_string(), epoch)];
        let unique: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(keys.len(), unique.len(), "epoch {epoch} repeats a sample");
        assert_eq!(
            unique.len() as u64,
            SAMPLES,
            "epoch {epoch} misses a sample"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_job_continues_on_fewer_nodes_and_grows_back() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 2,
        lease_ttl_seconds: 4,
    })
    .await
    .expect("sandbox");
    let dir = sandbox.path().to_path_buf();
    prepare(&dir);
    let coordinator = sandbox.coordinator_endpoint();
    let id = launch(
        &dir,
        &coordinator,
        "1:2",
        "elastic",
        &["--max-restarts", "2"],
    );
    let record = progress(&sandbox, &id, "steps on two nodes", 3).await;
    assert_eq!(record.placed_nodes, 2);
    // node-1 goes away for good: the job goes on with node-0's two ranks.
    sandbox.kill_agent("node-1");
    let record = wait_for(&sandbox, &id, "the shrink", Duration::from_secs(60), |r| {
        r.attempt == 1 && r.state == JobState::Running
    })
    .await;
    assert_eq!((record.placed_nodes, record.ranks.len()), (1, 2));
    progress(&sandbox, &id, "steps on one node", 3).await;
    // It comes back: the job checkpoints and restarts on both.
    sandbox.add_agent("node-1", &[]).expect("agent restarts");
    let record = wait_for(&sandbox, &id, "the growth", Duration::from_secs(90), |r| {
        r.attempt == 2 && r.state == JobState::Running
    })
    .await;
    assert_eq!((record.placed_nodes, record.ranks.len()), (2, 4));
    let record = wait_for(&sandbox, &id, "the end", Duration::from_secs(300), |r| {
        r.state == JobState::Succeeded
    })
    .await;
    assert_eq!(record.restarts.len(), 1, "{:#?}", record.restarts);
    let epochs = audited(&dir.join("runs/elastic"));
    // The global batch changed size with the world (2 or 4 ranks × 2), so
    // the epoch may end with fewer samples left than a batch: drop_last
    // leaves those out of that epoch, as upstream does.
    let all: BTreeSet<String> = epochs[&("laion".to_string(), 0)].iter().cloned().collect();
    let dropped = SAMPLES - all.len() as u64;
    assert!(
        dropped < PER_RANK * WORLD,
        "{dropped} samples of epoch 0 missing"
    );
    for ((_, epoch), keys) in &epochs {
        let unique: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(keys.len(), unique.len(), "epoch {epoch} repeats a sample");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_falls_back_to_the_previous_committed_one() {
    corrupt_checkpoint_falls_back(None).await;
}

/// The same with the checkpoints in a real S3-compatible server (moto):
/// ranks upload their parts, rank 0 the manifest last, the coordinator
/// commits the `s3://` folder, and a flipped byte in an object is caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_in_s3_falls_back_to_the_previous_committed_one() {
    let s3 = flamingo_common::testing::S3Server::start("checkpoints");
    // SAFETY: set before the sandbox starts any thread or process; the
    // agents and their ranks inherit these.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("FLAMINGO_S3_ENDPOINT", &s3.endpoint);
    }
    corrupt_checkpoint_falls_back(Some("s3://checkpoints/runs")).await;
}

/// Flips a byte of a running job's latest committed checkpoint (in the run
/// folder, or in `store`) and kills its ranks: the restart resumes from
/// the previous committed checkpoint and says why in an event.
async fn corrupt_checkpoint_falls_back(store: Option<&str>) {
    let sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 2,
        lease_ttl_seconds: 4,
    })
    .await
    .expect("sandbox");
    let dir = sandbox.path().to_path_buf();
    prepare(&dir);
    let extra: Vec<&str> = store
        .map(|store| vec!["--checkpoint_store", store])
        .unwrap_or_default();
    let id = launch(&dir, &sandbox.coordinator_endpoint(), "2", "verify", &extra);
    let record = wait_for(
        &sandbox,
        &id,
        "two committed checkpoints",
        Duration::from_secs(120),
        |r| r.checkpoints.len() >= 2 && r.ranks.iter().all(|rank| rank.pid.is_some()),
    )
    .await;
    // Freeze the group so nothing commits past what we read, flip one
    // byte of the latest committed checkpoint, then kill every rank.
    let pids: Vec<i32> = (0..WORLD as u32)
        .map(|rank| rank_pid(&record, rank))
        .collect();
    for pid in &pids {
        // SAFETY: plain signals to this test's own rank processes.
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    let frozen = job(&sandbox, &id).await.expect("job");
    let latest = frozen.latest_checkpoint().expect("a checkpoint").clone();
    let previous = frozen.checkpoints[frozen.checkpoints.len() - 2].step;
    let flip = |bytes: &mut Vec<u8>| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
    };
    match store {
        Some(store) => {
            assert_eq!(
                latest.path,
                format!("{store}/verify/checkpoints/step-{:08}", latest.step)
            );
            let folder = flamingo_engine::checkpoint::object::Folder::open(Path::new(&latest.path))
                .expect("the checkpoint's folder");
            let mut bytes = folder
                .get("rank-1.safetensors")
                .expect("get")
                .expect("rank 1's part");
            flip(&mut bytes);
            folder.put("rank-1.safetensors", bytes).expect("flipped");
            assert!(!dir.join("runs/verify/checkpoints").exists());
        }
        None => {
            let file = PathBuf::from(&latest.path).join("rank-1.safetensors");
            let mut bytes = std::fs::read(&file).expect("rank 1's part");
            flip(&mut bytes);
            std::fs::write(&file, &bytes).expect("flipped");
        }
    }
    for pid in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let record = wait_for(&sandbox, &id, "the end", Duration::from_secs(300), |r| {
        r.state.is_terminal()
    })
    .await;
    assert_eq!(record.state, JobState::Succeeded, "{:#?}", record.restarts);
    // Attempt 1 resumed from the previous checkpoint, and said why.
    let attempts =
        std::fs::read_to_string(dir.join("runs/verify/attempts.jsonl")).expect("attempts");
    let resumed: Vec<serde_json::Value> = attempts
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .filter(|start: &serde_json::Value| start["attempt"] == 1)
        .collect();
    assert_eq!(resumed.len(), 1, "{attempts}");
    assert_eq!(resumed[0]["step"], previous, "{attempts}");
    let events = ureq::get(&format!("{}api/jobs/{id}/events", sandbox.dashboard()))
        .set(
            "Authorization",
            &format!("Bearer {}", flamingo_tests::dashboard_token()),
        )
        .timeout(Duration::from_secs(10))
        .call()
        .expect("events")
        .into_string()
        .expect("text");
    let step_dir = format!("step-{:08}", latest.step);
    assert!(
        events.contains("checkpoint verification failed, resumed from the previous committed one")
            && events.contains(&step_dir)
            && events.contains("the file changed after it was written"),
        "{events}"
    );
}

/// With attempt 1 running, attempt 0's rank credential commits nothing, and
/// cannot be passed off as attempt 1's (the checkpoints stay as they are).
async fn superseded_attempts_cannot_commit(sandbox: &ClusterSandbox, id: &str) {
    use flamingo_proto::v1 as pb;
    let before = job(sandbox, id).await.expect("job").checkpoints;
    let node = flamingo_security::Identity::node("node-0");
    let mut client = pb::node_service_client::NodeServiceClient::new(
        sandbox.channel_as(&node).await.expect("channel"),
    );
    let old = sandbox.rank_token(id, 0);
    for (attempt, token) in [(0, old.clone()), (1, old)] {
        let status = client
            .commit_checkpoint(pb::CommitCheckpointRequest {
                job_id: id.to_string(),
                attempt,
                step: 999_999,
                path: "/tmp/forged-checkpoint".into(),
                data_cursor_json: String::new(),
                rank_token: token,
            })
            .await
            .expect_err("a superseded attempt's commit is refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
    assert_eq!(job(sandbox, id).await.expect("job").checkpoints, before);
}

/// Three coordinators under leader election: the leader is SIGKILLed twice
/// while a 2-node job trains. A standby takes over each time, the job goes
/// on without a restart, trains on every sample exactly once per epoch,
/// and ends with the weights of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_job_goes_on_through_two_leader_kills() {
    // Node leases well above the leader's (2 s): agents fence their ranks
    // after a node lease without a coordinator.
    let mut sandbox = ClusterSandbox::start_ha(
        SandboxOptions {
            nodes: 2,
            slots_per_node: 2,
            lease_ttl_seconds: 8,
        },
        3,
    )
    .await
    .expect("sandbox");
    let dir = sandbox.path().to_path_buf();
    let job_file = prepare(&dir);
    let coordinators = sandbox.coordinator_endpoint();
    assert_eq!(coordinators.split(',').count(), 3);
    assert_eq!(sandbox.leader(), Some(0), "the first coordinator leads");
    let id = launch(&dir, &coordinators, "2", "ha", &[]);
    let mut takeovers = Vec::new();
    for kill in 0..2 {
        let before = progress(&sandbox, &id, "steps before the leader dies", 3).await;
        let pids: Vec<Option<u32>> = before.ranks.iter().map(|rank| rank.pid).collect();
        let killed_at = Instant::now();
        let old = sandbox.kill_leader().expect("a leader to kill");
        // A standby leads (listens) …
        let new = loop {
            match sandbox.leader() {
                Some(leader) if leader != old => break leader,
                _ => {}
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "no standby took over"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let leads = killed_at.elapsed();
        // … and answers with the job still in its first attempt.
        let record = loop {
            if let Ok(record) = job(&sandbox, &id).await {
                break record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let answers = killed_at.elapsed();
        assert_eq!(record.attempt, 0, "{:#?}", record.restarts);
        let after = progress(&sandbox, &id, "steps under the new leader", 2).await;
        let resumed = killed_at.elapsed();
        assert_eq!(after.attempt, 0, "{:#?}", after.restarts);
        let pids_after: Vec<Option<u32>> = after.ranks.iter().map(|rank| rank.pid).collect();
        assert_eq!(pids, pids_after, "no rank was started again");
        eprintln!(
            "takeover {}: coordinator {old} SIGKILLed; coordinator {new} listening after {:.2} s, \
             answering after {:.2} s, the job 2 steps further after {:.2} s",
            kill + 1,
            leads.as_secs_f64(),
            answers.as_secs_f64(),
            resumed.as_secs_f64()
        );
        takeovers.push(leads);
    }
    let record = wait_for(&sandbox, &id, "the end", Duration::from_secs(300), |r| {
        r.state == JobState::Succeeded
    })
    .await;
    assert!(record.restarts.is_empty(), "{:#?}", record.restarts);
    assert_eq!(record.attempt, 0);
    every_sample_once_and_the_weights_of_a_whole_run(&dir, &job_file, &dir.join("runs/ha"), &[]);
    eprintln!("takeovers: {takeovers:?}");
}
