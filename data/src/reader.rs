//! A dataset opened for reading: its shards resolved, their indexes loaded
//! (or built and stored), and samples fetched by position with coalesced
//! range reads — a sample is never read with the shard around it.

use std::ops::Range;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::accept::{self, AcceptIndex, Verdict};
use crate::error::Result;
use crate::index::{group, ShardIndex};
use crate::order::{EpochOrder, OrderConfig, SampleRef};
use crate::sample::{RawSample, Reject, RejectReason, Skipped};
use crate::spec::DataSpec;
use crate::store::{Location, Storage};
use crate::tar;

/// Ranges closer than this are read with one request.
const COALESCE_GAP: u64 = 256 * 1024;
/// Indexes loaded (or built) at once when a dataset opens.
const INDEX_CONCURRENCY: usize = 16;

#[derive(Debug)]
pub struct Shard {
    pub location: Location,
    pub index: ShardIndex,
    /// Draw weight in resampled mode: its source's weight over the
    /// source's shard count.
    pub weight: f64,
}

#[derive(Debug)]
pub struct Dataset {
    pub spec: DataSpec,
    pub shards: Vec<Shard>,
    /// Each shard's verdicts (by sample number) when every shard has a
    /// current acceptance index ([`crate::accept`]); batches are then
    /// planned without preprocessing.
    pub verdicts: Option<Vec<Vec<Verdict>>>,
}

impl Dataset {
    /// Resolves every shard and loads its index, building and storing the
    /// missing ones. Fails with the URL of a shard that does not exist.
    pub async fn open(spec: &DataSpec, storage: &Storage) -> Result<Arc<Self>> {
        let refs = spec.shards()?;
        let mut per_source = vec![0usize; spec.sources.len()];
        for shard in &refs {
            per_source[shard.source] += 1;
        }
        let locations = refs
            .iter()
            .map(|shard| storage.resolve(&shard.url))
            .collect::<Result<Vec<_>>>()?;
        let indexes: Vec<ShardIndex> = futures::stream::iter(locations.clone())
            .map(|location| async move { ShardIndex::load_or_build(&location).await })
            .buffered(INDEX_CONCURRENCY)
            .try_collect()
            .await?;
        let shards = refs
            .iter()
            .zip(locations)
            .zip(indexes)
            .map(|((shard, location), index)| {
                if let Some(error) = &index.error {
                    tracing::warn!(shard = location.url(), %error, samples = index.samples.len(), "shard is damaged; reading the samples before the damage");
                }
                Shard {
                    weight: spec.sources[shard.source].weight / per_source[shard.source] as f64,
                    location,
                    index,
                }
            })
            .collect::<Vec<Shard>>();
        let verdicts = load_verdicts(spec, &shards).await?;
        Ok(Arc::new(Self {
            spec: spec.clone(),
            shards,
            verdicts,
        }))
    }

    pub fn samples(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.index.samples.len() as u64)
            .sum()
    }

    pub fn order(&self, seed: u64, epoch: u64) -> EpochOrder {
        let counts: Vec<u64> = self
            .shards
            .iter()
            .map(|shard| shard.index.samples.len() as u64)
            .collect();
        let weights: Vec<f64> = self.shards.iter().map(|shard| shard.weight).collect();
        let config = OrderConfig {
            seed,
            shuffle_shards: self.spec.shuffle_shards,
            shuffle_block: self.spec.shuffle_block,
            resampled: self.spec.resampled,
            samples_per_epoch: self.spec.samples_per_epoch,
        };
        EpochOrder::new(&counts, &weights, &config, epoch)
    }

    /// Reads the samples, in the order given. A sample whose bytes are not
    /// a readable tar comes back as skipped; a storage failure is an error
    /// (retryable: the caller tries again or another replica does).
    pub async fn read(&self, refs: &[SampleRef]) -> Result<Vec<Result<RawSample, Skipped>>> {
        let mut by_shard: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (position, sample) in refs.iter().enumerate() {
            by_shard.entry(sample.shard).or_default().push(position);
        }
        let mut out: Vec<Option<Result<RawSample, Skipped>>> = vec![None; refs.len()];
        let reads = by_shard.into_iter().map(|(shard, positions)| {
            let refs = &refs;
            async move {
                let shard = &self.shards[shard as usize];
                let spans: Vec<Range<u64>> = positions
                    .iter()
                    .map(|position| {
                        let span = &shard.index.samples[refs[*position].sample as usize];
                        span.start..span.end
                    })
                    .collect();
                let merged = coalesce(&spans);
                let bytes = shard.location.read_ranges(&merged).await?;
                let samples: Vec<(usize, Result<RawSample, Skipped>)> = positions
                    .iter()
                    .zip(&spans)
                    .map(|(position, span)| {
                        let (which, range) = merged
                            .iter()
                            .enumerate()
                            .find(|(_, range)| range.start <= span.start && span.end <= range.end)
                            .map(|(which, range)| (which, range.clone()))
                            .unwrap_or((0, 0..0));
                        let chunk = &bytes[which];
                        let offset = (span.start - range.start) as usize;
                        let length = (span.end - span.start) as usize;
                        let key = &shard.index.samples[refs[*position].sample as usize].key;
                        let sample = if offset + length <= chunk.len() {
                            parse_sample(
                                shard,
                                key,
                                chunk.slice(offset..offset + length),
                                span.start,
                            )
                        } else {
                            Err(skipped(
                                shard,
                                key,
                                "the shard is shorter than its index says",
                            ))
                        };
                        (*position, sample)
                    })
                    .collect();
                Ok::<_, crate::DataError>(samples)
            }
        });
        for result in futures::future::join_all(reads).await {
            for (position, sample) in result? {
                out[position] = Some(sample);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Every shard's stored verdicts, or none when a shard has no current ones
/// (the dataset is then read the way that needs none).
/// A damaged or unreadable acceptance index is reported and not used.
async fn load_verdicts(spec: &DataSpec, shards: &[Shard]) -> Result<Option<Vec<Vec<Verdict>>>> {
    let Ok(fingerprint) = accept::fingerprint(spec) else {
        return Ok(None);
    };
    let wanted: Vec<(Location, u64, usize, String)> = shards
        .iter()
        .map(|shard| {
            (
                shard.location.clone(),
                shard.index.shard_bytes,
                shard.index.samples.len(),
                fingerprint.clone(),
            )
        })
        .collect();
    let found: Vec<Option<Vec<Verdict>>> = futures::stream::iter(wanted)
        .map(|(location, bytes, samples, fingerprint)| async move {
            AcceptIndex::read(&location, &fingerprint, bytes, samples)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(%error, "acceptance index not used");
                    None
                })
        })
        .buffered(INDEX_CONCURRENCY)
        .collect()
        .await;
    let judged = found.iter().filter(|verdicts| verdicts.is_some()).count();
    if judged < shards.len() {
        if judged > 0 {
            tracing::warn!(
                judged,
                shards = shards.len(),
                %fingerprint,
                "only some shards have current acceptance indexes; run `flamingoctl data index --accept` to judge the rest"
            );
        }
        return Ok(None);
    }
    Ok(found.into_iter().collect())
}

fn skipped(shard: &Shard, key: &str, detail: &str) -> Skipped {
    Skipped {
        shard: shard.location.url().to_string(),
        key: key.to_string(),
        reject: Reject::new(RejectReason::BadTar, detail),
    }
}

fn parse_sample(
    shard: &Shard,
    key: &str,
    bytes: bytes::Bytes,
    base: u64,
) -> Result<RawSample, Skipped> {
    let parsed = tar::parse(&bytes, base, true);
    if let Some(error) = parsed.error {
        return Err(skipped(shard, key, &error.to_string()));
    }
    let groups = group(&parsed.members);
    let Some(found) = groups.into_iter().find(|group| group.key == key) else {
        return Err(skipped(
            shard,
            key,
            "the sample's bytes do not hold its key; reindex the shard",
        ));
    };
    let members = found
        .members
        .into_iter()
        .map(|(suffix, member)| {
            let start = (member.data_offset - base) as usize;
            (suffix, bytes.slice(start..start + member.size as usize))
        })
        .collect();
    Ok(RawSample {
        shard: shard.location.url().to_string(),
        key: key.to_string(),
        members,
    })
}

/// Sorted, merged ranges covering `spans` (gaps under [`COALESCE_GAP`]
/// are read rather than requested twice).
fn coalesce(spans: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = spans.to_vec();
    sorted.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in sorted {
        match merged.last_mut() {
            Some(last) if range.start <= last.end + COALESCE_GAP => {
                last.end = last.end.max(range.end);
            }
            _ => merged.push(range),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_ranges_merge() {
        assert_eq!(
            coalesce(&[0..10, 20..30, 10_000_000..10_000_100, 5..8]),
            [0..30, 10_000_000..10_000_100]
        );
    }
}
