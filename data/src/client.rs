//! The rank side of the batch stream: a bounded buffer of ready batches fed
//! by background tasks that reconnect — to the next replica, or the same
//! one restarted — from the cursor after the last batch they received, so
//! a broken stream neither loses nor repeats a batch.
//!
//! With K replicas, each global batch is cut into K shares and replica k
//! preprocesses share k (see the data service's module doc). A rank reads
//! the pieces of its slice from the replicas whose shares it overlaps —
//! one replica when ranks and shares line up (K divides the world), two at
//! most otherwise — and joins them. A piece's stream fails over to the
//! next replica in turn, which then serves that share from the same
//! cursor.
//!
//! With a replica on every node instead (`split` off), a rank reads its
//! whole slice from its node's replica — over loopback, so batches cross
//! the network only from object storage to the node — and the node's
//! replica prepares only its ranks' slices when the dataset is judged.
//! The other nodes' replicas stand in when it is down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flamingo_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::batch::Cursor;
use crate::convert::{ImageFormat, RankBatch};
use crate::error::DataError;

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Data service replicas (`http://host:port`): with `split`, replica k
    /// serves share k of each batch and the next ones stand in for it;
    /// without, the first (the node's own replica) serves the rank's whole
    /// slice and the others stand in for it in turn.
    pub endpoints: Vec<String>,
    /// The replicas split every batch between them (a job's own replicas)
    /// rather than each node's ranks reading from their node's replica.
    pub split: bool,
    pub spec_toml: String,
    pub seed: u64,
    pub rank: u32,
    pub world_size: u32,
    /// Samples per rank per batch.
    pub batch_size: u32,
    pub image_format: ImageFormat,
    pub cursor: Cursor,
    /// Stop after the batch that ends this epoch (0 = never).
    pub end_epoch: u64,
    /// Ready batches held on the rank.
    pub buffer_depth: usize,
    /// Give up when no replica has answered for this long.
    pub reconnect_for: Duration,
}

#[derive(Debug)]
pub struct BatchStream {
    receiver: mpsc::Receiver<Result<RankBatch, DataError>>,
    task: JoinHandle<()>,
    reconnects: Arc<AtomicU64>,
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BatchStream {
    pub fn start(config: StreamConfig) -> Self {
        let (sender, receiver) = mpsc::channel(config.buffer_depth.max(1));
        let reconnects = Arc::new(AtomicU64::new(0));
        let shares = match config.split {
            true => config.endpoints.len().max(1) as u32,
            false => 1,
        };
        let mine = shares_of(config.rank, config.world_size, shares);
        let task = if mine.len() == 1 {
            tokio::spawn(feed(config, mine[0], shares, sender, reconnects.clone()))
        } else {
            let mut pieces = Vec::new();
            let mut feeds = Vec::new();
            for share in mine {
                let (piece_sender, piece_receiver) = mpsc::channel(config.buffer_depth.max(1));
                feeds.push(tokio::spawn(feed(
                    config.clone(),
                    share,
                    shares,
                    piece_sender,
                    reconnects.clone(),
                )));
                pieces.push(piece_receiver);
            }
            tokio::spawn(join(pieces, feeds, sender))
        };
        Self {
            receiver,
            task,
            reconnects,
        }
    }

    /// Times the stream broke and was resumed from its cursor.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The next batch; `None` when the requested epochs are done.
    pub async fn next(&mut self) -> Option<Result<RankBatch, DataError>> {
        self.receiver.recv().await
    }
}

/// The shares (of `shares`) that rank `rank` of `world`'s slice overlaps
/// for some batch size: slice `[r/W, (r+1)/W)` against share
/// `[k/K, (k+1)/K)` of the batch.
pub fn shares_of(rank: u32, world: u32, shares: u32) -> Vec<u32> {
    let (rank, world, shares) = (u64::from(rank), u64::from(world.max(1)), u64::from(shares));
    (0..shares)
        .filter(|share| share * world < (rank + 1) * shares && rank * shares < (share + 1) * world)
        .map(|share| share as u32)
        .collect()
}

/// Joins one piece from each share's stream into the rank's batch.
async fn join(
    mut pieces: Vec<mpsc::Receiver<Result<RankBatch, DataError>>>,
    feeds: Vec<JoinHandle<()>>,
    sender: mpsc::Sender<Result<RankBatch, DataError>>,
) {
    struct AbortAll(Vec<JoinHandle<()>>);
    impl Drop for AbortAll {
        fn drop(&mut self) {
            for feed in &self.0 {
                feed.abort();
            }
        }
    }
    let _feeds = AbortAll(feeds);
    loop {
        let mut batch = Vec::with_capacity(pieces.len());
        for receiver in &mut pieces {
            match receiver.recv().await {
                Some(Ok(piece)) => batch.push(piece),
                Some(Err(error)) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                None => return,
            }
        }
        let joined = RankBatch::join(batch);
        let failed = joined.is_err();
        if sender.send(joined).await.is_err() || failed {
            return;
        }
    }
}

fn refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
    )
}

/// Passes a refusal on to the rank; the stream ends there.
async fn refuse(sender: &mpsc::Sender<Result<RankBatch, DataError>>, status: &tonic::Status) {
    let _ = sender
        .send(Err(DataError::Refused {
            message: status.message().to_string(),
        }))
        .await;
}

/// Streams share `share` of the rank's slice, from replica `share` first.
async fn feed(
    config: StreamConfig,
    share: u32,
    shares: u32,
    sender: mpsc::Sender<Result<RankBatch, DataError>>,
    reconnects: Arc<AtomicU64>,
) {
    let mut cursor = config.cursor;
    let mut replica = share as usize;
    let mut backoff = Duration::from_millis(50);
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut last_error = String::from("none");
    loop {
        if config.end_epoch > 0 && cursor.epoch >= config.end_epoch {
            return;
        }
        if let Some(since) = failing_since {
            if since.elapsed() > config.reconnect_for {
                let _ = sender
                    .send(Err(DataError::Unreachable {
                        seconds: config.reconnect_for.as_secs(),
                        last: last_error,
                    }))
                    .await;
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        let endpoint = config.endpoints[replica % config.endpoints.len()].clone();
        replica += 1;
        let request = pb::StreamBatchesRequest {
            spec_toml: config.spec_toml.clone(),
            seed: config.seed,
            cursor: Some(cursor.into()),
            rank: config.rank,
            world_size: config.world_size,
            batch_size: config.batch_size,
            image_format: pb::ImageFormat::from(config.image_format) as i32,
            end_epoch: config.end_epoch,
            // The rank's credential (the agent sets it); the service checks
            // it when it holds the cluster's rank key.
            rank_token: std::env::var(flamingo_security::ENV_RANK_TOKEN).unwrap_or_default(),
            share,
            shares,
        };
        let channel = match data_endpoint(&endpoint) {
            Ok(channel) => channel,
            Err(error) => {
                let _ = sender
                    .send(Err(DataError::Refused {
                        message: error.to_string(),
                    }))
                    .await;
                return;
            }
        };
        let connected = tokio::time::timeout(Duration::from_secs(5), channel.connect()).await;
        let mut client = match connected {
            Ok(Ok(channel)) => pb::data_service_client::DataServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX),
            Ok(Err(error)) => {
                last_error = format!("{endpoint}: {error}");
                failing_since.get_or_insert_with(tokio::time::Instant::now);
                continue;
            }
            Err(_) => {
                last_error = format!("{endpoint}: connect timed out");
                failing_since.get_or_insert_with(tokio::time::Instant::now);
                continue;
            }
        };
        let mut stream = match client.stream_batches(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if refused(&status) => {
                return refuse(&sender, &status).await;
            }
            Err(status) => {
                last_error = format!("{endpoint}: {}", status.message());
                failing_since.get_or_insert_with(tokio::time::Instant::now);
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    let batch = match RankBatch::try_from(message) {
                        Ok(batch) => batch,
                        Err(error) => {
                            let _ = sender.send(Err(error)).await;
                            return;
                        }
                    };
                    failing_since = None;
                    backoff = Duration::from_millis(50);
                    cursor = batch.next;
                    if sender.send(Ok(batch)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    // A clean end is the server's end of the epochs asked
                    // for; anything else is a broken stream (the loop
                    // checks which).
                    if config.end_epoch > 0 && cursor.epoch >= config.end_epoch {
                        return;
                    }
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    last_error = format!("{endpoint}: stream ended early");
                    failing_since.get_or_insert_with(tokio::time::Instant::now);
                    break;
                }
                Err(status) if refused(&status) => {
                    return refuse(&sender, &status).await;
                }
                Err(status) => {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%endpoint, share, error = %status.message(), ?cursor, "batch stream broke; reconnecting");
                    last_error = format!("{endpoint}: {}", status.message());
                    failing_since.get_or_insert_with(tokio::time::Instant::now);
                    break;
                }
            }
        }
    }
}

/// The replica's endpoint: mutual TLS with this process's credentials
/// (`FLAMINGO_TLS_*`) when it has them. A batch is megabytes, so the
/// HTTP/2 windows and frames are sized for it: with the 64 KiB defaults
/// the rank sends a window update every few frames and handles every
/// 16 KiB frame on its own, which cost a fifth of its receiving CPU.
fn data_endpoint(
    url: &str,
) -> Result<tonic::transport::Endpoint, flamingo_security::SecurityError> {
    let tls = flamingo_security::client_tls_from_env()?;
    Ok(
        flamingo_security::endpoint(url, tls.as_ref(), flamingo_security::DATA_SERVICE_NAME)?
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(2 * STREAM_WINDOW)
            .max_frame_size(FRAME),
    )
}

/// Bytes a replica may send a rank's stream ahead of what it has read:
/// about a batch of 8 images at 224 px, beyond the rank's own buffer.
const STREAM_WINDOW: u32 = 2 << 20;
/// The largest HTTP/2 frame the rank accepts.
const FRAME: u32 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::rank_slice;

    #[test]
    fn a_rank_reads_every_share_its_slice_overlaps_and_no_other() {
        for world in 1..10u32 {
            for shares in 1..6u32 {
                for rank in 0..world {
                    let mine = shares_of(rank, world, shares);
                    for n in 0..40usize {
                        let slice = rank_slice(n, world as usize, rank as usize);
                        for share in 0..shares {
                            let part = rank_slice(n, shares as usize, share as usize);
                            let overlap = slice.start.max(part.start) < slice.end.min(part.end);
                            assert!(
                                !overlap || mine.contains(&share),
                                "rank {rank}/{world} misses share {share}/{shares} at n={n}"
                            );
                        }
                    }
                    assert!(mine.len() <= (shares / world + 2) as usize, "{mine:?}");
                }
            }
        }
        assert_eq!(shares_of(1, 4, 2), [0]);
        assert_eq!(shares_of(1, 4, 3), [0, 1]);
        assert_eq!(shares_of(3, 8, 1), [0]);
    }
}
