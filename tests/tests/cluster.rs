//! Cluster behaviour against real processes: etcd, the coordinator and
//! worker agents from the workspace's binaries, ranks as real processes.

use std::process::Command;
use std::time::{Duration, Instant};

use flamingo_common::{JobKind, JobSpec, JobState, RankState};
use flamingo_tests::{alive, ClusterSandbox, SandboxOptions};

fn command_spec(nodes: u32, slots: u32, script: &str) -> JobSpec {
    JobSpec {
        submitter: String::new(),
        name: String::new(),
        nodes,
        slots_per_node: slots,
        kind: JobKind::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        },
        env: Default::default(),
        policy: Default::default(),
        min_nodes: 0,
    }
}

fn all_ranks_running(job: &flamingo_common::JobRecord) -> bool {
    job.state == JobState::Running
        && !job.ranks.is_empty()
        && job
            .ranks
            .iter()
            .all(|rank| rank.state == RankState::Running)
}

fn flamingoctl(sandbox: &ClusterSandbox, args: &[&str]) -> std::process::Output {
    Command::new(ClusterSandbox::binary("flamingoctl"))
        .args(args)
        .env("FLAMINGO_COORDINATOR", sandbox.coordinator_endpoint())
        .env("FLAMINGO_STATE_DIR", sandbox.path().join("ctl"))
        .output()
        .expect("flamingoctl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collective_check_on_two_nodes_by_two_slots_succeeds() {
    let sandbox = ClusterSandbox::start(SandboxOptions::default())
        .await
        .unwrap();
    let launch = flamingoctl(
        &sandbox,
        &[
            "launch",
            "--nodes",
            "2",
            "--slots-per-node",
            "2",
            "--job",
            "collective-check",
            "--max-bytes",
            "65536",
            "--json",
        ],
    );
    assert!(
        launch.status.success(),
        "{}",
        String::from_utf8_lossy(&launch.stderr)
    );
    let launched: serde_json::Value = serde_json::from_slice(&launch.stdout).unwrap();
    let job_id = launched["id"].as_str().unwrap().to_string();

    let job = sandbox
        .wait_job(&job_id, Duration::from_secs(120), |job| {
            job.state.is_terminal() && job.live_ranks().next().is_none()
        })
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");

    let status = flamingoctl(&sandbox, &["status", &job_id, "--json"]);
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["id"], job_id.as_str());
    assert_eq!(status["state"], "Succeeded");
    let ranks = status["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (index, rank) in ranks.iter().enumerate() {
        assert_eq!(rank["rank"], index);
        assert_eq!(rank["node"], if index < 2 { "node-0" } else { "node-1" });
        assert_eq!(rank["state"], "Exited");
        assert_eq!(rank["exit_code"], 0);
    }
    // The bandwidth table came back from rank 0: 3 ops × sizes 1 KiB..64 KiB.
    let rows = status["result"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3 * 7);
    assert!(rows
        .iter()
        .all(|row| row["busbw_gbps"].as_f64().unwrap() > 0.0));
    assert_eq!(status["result"]["world_size"], 4);

    let human = flamingoctl(&sandbox, &["status", &job_id]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("busbw GB/s") && human.contains("# reduce_scatter"),
        "{human}"
    );

    let logs = flamingoctl(&sandbox, &["logs", &job_id, "--rank", "3"]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("rank 3: correctness checks passed"), "{logs}");
    let json_logs = flamingoctl(&sandbox, &["logs", &job_id, "--rank", "0", "--json"]);
    let text: String = String::from_utf8_lossy(&json_logs.stdout)
        .lines()
        .map(|line| {
            let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(chunk["rank"], 0);
            chunk["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(text.contains("rank 0: correctness checks passed"), "{text}");
    let missing_rank = flamingoctl(&sandbox, &["logs", &job_id, "--rank", "9"]);
    assert!(!missing_rank.status.success());
    assert!(
        String::from_utf8_lossy(&missing_rank.stderr)
            .contains("no such rank (the job has 4 ranks)"),
        "{}",
        String::from_utf8_lossy(&missing_rank.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_job_stays_pending_until_a_third_node_joins() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut session = sandbox.session().await.unwrap();
    let job = session.launch(&command_spec(3, 1, "exit 0")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = session.job(job.id.as_str()).await.unwrap();
    assert_eq!(waiting.state, JobState::Pending);
    assert!(
        waiting.ranks.is_empty(),
        "no rank is placed before all can be"
    );

    sandbox.add_agent("node-2", &[]).unwrap();
    let done = sandbox
        .wait_state(
            job.id.as_str(),
            JobState::Succeeded,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let nodes: Vec<&str> = done.ranks.iter().map(|rank| rank.node.as_str()).collect();
    assert_eq!(nodes, vec!["node-0", "node-1", "node-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_leaves_no_rank_process_alive() {
    let sandbox = ClusterSandbox::start(SandboxOptions::default())
        .await
        .unwrap();
    let mut session = sandbox.session().await.unwrap();
    // Each rank also starts a child, which must die with it (process group).
    let children_dir = sandbox.path().join("children");
    std::fs::create_dir_all(&children_dir).unwrap();
    let script = format!(
        "sleep 300 & echo $! > {}/child-$RANK; wait",
        children_dir.display()
    );
    let job = session.launch(&command_spec(2, 2, &script)).await.unwrap();
    let running = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), all_ranks_running)
        .await
        .unwrap();
    let mut pids: Vec<u32> = running.ranks.iter().map(|rank| rank.pid.unwrap()).collect();
    let started = Instant::now();
    while std::fs::read_dir(&children_dir).unwrap().count() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "children did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for entry in std::fs::read_dir(&children_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        pids.push(text.trim().parse().unwrap());
    }
    assert!(pids.iter().all(|&pid| alive(pid)));

    let stopped = session.stop(job.id.as_str()).await.unwrap();
    assert_eq!(stopped.state, JobState::Stopped);
    assert!(stopped.live_ranks().next().is_none());
    let started = Instant::now();
    while pids.iter().any(|&pid| alive(pid)) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let survivors: Vec<u32> = pids.iter().copied().filter(|&pid| alive(pid)).collect();
    assert!(
        survivors.is_empty(),
        "still alive after stop: {survivors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_rank_fails_the_job_and_kills_its_peers() {
    let sandbox = ClusterSandbox::start(SandboxOptions::default())
        .await
        .unwrap();
    let mut session = sandbox.session().await.unwrap();
    let script = r#"if [ "$RANK" = 1 ]; then sleep 1; exit 3; fi; exec sleep 300"#;
    let job = session.launch(&command_spec(2, 2, script)).await.unwrap();
    let running = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), all_ranks_running)
        .await
        .unwrap();
    let pids: Vec<u32> = running.ranks.iter().map(|rank| rank.pid.unwrap()).collect();

    let failed = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), |job| {
            job.state == JobState::Failed && job.live_ranks().next().is_none()
        })
        .await
        .unwrap();
    assert!(
        failed
            .message
            .contains("rank 1 on node-0 exited with code 3"),
        "{}",
        failed.message
    );
    assert_eq!(failed.ranks[1].exit_code, Some(3));
    for rank in [0usize, 2, 3] {
        assert_eq!(failed.ranks[rank].state, RankState::Exited);
        assert_eq!(
            failed.ranks[rank].signal,
            Some(libc::SIGTERM),
            "{:?}",
            failed.ranks[rank]
        );
    }
    assert!(pids.iter().all(|&pid| !alive(pid)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkill_and_restart_carries_the_job_on() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        lease_ttl_seconds: 6,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut session = sandbox.session().await.unwrap();
    let marker = sandbox.path().join("release");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.1; done; exit 0",
        marker.display()
    );
    let job = session.launch(&command_spec(2, 1, &script)).await.unwrap();
    let before = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), all_ranks_running)
        .await
        .unwrap();
    let queued = session.launch(&command_spec(3, 2, "exit 0")).await.unwrap();
    drop(session);

    sandbox.kill_coordinator();
    // The ranks finish while no coordinator is up; their exits must not be lost.
    std::fs::write(&marker, b"go").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    sandbox.start_coordinator().unwrap();

    let after = sandbox
        .wait_state(
            job.id.as_str(),
            JobState::Succeeded,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(after.id, before.id);
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.master_port, before.master_port);
    let placement = |job: &flamingo_common::JobRecord| -> Vec<(u32, String, Option<u32>)> {
        job.ranks
            .iter()
            .map(|rank| (rank.rank, rank.node.0.clone(), rank.pid))
            .collect()
    };
    assert_eq!(placement(&after), placement(&before));
    let mut session = sandbox.session().await.unwrap();
    let still_queued = session.job(queued.id.as_str()).await.unwrap();
    assert_eq!(
        still_queued.state,
        JobState::Pending,
        "the pending job survived too"
    );
    assert_eq!(
        session.nodes().await.unwrap().len(),
        2,
        "nodes kept their leases"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_expires_its_lease_and_fails_the_job_within_the_ttl() {
    let ttl = 3;
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 1,
        lease_ttl_seconds: ttl,
    })
    .await
    .unwrap();
    let mut session = sandbox.session().await.unwrap();
    let job = session
        .launch(&command_spec(2, 1, "exec sleep 300"))
        .await
        .unwrap();
    let running = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), all_ranks_running)
        .await
        .unwrap();
    let pids: Vec<u32> = running.ranks.iter().map(|rank| rank.pid.unwrap()).collect();

    let killed_at = Instant::now();
    sandbox.kill_agent("node-1");
    let failed = sandbox
        .wait_state(job.id.as_str(), JobState::Failed, Duration::from_secs(30))
        .await
        .unwrap();
    let detected_after = killed_at.elapsed();
    // etcd checks lease expiry every 500 ms; allow that and our 100 ms polling.
    assert!(
        detected_after <= Duration::from_secs(u64::from(ttl)) + Duration::from_millis(1500),
        "failure detected only after {detected_after:?} with a {ttl} s TTL"
    );
    assert!(
        failed.message.contains("node node-1 lost"),
        "{}",
        failed.message
    );
    assert_eq!(failed.ranks[1].state, RankState::Lost);
    // The dead agent's rank died with it; the survivor was stopped.
    let started = Instant::now();
    while pids.iter().any(|&pid| alive(pid)) && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "ranks outlived the failure"
    );
    assert_eq!(session.nodes().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_another_protocol_version_is_refused_clearly() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    sandbox
        .add_agent("old-agent", &["--protocol-version=999"])
        .unwrap();
    let status = sandbox
        .wait_agent_exit("old-agent", Duration::from_secs(20))
        .unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(sandbox.agent_log("old-agent")).unwrap();
    assert!(
        log.contains(&format!(
            "the coordinator refused this agent: agent protocol version 999 does not match the coordinator's {}",
            flamingo_proto::PROTOCOL_VERSION
        )),
        "{log}"
    );
    let mut session = sandbox.session().await.unwrap();
    let nodes = session.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "the refused agent is not a node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_agent_whose_coordinator_is_down() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        slots_per_node: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    sandbox.kill_coordinator();
    let pid = sandbox.agent_pid("node-0").unwrap();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // Nothing runs on it: it stops at once rather than waiting for a
    // coordinator to drain through.
    let status = sandbox
        .wait_agent_exit("node-0", Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "agent exit {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_and_lets_its_rank_finish() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        slots_per_node: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut session = sandbox.session().await.unwrap();
    let job = session
        .launch(&command_spec(1, 1, "sleep 1.5; exit 0"))
        .await
        .unwrap();
    sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), all_ranks_running)
        .await
        .unwrap();
    let pid = sandbox.agent_pid("node-0").unwrap();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let waiting = session.launch(&command_spec(1, 1, "exit 0")).await.unwrap();
    let status = sandbox
        .wait_agent_exit("node-0", Duration::from_secs(20))
        .unwrap();
    assert!(status.success(), "agent exit {status:?}");
    let finished = session.job(job.id.as_str()).await.unwrap();
    assert_eq!(
        finished.state,
        JobState::Succeeded,
        "the running rank finished: {finished:#?}"
    );
    let waiting = session.job(waiting.id.as_str()).await.unwrap();
    assert_eq!(
        waiting.state,
        JobState::Pending,
        "a draining node takes no new ranks"
    );
    assert!(
        session.nodes().await.unwrap().is_empty(),
        "the agent deregistered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_names_the_coordinator_it_could_not_reach() {
    let port = flamingo_common::net::free_local_port().unwrap();
    let address = format!("http://127.0.0.1:{port}");
    let output = Command::new(ClusterSandbox::binary("flamingoctl"))
        .args(["status", "job-x", "--coordinator", &address])
        .env(
            "FLAMINGO_STATE_DIR",
            std::env::temp_dir().join("flamingo-no-cluster"),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot reach coordinator at {address} (connection refused); is the cluster up? try: flamingoctl up"
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_job_and_bad_launches_are_explained() {
    let sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let missing = flamingoctl(&sandbox, &["status", "job-nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("job job-nope not found"));
    let zero = flamingoctl(&sandbox, &["launch", "--nodes", "0", "--", "true"]);
    assert!(String::from_utf8_lossy(&zero.stderr).contains("invalid nodes: must be at least 1"));
}

/// Whether a node lives is kept in the coordinator's memory: one that
/// starts (after any downtime) gives every node a full lease. Nodes whose
/// agents come back carry on; one that died while no coordinator was up is
/// lost a lease after the start, and its job fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_down_past_the_ttl_loses_only_the_nodes_that_did_not_come_back() {
    let ttl = 3;
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 1,
        lease_ttl_seconds: ttl,
    })
    .await
    .unwrap();
    let mut session = sandbox.session().await.unwrap();
    let job = session
        .launch(&command_spec(2, 1, "exec sleep 300"))
        .await
        .unwrap();
    let running = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), all_ranks_running)
        .await
        .unwrap();
    let pids: Vec<u32> = running.ranks.iter().map(|rank| rank.pid.unwrap()).collect();
    drop(session);

    // The coordinator is down past the TTL, and node-1's agent dies (its
    // rank with it) meanwhile.
    let down = Instant::now();
    sandbox.kill_coordinator();
    sandbox.kill_agent("node-1");
    // node-0's agent fences its rank once it has been out of touch for the
    // node lease: by then a coordinator would have given the node up.
    let node_0_rank = running
        .ranks
        .iter()
        .find(|rank| rank.node.as_str() == "node-0")
        .and_then(|rank| rank.pid)
        .unwrap();
    while alive(node_0_rank) && down.elapsed() < Duration::from_secs(u64::from(ttl) + 5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fenced = down.elapsed();
    assert!(!alive(node_0_rank), "node-0's rank was not fenced");
    assert!(
        fenced >= Duration::from_secs(u64::from(ttl)),
        "fenced after {fenced:?}, before the lease ran out"
    );
    tokio::time::sleep(Duration::from_secs(u64::from(ttl) + 2).saturating_sub(down.elapsed()))
        .await;
    let restarted = Instant::now();
    sandbox.start_coordinator().unwrap();

    let failed = sandbox
        .wait_job(job.id.as_str(), Duration::from_secs(30), |job| {
            job.state == JobState::Failed && job.live_ranks().next().is_none()
        })
        .await
        .unwrap();
    // Whichever the coordinator learns first: node-1 lost (after its full
    // lease from the coordinator's start), or node-0's fenced rank.
    assert!(
        failed
            .message
            .contains("node node-1 lost: no heartbeat for 3 s")
            || failed.message.contains("rank 0"),
        "{}",
        failed.message
    );
    if failed.message.contains("node node-1 lost") {
        assert!(
            restarted.elapsed() >= Duration::from_secs(u64::from(ttl)),
            "node-1 had a full lease from the coordinator's start"
        );
    }
    // node-0 came back and stays; node-1's agent registers again.
    let nodes = sandbox.session().await.unwrap().nodes().await.unwrap();
    assert!(
        nodes.iter().any(|node| node.node_id == "node-0"),
        "{nodes:?}"
    );
    sandbox.add_agent("node-1", &[]).unwrap();
    // node-0's agent kills the failed job's rank.
    sandbox.wait_for_nodes(2).await.unwrap();
    let started = Instant::now();
    while pids.iter().any(|&pid| alive(pid)) && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "ranks of the failed job survived"
    );
    // And the cluster takes new work.
    let mut session = sandbox.session().await.unwrap();
    let next = session.launch(&command_spec(2, 1, "exit 0")).await.unwrap();
    sandbox
        .wait_state(
            next.id.as_str(),
            JobState::Succeeded,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
}
