//! The data service as processes: batches streamed over gRPC; a replica
//! killed with SIGKILL mid-stream (the client moves to another replica,
//! and later back to the restarted one) leaves the delivered sequence
//! unchanged; two ranks of one job share a replica's global batches; and a
//! spec naming a missing shard is refused with its URL.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flamingo_data::batch::Cursor;
use flamingo_data::client::{BatchStream, StreamConfig};
use flamingo_data::convert::{ImageFormat, RankBatch};
use flamingo_data::DataError;
use flamingo_proto::v1 as pb;

struct Replica {
    child: Child,
    port: u16,
}

/// The replicas' certificate, the CA's, and (set once in this process's
/// `FLAMINGO_TLS_*`) a submitter's client certificate, as a user streaming
/// from the service would have.
fn service_tls() -> &'static flamingo_security::TlsFiles {
    static TLS: std::sync::OnceLock<(tempfile::TempDir, flamingo_security::TlsFiles)> =
        std::sync::OnceLock::new();
    let (_, files) = TLS.get_or_init(|| {
        use flamingo_security::{Identity, Pki, Role};
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::init(&dir.path().join("pki")).expect("a CA");
        let day = Duration::from_secs(86_400);
        let hosts = ["127.0.0.1".to_string()];
        let service = pki
            .issue(&Identity::service("data-service"), day, &hosts)
            .expect("issued");
        let user = pki
            .issue(&Identity::user("tester", Role::Submitter), day, &[])
            .expect("issued");
        let client = flamingo_security::TlsFiles::new(&pki.ca_cert(), &user.cert, &user.key);
        for (name, path) in client.env() {
            std::env::set_var(name, path);
        }
        let files = flamingo_security::TlsFiles::new(&pki.ca_cert(), &service.cert, &service.key);
        (dir, files)
    });
    files
}

impl Replica {
    fn start(port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_flamingo-data-service"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--threads",
                "2",
                "--read-ahead",
                "2",
                "--allow-prefix",
                &std::env::temp_dir().display().to_string(),
            ])
            .args(service_tls().args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("data service starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "data service did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        // SIGKILL, as a node loss would.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    flamingo_common::net::free_local_port().expect("a free port")
}

fn config(
    endpoints: Vec<String>,
    spec: &str,
    rank: u32,
    world: u32,
    per_rank: u32,
) -> StreamConfig {
    let image_format = if spec.contains("image_size = 128") {
        ImageFormat::Float32
    } else {
        ImageFormat::Uint8
    };
    StreamConfig {
        endpoints,
        spec_toml: spec.to_string(),
        seed: 77,
        rank,
        world_size: world,
        batch_size: per_rank,
        image_format,
        cursor: Cursor::default(),
        end_epoch: 2,
        buffer_depth: 1,
        reconnect_for: Duration::from_secs(30),
    }
}

async fn collect(stream: &mut BatchStream, limit: usize) -> Vec<RankBatch> {
    let mut out = Vec::new();
    while out.len() < limit {
        match stream.next().await {
            Some(batch) => out.push(batch.expect("a batch")),
            None => break,
        }
    }
    out
}

fn keys(batches: &[RankBatch]) -> Vec<(Cursor, Vec<String>)> {
    batches
        .iter()
        .map(|batch| (batch.start, batch.keys.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replica_changes_nothing_the_rank_sees() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Batches of ~1.2 MB (float32 128² images), so that the stream cannot
    // sit whole in the HTTP/2 buffers when a replica dies.
    let spec = flamingo_data::synthetic::write_laion_fixture(dir.path(), 5, 12, 9)
        .await
        .expect("fixture written");
    let spec = spec.replace("image_size = 16", "image_size = 128");
    let spec = flamingo_data::spec::DataSpec::from_toml(&spec, None)
        .expect("spec")
        .to_toml();
    let mut first = Replica::start(free_port());
    let mut second = Replica::start(free_port());

    let mut reference = BatchStream::start(config(vec![second.endpoint()], &spec, 0, 1, 6));
    let expected = collect(&mut reference, usize::MAX).await;
    assert!(expected.len() >= 15, "{} batches", expected.len());
    assert_eq!(expected.last().map(|b| b.next.epoch), Some(2));
    let first_port = first.port;

    let mut stream = BatchStream::start(config(
        vec![first.endpoint(), second.endpoint()],
        &spec,
        0,
        1,
        6,
    ));
    let mut got = collect(&mut stream, 4).await;
    first.kill();
    got.extend(collect(&mut stream, 5).await);
    // Back to the first replica, restarted, when the second dies.
    let _restarted = Replica::start(first_port);
    second.kill();
    got.extend(collect(&mut stream, usize::MAX).await);
    assert_eq!(stream.reconnects(), 2, "both kills broke the stream");
    assert_eq!(keys(&got), keys(&expected));
    assert_eq!(got, expected, "identical batches, tensors included");
}

#[tokio::test(flavor = "multi_thread")]
async fn ranks_of_a_job_split_the_global_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = flamingo_data::synthetic::write_laion_fixture(dir.path(), 3, 10, 0)
        .await
        .expect("fixture written");
    let spec = flamingo_data::spec::DataSpec::from_toml(&spec, None)
        .expect("spec")
        .to_toml();
    let replica = Replica::start(free_port());
    let single = collect(
        &mut BatchStream::start(config(vec![replica.endpoint()], &spec, 0, 1, 4)),
        usize::MAX,
    )
    .await;
    let mut rank0 = BatchStream::start(config(vec![replica.endpoint()], &spec, 0, 2, 2));
    let mut rank1 = BatchStream::start(config(vec![replica.endpoint()], &spec, 1, 2, 2));
    let (zero, one) = tokio::join!(
        collect(&mut rank0, usize::MAX),
        collect(&mut rank1, usize::MAX)
    );
    assert_eq!(zero.len(), single.len());
    for ((whole, a), b) in single.iter().zip(&zero).zip(&one) {
        let mut joined = a.keys.clone();
        joined.extend(b.keys.clone());
        assert_eq!(joined, whole.keys);
        assert_eq!(a.next, whole.next);
        assert_eq!(a.image_shape[0] + b.image_shape[0], whole.image_shape[0]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_shard_is_refused_by_url() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = flamingo_data::synthetic::write_laion_fixture(dir.path(), 2, 4, 0)
        .await
        .expect("fixture written");
    let spec = spec.replace("{00000..00001}", "{00000..00002}");
    let spec = flamingo_data::spec::DataSpec::from_toml(&spec, None)
        .expect("spec")
        .to_toml();
    let replica = Replica::start(free_port());
    let tls = flamingo_security::client_tls_from_env()
        .expect("credentials")
        .expect("set by service_tls");
    let channel = flamingo_security::endpoint(
        &replica.endpoint(),
        Some(&tls),
        flamingo_security::DATA_SERVICE_NAME,
    )
    .expect("endpoint")
    .connect()
    .await
    .expect("connects");
    let mut client = pb::data_service_client::DataServiceClient::new(channel);
    let status = client
        .validate_spec(pb::ValidateSpecRequest {
            spec_toml: spec.clone(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        status.message().contains("laion-00002.tar"),
        "{}",
        status.message()
    );
    let mut stream = BatchStream::start(config(vec![replica.endpoint()], &spec, 0, 1, 2));
    match stream.next().await {
        Some(Err(DataError::Refused { message })) => {
            assert!(message.contains("laion-00002.tar"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
