//! The coordinator's job API as a session: launch, look at, wait for, stop
//! and read the logs of jobs; nodes, metrics and benchmark scores.

use std::io::Write;
use std::time::{Duration, Instant};

use flamingo_common::{JobEvent, JobRecord, JobSpec};
use flamingo_proto::v1 as pb;
use flamingo_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::{ClientError, Result};

/// A connection to the coordinator at `address`.
pub struct Session {
    pub address: String,
    pub client: JobServiceClient<Channel>,
}

impl Session {
    /// With this process's credentials (`FLAMINGO_TLS_*`).
    pub async fn open(address: &str) -> Result<Self> {
        Ok(Self {
            address: address.to_string(),
            client: crate::address::connect(address).await?,
        })
    }

    /// With `tls` (plain text when `None`).
    pub async fn open_with(
        address: &str,
        tls: Option<&flamingo_security::ClientTls>,
    ) -> Result<Self> {
        Ok(Self {
            address: address.to_string(),
            client: crate::address::connect_with(address, tls).await?,
        })
    }

    fn error(&self, status: tonic::Status) -> ClientError {
        ClientError::from_status(&self.address, status)
    }

    fn answer(&self, message: impl Into<String>) -> ClientError {
        ClientError::Answer {
            address: self.address.clone(),
            message: message.into(),
        }
    }

    /// The newest `limit` audit records, newest first (admins).
    pub async fn audit(&mut self, limit: u32) -> Result<Vec<pb::AuditRecord>> {
        let response = self
            .client
            .list_audit(pb::ListAuditRequest { limit })
            .await
            .map_err(|status| self.error(status))?;
        Ok(response.into_inner().records)
    }

    /// Every metric report the coordinator stored for the job.
    pub async fn metrics(&mut self, job_id: &str) -> Result<Vec<pb::MetricPoint>> {
        self.metrics_from(job_id, 0).await
    }

    /// The job's metric reports from the `offset`-th on (the coordinator
    /// sends them a page at a time; this fetches every page).
    pub async fn metrics_from(
        &mut self,
        job_id: &str,
        mut offset: u64,
    ) -> Result<Vec<pb::MetricPoint>> {
        let mut points = Vec::new();
        loop {
            let page = self
                .client
                .job_metrics(pb::JobMetricsRequest {
                    job_id: job_id.to_string(),
                    offset,
                    limit: 0,
                })
                .await
                .map_err(|status| self.error(status))?
                .into_inner();
            points.extend(page.points);
            if page.next_offset == 0 || page.next_offset <= offset {
                return Ok(points);
            }
            offset = page.next_offset;
        }
    }

    /// Stores a checkpoint's benchmark scores with its training job.
    pub async fn report_eval(&mut self, report: pb::EvalReport) -> Result<()> {
        self.client
            .report_eval(report)
            .await
            .map_err(|status| self.error(status))?;
        Ok(())
    }

    /// The benchmark scores stored with the job (`flamingoctl eval --job`).
    pub async fn evals(&mut self, job_id: &str) -> Result<Vec<pb::EvalReport>> {
        Ok(self
            .client
            .job_evals(pb::JobEvalsRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .reports)
    }

    pub async fn job(&mut self, job_id: &str) -> Result<JobRecord> {
        let job = self
            .client
            .get_job(pb::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .job
            .ok_or_else(|| self.answer("it answered without a job"))?;
        JobRecord::try_from(job).map_err(|error| self.answer(error.to_string()))
    }

    pub async fn launch(&mut self, spec: &JobSpec) -> Result<JobRecord> {
        let job = self
            .client
            .launch(pb::LaunchRequest {
                spec: Some(pb::JobSpec::from(spec)),
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .job
            .ok_or_else(|| self.answer("it answered without a job"))?;
        JobRecord::try_from(job).map_err(|error| self.answer(error.to_string()))
    }

    pub async fn list(&mut self) -> Result<Vec<JobRecord>> {
        let mut jobs = Vec::new();
        let mut offset = 0;
        loop {
            let page = self
                .client
                .list_jobs(pb::ListJobsRequest { offset, limit: 0 })
                .await
                .map_err(|status| self.error(status))?
                .into_inner();
            jobs.extend(page.jobs);
            if page.next_offset == 0 || page.next_offset <= offset {
                break;
            }
            offset = page.next_offset;
        }
        jobs.into_iter()
            .map(|job| JobRecord::try_from(job).map_err(|error| self.answer(error.to_string())))
            .collect()
    }

    pub async fn nodes(&mut self) -> Result<Vec<pb::Node>> {
        Ok(self
            .client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|status| self.error(status))?
            .into_inner()
            .nodes)
    }

    /// Stops the job and waits until none of its ranks is alive.
    pub async fn stop(&mut self, job_id: &str) -> Result<JobRecord> {
        self.client
            .stop_job(pb::StopJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(|status| self.error(status))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.job(job_id).await?;
            if job.live_ranks().next().is_none() {
                return Ok(job);
            }
            if Instant::now() > deadline {
                return Err(ClientError::Job {
                    job: job_id.to_string(),
                    message: format!(
                        "{} but ranks {:?} are still alive after 60 s",
                        job.state.as_str(),
                        job.live_ranks().map(|rank| rank.rank).collect::<Vec<_>>()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams rank 0's output to stderr once the rank exists, until the
    /// returned task is aborted or the log ends.
    fn follow_rank0(&self, job_id: &str) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let job_id = job_id.to_string();
        tokio::spawn(async move {
            loop {
                let request = pb::JobLogsRequest {
                    job_id: job_id.clone(),
                    rank: 0,
                    follow: true,
                };
                if let Ok(response) = client.job_logs(request).await {
                    let mut stream = response.into_inner();
                    let mut stderr = std::io::stderr();
                    while let Ok(Some(chunk)) = stream.message().await {
                        let _ = stderr.write_all(&chunk.data);
                    }
                    return;
                }
                // Not scheduled or not started yet.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    }

    /// Follows the job's events until it ends; prints them to stderr when
    /// `progress` is set, and rank 0's output too when `follow` is.
    pub async fn wait(&mut self, job_id: &str, progress: bool, follow: bool) -> Result<JobRecord> {
        let follower = follow.then(|| self.follow_rank0(job_id));
        let result = self.wait_events(job_id, progress).await;
        if let Some(follower) = follower {
            // Let the last lines of the log arrive, then stop following.
            let _ = tokio::time::timeout(Duration::from_secs(2), follower).await;
        }
        result
    }

    async fn wait_events(&mut self, job_id: &str, progress: bool) -> Result<JobRecord> {
        let started = Instant::now();
        let mut next_seq = 0;
        // A stream that ends before the job did (a coordinator restart, a
        // watcher that could not resync) is opened again from the next
        // event: nothing is missed and nothing hangs.
        'watch: loop {
            let mut stream = self
                .client
                .watch_job(pb::WatchJobRequest {
                    job_id: job_id.to_string(),
                    from_seq: next_seq,
                })
                .await
                .map_err(|status| self.error(status))?
                .into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        let event = JobEvent::try_from(event)
                            .map_err(|error| self.answer(error.to_string()))?;
                        next_seq = event.seq + 1;
                        if progress {
                            eprintln!(
                                "[{:>6.1}s] {:<9} {}",
                                started.elapsed().as_secs_f64(),
                                event.state.as_str(),
                                event.message
                            );
                        }
                        if event.state.is_terminal() {
                            break 'watch;
                        }
                    }
                    Ok(None) => {
                        if self.job(job_id).await?.state.is_terminal() {
                            break 'watch;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue 'watch;
                    }
                    Err(status) => return Err(self.error(status)),
                }
            }
        }
        // Let the ranks' exit reports land so the record is complete.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.job(job_id).await?;
            if job.state.is_terminal()
                && (job.live_ranks().next().is_none() || Instant::now() > deadline)
            {
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Copies the rank's log to stdout; with `json`, one object per chunk:
    /// `{"job": …, "rank": …, "text": …}`.
    pub async fn logs(&mut self, job_id: &str, rank: u32, follow: bool, json: bool) -> Result<()> {
        let mut stream = self
            .client
            .job_logs(pb::JobLogsRequest {
                job_id: job_id.to_string(),
                rank,
                follow,
            })
            .await
            .map_err(|status| self.error(status))?
            .into_inner();
        let mut stdout = std::io::stdout().lock();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|status| self.error(status))?
        {
            if json {
                let line = serde_json::json!({
                    "job": job_id,
                    "rank": rank,
                    "text": String::from_utf8_lossy(&chunk.data),
                });
                writeln!(stdout, "{line}").map_err(stdout_error)?;
            } else {
                stdout.write_all(&chunk.data).map_err(stdout_error)?;
            }
            stdout.flush().map_err(stdout_error)?;
        }
        Ok(())
    }
}

fn stdout_error(error: std::io::Error) -> ClientError {
    ClientError::File {
        path: "stdout".into(),
        message: error.to_string(),
    }
}
