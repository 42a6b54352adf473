//! Exactly once, at any world size: over a dataset of known keys (some of
//! them corrupt), E epochs consumed by 4 ranks, stopped at arbitrary
//! cursors and resumed with 2 or 3 ranks (or another global batch size),
//! deliver every good key exactly once per epoch, in the order of the
//! uninterrupted run; the corrupt ones are skipped every time.

mod common;

use flamingo_data::batch::{Assembler, Cursor};
use flamingo_data::convert::{ImageFormat, RankBatch};
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;

const SHARDS: usize = 7;
const PER_SHARD: usize = 13;
const CORRUPT_EVERY: u64 = 11;
const EPOCHS: u64 = 2;

async fn assembler(spec_toml: &str, seed: u64) -> Assembler {
    let spec = DataSpec::from_toml(spec_toml, None).expect("spec");
    let dataset = Dataset::open(&spec, &Storage::default())
        .await
        .expect("dataset");
    common::assembler(dataset, &spec, seed)
}

/// Runs `world` ranks of `per_rank` samples from `cursor` for `batches`
/// global batches (or to the end of `EPOCHS`); returns (epoch, key) in
/// delivery order (rank 0's slice, then rank 1's, …) and the cursor reached,
/// plus the skipped keys seen.
async fn run(
    assembler: &Assembler,
    mut cursor: Cursor,
    world: usize,
    per_rank: usize,
    batches: usize,
) -> (Vec<(u64, String)>, Cursor, Vec<String>) {
    let mut delivered = Vec::new();
    let mut skipped = Vec::new();
    for _ in 0..batches {
        if cursor.epoch >= EPOCHS {
            break;
        }
        let batch = assembler
            .batch(cursor, per_rank * world)
            .await
            .expect("batch");
        for rank in 0..world {
            let slice = RankBatch::from_global(&batch, rank, world, 1, 0, ImageFormat::Uint8);
            assert_eq!(slice.next, batch.next, "every rank gets the same cursor");
            delivered.extend(
                slice
                    .keys
                    .iter()
                    .map(|key| (batch.start.epoch, key.clone())),
            );
        }
        skipped.extend(batch.skipped.iter().map(|skip| skip.key.clone()));
        cursor = batch.next;
    }
    (delivered, cursor, skipped)
}

#[tokio::test(flavor = "multi_thread")]
async fn resumes_at_other_world_sizes_deliver_each_key_once_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = common::laion_fixture(dir.path(), SHARDS, PER_SHARD, CORRUPT_EVERY).await;
    let assembler = assembler(&spec, 1234).await;

    let (uninterrupted, end, skipped) = run(&assembler, Cursor::default(), 4, 3, usize::MAX).await;
    assert_eq!(end.epoch, EPOCHS);
    let good = common::good_keys(SHARDS, PER_SHARD, CORRUPT_EVERY);
    for epoch in 0..EPOCHS {
        let mut keys: Vec<String> = uninterrupted
            .iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, key)| key.clone())
            .collect();
        let order = keys.clone();
        keys.sort();
        assert_eq!(keys, good, "epoch {epoch}: every good key exactly once");
        assert_ne!(order, good, "epoch {epoch} is shuffled");
    }
    let bad = SHARDS * PER_SHARD - good.len();
    assert_eq!(
        skipped.len(),
        bad * EPOCHS as usize,
        "each corrupt sample skipped once per epoch"
    );
    let first_epoch: Vec<&(u64, String)> = uninterrupted.iter().filter(|(e, _)| *e == 0).collect();
    let second_epoch: Vec<&(u64, String)> = uninterrupted.iter().filter(|(e, _)| *e == 1).collect();
    assert_ne!(
        first_epoch.iter().map(|(_, k)| k).collect::<Vec<_>>(),
        second_epoch.iter().map(|(_, k)| k).collect::<Vec<_>>(),
        "epochs are ordered differently"
    );

    // Stop and resume at arbitrary points with other world sizes and batch
    // sizes (a fresh assembler each time, as after a restart).
    let plans: [&[(usize, usize, usize)]; 3] = [
        &[(4, 3, 2), (2, 6, 5), (3, 4, usize::MAX)],
        &[(4, 3, 7), (3, 4, 1), (2, 6, 3), (4, 3, usize::MAX)],
        &[(2, 4, 4), (3, 1, 9), (4, 3, usize::MAX)],
    ];
    for plan in plans {
        let mut cursor = Cursor::default();
        let mut delivered = Vec::new();
        for (world, per_rank, batches) in plan {
            let fresh = assembler_from(&spec).await;
            let (part, next, _) = run(&fresh, cursor, *world, *per_rank, *batches).await;
            delivered.extend(part);
            cursor = next;
        }
        assert_eq!(delivered, uninterrupted, "plan {plan:?}");
    }
}

async fn assembler_from(spec: &str) -> Assembler {
    assembler(spec, 1234).await
}

#[tokio::test(flavor = "multi_thread")]
async fn resampled_mode_is_deterministic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = common::laion_fixture(dir.path(), 4, 10, 0).await;
    let spec = format!("{spec}resampled = true\nsamples_per_epoch = 30\n");
    let first = run(
        &assembler(&spec, 5).await,
        Cursor::default(),
        2,
        3,
        usize::MAX,
    )
    .await
    .0;
    let again = run(
        &assembler(&spec, 5).await,
        Cursor::default(),
        3,
        2,
        usize::MAX,
    )
    .await
    .0;
    assert_eq!(first, again);
    let epoch0 = first.iter().filter(|(e, _)| *e == 0).count();
    assert_eq!(epoch0, 30);
    let distinct: std::collections::HashSet<&String> = first.iter().map(|(_, k)| k).collect();
    assert!(distinct.len() < first.len(), "drawn with replacement");
}
