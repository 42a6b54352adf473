//! The gRPC data service. Replicas share nothing: a stream is fully
//! described by its request, so any replica can serve it, and a replica
//! that dies is replaced by another from the rank's cursor.
//!
//! # Splitting one job's work over K replicas
//!
//! A global batch is the next `B` accepted samples of the epoch order, so
//! where a batch ends — and so where every later batch and rank slice
//! starts — depends on which samples preprocessing rejects. Cut into
//! shares, the work needs every replica to agree on the boundaries
//! without seeing the others' work. Two ways were weighed:
//!
//! - an exchange: replica k preprocesses every K-th run of positions and
//!   the replicas trade accept/reject bits before a batch can be cut. Cheap
//!   in bytes, but every batch waits for the slowest replica, and a dead
//!   replica stalls the others until its share is reassigned;
//! - acceptance decided ahead, once (chosen): `flamingoctl data index
//!   --accept` preprocesses each shard once and stores a verdict per sample
//!   next to it ([`flamingo_data::accept`]). From the verdicts, any replica
//!   plans any batch — its accepted samples, its skips with their reasons,
//!   its end — in microseconds, and preprocesses only what it serves. The
//!   seeded single-image drop of MMC4 is drawn at planning time as
//!   preprocessing draws it, so the plan equals the batch. The price is one
//!   validating pass over the data (as a conversion to MDS or a webdataset
//!   re-shard costs), redone when the filter options or tokenizer change
//!   (the file name carries their fingerprint).
//!
//! A stream names its share (`share` of `shares`): share k of a batch is
//! `rank_slice(n, K, k)` of its `n` accepted samples, and the stream
//! carries the part of its rank's slice inside it. The client asks replica
//! k for share k, so each accepted sample is preprocessed once in the
//! whole service; where ranks and shares line up (K divides the world) a
//! rank reads one replica, otherwise it joins the pieces of two. Batches
//! are bit-identical at any K and any world size.
//!
//! When a replica dies mid-epoch, the streams of its share fail over to
//! the next replica, which resumes them from the rank's cursor (the start
//! of the first batch not yet received), plans the same batch and
//! prepares the same piece: no sample is lost or repeated; that replica
//! then does two shares' work until the dead one is back.
//!
//! Without acceptance indexes (a dataset not yet judged, or judged under
//! other options), a replica preprocesses whole global batches, caching
//! each to cut every rank's piece from it: correct, but every replica
//! serving a job then does the whole job's work. The replica says so once
//! per dataset.
//!
//! # A replica per node
//!
//! The other layout: a replica on every node, each node's ranks streaming
//! their whole slices (one share) from it over loopback, the agent naming
//! it (`--data-service`). A planned slice request prepares only that
//! slice, so the replicas again split the job's work — by node instead of
//! by share — and batches cross the network only from storage to the node.
//! When a node's replica dies, its ranks fail over to the next replica in
//! their list from their cursors, exactly as above.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use flamingo_proto::v1 as pb;
use tokio::sync::OnceCell;
use tokio_stream::wrappers::ReceiverStream;

use flamingo_data::batch::{rank_slice, Assembler, Cursor, GlobalBatch, PrepareStats};
use flamingo_data::convert::{BatchFrame, ImageFormat, RankBatch};
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::{Storage, StorageOptions};
use flamingo_data::{DataError, Result};

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Preprocessing threads.
    pub threads: usize,
    /// Global batches a stream computes ahead of its reader.
    pub read_ahead: usize,
    /// Global batches kept for the other ranks of a job.
    pub cache_batches: usize,
    /// The most samples in one global batch (`batch_size × world_size`),
    /// checked before anything is allocated for a stream.
    pub max_global_batch: u64,
    /// Requests per second one client may send (0: no limit).
    pub max_requests_per_second: u32,
    pub storage: StorageOptions,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            read_ahead: 4,
            cache_batches: 64,
            max_global_batch: 65_536,
            max_requests_per_second: 1000,
            storage: StorageOptions::default(),
        }
    }
}

type BatchCell = Arc<OnceCell<Arc<GlobalBatch>>>;
type OpenedCell = Arc<OnceCell<Arc<Opened>>>;
/// (spec TOML, seed, global batch size, cursor)
type BatchKey = (String, u64, usize, Cursor);

#[derive(Debug)]
struct Opened {
    assembler: Arc<Assembler>,
    pad_token_id: i64,
    images_per_sample: usize,
    /// Said once: shares were asked of a dataset without verdicts.
    warned_unplanned: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub struct DataService {
    config: ServiceConfig,
    storage: Storage,
    pool: Arc<rayon::ThreadPool>,
    /// (spec TOML, seed) → opened dataset. The map's lock is held only to
    /// find or add a cell: a slow open (an object store listing thousands
    /// of shards) delays the streams of that dataset, not the others.
    opened: Mutex<HashMap<(String, u64), OpenedCell>>,
    /// (spec TOML, seed, global batch size, cursor) → batch, oldest first.
    batches: Mutex<(HashMap<BatchKey, BatchCell>, VecDeque<BatchKey>)>,
    stats: Arc<PrepareStats>,
    /// Streams served, and pieces (batches) sent.
    streams: std::sync::atomic::AtomicU64,
    pieces: std::sync::atomic::AtomicU64,
}

impl DataService {
    pub fn new(config: ServiceConfig) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .thread_name(|index| format!("prep-{index}"))
            .build()?;
        Ok(Self {
            storage: Storage::new(config.storage.clone()),
            pool: Arc::new(pool),
            config,
            opened: Default::default(),
            batches: Default::default(),
            stats: Arc::default(),
            streams: Default::default(),
            pieces: Default::default(),
        })
    }

    /// Prometheus text for `/metrics`: the work this replica did.
    pub fn prometheus_text(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let rows = [
            (
                "flamingo_data_samples_prepared_total",
                "Samples preprocessed (accepted or rejected).",
                self.stats.samples.load(Relaxed),
            ),
            (
                "flamingo_data_samples_accepted_total",
                "Samples preprocessed and accepted.",
                self.stats.accepted.load(Relaxed),
            ),
            (
                "flamingo_data_images_decoded_total",
                "Images decoded into accepted samples.",
                self.stats.images.load(Relaxed),
            ),
            (
                "flamingo_data_streams_total",
                "Batch streams opened.",
                self.streams.load(Relaxed),
            ),
            (
                "flamingo_data_batches_sent_total",
                "Batches (or pieces of batches) sent to ranks.",
                self.pieces.load(Relaxed),
            ),
        ];
        let mut text = String::new();
        for (name, help, value) in rows {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        text
    }

    async fn open(&self, spec_toml: &str, seed: u64) -> Result<Arc<Opened>> {
        let cell = self
            .opened
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .entry((spec_toml.to_string(), seed))
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.open_now(spec_toml, seed))
            .await
            .cloned()
    }

    async fn open_now(&self, spec_toml: &str, seed: u64) -> Result<Arc<Opened>> {
        let spec = DataSpec::from_toml(spec_toml, None)?;
        let preparer = Arc::new(Preparer::new(&spec)?);
        let dataset = Dataset::open(&spec, &self.storage).await?;
        tracing::info!(
            shards = dataset.shards.len(),
            samples = dataset.samples(),
            planned = dataset.verdicts.is_some(),
            "dataset opened"
        );
        let entry = Arc::new(Opened {
            pad_token_id: preparer.pad_token_id(),
            images_per_sample: spec.images_per_sample() as usize,
            assembler: Arc::new(
                Assembler::new(dataset, preparer, self.pool.clone(), seed)
                    .with_stats(self.stats.clone()),
            ),
            warned_unplanned: Default::default(),
        });
        Ok(entry)
    }

    async fn global_batch(
        &self,
        spec_toml: &str,
        seed: u64,
        size: usize,
        cursor: Cursor,
        assembler: &Assembler,
    ) -> Result<Arc<GlobalBatch>> {
        let key = (spec_toml.to_string(), seed, size, cursor);
        let cell = {
            let mut guard = self
                .batches
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let (cells, age) = &mut *guard;
            match cells.get(&key) {
                Some(cell) => cell.clone(),
                None => {
                    let cell: BatchCell = Arc::default();
                    cells.insert(key.clone(), cell.clone());
                    age.push_back(key);
                    while age.len() > self.config.cache_batches {
                        if let Some(old) = age.pop_front() {
                            cells.remove(&old);
                        }
                    }
                    cell
                }
            }
        };
        cell.get_or_try_init(|| async { assembler.batch(cursor, size).await.map(Arc::new) })
            .await
            .cloned()
    }

    pub async fn validate(&self, spec_toml: &str) -> Result<(u64, u64)> {
        let spec = DataSpec::from_toml(spec_toml, None)?;
        Preparer::new(&spec)?;
        let dataset = Dataset::open(&spec, &self.storage).await?;
        Ok((dataset.shards.len() as u64, dataset.samples()))
    }

    /// Starts the stream of `request`'s rank: batches are computed ahead
    /// (bounded by `read_ahead`) by a task that ends with the receiver.
    pub async fn stream(
        self: &Arc<Self>,
        request: pb::StreamBatchesRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<pb::Batch, tonic::Status>>> {
        let world = request.world_size as usize;
        let rank = request.rank as usize;
        if world == 0 || rank >= world {
            return Err(DataError::spec(
                "rank",
                format!("rank {rank} is not in a world of {world}"),
            ));
        }
        if request.batch_size == 0 {
            return Err(DataError::spec("batch_size", "must be at least 1"));
        }
        let global = u64::from(request.batch_size) * u64::from(request.world_size);
        if global > self.config.max_global_batch {
            return Err(DataError::spec(
                "batch_size",
                format!(
                    "{} per rank × world_size {} = {global} samples a global batch, more than this \
                     service's limit of {} (--max-global-batch)",
                    request.batch_size, request.world_size, self.config.max_global_batch
                ),
            ));
        }
        let shares = request.shares.max(1);
        if shares > MAX_SHARES || request.share >= shares {
            return Err(DataError::spec(
                "share",
                format!(
                    "share {} of {} (shares are numbered from 0, at most {MAX_SHARES})",
                    request.share, request.shares
                ),
            ));
        }
        let opened = self.open(&request.spec_toml, request.seed).await?;
        if shares > 1
            && !opened.assembler.planned()
            && !opened
                .warned_unplanned
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                shares,
                "this dataset has no acceptance indexes: every replica preprocesses whole batches \
                 ({shares}x the work); run `flamingoctl data index --accept <spec>` once to split it"
            );
        }
        self.streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let format = pb::ImageFormat::try_from(request.image_format)
            .map(ImageFormat::from)
            .unwrap_or_default();
        let size = request.batch_size as usize * world;
        let (sender, receiver) = tokio::sync::mpsc::channel(self.config.read_ahead.max(1));
        let service = self.clone();
        let mut cursor = request.cursor.map(Cursor::from).unwrap_or_default();
        let share = (request.share as usize, shares as usize);
        tokio::spawn(async move {
            loop {
                if request.end_epoch > 0 && cursor.epoch >= request.end_epoch {
                    return;
                }
                let piece = service
                    .piece(
                        &request,
                        &opened,
                        size,
                        cursor,
                        (rank, world),
                        share,
                        format,
                    )
                    .await;
                let message = piece.map(|piece| {
                    cursor = piece.next;
                    pb::Batch::from(piece)
                });
                let failed = message.is_err();
                service
                    .pieces
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if sender
                    .send(message.map_err(tonic::Status::from))
                    .await
                    .is_err()
                    || failed
                {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    /// The part of rank `rank`'s slice of the batch at `cursor` that lies
    /// in share `share.0` of `share.1`.
    #[allow(clippy::too_many_arguments)]
    async fn piece(
        &self,
        request: &pb::StreamBatchesRequest,
        opened: &Opened,
        size: usize,
        cursor: Cursor,
        (rank, world): (usize, usize),
        (share, shares): (usize, usize),
        format: ImageFormat,
    ) -> Result<RankBatch> {
        let part = |n: usize| {
            let slice = rank_slice(n, world, rank);
            let cut = rank_slice(n, shares, share);
            slice.start.max(cut.start)..slice.end.min(cut.end).max(slice.start.max(cut.start))
        };
        let assembler = &opened.assembler;
        if assembler.planned() {
            let plan = assembler.plan(cursor, size)?;
            let range = part(plan.accepted.len());
            let (samples, extra) = assembler.prepare_planned(&plan, range).await?;
            let mut skipped = plan.skipped;
            skipped.extend(extra);
            let frame = BatchFrame {
                start: plan.start,
                next: plan.next,
                last_in_epoch: plan.last_in_epoch,
                skipped,
            };
            return Ok(RankBatch::from_samples(
                frame,
                &samples,
                opened.images_per_sample,
                opened.pad_token_id,
                format,
            ));
        }
        let batch = self
            .global_batch(&request.spec_toml, request.seed, size, cursor, assembler)
            .await?;
        let frame = BatchFrame {
            start: batch.start,
            next: batch.next,
            last_in_epoch: batch.last_in_epoch,
            skipped: batch.skipped.clone(),
        };
        Ok(RankBatch::from_samples(
            frame,
            &batch.samples[part(batch.samples.len())],
            opened.images_per_sample,
            opened.pad_token_id,
            format,
        ))
    }
}

/// The most shares one batch is cut into (replicas serving one job).
const MAX_SHARES: u32 = 4096;

/// The tonic adapter.
#[derive(Debug, Clone)]
pub struct Grpc(pub Arc<DataService>, pub Arc<crate::access::Access>);

#[tonic::async_trait]
impl pb::data_service_server::DataService for Grpc {
    type StreamBatchesStream = ReceiverStream<Result<pb::Batch, tonic::Status>>;

    async fn stream_batches(
        &self,
        request: tonic::Request<pb::StreamBatchesRequest>,
    ) -> Result<tonic::Response<Self::StreamBatchesStream>, tonic::Status> {
        self.1
            .check_caller(&request, &request.get_ref().rank_token)?;
        self.1.check_spec(&request.get_ref().spec_toml)?;
        let receiver = self.0.stream(request.into_inner()).await?;
        Ok(tonic::Response::new(ReceiverStream::new(receiver)))
    }

    async fn validate_spec(
        &self,
        request: tonic::Request<pb::ValidateSpecRequest>,
    ) -> Result<tonic::Response<pb::ValidateSpecResponse>, tonic::Status> {
        self.1.check_spec(&request.get_ref().spec_toml)?;
        let (shards, samples) = self.0.validate(&request.into_inner().spec_toml).await?;
        Ok(tonic::Response::new(pb::ValidateSpecResponse {
            shards,
            samples,
        }))
    }
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    service: Arc<DataService>,
    access: crate::access::Access,
    tls: Option<tonic::transport::ServerTlsConfig>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Requests per second per client, streams in flight per connection (a
    // node's ranks share one), small requests (a data spec), batches as
    // large as they come.
    let limiter = flamingo_security::RateLimiter::new(
        flamingo_security::RateBudget::per_second(service.config.max_requests_per_second),
        "data service",
        "--max-requests-per-second",
    );
    let mut builder = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(256)
        .timeout(std::time::Duration::from_secs(600));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .layer(flamingo_security::RateLimitLayer::new(Some(limiter)))
        .add_service(
            pb::data_service_server::DataServiceServer::new(Grpc(service, Arc::new(access)))
                .max_decoding_message_size(1 << 20)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
