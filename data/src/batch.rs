//! Global batches: from a cursor, the next `B` accepted samples of the
//! epoch order (skipped samples consume positions but not batch slots), and
//! each rank's slice of them. Everything here is a function of (dataset,
//! seed, cursor, B), so any replica computes the same batch.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::order::{EpochOrder, SampleRef};
use crate::prepare::{Decisions, Preparer};
use crate::reader::Dataset;
use flamingo_common::rng::Rng;

use crate::purpose;
use crate::sample::{Prepared, Skipped};
use crate::spec::{DataSpec, DatasetKind};

/// Where a stream stands: positions of the epoch's order consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub consumed: u64,
}

#[derive(Debug, Clone)]
pub struct GlobalBatch {
    pub start: Cursor,
    pub next: Cursor,
    pub last_in_epoch: bool,
    /// Accepted samples in order: `B` of them, fewer only at an epoch's end.
    pub samples: Vec<Prepared>,
    pub skipped: Vec<Skipped>,
}

/// Rank `rank`'s part of `n` samples: contiguous, as even as possible (for
/// a full batch, exactly `n / world` each).
pub fn rank_slice(n: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    (rank * n / world)..((rank + 1) * n / world)
}

/// The seeded random decisions for `sample` of `epoch` in the batch that
/// starts at position `batch_start` (none when `augment` is off).
pub fn decisions(
    spec: &DataSpec,
    seed: u64,
    epoch: u64,
    batch_start: u64,
    sample: SampleRef,
) -> Decisions {
    if !spec.augment {
        return Decisions::default();
    }
    let shard = u64::from(sample.shard);
    let flip = match spec.dataset {
        // One flip decision per batch, as upstream flips the batch tensor.
        DatasetKind::Laion => Rng::keyed(&[seed, purpose::FLIP, epoch, batch_start, u64::MAX]),
        DatasetKind::Mmc4 => Rng::keyed(&[seed, purpose::FLIP, epoch, shard, sample.sample]),
    }
    .below(2)
        == 1;
    let drop_if_single_image = Rng::keyed(&[
        seed,
        purpose::SINGLE_IMAGE_DROP,
        epoch,
        shard,
        sample.sample,
    ])
    .next_f64()
        <= 0.5;
    Decisions {
        flip,
        drop_if_single_image,
    }
}

#[derive(Debug)]
pub struct Assembler {
    dataset: Arc<Dataset>,
    preparer: Arc<Preparer>,
    pool: Arc<rayon::ThreadPool>,
    seed: u64,
    order: Mutex<Option<Arc<(u64, EpochOrder)>>>,
}

impl Assembler {
    pub fn new(
        dataset: Arc<Dataset>,
        preparer: Arc<Preparer>,
        pool: Arc<rayon::ThreadPool>,
        seed: u64,
    ) -> Self {
        Self {
            dataset,
            preparer,
            pool,
            seed,
            order: Mutex::new(None),
        }
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    fn order(&self, epoch: u64) -> Arc<(u64, EpochOrder)> {
        let mut cached = self
            .order
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match cached.as_ref() {
            Some(order) if order.0 == epoch => order.clone(),
            _ => {
                let order = Arc::new((epoch, self.dataset.order(self.seed, epoch)));
                *cached = Some(order.clone());
                order
            }
        }
    }

    fn decisions(&self, epoch: u64, batch_start: u64, sample: SampleRef) -> Decisions {
        decisions(&self.dataset.spec, self.seed, epoch, batch_start, sample)
    }

    /// The global batch that starts at `cursor`.
    pub async fn batch(&self, cursor: Cursor, size: usize) -> Result<GlobalBatch> {
        if size == 0 {
            return Err(DataError::spec("batch_size", "must be at least 1"));
        }
        let mut cursor = cursor;
        let mut reasons: std::collections::BTreeMap<&'static str, (usize, String)> =
            Default::default();
        // An epoch with nothing left (or only dropped leftovers) moves on;
        // bounded so that a dataset of only bad samples cannot spin.
        for _ in 0..3 {
            let order = self.order(cursor.epoch);
            let order = &order.1;
            if order.is_empty() {
                return Err(DataError::spec(
                    "shards",
                    "the dataset has no samples (are the shards empty or unreadable?)",
                ));
            }
            if cursor.consumed >= order.len() {
                cursor = Cursor {
                    epoch: cursor.epoch + 1,
                    consumed: 0,
                };
                continue;
            }
            let batch = self.fill(order, cursor, size).await?;
            for skip in &batch.skipped {
                let entry = reasons
                    .entry(skip.reject.reason.as_str())
                    .or_insert_with(|| {
                        (
                            0,
                            format!("{} in {}: {}", skip.key, skip.shard, skip.reject.detail),
                        )
                    });
                entry.0 += 1;
            }
            let incomplete = batch.samples.len() < size;
            if incomplete && (self.dataset.spec.drop_last || batch.samples.is_empty()) {
                cursor = batch.next;
                continue;
            }
            return Ok(batch);
        }
        let summary: Vec<String> = reasons
            .iter()
            .map(|(reason, (count, example))| format!("{count} {reason} (e.g. {example})"))
            .collect();
        Err(DataError::spec(
            "shards",
            format!(
                "not one sample of the dataset could be used: {}",
                summary.join("; ")
            ),
        ))
    }

    async fn fill(&self, order: &EpochOrder, start: Cursor, size: usize) -> Result<GlobalBatch> {
        let mut samples = Vec::with_capacity(size);
        let mut skipped = Vec::new();
        let mut position = start.consumed;
        while samples.len() < size && position < order.len() {
            let want = (size - samples.len()) as u64;
            let refs = order.samples(position..position + want);
            let raws = self.dataset.read(&refs).await?;
            let jobs: Vec<_> = raws
                .into_iter()
                .zip(&refs)
                .map(|(raw, sample)| (raw, self.decisions(start.epoch, start.consumed, *sample)))
                .collect();
            let preparer = self.preparer.clone();
            let pool = self.pool.clone();
            let prepared = tokio::task::spawn_blocking(move || {
                pool.install(|| {
                    jobs.into_par_iter()
                        .map(|(raw, decisions)| {
                            let raw = raw?;
                            preparer.prepare(&raw, decisions).map_err(|reject| Skipped {
                                shard: raw.shard.clone(),
                                key: raw.key.clone(),
                                reject,
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .await
            .map_err(|error| DataError::Storage {
                url: "preprocessing".into(),
                message: error.to_string(),
            })?;
            position += refs.len() as u64;
            for result in prepared {
                match result {
                    Ok(sample) => samples.push(sample),
                    Err(skip) => skipped.push(skip),
                }
            }
        }
        let last_in_epoch = position >= order.len();
        let next = if last_in_epoch {
            Cursor {
                epoch: start.epoch + 1,
                consumed: 0,
            }
        } else {
            Cursor {
                epoch: start.epoch,
                consumed: position,
            }
        };
        Ok(GlobalBatch {
            start,
            next,
            last_in_epoch,
            samples,
            skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_batch_once() {
        for n in 0..20 {
            for world in 1..6 {
                let mut covered = Vec::new();
                for rank in 0..world {
                    covered.extend(rank_slice(n, world, rank));
                }
                assert_eq!(covered, (0..n).collect::<Vec<_>>());
            }
        }
        assert_eq!(rank_slice(12, 4, 1), 3..6);
    }
}
