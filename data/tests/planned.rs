//! Batches planned from acceptance indexes equal batches found by
//! preprocessing: the same boundaries, samples, skips and reasons, over
//! whole epochs, for LAION with corrupt images and MMC4 with every verdict
//! (single-image documents under the seeded drop, documents that end on
//! their only image, broken JSON); and the pieces K replicas serve join
//! into exactly the slice one replica serves, at any world size.

mod common;

use std::sync::Arc;

use flamingo_data::accept::{self, AcceptIndex, Verdict};
use flamingo_data::batch::{rank_slice, Assembler, Cursor, GlobalBatch};
use flamingo_data::convert::{BatchFrame, ImageFormat, RankBatch};
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;
use flamingo_data::synthetic;

/// Judges every shard of `spec` as `data index --accept` does.
async fn judge(spec: &DataSpec) -> Vec<Verdict> {
    let dataset = Dataset::open(spec, &Storage::default())
        .await
        .expect("dataset");
    assert!(dataset.verdicts.is_none(), "not judged yet");
    let preparer = Arc::new(Preparer::new(spec).expect("preparer"));
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool"),
    );
    let fingerprint = accept::fingerprint(spec).expect("fingerprint");
    let mut all = Vec::new();
    for (number, shard) in dataset.shards.iter().enumerate() {
        let verdicts = accept::judge_shard(&dataset, number, &preparer, &pool, |_| {})
            .await
            .expect("judged");
        AcceptIndex::new(shard.index.shard_bytes, &fingerprint, &verdicts)
            .write(&shard.location)
            .await
            .expect("stored");
        all.extend(verdicts);
    }
    all
}

async fn assembler(spec: &DataSpec, seed: u64) -> Assembler {
    let dataset = Dataset::open(spec, &Storage::default())
        .await
        .expect("dataset");
    common::assembler(dataset, spec, seed)
}

/// The pieces of rank `rank`'s slice that `shares` replicas serve, joined.
async fn joined(
    planned: &Assembler,
    cursor: Cursor,
    size: usize,
    (rank, world): (usize, usize),
    shares: usize,
    images: usize,
) -> RankBatch {
    let plan = planned.plan(cursor, size).expect("plan");
    let n = plan.accepted.len();
    let slice = rank_slice(n, world, rank);
    let mut pieces = Vec::new();
    for share in 0..shares {
        let cut = rank_slice(n, shares, share);
        let start = slice.start.max(cut.start);
        let end = slice.end.min(cut.end);
        if start >= end && !(share == 0 && slice.is_empty()) {
            continue;
        }
        let (samples, extra) = planned
            .prepare_planned(&plan, start..end.max(start))
            .await
            .expect("piece");
        assert!(extra.is_empty(), "the index agrees with preprocessing");
        let frame = BatchFrame {
            start: plan.start,
            next: plan.next,
            last_in_epoch: plan.last_in_epoch,
            skipped: plan.skipped.clone(),
        };
        pieces.push(RankBatch::from_samples(
            frame,
            &samples,
            images,
            0,
            ImageFormat::Float16,
        ));
    }
    RankBatch::join(pieces).expect("joined")
}

async fn check_equal(spec_toml: &str, sizes: &[usize], images: usize) -> Vec<Verdict> {
    let spec = DataSpec::from_toml(spec_toml, None).expect("spec");
    let seed = 77;
    let found = assembler(&spec, seed).await;
    let verdicts = judge(&spec).await;
    let planned = assembler(&spec, seed).await;
    assert!(planned.planned() && !found.planned());
    for &size in sizes {
        let mut cursor = Cursor::default();
        let mut batches = 0;
        while cursor.epoch < 2 {
            let expected: GlobalBatch = found.batch(cursor, size).await.expect("found");
            let plan = planned.plan(cursor, size).expect("plan");
            let keys: Vec<&str> = expected.samples.iter().map(|s| s.key.as_str()).collect();
            let plan_keys: Vec<&str> = plan
                .accepted
                .iter()
                .map(|sample| {
                    planned.dataset().shards[sample.shard as usize]
                        .index
                        .samples[sample.sample as usize]
                        .key
                        .as_str()
                })
                .collect();
            assert_eq!(plan_keys, keys, "size {size} at {cursor:?}");
            assert_eq!(plan.skipped, expected.skipped, "size {size} at {cursor:?}");
            assert_eq!(
                (plan.start, plan.next, plan.last_in_epoch),
                (expected.start, expected.next, expected.last_in_epoch)
            );
            let batch = planned.batch(cursor, size).await.expect("planned batch");
            assert_eq!(batch.samples, expected.samples, "size {size} at {cursor:?}");
            assert_eq!(batch.skipped, expected.skipped);
            if batches < 3 {
                for world in 1..=4 {
                    for shares in 1..=3 {
                        for rank in 0..world {
                            let whole = RankBatch::from_global(
                                &expected,
                                rank,
                                world,
                                images,
                                0,
                                ImageFormat::Float16,
                            );
                            let pieces =
                                joined(&planned, cursor, size, (rank, world), shares, images).await;
                            assert_eq!(
                                pieces, whole,
                                "rank {rank}/{world} from {shares} shares, size {size}"
                            );
                        }
                    }
                }
            }
            batches += 1;
            cursor = expected.next;
        }
    }
    verdicts
}

#[tokio::test(flavor = "multi_thread")]
async fn laion_batches_planned_from_verdicts_equal_batches_found_by_preprocessing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = common::laion_fixture(dir.path(), 3, 13, 4).await;
    let verdicts = check_equal(&spec, &[5, 8], 1).await;
    let rejected = verdicts
        .iter()
        .filter(|verdict| matches!(verdict, Verdict::Reject(_)))
        .count();
    assert_eq!(rejected, 39 / 4, "every corrupt image is a recorded reject");
}

#[tokio::test(flavor = "multi_thread")]
async fn mmc4_batches_planned_from_verdicts_equal_batches_found_by_preprocessing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = synthetic::write_mmc4_fixture(dir.path(), 3, 20, 9)
        .await
        .expect("fixture");
    let verdicts = check_equal(&spec, &[6], 3).await;
    let count = |kind: fn(&Verdict) -> bool| verdicts.iter().filter(|v| kind(v)).count();
    let accepted = count(|v| *v == Verdict::Accept);
    let single = count(|v| *v == Verdict::Single);
    let at_end = count(|v| *v == Verdict::SingleAtEnd);
    let rejected = count(|v| matches!(v, Verdict::Reject(_)));
    assert!(
        accepted > 0 && single > 0 && at_end > 0 && rejected > 0,
        "the fixture meets every verdict: {accepted} accepted, {single} single, {at_end} at end, {rejected} rejected"
    );
}
