//! The rank side of the batch stream: a bounded buffer of ready batches fed
//! by a background task that reconnects — to the next replica, or the same
//! one restarted — from the cursor after the last batch it received, so a
//! broken stream neither loses nor repeats a batch.

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
    /// Data service replicas (`http://host:port`); tried in turn.
    pub endpoints: Vec<String>,
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
        let task = tokio::spawn(feed(config, sender, reconnects.clone()));
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

async fn feed(
    config: StreamConfig,
    sender: mpsc::Sender<Result<RankBatch, DataError>>,
    reconnects: Arc<AtomicU64>,
) {
    let mut cursor = config.cursor;
    let mut replica = 0usize;
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
                    tracing::warn!(%endpoint, error = %status.message(), ?cursor, "batch stream broke; reconnecting");
                    last_error = format!("{endpoint}: {}", status.message());
                    failing_since.get_or_insert_with(tokio::time::Instant::now);
                    break;
                }
            }
        }
    }
}

/// The replica's endpoint: mutual TLS with this process's credentials
/// (`FLAMINGO_TLS_*`) when it has them.
fn data_endpoint(
    url: &str,
) -> Result<tonic::transport::Endpoint, flamingo_security::SecurityError> {
    let tls = flamingo_security::client_tls_from_env()?;
    flamingo_security::endpoint(url, tls.as_ref(), flamingo_security::DATA_SERVICE_NAME)
}
