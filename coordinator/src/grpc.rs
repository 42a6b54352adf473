//! Thin tonic adapters: decode requests into domain types, call the
//! [`Coordinator`], encode answers. No scheduling logic lives here.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use flamingo_common::{JobId, JobRecord, JobSpec, NodeId};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::agent_service_client::AgentServiceClient;
use flamingo_security::Role;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::auth::{Auth, Caller};
use crate::cluster::RankOutcome;
use crate::service::{Coordinator, Registration};
use crate::CoordinatorError;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The job API: users (and eval ranks reporting scores).
#[derive(Clone)]
pub struct JobApi(pub Arc<Coordinator>, pub Arc<Auth>);

/// The node API: agents, and ranks reporting metrics and checkpoints.
#[derive(Clone)]
pub struct NodeApi(pub Arc<Coordinator>, pub Arc<Auth>);

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
        let who = self.1.who(&request);
        let asked_of = |q: &pb::LaunchRequest| {
            q.spec
                .as_ref()
                .map(|spec| spec.name.clone())
                .unwrap_or_default()
        };
        let asked = asked_of(request.get_ref());
        let result = self.launch_unaudited(request).await;
        let (target, outcome) = match &result {
            Ok(response) => {
                let made_of = |r: &pb::LaunchResponse| {
                    r.job.as_ref().map(|job| job.id.clone()).unwrap_or_default()
                };
                let made = made_of(response.get_ref());
                (if made.is_empty() { asked } else { made }, "ok".to_string())
            }
            Err(status) => (asked, format!("refused: {}", status.message())),
        };
        self.0.audit(who, "launch", &target, outcome).await;
        result
    }

    async fn job_metrics(
        &self,
        request: Request<pb::JobMetricsRequest>,
    ) -> Result<Response<pb::JobMetricsResponse>, Status> {
        self.1.user(&request, Role::Viewer, "job metrics")?;
        let asked = request.into_inner();
        let points = self.0.metrics(&JobId(asked.job_id)).await?;
        let (page, next_offset) = page(&points, asked.offset, asked.limit, METRICS_PAGE, |point| {
            pb::MetricPoint::from(point)
        });
        Ok(Response::new(pb::JobMetricsResponse {
            points: page,
            next_offset,
            total: points.len() as u64,
        }))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::EvalReportResponse>, Status> {
        self.authorize_eval_report(&request).await?;
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
        self.1.user(&request, Role::Viewer, "job evals")?;
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
        let caller = self.1.user(&request, Role::Viewer, "get job")?;
        let job = self.0.job(&JobId(request.into_inner().job_id)).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(pb::Job::from(&self.1.redact(&caller, job))),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.1.user(&request, Role::Viewer, "list jobs")?;
        let asked = request.into_inner();
        let jobs = self.0.jobs().await;
        let (jobs, next_offset) = page(&jobs, asked.offset, asked.limit, JOBS_PAGE, |job| {
            pb::Job::from(&self.1.redact(&caller, job.clone()))
        });
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_offset,
            total: self.0.job_count().await as u64,
        }))
    }

    async fn stop_job(
        &self,
        request: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::StopJobResponse>, Status> {
        let who = self.1.who(&request);
        let asked_of = |q: &pb::StopJobRequest| q.job_id.clone();
        let asked = asked_of(request.get_ref());
        let result = self.stop_job_unaudited(request).await;
        let (target, outcome) = match &result {
            Ok(response) => {
                let made_of = |_: &pb::StopJobResponse| String::new();
                let made = made_of(response.get_ref());
                (if made.is_empty() { asked } else { made }, "ok".to_string())
            }
            Err(status) => (asked, format!("refused: {}", status.message())),
        };
        self.0.audit(who, "stop", &target, outcome).await;
        result
    }

    type WatchJobStream = BoxStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.1.user(&request, Role::Viewer, "watch job")?;
        let request = request.into_inner();
        let events = self
            .0
            .watch(&JobId(request.job_id), request.from_seq)
            .await?;
        let stream = ReceiverStream::new(events).map(|event| Ok(pb::JobEvent::from(&event)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.1.user(&request, Role::Admin, "audit log")?;
        let limit = match request.get_ref().limit {
            0 => 100,
            limit => limit,
        };
        let records = self
            .0
            .audit_log(limit)
            .await?
            .into_iter()
            .map(|entry| pb::AuditRecord {
                unix_ms: entry.unix_ms,
                who: entry.who,
                action: entry.action,
                target: entry.target,
                outcome: entry.outcome,
            })
            .collect();
        Ok(Response::new(pb::ListAuditResponse { records }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.1.user(&request, Role::Viewer, "list nodes")?;
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
        self.1.user(&request, Role::Viewer, "job logs")?;
        let request = request.into_inner();
        let job_id = JobId(request.job_id.clone());
        let endpoint = self.0.log_endpoint(&job_id, request.rank).await?;
        let logs_error = |message: String| CoordinatorError::Logs {
            job_id: request.job_id.clone(),
            rank: request.rank,
            message,
        };
        let channel = flamingo_security::endpoint(
            &endpoint,
            self.1.agent_tls.as_ref(),
            flamingo_security::AGENT_NAME,
        )
        .map_err(|error| logs_error(error.to_string()))?
        .connect()
        .await
        .map_err(|error| logs_error(format!("cannot reach agent at {endpoint}: {error}")))?;
        let mut agent = AgentServiceClient::new(channel);
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
        let who = self.1.who(&request);
        let asked_of = |q: &pb::RegisterRequest| q.node_id.clone();
        let asked = asked_of(request.get_ref());
        let result = self.register_unaudited(request).await;
        let (target, outcome) = match &result {
            Ok(response) => {
                let made_of = |_: &pb::RegisterResponse| String::new();
                let made = made_of(response.get_ref());
                (if made.is_empty() { asked } else { made }, "ok".to_string())
            }
            Err(status) => (asked, format!("refused: {}", status.message())),
        };
        self.0.audit(who, "register", &target, outcome).await;
        result
    }

    type AttachStream = BoxStream<pb::CoordinatorMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let caller = self.1.caller(&request)?;
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
        match &caller {
            Caller::Local => {}
            Caller::Peer(flamingo_security::Identity::Node { id }) if *id == node_id.0 => {}
            Caller::Peer(identity) => {
                return Err(Status::permission_denied(format!(
                    "only node {node_id}'s own certificate may attach as it; this is {identity}"
                )))
            }
        }
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
        // Each attempt's ranks get its credential with their assignment.
        let auth = self.1.clone();
        let stamped = ReceiverStream::new(receiver).map(move |message| {
            message.map(|mut message| {
                if let Some(pb::coordinator_message::Kind::Start(start)) = message.kind.as_mut() {
                    for rank in &mut start.ranks {
                        rank.rank_token = auth.mint(&rank.job_id, rank.attempt);
                    }
                }
                message
            })
        });
        Ok(Response::new(Box::pin(stamped)))
    }

    async fn report_rank(
        &self,
        request: Request<pb::RankReport>,
    ) -> Result<Response<pb::RankReportResponse>, Status> {
        self.1.node(&request, &request.get_ref().node_id)?;
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
        let report = request.get_ref();
        self.authorize_rank(&request, &report.job_id, report.attempt, &report.rank_token)
            .await?;
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
        let batch = request.get_ref();
        self.authorize_rank(&request, &batch.job_id, batch.attempt, &batch.rank_token)
            .await?;
        self.store_batches(vec![request.into_inner()]).await;
        Ok(Response::new(pb::MetricsReportResponse {}))
    }

    async fn report_node_metrics(
        &self,
        request: Request<pb::NodeMetrics>,
    ) -> Result<Response<pb::NodeMetricsResponse>, Status> {
        let node_id = request.get_ref().node_id.clone();
        self.1.node(&request, &node_id)?;
        let mut accepted = Vec::with_capacity(request.get_ref().batches.len());
        let mut refused = 0u32;
        let batches = std::mem::take(&mut request.into_inner().batches);
        // The node's own certificate was checked above; each batch needs
        // its rank's credential for a live attempt. A node's ranks of one
        // attempt share a credential: each distinct one is checked once.
        let mut checked: Vec<(String, u32, String, bool)> = Vec::new();
        for batch in batches {
            let known = checked.iter().find(|(job, attempt, token, _)| {
                *job == batch.job_id && *attempt == batch.attempt && *token == batch.rank_token
            });
            let authorized = match known {
                Some((.., authorized)) => *authorized,
                None => {
                    let authorized = self
                        .authorize_rank_token(&batch.job_id, batch.attempt, &batch.rank_token)
                        .await
                        .is_ok();
                    checked.push((
                        batch.job_id.clone(),
                        batch.attempt,
                        batch.rank_token.clone(),
                        authorized,
                    ));
                    authorized
                }
            };
            let allowed = batch.node_id == node_id && authorized;
            if allowed {
                accepted.push(batch);
            } else {
                refused += 1;
            }
        }
        if refused > 0 {
            tracing::debug!(node = %node_id, refused, "metrics batches refused");
        }
        self.store_batches(accepted).await;
        Ok(Response::new(pb::NodeMetricsResponse { refused }))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let who = self.1.who(&request);
        let request_ref = request.get_ref();
        let asked = format!("{} step {}", request_ref.job_id, request_ref.step);
        let result = self.commit_checkpoint_unaudited(request).await;
        let (target, outcome) = match &result {
            Ok(_) => (asked, "ok".to_string()),
            Err(status) => (asked, format!("refused: {}", status.message())),
        };
        self.0
            .audit(who, "commit-checkpoint", &target, outcome)
            .await;
        result
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let who = self.1.who(&request);
        let asked_of = |q: &pb::DeregisterRequest| q.node_id.clone();
        let asked = asked_of(request.get_ref());
        let result = self.deregister_unaudited(request).await;
        let (target, outcome) = match &result {
            Ok(response) => {
                let made_of = |_: &pb::DeregisterResponse| String::new();
                let made = made_of(response.get_ref());
                (if made.is_empty() { asked } else { made }, "ok".to_string())
            }
            Err(status) => (asked, format!("refused: {}", status.message())),
        };
        self.0.audit(who, "deregister", &target, outcome).await;
        result
    }
}

impl NodeApi {
    /// A rank's call: its node's certificate, and the credential of the
    /// job's current attempt.
    async fn authorize_rank<T>(
        &self,
        request: &Request<T>,
        job_id: &str,
        attempt: u32,
        token: &str,
    ) -> Result<(), Status> {
        self.1.rank(request, job_id, attempt, token)?;
        self.live_attempt(job_id, attempt).await
    }

    /// A batch an agent forwards: its rank's credential for a live attempt
    /// (the agent's own certificate was checked for the call).
    async fn authorize_rank_token(
        &self,
        job_id: &str,
        attempt: u32,
        token: &str,
    ) -> Result<(), Status> {
        self.1.rank_token(job_id, attempt, token)?;
        self.live_attempt(job_id, attempt).await
    }

    /// Stores ranks' batches (their points and notes); rank 0's last step
    /// is its job's progress.
    async fn store_batches(&self, batches: Vec<pb::MetricsBatch>) {
        let mut stored = Vec::with_capacity(batches.len());
        let mut progress = Vec::new();
        for batch in batches {
            let job_id = JobId(batch.job_id);
            let (rank, attempt) = (batch.rank, batch.attempt);
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
            if !batch.skip_examples.is_empty() {
                let examples = batch
                    .skip_examples
                    .into_iter()
                    .map(|example| crate::metrics::SkipExample {
                        step: example.step,
                        attempt,
                        dataset: example.dataset,
                        reason: example.reason,
                        shard: example.shard,
                        key: example.key,
                        detail: example.detail,
                    })
                    .collect();
                if let Err(error) = self
                    .0
                    .metrics_store()
                    .append_skip_examples(job_id.as_str(), examples)
                {
                    tracing::warn!(job = %job_id, %error, "could not store skipped-sample examples");
                }
            }
            if let (0, Some(point)) = (rank, points.last()) {
                progress.push((job_id.clone(), attempt, point.step));
            }
            stored.push((job_id, points, notes));
        }
        self.0.record_batches(stored).await;
        for (job_id, attempt, step) in progress {
            self.0.progress(&job_id, attempt, step).await;
        }
    }

    /// The attempt is the job's current one and the job has not ended.
    async fn live_attempt(&self, job_id: &str, attempt: u32) -> Result<(), Status> {
        let (current, state) = self.0.job_attempt(&JobId(job_id.to_string())).await?;
        if current != attempt || state.is_terminal() {
            return Err(Status::permission_denied(format!(
                "job {job_id} attempt {attempt} is no longer live (the job is {} at attempt {current})",
                state.as_str(),
            )));
        }
        Ok(())
    }
}

impl JobApi {
    /// Scores come from the job's submitter or an admin, or from a rank of
    /// a live eval job with its credential.
    async fn authorize_eval_report(&self, request: &Request<pb::EvalReport>) -> Result<(), Status> {
        let report = request.get_ref();
        if !report.rank_token.is_empty() {
            let token_job = report
                .rank_token
                .split(':')
                .nth(1)
                .unwrap_or_default()
                .to_string();
            let job = self.0.job(&JobId(token_job.clone())).await?;
            return NodeApi(self.0.clone(), self.1.clone())
                .authorize_rank(request, &token_job, job.attempt, &report.rank_token)
                .await;
        }
        let caller = self.1.user(request, Role::Submitter, "report eval")?;
        let job: JobRecord = self.0.job(&JobId(report.job_id.clone())).await?;
        if caller.owns(&job) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "report eval for {}: only its submitter or an admin",
                report.job_id
            )))
        }
    }
}

/// The calls themselves; the trait methods record each in the audit log.
impl JobApi {
    async fn launch_unaudited(
        &self,
        request: Request<pb::LaunchRequest>,
    ) -> Result<Response<pb::LaunchResponse>, Status> {
        let caller = self.1.user(&request, Role::Submitter, "launch")?;
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let mut spec = JobSpec::try_from(spec).map_err(CoordinatorError::from)?;
        self.1.admit(&caller, &spec)?;
        spec.submitter = caller.principal();
        let span = tracing::info_span!(
            "launch",
            name = %spec.name,
            kind = spec.kind.label(),
            nodes = spec.nodes,
            submitter = %spec.submitter,
            job = tracing::field::Empty
        );
        let job = self.0.launch(spec).instrument(span.clone()).await?;
        span.record("job", job.id.as_str());
        Ok(Response::new(pb::LaunchResponse {
            job: Some(pb::Job::from(&job)),
        }))
    }

    async fn stop_job_unaudited(
        &self,
        request: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::StopJobResponse>, Status> {
        let caller = self.1.user(&request, Role::Submitter, "stop")?;
        let job_id = JobId(request.into_inner().job_id);
        let job = self.0.job(&job_id).await?;
        if !caller.owns(&job) {
            return Err(Status::permission_denied(format!(
                "stop {job_id}: only its submitter ({}) or an admin may stop it",
                job.spec.submitter
            )));
        }
        tracing::info!(job = %job_id, by = %caller.principal(), "stop requested");
        let job = self.0.stop(&job_id).await?;
        Ok(Response::new(pb::StopJobResponse {
            job: Some(pb::Job::from(&job)),
        }))
    }
}

/// The calls themselves; the trait methods record each in the audit log.
impl NodeApi {
    async fn register_unaudited(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        if request.get_ref().node_id.is_empty() {
            return Err(Status::invalid_argument("node_id: empty"));
        }
        self.1.node(&request, &request.get_ref().node_id)?;
        let request = request.into_inner();
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

    async fn commit_checkpoint_unaudited(
        &self,
        request: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let commit = request.get_ref();
        self.authorize_rank(&request, &commit.job_id, commit.attempt, &commit.rank_token)
            .await?;
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

    async fn deregister_unaudited(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.1.node(&request, &request.get_ref().node_id)?;
        self.0
            .deregister(&NodeId(request.into_inner().node_id))
            .await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}

/// Page sizes of the listing calls: far below the 4 MiB message limit for
/// any record these hold (a point is ~100 bytes; a job record with 64
/// ranks ~10 KiB), and [`page`] also stops at [`PAGE_BYTES`].
const METRICS_PAGE: u32 = 10_000;
const JOBS_PAGE: u32 = 100;
const PAGE_BYTES: usize = 2 << 20;

/// `items[offset..]`, converted, at most `limit` of them (the default and
/// the most: `max`) and about [`PAGE_BYTES`] encoded (always at least one);
/// with the offset of the next page, 0 after the last.
fn page<T, P: prost::Message>(
    items: &[T],
    offset: u64,
    limit: u32,
    max: u32,
    convert: impl Fn(&T) -> P,
) -> (Vec<P>, u64) {
    let limit = if limit == 0 { max } else { limit.min(max) } as usize;
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(items.len());
    let mut out = Vec::new();
    let mut bytes = 0;
    for item in items[start..].iter().take(limit) {
        let converted = convert(item);
        bytes += converted.encoded_len();
        out.push(converted);
        if bytes >= PAGE_BYTES {
            break;
        }
    }
    let end = start + out.len();
    (out, if end < items.len() { end as u64 } else { 0 })
}

#[cfg(test)]
mod paging_tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once_and_stop_at_the_byte_budget() {
        let points: Vec<u64> = (0..25_000).collect();
        let convert = |step: &u64| pb::MetricPoint {
            step: *step,
            ..Default::default()
        };
        let mut offset = 0;
        let mut seen = Vec::new();
        loop {
            let (page, next) = page(&points, offset, 0, METRICS_PAGE, convert);
            assert!(page.len() <= METRICS_PAGE as usize);
            seen.extend(page.iter().map(|point| point.step));
            if next == 0 {
                break;
            }
            offset = next;
        }
        assert_eq!(seen, points);
        // A small limit is honoured; an offset past the end is an empty last page.
        assert_eq!(page(&points, 10, 3, METRICS_PAGE, convert).0.len(), 3);
        assert_eq!(
            page(&points, 99_999, 0, METRICS_PAGE, convert),
            (Vec::new(), 0)
        );
        // Large items: the byte budget ends the page early.
        let big: Vec<String> = (0..10).map(|_| "x".repeat(1 << 20)).collect();
        let (first, next) = page(&big, 0, 0, JOBS_PAGE, |text: &String| pb::LogChunk {
            data: text.clone().into_bytes(),
        });
        assert_eq!((first.len(), next), (2, 2));
    }
}
