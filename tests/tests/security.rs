//! The cluster as an attacker on the same network sees it: real etcd,
//! coordinator, agents and data service with the defaults users get
//! (mutual TLS, certificates from the cluster CA, roles). Every case here
//! succeeded against flamingo before authentication existed.

use std::time::{Duration, SystemTime};

use flamingo_common::{JobKind, JobSpec, JobState};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::job_service_client::JobServiceClient;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use flamingo_security::{Identity, Role};
use flamingo_tests::{credentials, ClusterSandbox, SandboxOptions};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

fn command(script: &str) -> pb::LaunchRequest {
    let spec = JobSpec {
        name: String::new(),
        nodes: 1,
        slots_per_node: 1,
        min_nodes: 0,
        kind: JobKind::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        },
        env: [("SECRET_TOKEN".to_string(), "hunter2".to_string())].into(),
        policy: Default::default(),
        submitter: String::new(),
    };
    pb::LaunchRequest {
        spec: Some(pb::JobSpec::from(&spec)),
    }
}

fn collective_check() -> pb::LaunchRequest {
    let spec = JobSpec {
        name: String::new(),
        nodes: 1,
        slots_per_node: 1,
        min_nodes: 0,
        kind: JobKind::CollectiveCheck {
            min_bytes: 1024,
            max_bytes: 1024,
            backend: None,
        },
        env: Default::default(),
        policy: Default::default(),
        submitter: String::new(),
    };
    pb::LaunchRequest {
        spec: Some(pb::JobSpec::from(&spec)),
    }
}

async fn jobs_as(sandbox: &ClusterSandbox, identity: &Identity) -> JobServiceClient<Channel> {
    JobServiceClient::new(sandbox.channel_as(identity).await.expect("channel"))
}

/// A client that trusts the cluster CA but shows no certificate.
async fn anonymous_tls(url: &str, domain: &str) -> Result<Channel, tonic::transport::Error> {
    let ca = std::fs::read(credentials().pki.ca_cert()).expect("CA");
    Endpoint::from_shared(url.replace("http://", "https://"))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(domain),
        )
        .expect("tls")
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
}

/// The launch fails on `channel` (at connect or at the call).
async fn launch_fails(
    channel: Result<Channel, tonic::transport::Error>,
    request: pb::LaunchRequest,
) -> tonic::Code {
    match channel {
        Err(_) => tonic::Code::Unavailable,
        Ok(channel) => JobServiceClient::new(channel)
            .launch(request)
            .await
            .expect_err("launch refused")
            .code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_credentials_and_the_wrong_roles_are_refused() {
    let sandbox = ClusterSandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox");
    let marker = sandbox.path().join("pwned");
    let touch = format!("touch {}", marker.display());
    let url = sandbox.coordinator_endpoint();

    // Plain text, and TLS without a client certificate: no way in.
    // The handshake fails: a plain HTTP/2 client sees the TLS server hang
    // up, and under TLS 1.3 a client without a certificate learns of the
    // refusal from an alert on its first read. tonic reports whichever
    // broke first (Unavailable, Unknown, Cancelled or Internal); no
    // request reaches the coordinator.
    let transport = |code: tonic::Code| {
        matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::Unauthenticated
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Internal
        )
    };
    let plain = Endpoint::from_shared(url.clone())
        .expect("url")
        .connect()
        .await;
    let code = launch_fails(plain, command(&touch)).await;
    assert!(transport(code), "{code:?}");
    let anonymous = anonymous_tls(&url, flamingo_security::COORDINATOR_NAME).await;
    let code = launch_fails(anonymous, command(&touch)).await;
    assert!(transport(code), "{code:?}");

    // A viewer reads but launches nothing; a submitter launches train-type
    // jobs but no command, and cannot stop an admin's job.
    let mut viewer = jobs_as(&sandbox, &Identity::user("vera", Role::Viewer)).await;
    assert!(viewer
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .is_ok());
    let status = viewer
        .launch(collective_check())
        .await
        .expect_err("viewer launch");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let mut submitter = jobs_as(&sandbox, &Identity::user("sam", Role::Submitter)).await;
    let status = submitter
        .launch(command(&touch))
        .await
        .expect_err("submitter command");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("admins only"),
        "{}",
        status.message()
    );

    // An admin's long job: the submitter may not stop it, and sees its
    // environment's values hidden; the admin sees them.
    let mut admin = jobs_as(&sandbox, &Identity::user("ada", Role::Admin)).await;
    let job = admin
        .launch(command("sleep 600"))
        .await
        .expect("admin launch")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.spec.as_ref().expect("spec").submitter, "ada");
    let status = submitter
        .stop_job(pb::StopJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect_err("stop refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let seen = submitter
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("readable")
        .into_inner();
    assert_eq!(
        seen.job.expect("job").spec.expect("spec").env["SECRET_TOKEN"],
        "(hidden)"
    );
    let seen = admin
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("readable")
        .into_inner();
    assert_eq!(
        seen.job.expect("job").spec.expect("spec").env["SECRET_TOKEN"],
        "hunter2"
    );

    // A node's certificate is not a user's.
    let mut agent = jobs_as(&sandbox, &Identity::node("node-0")).await;
    let status = agent
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("agent on JobService");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // The dashboard: its API without the token is 401, with it 200; a
    // foreign Host (DNS rebinding) is refused even with the token.
    let api = format!("{}api/jobs", sandbox.dashboard());
    match ureq::get(&api).call() {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 401),
        other => panic!("the API answered without a token: {other:?}"),
    }
    let bearer = format!("Bearer {}", flamingo_tests::dashboard_token());
    let page = ureq::get(&api)
        .set("Authorization", &bearer)
        .call()
        .expect("with the token");
    assert_eq!(page.status(), 200);
    assert!(page
        .header("Content-Security-Policy")
        .is_some_and(|csp| csp.contains("default-src 'none'")));
    match ureq::get(&api)
        .set("Authorization", &bearer)
        .set("Host", "attacker.example:7080")
        .call()
    {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 421),
        other => panic!("a foreign Host was served: {other:?}"),
    }

    // Nothing ran the command.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!marker.exists(), "a refused launch ran its command");
    admin
        .stop_job(pb::StopJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("the admin stops it");

    // The audit log has it all, refusals included, and only admins read it.
    let records = admin
        .list_audit(pb::ListAuditRequest { limit: 100 })
        .await
        .expect("the admin reads the audit log")
        .into_inner()
        .records;
    let has = |who: &str, action: &str, target: &str, outcome: &str| {
        records.iter().any(|record| {
            record.who == who
                && record.action == action
                && record.target == target
                && record.outcome.starts_with(outcome)
        })
    };
    assert!(has("ada", "launch", &job.id, "ok"), "{records:#?}");
    assert!(has("sam", "stop", &job.id, "refused"), "{records:#?}");
    assert!(has("ada", "stop", &job.id, "ok"), "{records:#?}");
    assert!(
        records
            .iter()
            .any(|r| r.who == "vera" && r.action == "launch" && r.outcome.starts_with("refused")),
        "{records:#?}"
    );
    let status = viewer
        .list_audit(pb::ListAuditRequest { limit: 10 })
        .await
        .expect_err("viewer");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_speaks_only_for_its_node() {
    let sandbox = ClusterSandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox");
    let mut admin = jobs_as(&sandbox, &Identity::user("ada", Role::Admin)).await;
    let mut spec = command("sleep 600");
    if let Some(spec) = spec.spec.as_mut() {
        spec.nodes = 2;
    }
    let job = admin
        .launch(spec)
        .await
        .expect("launch")
        .into_inner()
        .job
        .expect("job");
    let running = sandbox
        .wait_job(&job.id, Duration::from_secs(30), |job| {
            job.state == JobState::Running
                && job
                    .ranks
                    .iter()
                    .all(|rank| rank.state == flamingo_common::RankState::Running)
        })
        .await
        .expect("every rank running");

    // node-1's certificate registers as node-0, deregisters it, reports its
    // ranks: all refused, and the job runs on untouched.
    let mut impostor = NodeServiceClient::new(
        sandbox
            .channel_as(&Identity::node("node-1"))
            .await
            .expect("channel"),
    );
    let status = impostor
        .register(pb::RegisterRequest {
            protocol_version: flamingo_proto::PROTOCOL_VERSION,
            node_id: "node-0".into(),
            address: "10.66.66.66".into(),
            slots: 64,
            gpu: false,
            rendezvous_port_first: 29500,
            rendezvous_port_count: 10,
            agent_endpoint: "http://10.66.66.66:1".into(),
        })
        .await
        .expect_err("register as another node");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = impostor
        .deregister(pb::DeregisterRequest {
            node_id: "node-0".into(),
        })
        .await
        .expect_err("deregister another node");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = impostor
        .report_rank(pb::RankReport {
            node_id: "node-0".into(),
            job_id: job.id.clone(),
            rank: 0,
            attempt: 0,
            event: Some(pb::rank_report::Event::Exited(pb::RankExited {
                exit_code: 1,
                signal: 0,
                result_json: String::new(),
            })),
        })
        .await
        .expect_err("report another node's rank");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Relayed metrics: only a node's own certificate may send its node's
    // batches, and each batch needs its rank's credential.
    let batch = |node: &str, token: String| pb::MetricsBatch {
        node_id: node.into(),
        job_id: job.id.clone(),
        rank: 0,
        attempt: 0,
        rank_token: token,
        samples: vec![pb::MetricSample {
            step: 1,
            unix_ms: 1,
            values: [("loss".to_string(), 1.0)].into(),
        }],
        ..Default::default()
    };
    let status = impostor
        .report_node_metrics(pb::NodeMetrics {
            node_id: "node-0".into(),
            batches: vec![batch("node-0", sandbox.rank_token(&job.id, 0))],
        })
        .await
        .expect_err("relay another node's metrics");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let refused = impostor
        .report_node_metrics(pb::NodeMetrics {
            node_id: "node-1".into(),
            batches: vec![
                batch("node-1", "v1:forged:0:0:00".into()),
                batch("node-0", sandbox.rank_token(&job.id, 0)),
                batch("node-1", sandbox.rank_token(&job.id, 7)),
            ],
        })
        .await
        .expect("answered")
        .into_inner()
        .refused;
    assert_eq!(
        refused, 3,
        "a forged credential, another node's batch, a stale attempt"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = sandbox
        .session()
        .await
        .expect("session")
        .job(&job.id)
        .await
        .expect("job");
    assert_eq!(now.state, JobState::Running);
    assert_eq!(now.attempt, running.attempt);
    assert_eq!(now.ranks, running.ranks);
    let nodes = sandbox
        .session()
        .await
        .expect("session")
        .nodes()
        .await
        .expect("nodes");
    assert!(
        nodes.iter().all(|node| node.address != "10.66.66.66"),
        "{nodes:?}"
    );

    // The agent's log service: a job id that climbs out is refused, and
    // only the coordinator (or an admin) may read at all.
    let endpoint = nodes
        .iter()
        .find(|node| node.node_id == "node-0")
        .expect("node-0")
        .agent_endpoint
        .clone();
    let read = |channel: Channel, job_id: &str| {
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let request = pb::ReadLogRequest {
            job_id: job_id.into(),
            rank: 0,
            follow: false,
        };
        async move { client.read_log(request).await.map(|_| ()) }
    };
    let as_admin = flamingo_security::endpoint(
        &endpoint,
        credentials().admin.client().expect("admin").as_ref(),
        flamingo_security::AGENT_NAME,
    )
    .expect("endpoint")
    .connect()
    .await
    .expect("agent reachable");
    let status = read(as_admin.clone(), "../../x")
        .await
        .expect_err("climbing job id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        read(as_admin, &job.id).await.is_ok(),
        "an admin reads the log"
    );
    let node_cert = credentials()
        .node("node-1")
        .expect("cert")
        .client()
        .expect("tls");
    let as_node =
        flamingo_security::endpoint(&endpoint, node_cert.as_ref(), flamingo_security::AGENT_NAME)
            .expect("endpoint")
            .connect()
            .await
            .expect("agent reachable");
    let status = read(as_node.clone(), &job.id)
        .await
        .expect_err("another node reads logs");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = pb::agent_service_client::AgentServiceClient::new(as_node)
        .report_metrics_batch(batch("node-1", sandbox.rank_token(&job.id, 0)))
        .await
        .expect_err("another node's rank hands node-0's agent metrics");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = admin
        .job_logs(pb::JobLogsRequest {
            job_id: "../../x".into(),
            rank: 0,
            follow: false,
        })
        .await
        .expect_err("no such job");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    admin
        .stop_job(pb::StopJobRequest { job_id: job.id })
        .await
        .expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_certificates_and_bare_etcd_clients_are_refused() {
    let sandbox = ClusterSandbox::start(SandboxOptions {
        nodes: 1,
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let pki = &credentials().pki;
    let url = sandbox.coordinator_endpoint();
    let connect = |issued: &flamingo_security::Issued| {
        let tls = flamingo_security::TlsFiles::new(&pki.ca_cert(), &issued.cert, &issued.key)
            .client()
            .expect("tls")
            .expect("files");
        let url = url.clone();
        async move {
            let channel =
                flamingo_security::endpoint(&url, Some(&tls), flamingo_security::COORDINATOR_NAME)
                    .expect("endpoint")
                    .connect_timeout(Duration::from_secs(3))
                    .connect()
                    .await?;
            JobServiceClient::new(channel)
                .list_jobs(pb::ListJobsRequest::default())
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    };
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = pki
        .issue_window(
            &Identity::user("old", Role::Admin),
            now - 2 * day,
            now - day,
            &[],
        )
        .expect("issued");
    assert!(
        connect(&expired).await.is_err(),
        "an expired certificate is refused"
    );

    let revoked = pki
        .issue(&Identity::user("mallory", Role::Admin), day, &[])
        .expect("issued");
    connect(&revoked).await.expect("valid until revoked");
    pki.revoke("mallory").expect("revoked");
    let refused =
        flamingo_tests::wait_for("the revocation to apply", Duration::from_secs(10), || {
            let outcome = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(connect(&revoked))
            });
            outcome.err()
        });
    assert!(refused.to_string().contains("revoked"), "{refused:#}");

    // Rotation: node-0's certificate is revoked, the agent restarts with a
    // newly issued one and registers again; the old one stays refused.
    let node_files = credentials().node("node-0").expect("cert");
    let kept = sandbox.path().join("old-node-0");
    std::fs::create_dir_all(&kept).expect("folder");
    let (old_cert, old_key) = (kept.join("cert.pem"), kept.join("key.pem"));
    std::fs::copy(node_files.cert.as_ref().expect("path"), &old_cert).expect("copy");
    std::fs::copy(node_files.key.as_ref().expect("path"), &old_key).expect("copy");
    let old = flamingo_security::read_certificate(&old_cert).expect("readable");
    let endpoint_of = |nodes: Vec<pb::Node>| {
        nodes
            .into_iter()
            .find(|node| node.node_id == "node-0")
            .map(|node| node.agent_endpoint)
    };
    let before = endpoint_of(
        sandbox
            .session()
            .await
            .expect("session")
            .nodes()
            .await
            .expect("nodes"),
    );
    let mut sandbox = sandbox;
    sandbox.kill_agent("node-0");
    pki.revoke(&old.serial).expect("revoked");
    // The coordinator re-reads the list every 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sandbox.add_agent("node-0", &[]).expect("agent restarts");
    let new = flamingo_security::read_certificate(
        credentials()
            .node("node-0")
            .expect("cert")
            .cert
            .as_ref()
            .expect("path"),
    )
    .expect("readable");
    assert_ne!(new.serial, old.serial);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = endpoint_of(
            sandbox
                .session()
                .await
                .expect("session")
                .nodes()
                .await
                .expect("nodes"),
        );
        if now.is_some() && now != before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-0 did not register again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_tls = flamingo_security::TlsFiles::new(&pki.ca_cert(), &old_cert, &old_key)
        .client()
        .expect("tls")
        .expect("files");
    let channel =
        flamingo_security::endpoint(&url, Some(&old_tls), flamingo_security::COORDINATOR_NAME)
            .expect("endpoint")
            .connect()
            .await
            .expect("TLS accepts the still-valid certificate");
    let status = NodeServiceClient::new(channel)
        .deregister(pb::DeregisterRequest {
            node_id: "node-0".into(),
        })
        .await
        .expect_err("the revoked certificate is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // etcd: plain text and TLS without a client certificate get nothing.
    let etcd = sandbox.etcd_endpoint();
    let plain = etcd_client::Client::connect([etcd.replace("https://", "http://")], None).await;
    if let Ok(mut client) = plain {
        assert!(
            client.get("/flamingo", None).await.is_err(),
            "plain text read etcd"
        );
    }
    let ca = std::fs::read(pki.ca_cert()).expect("CA");
    let options = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .domain_name(flamingo_security::ETCD_NAME),
    );
    let bare = etcd_client::Client::connect([etcd], Some(options)).await;
    if let Ok(mut client) = bare {
        assert!(
            client.get("/flamingo", None).await.is_err(),
            "a client without a certificate read etcd"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_service_serves_only_its_prefixes() {
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
    let mut outside = spec.clone();
    outside.sources[0].shards = "file:///etc/laion-{00000..00001}.tar".into();
    let admin = credentials().admin.client().expect("tls");
    let channel = flamingo_security::endpoint(
        &endpoint,
        admin.as_ref(),
        flamingo_security::DATA_SERVICE_NAME,
    )
    .expect("endpoint")
    .connect()
    .await
    .expect("connects");
    let mut client = pb::data_service_client::DataServiceClient::new(channel);
    client
        .validate_spec(pb::ValidateSpecRequest {
            spec_toml: spec.to_toml(),
        })
        .await
        .expect("the sandbox's own data is served");
    let status = client
        .validate_spec(pb::ValidateSpecRequest {
            spec_toml: outside.to_toml(),
        })
        .await
        .expect_err("/etc refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("file:///etc/laion-"),
        "{}",
        status.message()
    );
    // A node's certificate without a rank credential streams nothing.
    let channel = sandbox
        .data_service_as_node(&endpoint, "node-0")
        .await
        .expect("connects");
    let status = pb::data_service_client::DataServiceClient::new(channel)
        .stream_batches(pb::StreamBatchesRequest {
            spec_toml: spec.to_toml(),
            world_size: 1,
            batch_size: 1,
            ..Default::default()
        })
        .await
        .expect_err("no credential");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}
