//! The agent's own gRPC service: rank logs, read (and followed) from disk,
//! for the coordinator to proxy to `flamingoctl logs`; and the node's ranks'
//! metrics batches, relayed to the coordinator (see [`crate::relay`]).

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use flamingo_common::JobId;
use flamingo_proto::v1 as pb;
use tokio::io::AsyncReadExt;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::ranks::{log_path, Ranks};

pub struct LogService {
    pub state_dir: PathBuf,
    pub ranks: Ranks,
    /// Over mutual TLS: only the coordinator (which checked the user) or
    /// an admin may read.
    pub secure: bool,
    /// This node, whose ranks (holding its certificate) hand their metrics
    /// batches to `relay`.
    pub node_id: String,
    pub relay: std::sync::Arc<crate::relay::Relay>,
}

/// Who holds the client certificate of `request`.
fn peer_identity<T>(request: &Request<T>) -> Result<flamingo_security::Identity, Status> {
    let cert = request
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let peer = flamingo_security::PeerCertificate::from_der(&cert)
        .map_err(|error| Status::unauthenticated(error.to_string()))?;
    Ok(peer.identity)
}

impl LogService {
    /// A rank of this node: it holds the node's own certificate.
    fn authorize_rank<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.secure {
            return Ok(());
        }
        match peer_identity(request)? {
            flamingo_security::Identity::Node { ref id } if *id == self.node_id => Ok(()),
            other => Err(Status::permission_denied(format!(
                "metrics come from this node's ranks (node {}'s certificate); not from {other}",
                self.node_id
            ))),
        }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.secure {
            return Ok(());
        }
        match peer_identity(request)? {
            flamingo_security::Identity::Service { ref name } if name == "coordinator" => Ok(()),
            flamingo_security::Identity::User {
                role: flamingo_security::Role::Admin,
                ..
            } => Ok(()),
            other => Err(Status::permission_denied(format!(
                "rank logs are read through the coordinator; {other} may not read them here"
            ))),
        }
    }
}

/// A job id safe to use as a folder name: letters, digits, '-', '_' and
/// '.', not starting with '.'.
fn check_job_id(job_id: &str) -> Result<(), Status> {
    let fine = !job_id.is_empty()
        && job_id.len() <= 128
        && !job_id.starts_with('.')
        && job_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "job_id '{job_id}': not a job id (letters, digits, '-', '_', '.')"
        )))
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

/// Rotates `path` when it holds more than `max_bytes`, as logrotate's
/// `copytruncate` does (the rank keeps writing to the same open file, in
/// append mode): `.1` … `.keep` shift up, the file is copied to `.1` and
/// truncated. Lines written between the copy and the truncation are lost
/// (a few, at most). Returns whether it rotated.
pub fn rotate_if_large(path: &std::path::Path, max_bytes: u64, keep: u32) -> std::io::Result<bool> {
    if std::fs::metadata(path)?.len() <= max_bytes {
        return Ok(false);
    }
    let numbered = |index: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{index}"));
        PathBuf::from(name)
    };
    for index in (1..keep).rev() {
        match std::fs::rename(numbered(index), numbered(index + 1)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    if keep > 0 {
        std::fs::copy(path, numbered(1))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// Every 5 s, rotates the rank logs under `state_dir` that outgrew
/// `max_bytes` (until `stop`).
pub async fn rotate_logs(
    state_dir: PathBuf,
    max_bytes: u64,
    keep: u32,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let Ok(jobs) = std::fs::read_dir(state_dir.join("jobs")) else {
            continue;
        };
        for job in jobs.flatten() {
            let Ok(files) = std::fs::read_dir(job.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                if path.extension().is_some_and(|extension| extension == "log") {
                    match rotate_if_large(&path, max_bytes, keep) {
                        Ok(true) => tracing::info!(log = %path.display(), "rank log rotated"),
                        Ok(false) => {}
                        Err(error) => {
                            tracing::warn!(log = %path.display(), %error, "rank log rotation failed")
                        }
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for LogService {
    type ReadLogStream = ChunkStream;

    async fn report_metrics_batch(
        &self,
        request: Request<pb::MetricsBatch>,
    ) -> Result<Response<pb::MetricsReportResponse>, Status> {
        self.authorize_rank(&request)?;
        let mut batch = request.into_inner();
        // The coordinator checks the batch's rank credential; the node is
        // this one.
        batch.node_id = self.node_id.clone();
        self.relay.push(batch)?;
        Ok(Response::new(pb::MetricsReportResponse {}))
    }

    async fn read_log(
        &self,
        request: Request<pb::ReadLogRequest>,
    ) -> Result<Response<Self::ReadLogStream>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        check_job_id(&request.job_id)?;
        let job_id = JobId(request.job_id);
        let path = log_path(&self.state_dir, &job_id, request.rank);
        let mut file = tokio::fs::File::open(&path).await.map_err(|error| {
            Status::not_found(format!(
                "log {}: {error} (has the rank started?)",
                path.display()
            ))
        })?;
        let ranks = self.ranks.clone();
        let rank = request.rank;
        let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 64 * 1024];
            let mut position = 0u64;
            loop {
                match file.read(&mut buffer).await {
                    Ok(0) => {
                        // Rotated under a follower (truncated to less than
                        // was read): go on from the new start.
                        if file
                            .metadata()
                            .await
                            .is_ok_and(|meta| meta.len() < position)
                        {
                            use tokio::io::AsyncSeekExt;
                            if file.seek(std::io::SeekFrom::Start(0)).await.is_ok() {
                                position = 0;
                                continue;
                            }
                        }
                        // At the end: stop unless following a live rank.
                        if !request.follow || !ranks.is_running(&job_id, rank) {
                            // One more read catches output written just before exit.
                            if let Ok(read) = file.read(&mut buffer).await {
                                if read > 0 {
                                    let _ = chunks_tx
                                        .send(Ok(pb::LogChunk {
                                            data: buffer[..read].to_vec(),
                                        }))
                                        .await;
                                    continue;
                                }
                            }
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(read) => {
                        position += read as u64;
                        let chunk = pb::LogChunk {
                            data: buffer[..read].to_vec(),
                        };
                        if chunks_tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        let _ = chunks_tx
                            .send(Err(Status::internal(format!("reading the log: {error}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(chunks_rx),
        )))
    }
}

#[cfg(test)]
mod rotation_tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_growing_log_rotates_and_the_writer_goes_on_at_the_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("rank-0.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("log");
        let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
        writer.write_all(&[b'a'; 600]).expect("write");
        assert!(!rotate_if_large(&path, 1000, 2).expect("rotation"));
        writer.write_all(&[b'b'; 600]).expect("write");
        assert!(rotate_if_large(&path, 1000, 2).expect("rotation"));
        assert_eq!(std::fs::metadata(&path).expect("log").len(), 0);
        assert_eq!(read(&dir.path().join("rank-0.log.1")).len(), 1200);
        // The rank's open file goes on from the start, not past a hole.
        writer.write_all(&[b'c'; 1100]).expect("write");
        assert_eq!(read(&path), "c".repeat(1100));
        assert!(rotate_if_large(&path, 1000, 2).expect("rotation"));
        writer.write_all(b"d").expect("write");
        assert!(read(&dir.path().join("rank-0.log.1")).starts_with('c'));
        assert!(read(&dir.path().join("rank-0.log.2")).starts_with('a'));
        assert_eq!(read(&path), "d");
        // keep = 2: a third rotation drops the oldest.
        writer.write_all(&[b'e'; 1100]).expect("write");
        assert!(rotate_if_large(&path, 1000, 2).expect("rotation"));
        assert!(read(&dir.path().join("rank-0.log.2")).starts_with('c'));
        assert!(!dir.path().join("rank-0.log.3").exists());
    }
}
