//! One conformance suite for the storage backends the data service reads:
//! local files (`file://` and plain paths) and S3, against a real
//! S3-compatible server (moto's server mode, from the test venv) that the
//! test starts. Shards and indexes are written, read back by range and by
//! stream, reindexed, and batched; a missing object is named by URL.

mod common;

use flamingo_common::testing::S3Server;
use flamingo_data::batch::Cursor;
use flamingo_data::index::{ShardIndex, INDEX_SUFFIX};
use flamingo_data::pack::ShardWriter;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::{Storage, StorageOptions};
use flamingo_data::{synthetic, DataError};

/// Writes 3 synthetic LAION shards under `prefix`, then checks every
/// storage operation the service uses; returns the keys of the first
/// global batches, to compare across backends.
async fn conformance(storage: &Storage, prefix: &str, tokenizer: &str) -> Vec<String> {
    let pattern = format!("{prefix}/laion-{{}}.tar");
    let mut writer = ShardWriter::new(storage, &pattern, 7);
    for index in 0..20u64 {
        let (key, members) = synthetic::laion_sample(4, index, 24);
        writer.add(&key, &members).await.expect("written");
    }
    let (shards, samples) = writer.finish().await.expect("finished");
    assert_eq!((shards.len(), samples), (3, 20));

    // Range reads and sizes.
    let shard = storage.resolve(&shards[0]).expect("resolves");
    let size = shard.size().await.expect("size");
    let index = ShardIndex::read(&shard)
        .await
        .expect("index read")
        .expect("index stored");
    assert_eq!(index.shard_bytes, size);
    assert_eq!(index.samples.len(), 7);
    let span = &index.samples[3];
    let bytes = shard
        .read_range(span.start..span.end)
        .await
        .expect("range read");
    assert_eq!(bytes.len() as u64, span.end - span.start);
    assert!(
        bytes.starts_with(span.key.as_bytes()),
        "the range starts at the sample's header"
    );

    // Streaming reindex gives the stored index; a stale one is rebuilt.
    assert_eq!(ShardIndex::build(&shard).await.expect("built"), index);
    let stale = ShardIndex {
        shard_bytes: 1,
        ..index.clone()
    };
    stale.write(&shard).await.expect("stale index written");
    assert_eq!(
        ShardIndex::load_or_build(&shard).await.expect("reindexed"),
        index
    );

    // A missing object is named.
    let missing = storage
        .resolve(&format!("{prefix}/laion-00009.tar"))
        .expect("resolves");
    match missing.size().await {
        Err(DataError::MissingShard { url, .. }) => {
            assert!(url.ends_with("laion-00009.tar"), "{url}")
        }
        other => panic!("expected a missing shard, got {other:?}"),
    }
    assert!(storage
        .resolve(&format!("{prefix}/laion-00009.tar{INDEX_SUFFIX}"))
        .expect("resolves")
        .read_if_exists()
        .await
        .expect("no error for a missing index")
        .is_none());

    // The whole path: open, order, read, prepare.
    let spec = DataSpec::from_toml(
        &format!(
            "dataset = \"laion\"\nshards = \"{}\"\ntokenizer = \"{tokenizer}\"\nimage_size = 16\n",
            ShardWriter::brace_pattern(&pattern, shards.len())
        ),
        None,
    )
    .expect("spec");
    let dataset = Dataset::open(&spec, storage).await.expect("opens");
    assert_eq!(dataset.samples(), 20);
    let assembler = common::assembler(dataset, &spec, 3);
    let mut keys = Vec::new();
    let mut cursor = Cursor::default();
    while cursor.epoch == 0 {
        let batch = assembler.batch(cursor, 6).await.expect("batch");
        keys.extend(batch.samples.iter().map(|sample| sample.key.clone()));
        cursor = batch.next;
    }
    assert_eq!(keys.len(), 20);
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn local_files_and_s3_behave_alike() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokenizer = dir.path().join("lm");
    synthetic::write_tokenizer(&tokenizer).expect("tokenizer");
    let tokenizer = tokenizer.display().to_string();

    let local = Storage::default();
    let files = conformance(
        &local,
        &format!("file://{}/a", dir.path().display()),
        &tokenizer,
    )
    .await;
    let plain = conformance(&local, &format!("{}/b", dir.path().display()), &tokenizer).await;
    assert_eq!(files, plain);

    let server = S3Server::start("shards");
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    let s3 = Storage::new(StorageOptions {
        s3_endpoint: Some(server.endpoint.clone()),
    });
    let remote = conformance(&s3, "s3://shards/laion", &tokenizer).await;
    assert_eq!(
        remote, files,
        "the same order from the same data on every backend"
    );

    // A bucket that does not exist is a clear error, not a hang.
    let error = s3
        .resolve("s3://no-such-bucket/x.tar")
        .expect("resolves")
        .size()
        .await
        .expect_err("no bucket");
    assert!(
        error.to_string().contains("s3://no-such-bucket/x.tar"),
        "{error}"
    );
}
