//! Global batches: from a cursor, the next `B` accepted samples of the
//! epoch order (skipped samples consume positions but not batch slots), and
//! each rank's slice of them. Everything here is a function of (dataset,
//! seed, cursor, B), so any replica computes the same batch.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::accept::Verdict;
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
    stats: Arc<PrepareStats>,
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
            stats: Arc::default(),
        }
    }

    /// Counts this assembler's work into `stats` (shared by a process).
    pub fn with_stats(mut self, stats: Arc<PrepareStats>) -> Self {
        self.stats = stats;
        self
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

    /// Whether batches are planned from acceptance indexes (every shard
    /// has current verdicts) rather than found by preprocessing.
    pub fn planned(&self) -> bool {
        self.dataset.verdicts.is_some()
    }

    /// Samples prepared and images they delivered, since the start.
    pub fn stats(&self) -> &Arc<PrepareStats> {
        &self.stats
    }

    /// The global batch that starts at `cursor`.
    pub async fn batch(&self, cursor: Cursor, size: usize) -> Result<GlobalBatch> {
        if self.planned() {
            let plan = self.plan(cursor, size)?;
            let (samples, extra) = self.prepare_planned(&plan, 0..plan.accepted.len()).await?;
            let mut skipped = plan.skipped;
            skipped.extend(extra);
            return Ok(GlobalBatch {
                start: plan.start,
                next: plan.next,
                last_in_epoch: plan.last_in_epoch,
                samples,
                skipped,
            });
        }
        self.walk(cursor, size, |order, start| async move {
            self.fill(&order.1, start, size).await
        })
        .await
    }

    /// The global batch that starts at `cursor`, decided from the
    /// acceptance indexes without preprocessing anything: the same
    /// boundaries, accepted samples and skips as [`Assembler::batch`].
    pub fn plan(&self, cursor: Cursor, size: usize) -> Result<Plan> {
        let Some(verdicts) = &self.dataset.verdicts else {
            return Err(DataError::spec(
                "shards",
                "the dataset has no acceptance index to plan from",
            ));
        };
        futures::executor::block_on(self.walk(cursor, size, |order, start| async move {
            Ok(self.plan_from(verdicts, &order.1, start, size))
        }))
    }

    /// Prepares `plan.accepted[range]`, with the decisions of the plan's
    /// batch. A sample that its index accepted but preprocessing rejects
    /// (the index was built from other bytes or rules) is skipped and
    /// reported, never an error.
    pub async fn prepare_planned(
        &self,
        plan: &Plan,
        range: std::ops::Range<usize>,
    ) -> Result<(Vec<Prepared>, Vec<Skipped>)> {
        let refs = plan.accepted[range].to_vec();
        let mut samples = Vec::with_capacity(refs.len());
        let mut skipped = Vec::new();
        for result in self.prepare(&refs, plan.start).await? {
            match result {
                Ok(sample) => samples.push(sample),
                Err(skip) => {
                    tracing::warn!(shard = %skip.shard, key = %skip.key, reason = skip.reject.reason.as_str(), "the acceptance index accepted a sample that preprocessing rejects; run `flamingoctl data index --accept --force`");
                    skipped.push(skip);
                }
            }
        }
        Ok((samples, skipped))
    }

    /// Moves on from epochs with nothing left (or only dropped leftovers),
    /// bounded so that a dataset of only bad samples cannot spin.
    async fn walk<B, F, Fut>(&self, cursor: Cursor, size: usize, mut fill: F) -> Result<B>
    where
        B: Walked,
        F: FnMut(Arc<(u64, EpochOrder)>, Cursor) -> Fut,
        Fut: std::future::Future<Output = Result<B>>,
    {
        if size == 0 {
            return Err(DataError::spec("batch_size", "must be at least 1"));
        }
        let mut cursor = cursor;
        let mut reasons: std::collections::BTreeMap<&'static str, (usize, String)> =
            Default::default();
        let mut carried: Vec<Skipped> = Vec::new();
        for _ in 0..3 {
            let order = self.order(cursor.epoch);
            if order.1.is_empty() {
                return Err(DataError::spec(
                    "shards",
                    "the dataset has no samples (are the shards empty or unreadable?)",
                ));
            }
            if cursor.consumed >= order.1.len() {
                cursor = Cursor {
                    epoch: cursor.epoch + 1,
                    consumed: 0,
                };
                continue;
            }
            let batch = fill(order, cursor).await?;
            for skip in batch.skipped() {
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
            let accepted = batch.accepted();
            let incomplete = accepted < size;
            if incomplete && (self.dataset.spec.drop_last || accepted == 0) {
                // The leftover's skipped samples are still reported, with
                // the batch that follows it: every skipped position of the
                // order reaches the ranks once.
                carried.extend(batch.skipped().iter().cloned());
                cursor = batch.next();
                continue;
            }
            let mut batch = batch;
            batch.carry(carried);
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

    fn plan_from(
        &self,
        verdicts: &[Vec<Verdict>],
        order: &EpochOrder,
        start: Cursor,
        size: usize,
    ) -> Plan {
        let mut accepted = Vec::with_capacity(size);
        let mut skipped = Vec::new();
        let mut position = start.consumed;
        // The order is read in runs, as preprocessing reads it.
        while accepted.len() < size && position < order.len() {
            let want = (size - accepted.len()) as u64;
            let refs = order.samples(position..position + want);
            position += refs.len() as u64;
            for sample in refs {
                let verdict = &verdicts[sample.shard as usize][sample.sample as usize];
                let decisions = self.decisions(start.epoch, start.consumed, sample);
                match verdict.outcome(decisions) {
                    Ok(()) => accepted.push(sample),
                    Err(reject) => {
                        let shard = &self.dataset.shards[sample.shard as usize];
                        skipped.push(Skipped {
                            shard: shard.location.url().to_string(),
                            key: shard.index.samples[sample.sample as usize].key.clone(),
                            reject,
                        });
                    }
                }
            }
        }
        let (next, last_in_epoch) = next_cursor(order, start, position);
        Plan {
            start,
            next,
            last_in_epoch,
            accepted,
            skipped,
        }
    }

    /// Reads and prepares `refs` with the decisions of the batch that
    /// starts at `start`, in order.
    async fn prepare(
        &self,
        refs: &[SampleRef],
        start: Cursor,
    ) -> Result<Vec<std::result::Result<Prepared, Skipped>>> {
        let raws = self.dataset.read(refs).await?;
        let jobs: Vec<_> = raws
            .into_iter()
            .zip(refs)
            .map(|(raw, sample)| (raw, self.decisions(start.epoch, start.consumed, *sample)))
            .collect();
        let preparer = self.preparer.clone();
        let pool = self.pool.clone();
        let stats = self.stats.clone();
        tokio::task::spawn_blocking(move || {
            pool.install(|| {
                jobs.into_par_iter()
                    .map(|(raw, decisions)| {
                        let raw = raw?;
                        let prepared = preparer.prepare(&raw, decisions);
                        stats.count(prepared.as_ref().ok());
                        prepared.map_err(|reject| Skipped {
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
        })
    }

    async fn fill(&self, order: &EpochOrder, start: Cursor, size: usize) -> Result<GlobalBatch> {
        let mut samples = Vec::with_capacity(size);
        let mut skipped = Vec::new();
        let mut position = start.consumed;
        while samples.len() < size && position < order.len() {
            let want = (size - samples.len()) as u64;
            let refs = order.samples(position..position + want);
            let prepared = self.prepare(&refs, start).await?;
            position += refs.len() as u64;
            for result in prepared {
                match result {
                    Ok(sample) => samples.push(sample),
                    Err(skip) => skipped.push(skip),
                }
            }
        }
        let (next, last_in_epoch) = next_cursor(order, start, position);
        Ok(GlobalBatch {
            start,
            next,
            last_in_epoch,
            samples,
            skipped,
        })
    }
}

/// Where the stream goes after a batch that read up to `position`.
fn next_cursor(order: &EpochOrder, start: Cursor, position: u64) -> (Cursor, bool) {
    if position >= order.len() {
        let next = Cursor {
            epoch: start.epoch + 1,
            consumed: 0,
        };
        (next, true)
    } else {
        let next = Cursor {
            epoch: start.epoch,
            consumed: position,
        };
        (next, false)
    }
}

/// A global batch as its acceptance indexes decide it: which samples it
/// takes (in order) and which it skips, before anything is preprocessed.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub start: Cursor,
    pub next: Cursor,
    pub last_in_epoch: bool,
    pub accepted: Vec<SampleRef>,
    pub skipped: Vec<Skipped>,
}

/// What [`Assembler::walk`] needs to know of a batch.
trait Walked {
    fn accepted(&self) -> usize;
    fn next(&self) -> Cursor;
    fn skipped(&self) -> &[Skipped];
    /// Puts the skips of dropped leftovers before this batch's own.
    fn carry(&mut self, earlier: Vec<Skipped>);
}

impl Walked for GlobalBatch {
    fn accepted(&self) -> usize {
        self.samples.len()
    }
    fn next(&self) -> Cursor {
        self.next
    }
    fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
    fn carry(&mut self, earlier: Vec<Skipped>) {
        self.skipped.splice(0..0, earlier);
    }
}

impl Walked for Plan {
    fn accepted(&self) -> usize {
        self.accepted.len()
    }
    fn next(&self) -> Cursor {
        self.next
    }
    fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
    fn carry(&mut self, earlier: Vec<Skipped>) {
        self.skipped.splice(0..0, earlier);
    }
}

/// Work done by one process's preprocessing (reported on the data
/// service's `/metrics`).
#[derive(Debug, Default)]
pub struct PrepareStats {
    /// Samples preprocessed, accepted or not.
    pub samples: std::sync::atomic::AtomicU64,
    /// Samples preprocessed and accepted.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Images decoded into accepted samples.
    pub images: std::sync::atomic::AtomicU64,
}

impl PrepareStats {
    fn count(&self, accepted: Option<&Prepared>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.samples.fetch_add(1, Relaxed);
        if let Some(sample) = accepted {
            self.accepted.fetch_add(1, Relaxed);
            self.images.fetch_add(sample.images.len() as u64, Relaxed);
        }
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
