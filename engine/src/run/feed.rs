//! Where a rank's batches come from: read and prepared in this process, or
//! streamed from data-service replicas, with the data cursor that
//! checkpoints save.

use std::path::Path;
use std::sync::Arc;

use flamingo_common::train::TrainJob;
use flamingo_data::batch::{Assembler, Cursor};
use flamingo_data::client::{BatchStream, StreamConfig};
use flamingo_data::convert::{ImageFormat, RankBatch};
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::sample::Skipped;
use flamingo_data::spec::{DataSpec, DatasetKind, Mmc4Options};
use flamingo_data::store::Storage;

use crate::batch::TrainBatch;

/// One batch and where it came from (for the sample audit).
pub(crate) struct Fetched {
    pub(crate) batch: TrainBatch,
    pub(crate) keys: Vec<String>,
    pub(crate) epoch: u64,
    /// Samples the pipeline skipped for this batch; rank 0's only (the
    /// global batch's, told once).
    pub(crate) skipped: Vec<Skipped>,
}

/// Where a rank's batches come from.
enum Source {
    /// Read and prepared in this process.
    Local(Assembler),
    /// Streamed from data-service replicas (started at the first batch, so
    /// that a resumed cursor is used).
    Remote {
        config: StreamConfig,
        stream: Option<BatchStream>,
    },
}

/// A dataset's stream on this rank.
pub(crate) struct Feed {
    source: Source,
    pub(crate) cursor: Cursor,
    images_per_sample: usize,
    pad: i64,
    per_rank: usize,
}

/// The dataset spec a run's flags describe for `kind`.
fn data_spec(
    job: &TrainJob,
    kind: DatasetKind,
    shards: &str,
    tokenizer: &Path,
    image_size: i64,
) -> anyhow::Result<DataSpec> {
    let samples = match kind {
        DatasetKind::Laion => job.train_num_samples_laion,
        DatasetKind::Mmc4 => job.train_num_samples_mmc4,
    };
    let spec = DataSpec {
        dataset: kind,
        shards: None,
        sources: vec![flamingo_data::spec::Source {
            shards: shards.to_string(),
            weight: 1.0,
        }],
        tokenizer: tokenizer.display().to_string(),
        resampled: job.dataset_resampled,
        samples_per_epoch: if job.dataset_resampled { samples } else { 0 },
        shuffle_block: 1000,
        shuffle_shards: true,
        image_size: image_size as u32,
        augment: true,
        drop_last: true,
        laion: Default::default(),
        mmc4: Mmc4Options {
            sim_threshold: job.mmc4_textsim_threshold,
            min_images: job.mmc4_min_num_images,
            max_images: job.mmc4_max_num_images,
            ..Mmc4Options::default()
        },
    };
    // Local paths absolute: a data service may run elsewhere.
    Ok(DataSpec::from_toml(
        &spec.to_toml(),
        Some(&std::env::current_dir()?),
    )?)
}

/// The job's own replicas (`--data_service`), which split every batch
/// between them; else the node's (`FLAMINGO_DATA_SERVICE`, which the agent
/// passes on: its node's replica first, which serves this rank's whole
/// slice, then those that stand in for it); none: the shards are read in
/// this process. Returns the endpoints and whether they split the batches.
fn replicas(job: &TrainJob) -> (Vec<String>, bool) {
    if !job.data_service.is_empty() {
        return (job.data_service.clone(), true);
    }
    let node = std::env::var("FLAMINGO_DATA_SERVICE")
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|endpoint| !endpoint.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    (node, false)
}

impl Feed {
    pub(crate) fn open(
        job: &TrainJob,
        kind: DatasetKind,
        shards: &str,
        tokenizer: &Path,
        image_size: i64,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let spec = data_spec(job, kind, shards, tokenizer, image_size)?;
        let per_rank = match kind {
            DatasetKind::Laion => job.batch_size_laion as usize,
            DatasetKind::Mmc4 => job.batch_size_mmc4 as usize,
        };
        let images_per_sample = spec.images_per_sample() as usize;
        let (endpoints, split) = replicas(job);
        if !endpoints.is_empty() {
            let config = StreamConfig {
                endpoints,
                split,
                spec_toml: spec.to_toml(),
                seed: job.seed,
                rank: 0,
                world_size: 1,
                batch_size: per_rank as u32,
                image_format: ImageFormat::Uint8,
                cursor: Cursor::default(),
                end_epoch: 0,
                buffer_depth: 4,
                reconnect_for: std::time::Duration::from_secs(120),
            };
            return Ok(Self {
                source: Source::Remote {
                    config,
                    stream: None,
                },
                cursor: Cursor::default(),
                images_per_sample,
                pad: 0,
                per_rank,
            });
        }
        let dataset = runtime.block_on(Dataset::open(&spec, &Storage::default()))?;
        let preparer = Arc::new(Preparer::new(&spec)?);
        let pad = preparer.pad_token_id();
        let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(1).build()?);
        Ok(Self {
            source: Source::Local(Assembler::new(dataset, preparer, pool, job.seed)),
            cursor: Cursor::default(),
            images_per_sample,
            pad,
            per_rank,
        })
    }

    /// This rank's slice of the next global batch.
    pub(crate) fn next(
        &mut self,
        rank: usize,
        world: usize,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Fetched> {
        let assembler = match &mut self.source {
            Source::Local(assembler) => assembler,
            Source::Remote { config, stream } => {
                if stream.is_none() {
                    config.rank = rank as u32;
                    config.world_size = world as u32;
                    config.cursor = self.cursor;
                    let config = config.clone();
                    *stream = Some(runtime.block_on(async move { BatchStream::start(config) }));
                }
                let stream = stream
                    .as_mut()
                    .ok_or_else(|| anyhow::anyhow!("no batch stream"))?;
                let batch = runtime
                    .block_on(stream.next())
                    .ok_or_else(|| anyhow::anyhow!("the data service ended the stream"))??;
                self.cursor = batch.next;
                return Ok(Fetched {
                    batch: TrainBatch::from_rank_batch(&batch),
                    keys: batch.keys.clone(),
                    epoch: batch.start.epoch,
                    // Every rank receives the global batch's skips; rank 0
                    // tells them.
                    skipped: if rank == 0 {
                        batch.skipped.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        };
        let global = runtime.block_on(assembler.batch(self.cursor, self.per_rank * world))?;
        for skip in global.skipped.iter().filter(|_| rank == 0) {
            tracing::debug!(shard = %skip.shard, key = %skip.key, reason = %skip.reject.reason, detail = %skip.reject.detail, "sample skipped");
        }
        self.cursor = global.next;
        let slice = RankBatch::from_global(
            &global,
            rank,
            world,
            self.images_per_sample,
            self.pad,
            ImageFormat::Uint8,
        );
        Ok(Fetched {
            batch: TrainBatch::from_rank_batch(&slice),
            keys: slice.keys.clone(),
            epoch: slice.start.epoch,
            // The global batch's skips, told once (by rank 0).
            skipped: if rank == 0 {
                global.skipped.clone()
            } else {
                Vec::new()
            },
        })
    }
}
