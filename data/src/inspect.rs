//! Every sample of a dataset in shard order (no shuffling), prepared as
//! training would prepare it: what `flamingoctl data inspect` prints and
//! what the parity tests compare with OpenFlamingo.

use std::sync::Arc;

use futures::StreamExt;

use crate::batch::decisions;
use crate::error::Result;
use crate::order::SampleRef;
use crate::prepare::Preparer;
use crate::reader::Dataset;
use crate::sample::{Prepared, Skipped};

const CHUNK: u64 = 64;

/// Calls `visit` for each sample, shard by shard, in shard order. With
/// augmentation on, each sample gets the decisions epoch 0 would give it
/// (LAION's per-batch flip as if the sample were its own batch).
pub async fn for_each_sample(
    dataset: &Arc<Dataset>,
    preparer: &Arc<Preparer>,
    seed: u64,
    mut visit: impl FnMut(Result<Prepared, Skipped>),
) -> Result<()> {
    let mut position = 0u64;
    for (shard, entry) in dataset.shards.iter().enumerate() {
        let count = entry.index.samples.len() as u64;
        let mut start = 0;
        while start < count {
            let refs: Vec<SampleRef> = (start..(start + CHUNK).min(count))
                .map(|sample| SampleRef {
                    shard: shard as u32,
                    sample,
                })
                .collect();
            let raws = dataset.read(&refs).await?;
            let jobs: Vec<_> = raws
                .into_iter()
                .zip(&refs)
                .enumerate()
                .map(|(offset, (raw, sample))| {
                    let choice =
                        decisions(&dataset.spec, seed, 0, position + offset as u64, *sample);
                    (raw, choice)
                })
                .collect();
            let preparer = preparer.clone();
            let prepared = futures::stream::iter(jobs)
                .map(|(raw, choice)| {
                    let preparer = preparer.clone();
                    tokio::task::spawn_blocking(move || {
                        let raw = raw?;
                        preparer.prepare(&raw, choice).map_err(|reject| Skipped {
                            shard: raw.shard.clone(),
                            key: raw.key.clone(),
                            reject,
                        })
                    })
                })
                .buffered(std::thread::available_parallelism().map_or(2, |n| n.get()))
                .collect::<Vec<_>>()
                .await;
            for result in prepared {
                match result {
                    Ok(sample) => visit(sample),
                    Err(error) => tracing::error!(%error, "preprocessing task failed"),
                }
            }
            position += refs.len() as u64;
            start += CHUNK;
        }
    }
    Ok(())
}
