//! The agent's own gRPC service: rank logs, read (and followed) from disk,
//! for the coordinator to proxy to `flamingoctl logs`.

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
}

impl LogService {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.secure {
            return Ok(());
        }
        let cert = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = flamingo_security::PeerCertificate::from_der(&cert)
            .map_err(|error| Status::unauthenticated(error.to_string()))?;
        match peer.identity {
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

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for LogService {
    type ReadLogStream = ChunkStream;

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
            loop {
                match file.read(&mut buffer).await {
                    Ok(0) => {
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
