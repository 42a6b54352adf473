//! Bad input from a client, against the real coordinator, etcd, agents and
//! data service (mutual TLS on, as users run them): every request that
//! would have cost unbounded work or memory, or touched what it should not,
//! is refused at once with the field and the limit named, and the service
//! goes on answering. Each case here passed admission before the limits.

use std::time::Duration;

use flamingo_common::{JobKind, JobSpec, JobState};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::job_service_client::JobServiceClient;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use flamingo_security::{Identity, Role};
use flamingo_tests::{credentials, ClusterSandbox, SandboxOptions};
use tonic::transport::Channel;

fn spec(nodes: u32, slots: u32, kind: JobKind) -> JobSpec {
    JobSpec {
        name: String::new(),
        nodes,
        slots_per_node: slots,
        min_nodes: 0,
        kind,
        env: Default::default(),
        policy: Default::default(),
        submitter: String::new(),
    }
}

fn command(nodes: u32, script: &str) -> JobSpec {
    spec(
        nodes,
        1,
        JobKind::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        },
    )
}

fn request(spec: &JobSpec) -> pb::LaunchRequest {
    pb::LaunchRequest {
        spec: Some(pb::JobSpec::from(spec)),
    }
}

/// A train job's settings whose paths exist in `dir` (the coordinator
/// checks them) with `shards` as its LAION pattern.
fn train(dir: &std::path::Path, nodes: u32, shards: &str) -> JobSpec {
    let model = dir.join("model.toml");
    std::fs::write(&model, "").expect("model spec");
    let run = serde_json::json!({
        "model": model,
        "runs_dir": dir.join("runs"),
        "run_name": "hardening",
        "laion_shards": shards,
        "batch_size_laion": 1,
        "train_num_samples_laion": 64,
    });
    spec(
        nodes,
        1,
        JobKind::Train {
            config_json: run.to_string(),
        },
    )
}

async fn refused(client: &mut JobServiceClient<Channel>, spec: &JobSpec) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(10), client.launch(request(spec)))
        .await
        .expect("answered at once, not after placement work")
        .expect_err("refused")
}

async fn job_count(client: &mut JobServiceClient<Channel>) -> usize {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.list_jobs(pb::ListJobsRequest::default()),
    )
    .await
    .expect("ListJobs answers")
    .expect("ListJobs")
    .into_inner()
    .jobs
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_requests_are_refused_and_nothing_blocks_the_queue() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 2,
        slots_per_node: 1,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let dir = sandbox.path().to_path_buf();
    std::fs::write(dir.join("shard-0.tar"), "").expect("shard");
    let admin = sandbox
        .channel_as(&Identity::user("ada", Role::Admin))
        .await
        .expect("channel");
    let mut jobs = JobServiceClient::new(admin);

    // nodes = u32::MAX, min_nodes = 1: refused with the limit named.
    let mut huge = train(&dir, u32::MAX, &format!("{}/shard-0.tar", dir.display()));
    huge.min_nodes = 1;
    let status = refused(&mut jobs, &huge).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("nodes: 4294967295 is more than"),
        "{status:?}"
    );
    let mut wide = command(1, "true");
    wide.slots_per_node = 100_000;
    let status = refused(&mut jobs, &wide).await;
    assert!(
        status
            .message()
            .contains("slots_per_node: 100000 is more than"),
        "{status:?}"
    );
    assert_eq!(job_count(&mut jobs).await, 0);

    // A brace pattern naming 10^11 shards: counted, not expanded.
    let status = refused(
        &mut jobs,
        &train(
            &dir,
            1,
            &format!("{}/shard-{{0..99999999999}}.tar", dir.display()),
        ),
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("train.laion_shards: '")
            && status
                .message()
                .contains("names 100000000000 shards, more than this coordinator's limit of 1000000 (--max-shards)"),
        "{status:?}"
    );

    // A 2 MiB spec: refused before it reaches memory or etcd.
    let mut big = command(1, "true");
    big.env.insert("PADDING".into(), "x".repeat(2 << 20));
    let status = refused(&mut jobs, &big).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("more than this coordinator's limit of 1048576 (--max-spec-bytes)"),
        "{status:?}"
    );
    assert_eq!(job_count(&mut jobs).await, 0, "nothing of it stays");

    // A job that cannot fit the two registered nodes waits, says why, and
    // blocks nothing behind it.
    let three = jobs
        .launch(request(&command(3, "true")))
        .await
        .expect("launched")
        .into_inner()
        .job
        .expect("job")
        .id;
    let small = jobs
        .launch(request(&command(1, "true")))
        .await
        .expect("launched")
        .into_inner()
        .job
        .expect("job")
        .id;
    sandbox
        .wait_state(&small, JobState::Succeeded, Duration::from_secs(60))
        .await
        .expect("the small job ran past the one that cannot fit");
    let waiting = sandbox
        .wait_job(&three, Duration::from_secs(10), |job| {
            !job.message.is_empty()
        })
        .await
        .expect("a reason");
    assert_eq!(waiting.state, JobState::Pending);
    assert!(
        waiting.message.contains(
            "cannot fit the registered cluster: needs 3 node(s) with 1 slot(s); 2 registered node(s)"
        ),
        "{}",
        waiting.message
    );
    let status = flamingo_tests::flamingoctl(
        &dir,
        &[
            "--coordinator",
            &sandbox.coordinator_endpoint(),
            "status",
            &three,
        ],
    );
    assert!(
        status.contains("cannot fit the registered cluster"),
        "{status}"
    );
    // A third node arrives: the large job starts.
    sandbox.add_agent("node-2", &[]).expect("third agent");
    sandbox
        .wait_state(&three, JobState::Succeeded, Duration::from_secs(60))
        .await
        .expect("the large job ran once the nodes were there");

    // Ranks' calls for jobs that are not there, or paths that are not
    // theirs.
    let node = sandbox
        .channel_as(&Identity::node("node-0"))
        .await
        .expect("channel");
    let mut nodes = NodeServiceClient::new(node);
    let status = nodes
        .report_metrics_batch(pb::MetricsBatch {
            node_id: "node-0".into(),
            job_id: "job-that-never-was".into(),
            rank: 0,
            attempt: 0,
            rank_token: sandbox.rank_token("job-that-never-was", 0),
            samples: vec![pb::MetricSample {
                step: 1,
                unix_ms: 1,
                values: [("loss".to_string(), 1.0)].into(),
            }],
            ..Default::default()
        })
        .await
        .expect_err("an unknown job's metrics are refused");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let stored: Vec<String> = std::fs::read_dir(dir.join("metrics"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        stored.iter().all(|name| !name.contains("never-was")),
        "{stored:?}"
    );

    // A train job that can never run here (four nodes), to commit for.
    let waiting = jobs
        .launch(request(&train(
            &dir,
            4,
            &format!("{}/shard-0.tar", dir.display()),
        )))
        .await
        .expect("launched")
        .into_inner()
        .job
        .expect("job")
        .id;
    let victim = dir.join("precious");
    std::fs::create_dir_all(&victim).expect("folder");
    let status = nodes
        .commit_checkpoint(pb::CommitCheckpointRequest {
            job_id: waiting.clone(),
            attempt: 0,
            step: 3,
            path: victim.display().to_string(),
            data_cursor_json: String::new(),
            rank_token: sandbox.rank_token(&waiting, 0),
        })
        .await
        .expect_err("a path outside the run folder is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("is not step 3's checkpoint folder of this run")
            && status
                .message()
                .contains("runs/hardening/checkpoints/step-00000003"),
        "{status:?}"
    );
    assert!(victim.exists());
    let mut session = sandbox.session().await.expect("session");
    assert!(session
        .job(&waiting)
        .await
        .expect("job")
        .checkpoints
        .is_empty());
    session.stop(&waiting).await.expect("stopped");
    assert!(
        job_count(&mut jobs).await >= 3,
        "the coordinator still answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_service_refuses_a_huge_batch_and_keeps_serving() {
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let endpoint = sandbox.start_data_service().expect("data service");
    let fixture = flamingo_data::synthetic::write_laion_fixture(sandbox.path(), 1, 4, 0)
        .await
        .expect("fixture");
    let spec = flamingo_data::spec::DataSpec::from_toml(&fixture, None).expect("spec");
    let channel = sandbox
        .data_service_as_node(&endpoint, "node-0")
        .await
        .expect("connects");
    let mut client = pb::data_service_client::DataServiceClient::new(channel);
    let ask = |batch_size: u32, world_size: u32| pb::StreamBatchesRequest {
        spec_toml: spec.to_toml(),
        world_size,
        batch_size,
        rank_token: sandbox.rank_token("job-data", 0),
        ..Default::default()
    };
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream_batches(ask(1_000_000, 1_000_000)),
    )
    .await
    .expect("answered at once")
    .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(
            "1000000 per rank × world_size 1000000 = 1000000000000 samples a global batch, more than this service's limit of 65536"
        ),
        "{status:?}"
    );
    // Still serving.
    let mut stream = client
        .stream_batches(ask(2, 1))
        .await
        .expect("a sane request streams")
        .into_inner();
    let batch = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("a batch in time")
        .expect("stream")
        .expect("a batch");
    assert!(!batch.keys.is_empty(), "{:?}", batch.keys);
}

/// 50,000 steps × 8 ranks of reports (400,000 points, ~40 MB as one
/// message — ten times tonic's 4 MiB limit) still come back through
/// `flamingoctl metrics`, a page at a time; then the job outlives its
/// retention in etcd and is still shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_long_job_come_back_in_pages() {
    const STEPS: u64 = 50_000;
    const RANKS: u32 = 8;
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        slots_per_node: 1,
        // Storing 400,000 points loads the two cores this runs on (and CI
        // runs the other tests of this file beside it); the node's lease
        // must not be what this test measures.
        lease_ttl_seconds: 60,
    })
    .await
    .expect("sandbox");
    // Nor the agent's reconnects: a stream that breaks under this load
    // must not lose the node within the default grace of 1.5 heartbeats.
    sandbox.coordinator_spec.heartbeat_interval_ms = 3000;
    sandbox.kill_coordinator();
    sandbox.start_coordinator().expect("coordinator restarts");
    sandbox.wait_for_nodes(1).await.expect("the node is back");
    let mut session = sandbox.session().await.expect("session");
    let job = session
        .launch(&command(1, "sleep 600"))
        .await
        .expect("launched");
    let id = job.id.as_str().to_string();
    sandbox
        .wait_state(&id, JobState::Running, Duration::from_secs(30))
        .await
        .expect("running");
    let node = sandbox
        .channel_as(&Identity::node("node-0"))
        .await
        .expect("channel");
    let mut nodes = NodeServiceClient::new(node);
    let token = sandbox.rank_token(&id, 0);
    for rank in 0..RANKS {
        for chunk in (0..STEPS).collect::<Vec<_>>().chunks(10_000) {
            nodes
                .report_metrics_batch(pb::MetricsBatch {
                    node_id: "node-0".into(),
                    job_id: id.clone(),
                    rank,
                    attempt: 0,
                    rank_token: token.clone(),
                    samples: chunk
                        .iter()
                        .map(|step| pb::MetricSample {
                            step: *step,
                            unix_ms: 1_700_000_000_000 + *step as i64,
                            values: [("loss".to_string(), 1.0 / (*step as f64 + 1.0))].into(),
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .expect("stored");
        }
    }
    let csv = flamingo_tests::flamingoctl(
        sandbox.path(),
        &[
            "--coordinator",
            &sandbox.coordinator_endpoint(),
            "metrics",
            "--csv",
            &id,
        ],
    );
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), (STEPS * u64::from(RANKS)) as usize);
    assert!(rows[0].starts_with("0,0,0,"), "{}", rows[0]);
    assert!(
        rows.last()
            .is_some_and(|row| row.starts_with(&format!("{},{},0,", STEPS - 1, RANKS - 1))),
        "{:?}",
        rows.last()
    );
    let stopped = session.stop(&id).await.expect("stopped");
    assert_eq!(
        stopped.state,
        JobState::Stopped,
        "the job ended before it was stopped: {}",
        stopped.message
    );
    drop(session);

    // Months of use: a record that does not decode does not stop a
    // coordinator from starting (it is moved aside), and finished jobs
    // leave etcd after their retention yet stay visible.
    let mut etcd = etcd_as_coordinator(&sandbox).await;
    etcd.put("/flamingo/jobs/job-garbage", "{not json", None)
        .await
        .expect("garbage written");
    sandbox.kill_coordinator();
    sandbox.set_coordinator_args(&["--job-retention-seconds=2", "--max-requests-per-second=50"]);
    sandbox.start_coordinator().expect("coordinator starts");
    let quarantined = etcd
        .get("/flamingo/quarantine/jobs/job-garbage", None)
        .await
        .expect("read");
    assert_eq!(quarantined.kvs().len(), 1, "the bad record is kept aside");
    let job_key = format!("/flamingo/jobs/{id}");
    flamingo_tests::wait_for(
        "the stopped job to leave etcd",
        Duration::from_secs(30),
        || {
            let gone = etcd_lacks(&mut etcd, &job_key);
            gone.then_some(())
        },
    );
    let events = etcd
        .get(
            format!("/flamingo/events/{id}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("read");
    assert!(events.kvs().is_empty(), "its events left too");
    let mut session = sandbox.session().await.expect("session");
    assert!(session.list().await.expect("list").is_empty());
    // Waiting on it answers at once (its stored events are gone with it).
    let waited = tokio::time::timeout(Duration::from_secs(20), session.wait(&id, false, false))
        .await
        .expect("wait does not hang on a retired job")
        .expect("wait");
    assert_eq!(waited.state, JobState::Stopped);
    let status = flamingo_tests::flamingoctl(
        sandbox.path(),
        &[
            "--coordinator",
            &sandbox.coordinator_endpoint(),
            "status",
            &id,
        ],
    );
    assert!(status.contains("stopped"), "{status}");
    assert_eq!(
        session.metrics(&id).await.expect("metrics").len(),
        (STEPS * u64::from(RANKS)) as usize
    );

    // A client past its request rate is refused at once with the limit
    // named; the other clients are still served.
    let mut flood = JobServiceClient::new(
        sandbox
            .channel_as(&Identity::user("flood", Role::Viewer))
            .await
            .expect("channel"),
    );
    let mut refusal = None;
    for _ in 0..1000 {
        if let Err(status) = flood.list_jobs(pb::ListJobsRequest::default()).await {
            refusal = Some(status);
            break;
        }
    }
    let status = refusal.expect("a client past 50 requests a second is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    for expected in [
        "user flood (viewer)",
        "50 requests per second",
        "--max-requests-per-second",
    ] {
        assert!(
            status.message().contains(expected),
            "{expected}: {status:?}"
        );
    }
    session.list().await.expect("another client is served");
}

/// An etcd client with the coordinator's certificate.
async fn etcd_as_coordinator(sandbox: &ClusterSandbox) -> etcd_client::Client {
    let files = &credentials().coordinator;
    let read = |path: &Option<std::path::PathBuf>| {
        std::fs::read(path.as_ref().expect("a path")).expect("PEM")
    };
    let options = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&files.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&files.cert),
                read(&files.key),
            ))
            .domain_name(flamingo_security::ETCD_NAME),
    );
    etcd_client::Client::connect([sandbox.etcd_endpoint()], Some(options))
        .await
        .expect("etcd")
}

/// Whether `key` is absent from etcd (a blocking look from a sync probe).
fn etcd_lacks(etcd: &mut etcd_client::Client, key: &str) -> bool {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        handle
            .block_on(etcd.get(key, None))
            .is_ok_and(|response| response.kvs().is_empty())
    })
}
