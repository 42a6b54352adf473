//! Unit tests of the coordinator's pure core: gang scheduling, failure
//! propagation, node loss and heartbeat reconciliation.

use std::collections::BTreeMap;

use flamingo_common::JobKind;

use super::*;

fn node(id: &str, slots: u32) -> NodeRecord {
    NodeRecord {
        node_id: NodeId(id.into()),
        address: "127.0.0.1".into(),
        slots,
        gpu: false,
        draining: false,
        agent_endpoint: String::new(),
        rendezvous_port_first: 29500,
        rendezvous_port_count: 4,
        lease_id: 1,
        registered_unix_ms: 0,
    }
}

fn job(id: &str, nodes: u32, slots: u32, created: i64) -> JobRecord {
    JobRecord::new(
        JobId(id.into()),
        JobSpec {
            name: String::new(),
            nodes,
            slots_per_node: slots,
            kind: JobKind::Command {
                argv: vec!["true".into()],
            },
            env: BTreeMap::new(),
        },
        created,
    )
}

fn cluster(nodes: &[(&str, u32)]) -> Cluster {
    let mut cluster = Cluster::default();
    for (id, slots) in nodes {
        cluster.nodes.insert(NodeId((*id).into()), node(id, *slots));
    }
    cluster
}

fn exited(code: i32) -> RankOutcome {
    RankOutcome::Exited {
        exit_code: code,
        signal: 0,
        result_json: None,
    }
}

#[test]
fn job_waits_for_enough_nodes_then_starts_all_ranks_at_once() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    let effects = cluster.submit(job("j", 3, 2, 1), 10);
    assert!(effects.messages.is_empty());
    assert_eq!(cluster.jobs[&JobId("j".into())].state, JobState::Pending);

    cluster
        .nodes
        .insert(NodeId("node-2".into()), node("node-2", 2));
    let effects = cluster.schedule(20);
    let job = &cluster.jobs[&JobId("j".into())];
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.ranks.len(), 6);
    assert_eq!(effects.messages.len(), 3, "one start message per node");
    // Node-major numbering: ranks 0,1 on node-0, 2,3 on node-1, 4,5 on node-2.
    let layout: Vec<(u32, &str, u32)> = job
        .ranks
        .iter()
        .map(|rank| (rank.rank, rank.node.as_str(), rank.local_rank))
        .collect();
    assert_eq!(
        layout,
        vec![
            (0, "node-0", 0),
            (1, "node-0", 1),
            (2, "node-1", 0),
            (3, "node-1", 1),
            (4, "node-2", 0),
            (5, "node-2", 1)
        ]
    );
    assert_eq!(job.master_port, 29500);
}

#[test]
fn failing_rank_fails_job_and_stops_peers() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    cluster.submit(job("j", 2, 2, 1), 10);
    let id = JobId("j".into());
    for rank in 0..4 {
        cluster.rank_report(&id, rank, RankOutcome::Started { pid: 100 + rank }, 11);
    }
    let effects = cluster.rank_report(&id, 1, exited(1), 12);
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.message.contains("rank 1 on node-0 exited with code 1"),
        "{}",
        job.message
    );
    let stopped: BTreeSet<&str> = effects
        .messages
        .iter()
        .filter(|(_, message)| matches!(message.kind, Some(pb::coordinator_message::Kind::Stop(_))))
        .map(|(node, _)| node.as_str())
        .collect();
    assert_eq!(stopped, BTreeSet::from(["node-0", "node-1"]));
    // Slots stay held until the killed peers report their exits.
    assert_eq!(
        cluster.free_slots(&cluster.nodes[&NodeId("node-1".into())]),
        0
    );
    for rank in [0, 2, 3] {
        cluster.rank_report(
            &id,
            rank,
            RankOutcome::Exited {
                exit_code: -1,
                signal: 9,
                result_json: None,
            },
            13,
        );
    }
    assert_eq!(cluster.jobs[&id].state, JobState::Failed, "stays failed");
    assert_eq!(
        cluster.free_slots(&cluster.nodes[&NodeId("node-1".into())]),
        2
    );
}

#[test]
fn all_ranks_succeeding_succeeds_job_with_rank0_result() {
    let mut cluster = cluster(&[("node-0", 2)]);
    cluster.submit(job("j", 1, 2, 1), 10);
    let id = JobId("j".into());
    cluster.rank_report(&id, 1, exited(0), 11);
    assert_eq!(cluster.jobs[&id].state, JobState::Running);
    cluster.rank_report(
        &id,
        0,
        RankOutcome::Exited {
            exit_code: 0,
            signal: 0,
            result_json: Some("{\"ok\":true}".into()),
        },
        12,
    );
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.result_json.as_deref(), Some("{\"ok\":true}"));
    assert_eq!(job.finished_unix_ms, Some(12));
}

#[test]
fn fifo_head_blocks_smaller_jobs_behind_it() {
    let mut cluster = cluster(&[("node-0", 1), ("node-1", 1)]);
    cluster.submit(job("running", 1, 1, 1), 1);
    cluster.submit(job("big", 2, 1, 2), 2);
    cluster.submit(job("small", 1, 1, 3), 3);
    assert_eq!(cluster.jobs[&JobId("big".into())].state, JobState::Pending);
    assert_eq!(
        cluster.jobs[&JobId("small".into())].state,
        JobState::Pending
    );
    cluster.rank_report(&JobId("running".into()), 0, exited(0), 4);
    assert_eq!(cluster.jobs[&JobId("big".into())].state, JobState::Running);
    assert_eq!(
        cluster.jobs[&JobId("small".into())].state,
        JobState::Pending
    );
}

#[test]
fn losing_a_node_fails_its_jobs_and_frees_nothing_twice() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    cluster.submit(job("j", 2, 1, 1), 1);
    let id = JobId("j".into());
    let effects = cluster.node_lost(&NodeId("node-1".into()), "lease expired", 5);
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Failed);
    assert!(job.message.contains("node node-1 lost"));
    assert_eq!(job.ranks[1].state, RankState::Lost);
    assert_eq!(effects.messages.len(), 1, "stop goes to node-0 only");
    assert!(!cluster.nodes.contains_key(&NodeId("node-1".into())));
}

#[test]
fn stop_is_idempotent_and_pending_jobs_stop_at_once() {
    let mut cluster = cluster(&[("node-0", 1)]);
    cluster.submit(job("waiting", 2, 1, 1), 1);
    let effects = cluster.stop(&JobId("waiting".into()), 2);
    assert!(effects.messages.is_empty());
    assert_eq!(
        cluster.jobs[&JobId("waiting".into())].state,
        JobState::Stopped
    );
    assert!(cluster.stop(&JobId("waiting".into()), 3).events.is_empty());
}

#[test]
fn heartbeat_resends_unacted_starts_and_stops_unknown_jobs() {
    let mut cluster = cluster(&[("node-0", 1)]);
    cluster.submit(job("j", 1, 1, 1), 1);
    let node_id = NodeId("node-0".into());
    let running = BTreeSet::from([(JobId("ghost".into()), 0)]);
    let effects = cluster.heartbeat(&node_id, &running, 1000, 5000);
    let kinds: Vec<&str> = effects
        .messages
        .iter()
        .map(|(_, message)| match message.kind {
            Some(pb::coordinator_message::Kind::Start(_)) => "start",
            Some(pb::coordinator_message::Kind::Stop(_)) => "stop",
            None => "none",
        })
        .collect();
    assert_eq!(kinds, vec!["stop", "start"]);
}

#[test]
fn master_ports_do_not_collide_on_one_node() {
    let mut cluster = cluster(&[("node-0", 4)]);
    cluster.submit(job("a", 1, 1, 1), 1);
    cluster.submit(job("b", 1, 1, 2), 2);
    assert_eq!(cluster.jobs[&JobId("a".into())].master_port, 29500);
    assert_eq!(cluster.jobs[&JobId("b".into())].master_port, 29501);
}
