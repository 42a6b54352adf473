//! Thin tonic adapters: decode requests into domain types, call the
//! [`Coordinator`], encode answers. No scheduling logic lives here.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use flamingo_common::{JobId, JobSpec, NodeId};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::agent_service_client::AgentServiceClient;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::cluster::RankOutcome;
use crate::service::{Coordinator, Registration};
use crate::CoordinatorError;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone)]
pub struct JobApi(pub Arc<Coordinator>);

#[derive(Clone)]
pub struct NodeApi(pub Arc<Coordinator>);

fn port(value: u32, field: &str) -> Result<u16, Status> {
    u16::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field} {value} exceeds 65535")))
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn launch(
        &self,
        request: Request<pb::LaunchRequest>,
    ) -> Result<Response<pb::LaunchResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let spec = JobSpec::try_from(spec).map_err(CoordinatorError::from)?;
        let span = tracing::info_span!(
            "launch",
            name = %spec.name,
            kind = spec.kind.label(),
            nodes = spec.nodes,
            job = tracing::field::Empty
        );
        let job = self.0.launch(spec).instrument(span.clone()).await?;
        span.record("job", job.id.as_str());
        Ok(Response::new(pb::LaunchResponse {
            job: Some(pb::Job::from(&job)),
        }))
    }

    async fn job_metrics(
        &self,
        request: Request<pb::JobMetricsRequest>,
    ) -> Result<Response<pb::JobMetricsResponse>, Status> {
        let points = self.0.metrics(&JobId(request.into_inner().job_id)).await?;
        Ok(Response::new(pb::JobMetricsResponse {
            points: points.iter().map(pb::MetricPoint::from).collect(),
        }))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::EvalReportResponse>, Status> {
        let report = request.into_inner();
        let job_id = JobId(report.job_id.clone());
        tracing::info!(job = %job_id, step = report.step, dataset = %report.dataset, "eval report");
        self.0
            .record_eval(&job_id, crate::metrics::EvalRecord::from(report))
            .await?;
        Ok(Response::new(pb::EvalReportResponse {}))
    }

    async fn job_evals(
        &self,
        request: Request<pb::JobEvalsRequest>,
    ) -> Result<Response<pb::JobEvalsResponse>, Status> {
        let job_id = JobId(request.into_inner().job_id);
        let evals = self.0.evals(&job_id).await?;
        Ok(Response::new(pb::JobEvalsResponse {
            reports: evals
                .iter()
                .map(|record| record.to_proto(job_id.as_str()))
                .collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let job = self.0.job(&JobId(request.into_inner().job_id)).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(pb::Job::from(&job)),
        }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.0.jobs().await;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(pb::Job::from).collect(),
        }))
    }

    async fn stop_job(
        &self,
        request: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::StopJobResponse>, Status> {
        let job = self.0.stop(&JobId(request.into_inner().job_id)).await?;
        Ok(Response::new(pb::StopJobResponse {
            job: Some(pb::Job::from(&job)),
        }))
    }

    type WatchJobStream = BoxStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let request = request.into_inner();
        let events = self
            .0
            .watch(&JobId(request.job_id), request.from_seq)
            .await?;
        let stream = ReceiverStream::new(events).map(|event| Ok(pb::JobEvent::from(&event)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .0
            .nodes()
            .await
            .into_iter()
            .map(|(node, free_slots)| pb::Node {
                node_id: node.node_id.0,
                address: node.address,
                slots: node.slots,
                free_slots,
                gpu: node.gpu,
                draining: node.draining,
                agent_endpoint: node.agent_endpoint,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    type JobLogsStream = BoxStream<pb::LogChunk>;

    async fn job_logs(
        &self,
        request: Request<pb::JobLogsRequest>,
    ) -> Result<Response<Self::JobLogsStream>, Status> {
        let request = request.into_inner();
        let job_id = JobId(request.job_id.clone());
        let endpoint = self.0.log_endpoint(&job_id, request.rank).await?;
        let logs_error = |message: String| CoordinatorError::Logs {
            job_id: request.job_id.clone(),
            rank: request.rank,
            message,
        };
        let mut agent = AgentServiceClient::connect(endpoint.clone())
            .await
            .map_err(|error| logs_error(format!("cannot reach agent at {endpoint}: {error}")))?;
        let stream = agent
            .read_log(pb::ReadLogRequest {
                job_id: request.job_id.clone(),
                rank: request.rank,
                follow: request.follow,
            })
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        if request.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id: empty"));
        }
        let registration = Registration {
            protocol_version: request.protocol_version,
            node_id: NodeId(request.node_id),
            address: request.address,
            slots: request.slots,
            gpu: request.gpu,
            rendezvous_port_first: port(request.rendezvous_port_first, "rendezvous_port_first")?,
            rendezvous_port_count: port(request.rendezvous_port_count, "rendezvous_port_count")?,
            agent_endpoint: request.agent_endpoint,
        };
        self.0.register(registration).await?;
        Ok(Response::new(pb::RegisterResponse {
            lease_ttl_seconds: self.0.lease_ttl_seconds(),
            heartbeat_interval_ms: self.0.heartbeat_interval_ms(),
        }))
    }

    type AttachStream = BoxStream<pb::CoordinatorMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("attach: stream closed before a heartbeat"))?;
        let Some(pb::agent_message::Kind::Heartbeat(heartbeat)) = first.kind else {
            return Err(Status::invalid_argument(
                "attach: the first message must be a heartbeat",
            ));
        };
        let node_id = NodeId(heartbeat.node_id.clone());
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        let initial = self.0.attach(&node_id, sender.clone()).await?;
        for message in initial {
            let _ = sender.try_send(Ok(message));
        }
        let coordinator = self.0.clone();
        tokio::spawn(async move {
            let mut next = Some(heartbeat);
            loop {
                if let Some(heartbeat) = next.take() {
                    let running: BTreeSet<(JobId, u32, u32)> = heartbeat
                        .running
                        .into_iter()
                        .map(|rank| (JobId(rank.job_id), rank.attempt, rank.rank))
                        .collect();
                    if let Err(error) = coordinator
                        .heartbeat(&node_id, running, heartbeat.draining)
                        .await
                    {
                        let _ = sender.send(Err(Status::from(error))).await;
                        break;
                    }
                }
                match incoming.message().await {
                    Ok(Some(pb::AgentMessage {
                        kind: Some(pb::agent_message::Kind::Heartbeat(heartbeat)),
                    })) => next = Some(heartbeat),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            coordinator.detach(&node_id, &sender).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn report_rank(
        &self,
        request: Request<pb::RankReport>,
    ) -> Result<Response<pb::RankReportResponse>, Status> {
        let report = request.into_inner();
        let outcome = match report.event {
            Some(pb::rank_report::Event::Started(started)) => {
                RankOutcome::Started { pid: started.pid }
            }
            Some(pb::rank_report::Event::Exited(exited)) => RankOutcome::Exited {
                exit_code: exited.exit_code,
                signal: exited.signal,
                result_json: (!exited.result_json.is_empty()).then_some(exited.result_json),
            },
            Some(pb::rank_report::Event::FailedToStart(failed)) => RankOutcome::FailedToStart {
                message: failed.message,
            },
            None => return Err(Status::invalid_argument("rank report: event missing")),
        };
        self.0
            .rank_report(&JobId(report.job_id), report.attempt, report.rank, outcome)
            .await?;
        Ok(Response::new(pb::RankReportResponse {}))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::MetricsReport>,
    ) -> Result<Response<pb::MetricsReportResponse>, Status> {
        let report = request.into_inner();
        tracing::debug!(job = %report.job_id, rank = report.rank, step = report.step, values = ?report.values, "metrics");
        let job_id = JobId(report.job_id);
        self.0.record_metrics(
            &job_id,
            &crate::metrics::Point {
                step: report.step,
                rank: report.rank,
                attempt: report.attempt,
                unix_ms: flamingo_common::unix_ms(),
                values: report.values.into_iter().collect(),
            },
        );
        if report.rank == 0 {
            self.0.progress(&job_id, report.attempt, report.step).await;
        }
        Ok(Response::new(pb::MetricsReportResponse {}))
    }

    async fn report_metrics_batch(
        &self,
        request: Request<pb::MetricsBatch>,
    ) -> Result<Response<pb::MetricsReportResponse>, Status> {
        let batch = request.into_inner();
        let job_id = JobId(batch.job_id);
        let (rank, attempt) = (batch.rank, batch.attempt);
        let count = batch.samples.len();
        let mut points: Vec<crate::metrics::Point> = batch
            .samples
            .into_iter()
            .map(|sample| crate::metrics::Point {
                step: sample.step,
                rank,
                attempt,
                unix_ms: sample.unix_ms,
                values: sample.values.into_iter().collect(),
            })
            .collect();
        if let Some(last) = points.last_mut() {
            last.values
                .insert(crate::metrics::DROPPED.to_string(), batch.dropped as f64);
        }
        let notes: Vec<crate::metrics::StoredEvent> = batch
            .notes
            .into_iter()
            .map(|note| crate::metrics::StoredEvent {
                unix_ms: note.unix_ms,
                kind: flamingo_common::EventKind::parse(&note.kind),
                message: format!("rank {rank}: {}", note.message),
                seq: None,
                step: Some(note.step),
                rank: Some(rank),
                attempt,
            })
            .collect();
        let last_step = points.last().map(|point| point.step);
        self.0.record_batch(&job_id, &points, &notes);
        tracing::debug!(job = %job_id, rank, count, "metrics batch");
        if let (0, Some(step)) = (rank, last_step) {
            self.0.progress(&job_id, attempt, step).await;
        }
        Ok(Response::new(pb::MetricsReportResponse {}))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let request = request.into_inner();
        if request.path.is_empty() {
            return Err(Status::invalid_argument("commit_checkpoint.path: empty"));
        }
        let record = flamingo_common::CheckpointRecord {
            step: request.step,
            path: request.path,
            unix_ms: flamingo_common::unix_ms(),
            attempt: request.attempt,
            data_cursor_json: request.data_cursor_json,
        };
        let span = tracing::info_span!(
            "checkpoint",
            job = %request.job_id,
            step = record.step,
            attempt = record.attempt
        );
        let retired_paths = self
            .0
            .commit_checkpoint(&JobId(request.job_id), record)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::CommitCheckpointResponse {
            retired_paths,
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.0
            .deregister(&NodeId(request.into_inner().node_id))
            .await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}
