//! The data service as processes: batches streamed over gRPC; a replica
//! killed with SIGKILL mid-stream (the client moves to another replica,
//! and later back to the restarted one) leaves the delivered sequence
//! unchanged; two ranks of one job share a replica's global batches; K
//! replicas of a judged dataset split the preprocessing and serve the same
//! batches as one (also when one of them is killed, and with a replica per
//! node serving that node's ranks); and a spec naming a
//! missing shard is refused with its URL.

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
        Self::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[String]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_flamingo-data-service"))
            .args(extra)
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
        split: true,
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
    // Two replicas split each batch: the rank streams share 0 from the
    // first and share 1 from the second. The first kill breaks share 0's
    // stream (it moves to the second); the second kill breaks both.
    assert_eq!(stream.reconnects(), 3, "every kill broke the streams on it");
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

/// A replica with `/metrics` on its own port.
struct Measured {
    replica: Replica,
    metrics: u16,
}

impl Measured {
    fn start() -> Self {
        let metrics = free_port();
        let replica = Replica::start_with(
            free_port(),
            &["--metrics-listen".into(), format!("127.0.0.1:{metrics}")],
        );
        Self { replica, metrics }
    }

    /// A counter from the replica's Prometheus `/metrics`.
    fn counter(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let mut connection =
            std::net::TcpStream::connect(("127.0.0.1", self.metrics)).expect("metrics answer");
        connection
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: replica\r\nConnection: close\r\n\r\n")
            .expect("asked");
        let mut text = String::new();
        connection.read_to_string(&mut text).expect("read");
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
            .trim()
            .parse()
            .expect("a count")
    }
}

/// Judges every shard of `spec` and stores the verdicts, as `flamingoctl
/// data index --accept` does.
async fn judge(spec_toml: &str) {
    let spec = flamingo_data::spec::DataSpec::from_toml(spec_toml, None).expect("spec");
    let dataset = flamingo_data::reader::Dataset::open(&spec, &Default::default())
        .await
        .expect("dataset");
    let judged = flamingo_data::accept::judge_dataset(&spec, &dataset, 2, true, |_, _| {})
        .await
        .expect("judged");
    assert_eq!(judged.judged_shards, dataset.shards.len());
}

const WORLD: u32 = 4;

/// Every rank's batches from `endpoints`, which split every batch; `kill`
/// SIGKILLs a replica once rank 0 has `after` batches.
async fn run_job(
    endpoints: Vec<String>,
    spec: &str,
    kill: Option<(&mut Measured, usize)>,
) -> Vec<Vec<RankBatch>> {
    let configs = (0..WORLD)
        .map(|rank| config(endpoints.clone(), spec, rank, WORLD, 2))
        .collect();
    run_streams(configs, kill).await
}

/// Every rank's batches, rank r streaming as `configs[r]` says.
async fn run_streams(
    configs: Vec<StreamConfig>,
    mut kill: Option<(&mut Measured, usize)>,
) -> Vec<Vec<RankBatch>> {
    let mut streams: Vec<BatchStream> = configs.into_iter().map(BatchStream::start).collect();
    let mut out: Vec<Vec<RankBatch>> = vec![Vec::new(); WORLD as usize];
    // In lockstep, as a training job reads.
    loop {
        let mut ended = 0;
        for (rank, stream) in streams.iter_mut().enumerate() {
            match tokio::time::timeout(Duration::from_secs(60), stream.next())
                .await
                .expect("a batch within a minute")
            {
                Some(batch) => out[rank].push(batch.expect("a batch")),
                None => ended += 1,
            }
        }
        if ended == streams.len() {
            return out;
        }
        assert_eq!(ended, 0, "ranks ended together");
        if let Some((replica, after)) = kill.as_mut() {
            if out[0].len() == *after {
                replica.replica.kill();
                kill = None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_split_the_work_and_serve_identical_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = flamingo_data::synthetic::write_mmc4_fixture(dir.path(), 6, 30, 9)
        .await
        .expect("fixture written");
    let spec = flamingo_data::spec::DataSpec::from_toml(&spec, None)
        .expect("spec")
        .to_toml();
    judge(&spec).await;

    let mut reference: Option<(Vec<Vec<RankBatch>>, u64)> = None;
    for replicas in 1..=3usize {
        let measured: Vec<Measured> = (0..replicas).map(|_| Measured::start()).collect();
        let endpoints = measured.iter().map(|m| m.replica.endpoint()).collect();
        let batches = run_job(endpoints, &spec, None).await;
        let images: Vec<u64> = measured
            .iter()
            .map(|m| m.counter("flamingo_data_images_decoded_total"))
            .collect();
        let total: u64 = images.iter().sum();
        eprintln!("{replicas} replica(s): images decoded {images:?} (total {total})");
        let (expected, single) = reference.get_or_insert_with(|| (batches.clone(), total));
        assert!(expected[0].len() >= 8, "{} batches", expected[0].len());
        assert!(
            expected
                .iter()
                .flatten()
                .any(|batch| !batch.skipped.is_empty()),
            "the job skips samples"
        );
        assert_eq!(&batches, expected, "{replicas} replicas: identical batches");
        let single = *single as f64;
        assert!(
            (total as f64 - single).abs() <= 0.05 * single,
            "{replicas} replicas decode {total} images in all, one decodes {single}"
        );
        for (replica, count) in images.iter().enumerate() {
            assert!(
                *count as f64 <= (1.0 / replicas as f64 + 0.10) * single,
                "replica {replica} of {replicas} decoded {count} of {single}"
            );
        }
    }

    let (expected, single) = reference.expect("measured");

    // A replica per node: two "nodes" of two ranks, each rank streaming
    // its whole slice from its node's replica (the other standing in).
    // Same batches; each node's replica prepared only its ranks' half.
    let measured: Vec<Measured> = (0..2).map(|_| Measured::start()).collect();
    let endpoints: Vec<String> = measured.iter().map(|m| m.replica.endpoint()).collect();
    let configs = (0..WORLD)
        .map(|rank| {
            let node = (rank / 2) as usize;
            let mut config = config(
                vec![endpoints[node].clone(), endpoints[1 - node].clone()],
                &spec,
                rank,
                WORLD,
                2,
            );
            config.split = false;
            config
        })
        .collect();
    let batches = run_streams(configs, None).await;
    assert_eq!(batches, expected, "a replica per node: identical batches");
    let images: Vec<u64> = measured
        .iter()
        .map(|m| m.counter("flamingo_data_images_decoded_total"))
        .collect();
    eprintln!("a replica per node: images decoded {images:?} of {single}");
    for (node, count) in images.iter().enumerate() {
        assert!(
            *count as f64 <= 0.6 * single as f64,
            "node {node}'s replica decoded {count} of {single}"
        );
    }
    drop(measured);

    // SIGKILL one of two replicas mid-epoch: its share moves to the other,
    // and every rank still receives exactly the batches of one replica.
    let mut measured: Vec<Measured> = (0..2).map(|_| Measured::start()).collect();
    let endpoints = measured.iter().map(|m| m.replica.endpoint()).collect();
    let batches = run_job(endpoints, &spec, Some((&mut measured[1], 3))).await;
    assert_eq!(batches, expected, "identical batches after a replica died");
    let survivor = measured[0].counter("flamingo_data_images_decoded_total");
    eprintln!("after the kill the survivor decoded {survivor} of {single} images");
    assert!(
        survivor as f64 > 0.7 * single as f64,
        "the survivor took the dead replica's share: {survivor} of {single}"
    );
}
