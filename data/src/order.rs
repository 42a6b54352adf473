//! The sample order of an epoch, a pure function of (shard sample counts,
//! spec, seed, epoch): shards in a seeded permutation (or drawn with
//! replacement in resampled mode), samples read shard after shard, then
//! shuffled within blocks of `shuffle_block` positions. Position p of the
//! epoch is always the same sample, whatever the world size, so a cursor
//! (epoch, positions consumed) is all a resume needs.

use flamingo_common::rng::Rng;

use crate::purpose;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderConfig {
    pub seed: u64,
    pub shuffle_shards: bool,
    pub shuffle_block: u64,
    pub resampled: bool,
    /// 0: the whole dataset (not allowed when resampled).
    pub samples_per_epoch: u64,
}

#[derive(Debug, Clone)]
pub struct EpochOrder {
    /// Shard ids in reading order.
    shards: Vec<u32>,
    /// `prefix[i]`: samples in `shards[..i]`.
    prefix: Vec<u64>,
    len: u64,
    block: u64,
    seed: u64,
    epoch: u64,
}

/// Where a position of the epoch points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    pub shard: u32,
    pub sample: u64,
}

impl EpochOrder {
    /// `counts[i]` and `weights[i]` are shard i's sample count and draw
    /// weight (used only when resampled).
    pub fn new(counts: &[u64], weights: &[f64], config: &OrderConfig, epoch: u64) -> Self {
        let shards: Vec<u32> = if config.resampled {
            draw_shards(counts, weights, config, epoch)
        } else if config.shuffle_shards {
            Rng::keyed(&[config.seed, purpose::SHARD_ORDER, epoch]).permutation(counts.len())
        } else {
            (0..counts.len() as u32).collect()
        };
        let mut prefix = Vec::with_capacity(shards.len());
        let mut total = 0u64;
        for shard in &shards {
            prefix.push(total);
            total += counts[*shard as usize];
        }
        let len = if config.samples_per_epoch > 0 {
            total.min(config.samples_per_epoch)
        } else {
            total
        };
        Self {
            shards,
            prefix,
            len,
            block: config.shuffle_block,
            seed: config.seed,
            epoch,
        }
    }

    /// Positions in the epoch.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Unshuffled: the sample at stream position `position`.
    fn stream_at(&self, position: u64) -> SampleRef {
        let index = self.prefix.partition_point(|start| *start <= position) - 1;
        SampleRef {
            shard: self.shards[index],
            sample: position - self.prefix[index],
        }
    }

    fn block_permutation(&self, block: u64) -> Vec<u32> {
        let start = block * self.block;
        let length = self.block.min(self.len - start) as usize;
        Rng::keyed(&[self.seed, purpose::BLOCK_SHUFFLE, self.epoch, block]).permutation(length)
    }

    /// The samples at positions `range` of the epoch, in order.
    pub fn samples(&self, range: std::ops::Range<u64>) -> Vec<SampleRef> {
        let end = range.end.min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(range.start) as usize);
        if self.block <= 1 {
            out.extend((range.start..end).map(|position| self.stream_at(position)));
            return out;
        }
        let mut cached: Option<(u64, Vec<u32>)> = None;
        for position in range.start..end {
            let block = position / self.block;
            if cached
                .as_ref()
                .is_none_or(|(cached_block, _)| *cached_block != block)
            {
                cached = Some((block, self.block_permutation(block)));
            }
            let offset = cached.as_ref().map_or(0, |(_, permutation)| {
                permutation[(position % self.block) as usize]
            });
            out.push(self.stream_at(block * self.block + u64::from(offset)));
        }
        out
    }
}

/// Resampled mode: shards drawn with replacement, each with probability
/// proportional to its weight, until the epoch's sample budget is covered.
fn draw_shards(counts: &[u64], weights: &[f64], config: &OrderConfig, epoch: u64) -> Vec<u32> {
    let mut cumulative = Vec::with_capacity(counts.len());
    let mut total_weight = 0.0;
    for (count, weight) in counts.iter().zip(weights) {
        if *count > 0 {
            total_weight += weight;
        }
        cumulative.push(total_weight);
    }
    if total_weight <= 0.0 {
        return Vec::new();
    }
    let mut rng = Rng::keyed(&[config.seed, purpose::RESAMPLE, epoch]);
    let mut shards = Vec::new();
    let mut covered = 0u64;
    while covered < config.samples_per_epoch {
        let target = rng.next_f64() * total_weight;
        let shard = cumulative
            .partition_point(|value| *value <= target)
            .min(counts.len() - 1);
        if counts[shard] == 0 {
            continue;
        }
        covered += counts[shard];
        shards.push(shard as u32);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(block: u64) -> OrderConfig {
        OrderConfig {
            seed: 42,
            shuffle_shards: true,
            shuffle_block: block,
            resampled: false,
            samples_per_epoch: 0,
        }
    }

    proptest! {
        #[test]
        fn an_epoch_is_a_permutation_of_all_samples(
            counts in proptest::collection::vec(0u64..40, 1..12),
            block in 0u64..50,
            epoch in 0u64..3,
        ) {
            let order = EpochOrder::new(&counts, &vec![1.0; counts.len()], &config(block), epoch);
            let total: u64 = counts.iter().sum();
            prop_assert_eq!(order.len(), total);
            let mut seen = order.samples(0..total);
            // Any split of the range gives the same positions.
            let middle = total / 3;
            let mut split = order.samples(0..middle);
            split.extend(order.samples(middle..total));
            prop_assert_eq!(&split, &seen);
            seen.sort();
            let mut expected = Vec::new();
            for (shard, count) in counts.iter().enumerate() {
                for sample in 0..*count {
                    expected.push(SampleRef { shard: shard as u32, sample });
                }
            }
            prop_assert_eq!(seen, expected);
        }
    }

    #[test]
    fn epochs_and_seeds_change_the_order() {
        let counts = [10u64; 8];
        let weights = [1.0; 8];
        let a = EpochOrder::new(&counts, &weights, &config(16), 0).samples(0..80);
        let b = EpochOrder::new(&counts, &weights, &config(16), 1).samples(0..80);
        assert_ne!(a, b);
        let again = EpochOrder::new(&counts, &weights, &config(16), 0).samples(0..80);
        assert_eq!(a, again);
    }

    #[test]
    fn resampling_draws_with_replacement_by_weight() {
        let counts = [10u64, 10, 10, 10];
        // Source weights as per-shard weights: shard 0 is 9x as likely.
        let weights = [9.0, 1.0, 1.0, 1.0];
        let resampled = OrderConfig {
            resampled: true,
            samples_per_epoch: 2000,
            ..config(0)
        };
        let order = EpochOrder::new(&counts, &weights, &resampled, 0);
        assert_eq!(order.len(), 2000);
        let from_first = order
            .samples(0..2000)
            .iter()
            .filter(|sample| sample.shard == 0)
            .count();
        assert!((1250..1750).contains(&from_first), "{from_first}");
        let same = EpochOrder::new(&counts, &weights, &resampled, 0).samples(0..2000);
        assert_eq!(same, order.samples(0..2000));
    }
}
