//! Delivers rank reports to the coordinator in order, retrying through
//! coordinator restarts: an exit that happened while no coordinator was up
//! still arrives. An exit goes after the node's queued metrics batches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flamingo_proto::v1 as pb;
use flamingo_proto::v1::node_service_client::NodeServiceClient;
use flamingo_security::Failover;
use tokio::sync::mpsc;

use crate::ranks::RankKey;

#[derive(Clone, Default)]
pub struct Backlog(Arc<AtomicUsize>);

impl Backlog {
    pub fn pending(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Returns the sender the rank supervisor reports through and a counter of
/// reports not yet delivered.
pub fn spawn(
    client: NodeServiceClient<Failover>,
    node_id: String,
    relay: Arc<crate::relay::Relay>,
) -> (
    mpsc::UnboundedSender<(RankKey, pb::rank_report::Event)>,
    Backlog,
) {
    let (reports_tx, mut reports_rx) =
        mpsc::unbounded_channel::<(RankKey, pb::rank_report::Event)>();
    let backlog = Backlog::default();
    let counter = backlog.clone();
    let (counted_tx, mut counted_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(report) = reports_rx.recv().await {
            counter.0.fetch_add(1, Ordering::SeqCst);
            if counted_tx.send(report).is_err() {
                return;
            }
        }
    });
    let counter = backlog.clone();
    tokio::spawn(async move {
        while let Some(((job_id, attempt, rank), event)) = counted_rx.recv().await {
            // The rank's last metrics go out before its exit is reported.
            if matches!(event, pb::rank_report::Event::Exited(_)) {
                relay.flush().await;
            }
            let report = pb::RankReport {
                node_id: node_id.clone(),
                job_id: job_id.0.clone(),
                rank,
                attempt,
                event: Some(event),
            };
            let mut delay = Duration::from_millis(100);
            loop {
                match client.clone().report_rank(report.clone()).await {
                    Ok(_) => break,
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        tracing::error!(%status, "coordinator rejected a rank report; dropping it");
                        break;
                    }
                    Err(status) => {
                        tracing::debug!(%status, "rank report not delivered; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
            counter.0.fetch_sub(1, Ordering::SeqCst);
        }
    });
    (reports_tx, backlog)
}
