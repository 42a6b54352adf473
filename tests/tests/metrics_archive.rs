//! A job's curves outlive the coordinator's disk: with `--metrics-store
//! s3://…` (a real S3-compatible server, moto, started by the test) the
//! coordinator copies its metrics folder to the bucket; SIGKILLed, its
//! metrics folder deleted and started again, it restores the job's points
//! and events from the bucket.

use std::time::Duration;

use flamingo_common::testing::S3Server;
use flamingo_proto::v1 as pb;
use flamingo_tests::{flamingoctl, ClusterSandbox, SandboxOptions};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curves_come_back_from_object_storage_after_the_disk_is_lost() {
    let s3 = S3Server::start("curves");
    // SAFETY: this test binary has one test and no other thread yet; the
    // coordinator processes inherit these.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("FLAMINGO_S3_ENDPOINT", &s3.endpoint);
    }
    let mut sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 0,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    sandbox.set_coordinator_args(&[
        "--metrics-store=s3://curves/flamingo/metrics",
        "--metrics-sync-seconds=1",
    ]);
    sandbox.kill_coordinator();
    sandbox.start_coordinator().unwrap();
    let coordinator = sandbox.coordinator_endpoint();
    let dir = sandbox.path().to_path_buf();

    // A job no node can take (there are none): it waits, and its reports
    // are sent here by hand, as two ranks would.
    let job = flamingoctl(
        &dir,
        &[
            "--coordinator",
            &coordinator,
            "launch",
            "--nodes",
            "1",
            "--slots-per-node",
            "1",
            "--job",
            "collective-check",
        ],
    )
    .trim()
    .to_string();
    let node = flamingo_security::Identity::node("node-x");
    let mut nodes =
        pb::node_service_client::NodeServiceClient::new(sandbox.channel_as(&node).await.unwrap());
    for rank in 0..2u32 {
        let samples = (1..=50u64)
            .map(|step| pb::MetricSample {
                step,
                unix_ms: 1_700_000_000_000 + step as i64,
                values: [(
                    "loss_laion".to_string(),
                    10.0 / step as f64 + f64::from(rank),
                )]
                .into_iter()
                .collect(),
            })
            .collect();
        nodes
            .report_metrics_batch(pb::MetricsBatch {
                node_id: "node-x".into(),
                job_id: job.clone(),
                rank,
                attempt: 0,
                samples,
                dropped: 0,
                notes: vec![pb::RankNote {
                    step: 7,
                    unix_ms: 1_700_000_000_007,
                    kind: "samples_skipped".into(),
                    message: "1 sample(s) skipped: shard-0 key-3: corrupt jpeg".into(),
                }],
                rank_token: sandbox.rank_token(&job, 0),
                skip_examples: Vec::new(),
            })
            .await
            .unwrap();
    }
    let before = flamingoctl(
        &dir,
        &["--coordinator", &coordinator, "metrics", &job, "--json"],
    );
    let before_points: Vec<Value> = serde_json::from_str(&before).unwrap();
    assert_eq!(before_points.len(), 100);
    let events_url = format!("{}api/jobs/{job}/events", sandbox.dashboard());
    let events_before = ureq::get(&events_url)
        .set(
            "Authorization",
            &format!("Bearer {}", flamingo_tests::dashboard_token()),
        )
        .call()
        .unwrap()
        .into_string()
        .unwrap();

    // Two syncs later the bucket holds everything; then the disk is lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sandbox.kill_coordinator();
    let metrics_dir = sandbox.path().join("metrics");
    assert!(metrics_dir.join(format!("{job}.jsonl")).exists());
    std::fs::remove_dir_all(&metrics_dir).unwrap();
    sandbox.start_coordinator().unwrap();

    let after = flamingoctl(
        &dir,
        &["--coordinator", &coordinator, "metrics", &job, "--json"],
    );
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&after).unwrap(),
        before_points
    );
    let events_after = ureq::get(&events_url)
        .set(
            "Authorization",
            &format!("Bearer {}", flamingo_tests::dashboard_token()),
        )
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(events_after, events_before);
    assert!(events_after.contains("corrupt jpeg"), "{events_after}");
    assert!(metrics_dir.join(format!("{job}.jsonl")).exists());
}
