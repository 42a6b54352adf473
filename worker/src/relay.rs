//! The agent's metrics relay: the node's ranks hand their batches to their
//! agent (over the agent's own service, on the node), and the agent sends
//! the node's batches to the coordinator as one call about once a second.
//! A 4,096-node cluster with 8 ranks a node then makes 4,096 calls a
//! second to the coordinator instead of 32,768. Each batch keeps its
//! rank's credential, which the coordinator checks.
//!
//! A rank's exit is reported only after its batches went out (the reporter
//! flushes the relay first), so a job that succeeded has all its curves.

use std::sync::Mutex;
use std::time::Duration;

use flamingo_proto::v1 as pb;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use flamingo_security::Failover;
use tokio_util::sync::CancellationToken;

/// Batches held at most (a coordinator out of reach costs this much
/// memory, no more); past it a rank's batch is refused and counted by the
/// rank as dropped.
const MAX_QUEUED: usize = 4096;
/// How often the queue goes out.
pub const RELAY_INTERVAL: Duration = Duration::from_secs(1);

pub struct Relay {
    node_id: String,
    client: NodeServiceClient<Failover>,
    queue: Mutex<Vec<pb::MetricsBatch>>,
    /// One flush at a time, so batches leave in order.
    sending: tokio::sync::Mutex<()>,
}

impl Relay {
    pub fn new(node_id: String, client: NodeServiceClient<Failover>) -> Self {
        Self {
            node_id,
            client,
            queue: Mutex::default(),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    /// Queues a rank's batch; refused when the queue is full.
    pub fn push(&self, batch: pb::MetricsBatch) -> Result<(), tonic::Status> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= MAX_QUEUED {
            return Err(tonic::Status::resource_exhausted(format!(
                "the agent holds {MAX_QUEUED} metrics batches it could not send yet"
            )));
        }
        queue.push(batch);
        Ok(())
    }

    /// Sends everything queued as one call. Batches the coordinator did not
    /// take (it was out of reach) are dropped, as a rank's own would be:
    /// each rank reports what it dropped in its next batch.
    pub async fn flush(&self) {
        let _one_at_a_time = self.sending.lock().await;
        let batches = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        if batches.is_empty() {
            return;
        }
        let count = batches.len();
        let sent = self
            .client
            .clone()
            .report_node_metrics(pb::NodeMetrics {
                node_id: self.node_id.clone(),
                batches,
            })
            .await;
        match sent {
            Ok(response) if response.get_ref().refused > 0 => tracing::debug!(
                refused = response.get_ref().refused,
                count,
                "the coordinator refused some metrics batches"
            ),
            Ok(_) => {}
            Err(status) => {
                tracing::debug!(%status, count, "metrics batches not delivered; dropped")
            }
        }
    }

    /// Flushes every [`RELAY_INTERVAL`] until `stop`, then once more.
    pub async fn run(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(RELAY_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.flush().await;
                    return;
                }
                _ = ticker.tick() => self.flush().await,
            }
        }
    }
}
