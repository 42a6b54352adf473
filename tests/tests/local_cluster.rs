//! `flamingoctl up` / `launch` / `status` / `down` as a user runs them.

use std::process::Command;

use flamingo_tests::{alive, serial_guard, ClusterSandbox};

fn flamingoctl(state_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(ClusterSandbox::binary("flamingoctl"))
        .args(args)
        .env("FLAMINGO_STATE_DIR", state_dir)
        .env_remove("FLAMINGO_COORDINATOR")
        .output()
        .expect("flamingoctl runs")
}

fn ok(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn up_launch_status_down_leaves_no_process_behind() {
    let _serial = serial_guard();
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("cluster");
    let up = ok(&flamingoctl(
        &state_dir,
        &[
            "up",
            "--nodes",
            "2",
            "--port",
            "0",
            "--allow-command-jobs",
            "--coordinators",
            "3",
            "--json",
        ],
    ));
    let cluster: serde_json::Value = serde_json::from_str(&up).unwrap();
    // Three coordinators: every client below finds the leader among them.
    assert_eq!(
        cluster["coordinator"].as_str().unwrap().split(',').count(),
        3,
        "{cluster}"
    );
    let standbys: Vec<u32> = cluster["standby_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pid| pid.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(standbys.len(), 2, "{cluster}");
    let mut pids: Vec<u32> = cluster["agent_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pid| pid.as_u64().unwrap() as u32)
        .collect();
    pids.push(cluster["coordinator_pid"].as_u64().unwrap() as u32);
    pids.extend(&standbys);
    pids.push(cluster["etcd_pid"].as_u64().unwrap() as u32);
    // A data-service replica per node, each answering.
    let replicas: Vec<String> = cluster["data_services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|endpoint| endpoint.as_str().unwrap().to_string())
        .collect();
    assert_eq!(replicas.len(), 2, "{cluster}");
    for replica in &replicas {
        let address = replica.trim_start_matches("http://");
        assert!(std::net::TcpStream::connect(address).is_ok(), "{replica}");
    }
    pids.extend(
        cluster["data_service_pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pid| pid.as_u64().unwrap() as u32),
    );
    assert!(pids.iter().all(|&pid| alive(pid)));

    // A second `up` refuses rather than starting a second cluster.
    let again = flamingoctl(&state_dir, &["up", "--nodes", "1"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let launched = ok(&flamingoctl(
        &state_dir,
        &[
            "launch",
            "--nodes",
            "2",
            "--slots-per-node",
            "2",
            "--job",
            "collective-check",
            "--max-bytes",
            "16384",
            "--json",
        ],
    ));
    let launched: serde_json::Value = serde_json::from_str(&launched).unwrap();
    let job_id = launched["id"].as_str().unwrap().to_string();
    let waited = flamingoctl(&state_dir, &["wait", &job_id, "--json"]);
    ok(&waited);
    let status: serde_json::Value = serde_json::from_str(&ok(&flamingoctl(
        &state_dir,
        &["status", &job_id, "--json"],
    )))
    .unwrap();
    assert_eq!(status["state"], "Succeeded");
    assert_eq!(status["ranks"].as_array().unwrap().len(), 4);
    pids.extend(
        status["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rank| rank["pid"].as_u64().unwrap() as u32),
    );

    // A long job is still running when the cluster goes down.
    let sleeper = ok(&flamingoctl(
        &state_dir,
        &["launch", "--nodes", "2", "--", "sleep", "300"],
    ));
    let sleeper = sleeper.trim().to_string();
    let started = std::time::Instant::now();
    let sleeper_pids: Vec<u32> = loop {
        let status: serde_json::Value = serde_json::from_str(&ok(&flamingoctl(
            &state_dir,
            &["status", &sleeper, "--json"],
        )))
        .unwrap();
        let ranks = status["ranks"].as_array().unwrap().clone();
        if ranks.len() == 2 && ranks.iter().all(|rank| rank["pid"].is_u64()) {
            break ranks
                .iter()
                .map(|rank| rank["pid"].as_u64().unwrap() as u32)
                .collect();
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "sleeper ranks did not start: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Each node's ranks are told their node's replica first, the other
    // after it.
    for pid in &sleeper_pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let var = |name: &str| {
            environ
                .split(|byte| *byte == 0)
                .find_map(|entry| entry.strip_prefix(format!("{name}=").as_bytes()))
                .map(|value| String::from_utf8_lossy(value).into_owned())
                .unwrap_or_else(|| panic!("rank {pid} has no {name}"))
        };
        let node: usize = var("FLAMINGO_NODE_ID")
            .trim_start_matches("node-")
            .parse()
            .unwrap();
        let expected = format!("{},{}", replicas[node], replicas[1 - node]);
        assert_eq!(var("FLAMINGO_DATA_SERVICE"), expected, "rank {pid}");
    }
    pids.extend(sleeper_pids);

    ok(&flamingoctl(&state_dir, &["down"]));
    let survivors: Vec<u32> = pids.iter().copied().filter(|&pid| alive(pid)).collect();
    assert!(survivors.is_empty(), "alive after down: {survivors:?}");
    assert!(!state_dir.join("cluster.json").exists());
    let down_again = ok(&flamingoctl(&state_dir, &["down"]));
    assert!(down_again.contains("nothing to stop"));
}
