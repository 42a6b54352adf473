//! Unit tests of the coordinator's pure core: gang scheduling, failure
//! propagation, node loss and heartbeat reconciliation.

use std::collections::BTreeMap;

use flamingo_common::{JobKind, JobSpec, RankState};

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
            submitter: String::new(),
            name: String::new(),
            nodes,
            slots_per_node: slots,
            kind: JobKind::Command {
                argv: vec!["true".into()],
            },
            env: BTreeMap::new(),
            policy: Default::default(),
            min_nodes: 0,
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
        cluster.rank_report(&id, 0, rank, RankOutcome::Started { pid: 100 + rank }, 11);
    }
    let effects = cluster.rank_report(&id, 0, 1, exited(1), 12);
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
            0,
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
    cluster.rank_report(&id, 0, 1, exited(0), 11);
    assert_eq!(cluster.jobs[&id].state, JobState::Running);
    cluster.rank_report(
        &id,
        0,
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
    cluster.rank_report(&JobId("running".into()), 0, 0, exited(0), 4);
    assert_eq!(cluster.jobs[&JobId("big".into())].state, JobState::Running);
    assert_eq!(
        cluster.jobs[&JobId("small".into())].state,
        JobState::Pending
    );
}

#[test]
fn a_waiting_job_holds_its_nodes_and_smaller_jobs_backfill_the_rest() {
    let mut cluster = cluster(&[("n0", 4), ("n1", 4), ("n2", 2)]);
    let state = |cluster: &Cluster, id: &str| cluster.jobs[&JobId(id.into())].state;
    cluster.submit(job("a", 1, 4, 1), 1);
    assert_eq!(
        cluster.jobs[&JobId("a".into())].ranks[0].node.as_str(),
        "n0"
    );
    cluster.submit(job("big", 2, 4, 2), 2);
    assert_eq!(state(&cluster, "big"), JobState::Pending);
    let waiting = &cluster.jobs[&JobId("big".into())].message;
    assert!(
        waiting.contains("waiting for 2 node(s) with 4 free slot(s); holding n1, n0"),
        "{waiting}"
    );
    // Behind it: a job that fits on a node it does not hold runs now; one
    // that would take a held node waits (it cannot delay the big job).
    cluster.submit(job("small", 1, 2, 3), 3);
    cluster.submit(job("takes-n1", 1, 4, 4), 4);
    assert_eq!(state(&cluster, "small"), JobState::Running);
    assert_eq!(
        cluster.jobs[&JobId("small".into())].ranks[0].node.as_str(),
        "n2"
    );
    assert_eq!(state(&cluster, "takes-n1"), JobState::Pending);
    for rank in 0..4 {
        cluster.rank_report(&JobId("a".into()), 0, rank, exited(0), 5);
    }
    assert_eq!(state(&cluster, "big"), JobState::Running);
    assert!(cluster.jobs[&JobId("big".into())].message.is_empty());
    assert_eq!(state(&cluster, "takes-n1"), JobState::Pending);
}

#[test]
fn a_job_that_cannot_fit_the_cluster_blocks_nothing_and_starts_when_nodes_arrive() {
    let mut cluster = cluster(&[("n0", 2), ("n1", 2)]);
    let state = |cluster: &Cluster, id: &str| cluster.jobs[&JobId(id.into())].state;
    cluster.submit(job("huge", 3, 2, 1), 1);
    cluster.submit(job("wide", 1, 8, 2), 2);
    cluster.submit(job("small", 2, 1, 3), 3);
    assert_eq!(state(&cluster, "small"), JobState::Running);
    let huge = &cluster.jobs[&JobId("huge".into())].message;
    assert!(
        huge.contains("cannot fit the registered cluster: needs 3 node(s) with 2 slot(s); 2 registered node(s)"),
        "{huge}"
    );
    assert!(cluster.jobs[&JobId("wide".into())]
        .message
        .contains("needs 1 node(s) with 8 slot(s); 0 registered"));
    cluster.rank_report(&JobId("small".into()), 0, 0, exited(0), 4);
    cluster.rank_report(&JobId("small".into()), 0, 1, exited(0), 4);
    cluster.nodes.insert(NodeId("n2".into()), node("n2", 2));
    cluster.schedule(5);
    assert_eq!(state(&cluster, "huge"), JobState::Running);
    assert_eq!(state(&cluster, "wide"), JobState::Pending);
}

#[test]
fn an_absurd_elastic_request_costs_placement_work_for_the_nodes_there_are() {
    let mut cluster = cluster(&[("n0", 1), ("n1", 1)]);
    let mut elastic = job("elastic", u32::MAX, 1, 1);
    elastic.spec.min_nodes = 1;
    elastic.spec.kind = JobKind::Train {
        config_json: "{}".into(),
    };
    cluster.submit(elastic, 1);
    assert_eq!(
        cluster.jobs[&JobId("elastic".into())].state,
        JobState::Running
    );
    // Sizes tried: the two free nodes, not four billion.
    assert_eq!(cluster.jobs[&JobId("elastic".into())].placed_nodes, 2);
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
fn nodes_live_while_heard_from_and_a_closed_stream_shortens_the_wait() {
    let mut cluster = cluster(&[("node-0", 1), ("node-1", 1), ("node-2", 1)]);
    for id in ["node-0", "node-1", "node-2"] {
        cluster.heard_from(&NodeId(id.into()), 10_000, 0);
    }
    cluster.submit(job("j", 2, 1, 1), 1);
    // node-0 keeps heartbeating; node-1's agent dies (its stream closes);
    // node-2 goes silent with its stream open.
    cluster.heard_from(&NodeId("node-0".into()), 10_000, 8_000);
    cluster.connection_closed(&NodeId("node-1".into()), 1_500, 1_000);
    let (lost, _) = cluster.expire_nodes(10_000, 2_000);
    assert!(lost.is_empty(), "within the grace: {lost:?}");
    let (lost, effects) = cluster.expire_nodes(10_000, 2_500);
    assert_eq!(lost, vec![NodeId("node-1".into())]);
    let job = &cluster.jobs[&JobId("j".into())];
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.message
            .contains("its agent's connection closed 1.5 s ago"),
        "{}",
        job.message
    );
    assert!(!effects.events.is_empty());
    // A node that reattached in time is not lost.
    cluster.connection_closed(&NodeId("node-0".into()), 1_500, 9_000);
    cluster.heard_from(&NodeId("node-0".into()), 10_000, 9_500);
    let (lost, _) = cluster.expire_nodes(10_000, 10_001);
    assert_eq!(
        lost,
        vec![NodeId("node-2".into())],
        "node-2: no heartbeat for 10 s"
    );
    assert!(cluster.nodes.contains_key(&NodeId("node-0".into())));
    let (lost, _) = cluster.expire_nodes(10_000, 19_499);
    assert!(lost.is_empty());
}

#[test]
fn a_whole_cluster_job_reports_in_linear_time_with_one_start_event() {
    let nodes: Vec<(String, u32)> = (0..512).map(|n| (format!("node-{n:04}"), 8)).collect();
    let refs: Vec<(&str, u32)> = nodes
        .iter()
        .map(|(id, slots)| (id.as_str(), *slots))
        .collect();
    let mut cluster = cluster(&refs);
    cluster.submit(job("big", 512, 8, 1), 1);
    let id = JobId("big".into());
    assert_eq!(cluster.jobs[&id].ranks.len(), 4096);
    let mut start_events = 0;
    for rank in 0..4096 {
        let effects = cluster.rank_report(&id, 0, rank, RankOutcome::Started { pid: rank }, 2);
        start_events += effects.events.len();
    }
    assert_eq!(start_events, 1, "one event when the whole group runs");
    let mut finished = None;
    for rank in (0..4096).rev() {
        let effects = cluster.rank_report(&id, 0, rank, exited(0), 3);
        if let Some(event) = effects
            .events
            .iter()
            .find(|event| event.state == JobState::Succeeded)
        {
            finished = Some((rank, event.message.clone()));
        }
    }
    assert_eq!(
        finished,
        Some((
            0,
            "Succeeded: all 4096 rank(s) exited with code 0".to_string()
        ))
    );
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
    let running = BTreeSet::from([(JobId("ghost".into()), 0, 0)]);
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

fn train_job(id: &str, nodes: u32, slots: u32, max_restarts: u32) -> JobRecord {
    let mut record = job(id, nodes, slots, 1);
    record.spec.kind = JobKind::Train {
        config_json: "{}".into(),
    };
    record.spec.policy.max_restarts = max_restarts;
    record.spec.policy.hang_timeout_seconds = 5;
    record
}

fn checkpoint(step: u64, attempt: u32) -> flamingo_common::CheckpointRecord {
    flamingo_common::CheckpointRecord {
        step,
        path: format!("/runs/r/checkpoints/step-{step}"),
        unix_ms: 0,
        attempt,
        data_cursor_json: "{}".into(),
    }
}

fn stops(effects: &Effects) -> Vec<(String, u32, bool)> {
    effects
        .messages
        .iter()
        .filter_map(|(node, message)| match &message.kind {
            Some(pb::coordinator_message::Kind::Stop(stop)) => {
                Some((node.0.clone(), stop.before_attempt, stop.kill_now))
            }
            _ => None,
        })
        .collect()
}

fn starts(effects: &Effects) -> Vec<pb::RankAssignment> {
    effects
        .messages
        .iter()
        .filter_map(|(_, message)| match &message.kind {
            Some(pb::coordinator_message::Kind::Start(start)) => Some(start.ranks.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_crashed_train_rank_restarts_the_group_from_the_latest_commit() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    cluster.submit(train_job("t", 2, 2, 2), 1);
    let id = JobId("t".into());
    let first_port = cluster.jobs[&id].master_port;
    cluster
        .commit_checkpoint(&id, checkpoint(4, 0), 5)
        .expect("attempt 0 commits");
    let effects = cluster.rank_report(
        &id,
        0,
        3,
        RankOutcome::Exited {
            exit_code: -1,
            signal: 9,
            result_json: None,
        },
        10,
    );
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Running, "re-placed at once");
    assert_eq!(job.attempt, 1);
    assert_eq!(job.restarts.len(), 1);
    assert!(
        job.restarts[0].contains("killed by signal 9"),
        "{:?}",
        job.restarts
    );
    assert!(job.restarts[0].contains("resuming from step 4"));
    assert_ne!(job.master_port, first_port, "a restart takes a fresh port");
    // Both nodes' old ranks are killed now, then all four start again.
    let mut stopped = stops(&effects);
    stopped.sort();
    assert_eq!(
        stopped,
        vec![("node-0".into(), 1, true), ("node-1".into(), 1, true)]
    );
    let assignments = starts(&effects);
    assert_eq!(assignments.len(), 4);
    assert!(assignments
        .iter()
        .all(|a| a.attempt == 1 && a.resume_from == "/runs/r/checkpoints/step-4"));
    // A late report from the old attempt changes nothing.
    let late = cluster.rank_report(&id, 0, 1, exited(1), 11);
    assert!(late.jobs_changed.is_empty());
    assert_eq!(cluster.jobs[&id].attempt, 1);
    // So does a commit from it.
    assert!(matches!(
        cluster.commit_checkpoint(&id, checkpoint(6, 0), 12),
        Err(CommitRefused::Stale {
            current_attempt: 1,
            ..
        })
    ));
}

#[test]
fn restarts_run_out_and_other_kinds_never_restart() {
    let mut cluster = cluster(&[("node-0", 2)]);
    cluster.submit(train_job("t", 1, 1, 1), 1);
    let id = JobId("t".into());
    cluster.rank_report(&id, 0, 0, exited(1), 2);
    assert_eq!(cluster.jobs[&id].attempt, 1);
    cluster.rank_report(&id, 1, 0, exited(1), 3);
    let record = &cluster.jobs[&id];
    assert_eq!(record.state, JobState::Failed);
    assert!(
        record.message.contains("no restarts left: 1 of 1"),
        "{}",
        record.message
    );

    cluster.submit(job("c", 1, 1, 4), 4);
    let command = JobId("c".into());
    cluster.rank_report(&command, 0, 0, exited(3), 5);
    assert_eq!(cluster.jobs[&command].state, JobState::Failed);
}

#[test]
fn a_silent_job_is_a_hang_but_progress_keeps_it_alive() {
    let mut cluster = cluster(&[("node-0", 2)]);
    cluster.submit(train_job("t", 1, 2, 3), 1_000);
    let id = JobId("t".into());
    assert!(cluster.tick(4_000).events.is_empty());
    cluster.progress(&id, 0, 7, 5_000);
    assert!(cluster.tick(9_000).events.is_empty(), "4 s after a step");
    // A report from a superseded attempt does not count.
    cluster.progress(&id, 5, 8, 9_500);
    let effects = cluster.tick(10_500);
    let job = &cluster.jobs[&id];
    assert_eq!(job.attempt, 1, "{:?}", effects.events);
    assert!(job.restarts[0].contains("hang"), "{:?}", job.restarts);
    assert!(job.restarts[0].contains("after step 7"));
    assert_eq!(stops(&effects), vec![("node-0".into(), 1, true)]);
}

#[test]
fn retention_keeps_the_newest_and_the_milestones() {
    let mut cluster = cluster(&[("node-0", 1)]);
    let mut record = train_job("t", 1, 1, 0);
    record.spec.policy.keep_checkpoints = 2;
    record.spec.policy.keep_every_checkpoint_steps = 4;
    cluster.submit(record, 1);
    let id = JobId("t".into());
    let mut retired = Vec::new();
    for step in [2, 4, 6, 8, 10] {
        let (_, gone) = cluster
            .commit_checkpoint(&id, checkpoint(step, 0), 2)
            .expect("commits");
        retired.extend(gone);
    }
    let kept: Vec<u64> = cluster.jobs[&id]
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(kept, vec![4, 8, 10]);
    assert_eq!(
        retired,
        vec![
            "/runs/r/checkpoints/step-2".to_string(),
            "/runs/r/checkpoints/step-6".to_string()
        ]
    );
    assert_eq!(
        cluster.jobs[&id].latest_checkpoint().map(|c| c.step),
        Some(10)
    );
}

#[test]
fn a_node_that_keeps_failing_is_left_out_when_others_can_run_the_job() {
    let mut cluster = cluster(&[("node-0", 1), ("node-1", 1)]);
    let mut record = train_job("t", 1, 1, 5);
    record.spec.policy.exclude_node_after_failures = 2;
    cluster.submit(record, 1);
    let id = JobId("t".into());
    let first = cluster.jobs[&id].ranks[0].node.clone();
    for attempt in 0..2 {
        assert_eq!(cluster.jobs[&id].ranks[0].node, first);
        cluster.rank_report(&id, attempt, 0, exited(1), 2 + i64::from(attempt));
    }
    let job = &cluster.jobs[&id];
    assert_eq!(job.excluded_nodes(), vec![first.clone()]);
    assert_ne!(job.ranks[0].node, first, "moved to the healthy node");
    assert!(job.restarts[1].contains("avoiding"), "{:?}", job.restarts);
}

#[test]
fn a_lost_node_restarts_a_train_job_that_waits_for_capacity() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    cluster.submit(train_job("t", 2, 2, 3), 1);
    let id = JobId("t".into());
    let effects = cluster.node_lost(&NodeId("node-1".into()), "lease expired", 5);
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Pending, "one node left: waits");
    assert_eq!(job.attempt, 1);
    assert_eq!(stops(&effects), vec![("node-0".into(), 1, true)]);
    cluster
        .nodes
        .insert(NodeId("node-1".into()), node("node-1", 2));
    let effects = cluster.schedule(6);
    assert_eq!(cluster.jobs[&id].state, JobState::Running);
    assert_eq!(starts(&effects).len(), 4);
}

#[test]
fn a_preempted_rank_requeues_the_job_without_using_a_restart() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    cluster.submit(train_job("t", 2, 2, 0), 1);
    let id = JobId("t".into());
    cluster
        .commit_checkpoint(&id, checkpoint(9, 0), 2)
        .expect("commits");
    cluster
        .nodes
        .get_mut(&NodeId("node-1".into()))
        .unwrap()
        .draining = true;
    let effects = cluster.rank_report(
        &id,
        0,
        2,
        exited(flamingo_common::jobs::PREEMPTED_EXIT_CODE),
        3,
    );
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Pending, "waits: node-1 drains");
    assert_eq!(job.attempt, 1);
    assert!(job.restarts.is_empty(), "max_restarts 0 and still alive");
    assert!(effects
        .events
        .iter()
        .any(|e| e.message.contains("preempted on node-1") && e.message.contains("step 9")));
    cluster
        .nodes
        .get_mut(&NodeId("node-1".into()))
        .unwrap()
        .draining = false;
    let effects = cluster.schedule(4);
    assert!(starts(&effects)
        .iter()
        .all(|a| a.resume_from.ends_with("step-9")));
    assert_eq!(cluster.jobs[&id].state, JobState::Running);
}

#[test]
fn an_elastic_job_shrinks_to_the_nodes_left_and_grows_back() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2)]);
    let mut record = train_job("t", 2, 2, 5);
    record.spec.min_nodes = 1;
    cluster.submit(record, 1);
    let id = JobId("t".into());
    assert_eq!(cluster.jobs[&id].placed_nodes, 2);
    let effects = cluster.node_lost(&NodeId("node-1".into()), "lease expired", 5);
    let job = &cluster.jobs[&id];
    assert_eq!(job.state, JobState::Running, "continues on one node");
    assert_eq!(job.placed_nodes, 1);
    let assignments = starts(&effects);
    assert_eq!(assignments.len(), 2);
    assert!(assignments.iter().all(|a| a.world_size == 2));
    // node-1 returns: the job is asked to checkpoint and stop…
    cluster
        .nodes
        .insert(NodeId("node-1".into()), node("node-1", 2));
    let effects = cluster.schedule(6);
    assert!(cluster.jobs[&id].growing);
    let asked: Vec<(u32, bool, u32)> = effects
        .messages
        .iter()
        .filter_map(|(_, message)| match &message.kind {
            Some(pb::coordinator_message::Kind::Stop(stop)) => {
                Some((stop.before_attempt, stop.kill_now, stop.grace_seconds))
            }
            _ => None,
        })
        .collect();
    assert_eq!(asked, vec![(2, false, CHECKPOINT_GRACE_SECONDS)]);
    assert!(cluster.schedule(7).messages.is_empty(), "asked once");
    // …checkpoints, exits for a requeue, and comes back on both nodes.
    let effects = cluster.rank_report(
        &id,
        1,
        0,
        exited(flamingo_common::jobs::PREEMPTED_EXIT_CODE),
        8,
    );
    let job = &cluster.jobs[&id];
    assert_eq!(
        (job.state, job.placed_nodes, job.attempt),
        (JobState::Running, 2, 2)
    );
    assert!(effects.events.iter().any(|e| e.message.contains("to grow")));
    assert!(starts(&effects).iter().all(|a| a.world_size == 4));
    assert_eq!(job.restarts.len(), 1, "only the node loss was a failure");
}

#[test]
fn a_restart_avoids_a_node_whose_agent_is_gone() {
    let mut cluster = cluster(&[("node-0", 2), ("node-1", 2), ("node-2", 2)]);
    cluster.submit(train_job("t", 2, 2, 3), 1);
    let id = JobId("t".into());
    let before: BTreeSet<NodeId> = cluster.jobs[&id]
        .ranks
        .iter()
        .map(|r| r.node.clone())
        .collect();
    assert!(before.contains(&NodeId("node-1".into())));
    // node-1's agent died: its stream closed, its lease still runs.
    cluster.detached.insert(NodeId("node-1".into()));
    cluster.rank_report(&id, 0, 0, exited(1), 2);
    let after: BTreeSet<NodeId> = cluster.jobs[&id]
        .ranks
        .iter()
        .map(|r| r.node.clone())
        .collect();
    assert!(!after.contains(&NodeId("node-1".into())), "{after:?}");
    assert_eq!(cluster.jobs[&id].state, JobState::Running);
}
