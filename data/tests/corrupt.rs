//! A corpus of damaged shards and samples: a truncated shard, a file of
//! garbage, a sample whose bytes were overwritten after indexing, a header
//! whose size is u64::MAX, samples with corrupt images. Opening and reading
//! them must count and report what is skipped — with shard and key — and
//! never panic; every intact sample is still delivered, the same way on
//! every replay.

mod common;

use std::collections::BTreeMap;

use flamingo_data::batch::Cursor;
use flamingo_data::index::ShardIndex;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;

#[tokio::test(flavor = "multi_thread")]
async fn damaged_shards_and_samples_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Four shards of 10; every 7th sample has a corrupt image.
    let spec = common::laion_fixture(dir.path(), 4, 10, 7).await;
    let shard = |n: usize| dir.path().join(format!("laion-{n:05}.tar"));
    let storage = Storage::default();

    // Shard 1: cut in the middle of its 6th sample, its index deleted.
    let index1 = ShardIndex::read(
        &storage
            .resolve(&shard(1).display().to_string())
            .expect("resolves"),
    )
    .await
    .expect("read")
    .expect("stored");
    let bytes = std::fs::read(shard(1)).expect("shard 1");
    let cut = (index1.samples[5].start + index1.samples[5].end) / 2;
    std::fs::write(shard(1), &bytes[..cut as usize]).expect("truncated");
    std::fs::remove_file(dir.path().join("laion-00001.tar.index.json")).expect("index removed");
    // Shard 2: garbage.
    std::fs::write(shard(2), vec![0x5a; 5000]).expect("garbage");
    std::fs::remove_file(dir.path().join("laion-00002.tar.index.json")).expect("index removed");
    // Shard 3: sample 3's header overwritten after indexing (same size).
    let index3 = ShardIndex::read(
        &storage
            .resolve(&shard(3).display().to_string())
            .expect("resolves"),
    )
    .await
    .expect("read")
    .expect("stored");
    let mut bytes = std::fs::read(shard(3)).expect("shard 3");
    let start = index3.samples[3].start as usize;
    bytes[start..start + 100].fill(0x33);
    // And sample 5's header claims a GNU base-256 size of u64::MAX (with a
    // valid checksum): a reader that trusted it would overflow.
    let header = index3.samples[5].start as usize;
    let header = &mut bytes[header..header + 512];
    header[124] = 0x80;
    header[125..128].fill(0);
    header[128..136].copy_from_slice(&u64::MAX.to_be_bytes());
    header[148..156].fill(b' ');
    let sum: u64 = header.iter().map(|byte| u64::from(*byte)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    std::fs::write(shard(3), &bytes).expect("overwritten");

    let spec = DataSpec::from_toml(
        &spec.replace("shuffle_block = 10", "shuffle_block = 0"),
        None,
    )
    .expect("spec");
    let dataset = Dataset::open(&spec, &storage)
        .await
        .expect("a damaged dataset still opens");
    let counts: Vec<usize> = dataset
        .shards
        .iter()
        .map(|s| s.index.samples.len())
        .collect();
    assert_eq!(
        counts,
        [10, 5, 0, 10],
        "intact samples before the damage are indexed"
    );
    assert!(dataset.shards[1]
        .index
        .error
        .as_deref()
        .is_some_and(|e| e.contains("truncated tar")));
    assert!(dataset.shards[2]
        .index
        .error
        .as_deref()
        .is_some_and(|e| e.contains("checksum")));

    let assembler = common::assembler(dataset, &spec, 8);
    let replay = || async {
        let mut delivered = Vec::new();
        let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut cursor = Cursor::default();
        while cursor.epoch == 0 {
            let batch = assembler.batch(cursor, 4).await.expect("batch");
            delivered.extend(batch.samples.iter().map(|s| s.key.clone()));
            for skip in &batch.skipped {
                assert!(skip.shard.contains("laion-0000"), "{skip:?}");
                reasons
                    .entry(skip.reject.reason.as_str().to_string())
                    .or_default()
                    .push(skip.key.clone());
            }
            cursor = batch.next;
        }
        (delivered, reasons)
    };
    let (delivered, reasons) = replay().await;
    // Samples 33 and 35 (shard 3, samples 3 and 5) are unreadable; 6, 13,
    // 20, 27, 34 have corrupt images (20 and 27 sit in the lost parts of
    // shards 1 and 2).
    let mut bad_tars = reasons["bad_tar"].clone();
    bad_tars.sort();
    assert_eq!(bad_tars, ["000000033", "000000035"]);
    let mut bad_images = reasons["bad_image"].clone();
    bad_images.sort();
    assert_eq!(bad_images, ["000000006", "000000013", "000000034"]);
    assert_eq!(delivered.len(), 25 - 5);
    let (again, again_reasons) = replay().await;
    assert_eq!(again, delivered, "skipped the same way on every replay");
    assert_eq!(again_reasons, reasons);
}
