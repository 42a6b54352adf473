//! The coordinator in domain terms: owns the in-memory [`Cluster`], writes
//! every change through to etcd, publishes job events and pushes start/stop
//! messages to attached agents. The tonic adapters in `grpc.rs` only call in.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use flamingo_common::{unix_ms, JobEvent, JobId, JobRecord, JobSpec, NodeId, NodeRecord};
use flamingo_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, CommitRefused, Effects, RankOutcome};
use crate::store::EtcdStore;
use crate::{Config, CoordinatorError};

pub type AgentSender = mpsc::Sender<Result<pb::CoordinatorMessage, tonic::Status>>;

/// Effects waiting to be written to etcd and then delivered.
#[derive(Default)]
struct Outbox {
    jobs: BTreeSet<JobId>,
    events: Vec<JobEvent>,
    messages: Vec<(NodeId, pb::CoordinatorMessage)>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.events.is_empty()
            && self.messages.is_empty()
            && self.waiters.is_empty()
    }
}

/// Resolves once a transition's effects are in etcd (and delivered).
#[must_use = "await it after letting go of the cluster lock"]
pub struct Flushed(oneshot::Receiver<Result<(), String>>);

impl Flushed {
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(CoordinatorError::Etcd {
                action: "write the cluster's state".into(),
                message,
            }),
            Err(_) => Err(CoordinatorError::Etcd {
                action: "write the cluster's state".into(),
                message: "the coordinator is shutting down".into(),
            }),
        }
    }
}

/// What an agent says about itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub protocol_version: u32,
    pub node_id: NodeId,
    pub address: String,
    pub slots: u32,
    pub gpu: bool,
    pub rendezvous_port_first: u16,
    pub rendezvous_port_count: u16,
    pub agent_endpoint: String,
}

pub struct Coordinator {
    config: Config,
    store: EtcdStore,
    cluster: Mutex<Cluster>,
    sessions: Mutex<HashMap<NodeId, AgentSender>>,
    events_tx: broadcast::Sender<JobEvent>,
    metrics: Arc<crate::metrics::MetricsStore>,
    outbox: std::sync::Mutex<Outbox>,
    outbox_ready: tokio::sync::Notify,
    metrics_queue: std::sync::Mutex<Vec<QueuedMetrics>>,
    metrics_ready: tokio::sync::Notify,
}

/// A rank's batch waiting to be written, and who waits for it.
type QueuedMetrics = (
    JobId,
    Vec<crate::metrics::Point>,
    Vec<crate::metrics::StoredEvent>,
    Option<oneshot::Sender<()>>,
);

/// Connects to the etcd of `config`.
pub async fn connect_store(config: &Config) -> Result<EtcdStore, CoordinatorError> {
    let tls = config
        .tls
        .client()
        .map_err(|error| CoordinatorError::Etcd {
            action: "load the TLS credentials for etcd".into(),
            message: error.to_string(),
        })?;
    EtcdStore::connect(&config.etcd_endpoints, &config.etcd_prefix, tls.as_ref()).await
}

impl Coordinator {
    /// Connects to etcd and rebuilds the state a previous coordinator left.
    /// Loads the cluster's state through `store` (fenced by the leadership
    /// under leader election) and starts serving it.
    pub async fn start(config: Config, store: EtcdStore) -> Result<Arc<Self>, CoordinatorError> {
        let snapshot = store.load().await?;
        let mut cluster = Cluster {
            booted_ms: unix_ms(),
            ..Cluster::default()
        };
        let lease_ms = i64::from(config.lease_ttl_seconds) * 1000;
        for mut node in snapshot.nodes {
            if node.lease_id != 0 {
                // Written by a coordinator that kept nodes under etcd
                // leases, which nobody renews now: store it without one.
                node.lease_id = 0;
                store.put_node(&node).await?;
            }
            cluster.nodes.insert(node.node_id.clone(), node);
        }
        // Every node gets a full lease from now to be heard from.
        let known: Vec<NodeId> = cluster.nodes.keys().cloned().collect();
        for node_id in known {
            cluster.heard_from(&node_id, lease_ms, cluster.booted_ms);
        }
        for job in snapshot.jobs {
            cluster.jobs.insert(job.id.clone(), job);
        }
        tracing::info!(
            nodes = cluster.nodes.len(),
            jobs = cluster.jobs.len(),
            revision = snapshot.revision,
            "state loaded from etcd"
        );
        let (events_tx, _) = broadcast::channel(1024);
        let metrics = Arc::new(crate::metrics::MetricsStore::new(config.metrics_dir()));
        let coordinator = Arc::new(Self {
            config,
            store,
            cluster: Mutex::new(cluster),
            sessions: Mutex::new(HashMap::new()),
            events_tx,
            metrics,
            outbox: std::sync::Mutex::default(),
            outbox_ready: tokio::sync::Notify::new(),
            metrics_queue: std::sync::Mutex::default(),
            metrics_ready: tokio::sync::Notify::new(),
        });
        // Ranks on nodes that vanished while no coordinator was watching.
        {
            let mut cluster = coordinator.cluster.lock().await;
            let known: BTreeSet<NodeId> = cluster.nodes.keys().cloned().collect();
            let vanished: BTreeSet<NodeId> = cluster
                .jobs
                .values()
                .flat_map(|job| job.live_ranks().map(|rank| rank.node.clone()))
                .filter(|node| !known.contains(node))
                .collect();
            let mut effects = Effects::default();
            for node in vanished {
                let lost = cluster.node_lost(
                    &node,
                    "lease expired while the coordinator was down",
                    unix_ms(),
                );
                effects.jobs_changed.extend(lost.jobs_changed);
                effects.events.extend(lost.events);
                effects.messages.extend(lost.messages);
            }
            let scheduled = cluster.schedule(unix_ms());
            effects.jobs_changed.extend(scheduled.jobs_changed);
            effects.events.extend(scheduled.events);
            effects.messages.extend(scheduled.messages);
            drop(coordinator.apply(&cluster, effects));
        }
        // Before serving: what the boot decided is in etcd.
        coordinator.flush().await?;
        Ok(coordinator)
    }

    /// Queues a transition's effects for the flusher, which writes them to
    /// etcd (batched with whatever else is queued, outside the cluster
    /// lock) and only then publishes the events and tells the agents. Called
    /// with the cluster lock held, so effects queue in transition order;
    /// the returned [`Flushed`] is awaited after the lock is let go.
    fn apply(&self, _cluster: &Cluster, effects: Effects) -> Flushed {
        let (done, flushed) = oneshot::channel();
        {
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            outbox.jobs.extend(effects.jobs_changed);
            outbox.events.extend(effects.events);
            outbox.messages.extend(effects.messages);
            outbox.waiters.push(done);
        }
        self.outbox_ready.notify_one();
        Flushed(flushed)
    }

    /// Writes everything queued to etcd in one batch, then delivers it.
    /// On failure the batch stays queued (ahead of anything newer) for the
    /// next try, and its waiters hear of the failure.
    pub async fn flush(&self) -> Result<(), CoordinatorError> {
        let batch = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        let (puts, stored_events, messages) = {
            let cluster = self.cluster.lock().await;
            let mut puts = Vec::with_capacity(batch.jobs.len() + batch.events.len());
            for job_id in &batch.jobs {
                // A job withdrawn (its launch failed) or retired since is
                // not written back.
                if let Some(job) = cluster.jobs.get(job_id) {
                    puts.push(self.store.job_put(job));
                }
            }
            let mut stored_events = Vec::with_capacity(batch.events.len());
            for event in &batch.events {
                let Some(job) = cluster.jobs.get(&event.job_id) else {
                    continue;
                };
                puts.push(self.store.event_put(event));
                // The dashboard's timeline reads events next to the
                // curves. On the step axis a restart sits where the new
                // attempt resumes (its curve starts there); other events at
                // the last step rank 0 reported.
                let step = match event.kind {
                    flamingo_common::EventKind::Restart => job
                        .latest_checkpoint()
                        .map_or(0, |checkpoint| checkpoint.step),
                    _ => job.last_step,
                };
                stored_events.push((
                    event.clone(),
                    crate::metrics::StoredEvent {
                        unix_ms: event.unix_ms,
                        kind: event.kind,
                        message: event.message.clone(),
                        seq: Some(event.seq),
                        step: Some(step),
                        rank: None,
                        attempt: job.attempt,
                    },
                ));
            }
            // Starts for a job withdrawn since are dropped (stops for
            // unknown jobs are meant: they clear what agents still run).
            let mut messages = batch.messages;
            messages.retain(|(_, message)| match &message.kind {
                Some(pb::coordinator_message::Kind::Start(start)) => start
                    .ranks
                    .first()
                    .is_none_or(|rank| cluster.jobs.contains_key(&JobId(rank.job_id.clone()))),
                _ => true,
            });
            (puts, stored_events, messages)
        };
        if let Err(error) = self.store.put_all(puts).await {
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            outbox.jobs.extend(batch.jobs);
            outbox.events.splice(0..0, batch.events);
            outbox.messages.splice(0..0, messages);
            for waiter in batch.waiters {
                let _ = waiter.send(Err(error.to_string()));
            }
            return Err(error);
        }
        for (event, stored) in stored_events {
            tracing::info!(job = %event.job_id, state = event.state.as_str(), "{}", event.message);
            if event.kind == flamingo_common::EventKind::Restart {
                // A span per restart for OTLP collectors (the restart
                // itself is this transition).
                tracing::info_span!("restart", job = %event.job_id, cause = %event.message)
                    .in_scope(|| tracing::info!(job = %event.job_id, "restarting the group"));
            }
            if let Err(error) = self
                .metrics
                .append_batch(event.job_id.as_str(), &[], &[stored])
            {
                tracing::warn!(job = %event.job_id, %error, "could not store an event with the metrics");
            }
            let _no_watchers_is_fine = self.events_tx.send(event);
        }
        if !messages.is_empty() {
            let sessions = self.sessions.lock().await;
            for (node_id, message) in messages {
                if let Some(sender) = sessions.get(&node_id) {
                    // A full or closed channel means the agent is gone or
                    // slow; heartbeat reconciliation re-sends what matters.
                    let _ = sender.try_send(Ok(message));
                }
            }
        }
        for waiter in batch.waiters {
            let _ = waiter.send(Ok(()));
        }
        Ok(())
    }

    /// Flushes whenever effects are queued, until shutdown (then once
    /// more). A failed write is retried with backoff: until etcd takes it,
    /// no agent hears of it.
    pub async fn flush_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.flush().await;
                    return;
                }
                _ = self.outbox_ready.notified() => {}
            }
            loop {
                match self.flush().await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not write the cluster's state to etcd; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Records a state-changing call in the audit log (and the coordinator's
    /// log); a failed write is logged, never the caller's failure.
    pub async fn audit(&self, who: String, action: &str, target: &str, outcome: String) {
        tracing::info!(%who, action, target, %outcome, "audit");
        let entry = crate::store::AuditEntry {
            unix_ms: unix_ms(),
            who,
            action: action.to_string(),
            target: target.to_string(),
            outcome,
        };
        if let Err(error) = self.store.put_audit(&entry).await {
            tracing::warn!(%error, "audit record not stored");
        }
    }

    /// The newest `limit` audit records.
    pub async fn audit_log(
        &self,
        limit: u32,
    ) -> Result<Vec<crate::store::AuditEntry>, CoordinatorError> {
        self.store.audit(i64::from(limit.clamp(1, 10_000))).await
    }

    pub async fn launch(&self, spec: JobSpec) -> Result<JobRecord, CoordinatorError> {
        spec.validate()?;
        crate::admission::check(&spec, !self.config.no_path_checks, &self.config.limits)?;
        let now = unix_ms();
        let job = JobRecord::new(JobId::generate(now), spec, now);
        let job_id = job.id.clone();
        let mut cluster = self.cluster.lock().await;
        let effects = cluster.submit(job, now);
        let flushed = self.apply(&cluster, effects);
        let record = cluster.jobs[&job_id].clone();
        drop(cluster);
        if let Err(error) = flushed.wait().await {
            // Not stored, so not submitted: nothing of it stays in memory,
            // and no agent heard of it (messages go out after the writes;
            // a later batch drops its starts).
            self.cluster.lock().await.withdraw(&job_id);
            return Err(error);
        }
        Ok(record)
    }

    /// The job: live or recent from memory, older finished ones from the
    /// archive they moved to after their retention.
    pub async fn job(&self, job_id: &JobId) -> Result<JobRecord, CoordinatorError> {
        let live = self.cluster.lock().await.jobs.get(job_id).cloned();
        live.or_else(|| self.metrics.archived_job(job_id.as_str()))
            .ok_or_else(|| CoordinatorError::JobNotFound(job_id.0.clone()))
    }

    /// Moves finished jobs older than the retention period out of etcd and
    /// memory, into the metrics folder beside their curves. Returns how
    /// many moved.
    pub async fn retire_finished(&self) -> Result<usize, CoordinatorError> {
        let retention = self.config.job_retention_seconds;
        if retention == 0 {
            return Ok(0);
        }
        let cutoff = unix_ms()
            .saturating_sub(i64::try_from(retention.saturating_mul(1000)).unwrap_or(i64::MAX));
        let mut cluster = self.cluster.lock().await;
        let old: Vec<JobRecord> = cluster
            .jobs
            .values()
            .filter(|job| {
                job.state.is_terminal()
                    && job.live_ranks().next().is_none()
                    && job
                        .finished_unix_ms
                        .is_some_and(|finished| finished < cutoff)
            })
            .cloned()
            .collect();
        for job in &old {
            // The archive copy first: if the delete then fails, the job is
            // still in etcd and is retired again at the next pass.
            self.metrics
                .archive_job(job)
                .map_err(|error| metrics_error(&job.id, error))?;
            self.store.delete_job(&job.id).await?;
            cluster.jobs.remove(&job.id);
            cluster.progress_ms.remove(&job.id);
            tracing::info!(job = %job.id, "retention: moved from etcd to the metrics archive");
        }
        Ok(old.len())
    }

    pub async fn jobs(&self) -> Vec<JobRecord> {
        let mut jobs: Vec<JobRecord> = self.cluster.lock().await.jobs.values().cloned().collect();
        jobs.sort_by_key(|job| job.created_unix_ms);
        jobs
    }

    pub async fn job_count(&self) -> usize {
        self.cluster.lock().await.jobs.len()
    }

    pub async fn stop(&self, job_id: &JobId) -> Result<JobRecord, CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        if !cluster.jobs.contains_key(job_id) {
            return Err(CoordinatorError::JobNotFound(job_id.0.clone()));
        }
        let effects = cluster.stop(job_id, unix_ms());
        let flushed = self.apply(&cluster, effects);
        let record = cluster.jobs[job_id].clone();
        drop(cluster);
        flushed.wait().await?;
        Ok(record)
    }

    /// Nodes with their free slots.
    pub async fn nodes(&self) -> Vec<(NodeRecord, u32)> {
        let cluster = self.cluster.lock().await;
        cluster
            .nodes
            .values()
            .map(|node| (node.clone(), cluster.free_slots(node)))
            .collect()
    }

    /// Past events of the job (from `from_seq`), then live ones; the
    /// receiver ends after the event that makes the job terminal.
    pub async fn watch(
        &self,
        job_id: &JobId,
        from_seq: u64,
    ) -> Result<mpsc::Receiver<JobEvent>, CoordinatorError> {
        let mut live = self.events_tx.subscribe();
        self.job(job_id).await?;
        let past = self.store.events(job_id).await?;
        let (events_tx, events_rx) = mpsc::channel(256);
        let job_id = job_id.clone();
        let current = self.job(&job_id).await?;
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut next_seq = from_seq;
            for event in past.into_iter().filter(|event| event.seq >= from_seq) {
                next_seq = event.seq + 1;
                let terminal = event.state.is_terminal();
                if events_tx.send(event).await.is_err() || terminal {
                    return;
                }
            }
            // A job that has ended gets no more events: its stream ends here
            // (also for one retired from etcd, whose stored events are gone).
            if current.state.is_terminal() {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(event) if event.job_id == job_id && event.seq >= next_seq => {
                        next_seq = event.seq + 1;
                        let terminal = event.state.is_terminal();
                        if events_tx.send(event).await.is_err() || terminal {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // This watcher fell behind the live feed: it
                        // resyncs from the stored events, so it misses
                        // nothing (the terminal event included).
                        tracing::debug!(job = %job_id, missed, "watcher lagged; resyncing from etcd");
                        let Ok(stored) = store.events(&job_id).await else {
                            return;
                        };
                        let from = next_seq;
                        for event in stored.into_iter().filter(|event| event.seq >= from) {
                            next_seq = event.seq + 1;
                            let terminal = event.state.is_terminal();
                            if events_tx.send(event).await.is_err() || terminal {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(events_rx)
    }

    pub async fn register(&self, registration: Registration) -> Result<(), CoordinatorError> {
        if registration.protocol_version != flamingo_proto::PROTOCOL_VERSION {
            tracing::warn!(
                node = %registration.node_id,
                version = registration.protocol_version,
                "refused agent with a different protocol version"
            );
            return Err(CoordinatorError::ProtocolMismatch {
                agent: registration.protocol_version,
                coordinator: flamingo_proto::PROTOCOL_VERSION,
            });
        }
        if registration.slots == 0 {
            return Err(
                flamingo_common::CommonError::invalid("slots", "must be at least 1").into(),
            );
        }
        let mut cluster = self.cluster.lock().await;
        let now = unix_ms();
        let mut effects = Effects::default();
        if let Some(previous) = cluster.nodes.get(&registration.node_id).cloned() {
            // The agent restarted: whatever it ran before is gone.
            let lost = cluster.node_lost(&previous.node_id, "its agent restarted", now);
            effects.jobs_changed.extend(lost.jobs_changed);
            effects.events.extend(lost.events);
            effects.messages.extend(lost.messages);
        }
        let node = NodeRecord {
            node_id: registration.node_id.clone(),
            address: registration.address,
            slots: registration.slots,
            gpu: registration.gpu,
            draining: false,
            agent_endpoint: registration.agent_endpoint,
            rendezvous_port_first: registration.rendezvous_port_first,
            rendezvous_port_count: registration.rendezvous_port_count.max(1),
            lease_id: 0,
            registered_unix_ms: now,
        };
        self.store.put_node(&node).await?;
        tracing::info!(node = %node.node_id, slots = node.slots, "node registered");
        let node_id = node.node_id.clone();
        cluster.nodes.insert(node_id.clone(), node);
        cluster.heard_from(&node_id, self.lease_ms(), now);
        let scheduled = cluster.schedule(now);
        effects.jobs_changed.extend(scheduled.jobs_changed);
        effects.events.extend(scheduled.events);
        effects.messages.extend(scheduled.messages);
        let flushed = self.apply(&cluster, effects);
        drop(cluster);
        flushed.wait().await
    }

    /// Registers the agent's message channel and returns the starts it
    /// should act on now.
    pub async fn attach(
        &self,
        node_id: &NodeId,
        sender: AgentSender,
    ) -> Result<Vec<pb::CoordinatorMessage>, CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        if !cluster.nodes.contains_key(node_id) {
            return Err(CoordinatorError::NodeNotRegistered(node_id.0.clone()));
        }
        self.sessions.lock().await.insert(node_id.clone(), sender);
        cluster.heard_from(node_id, self.lease_ms(), unix_ms());
        let starts = cluster.starts_for(node_id);
        if cluster.detached.remove(node_id) {
            // Jobs may have waited for this node (their starts reach it
            // through the session just registered).
            let effects = cluster.schedule(unix_ms());
            // Delivered when written; the attach does not wait for it.
            drop(self.apply(&cluster, effects));
        }
        Ok(starts)
    }

    pub async fn detach(&self, node_id: &NodeId, sender: &AgentSender) {
        let mut cluster = self.cluster.lock().await;
        let mut sessions = self.sessions.lock().await;
        if sessions
            .get(node_id)
            .is_some_and(|current| current.same_channel(sender))
        {
            sessions.remove(node_id);
            cluster.connection_closed(node_id, self.detach_grace_ms(), unix_ms());
        }
    }

    pub async fn heartbeat(
        &self,
        node_id: &NodeId,
        running: BTreeSet<(JobId, u32, u32)>,
        draining: bool,
    ) -> Result<(), CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        if !cluster.nodes.contains_key(node_id) {
            return Err(CoordinatorError::NodeNotRegistered(node_id.0.clone()));
        }
        cluster.heard_from(node_id, self.lease_ms(), unix_ms());
        let mut node_changed = None;
        if let Some(node) = cluster.nodes.get_mut(node_id) {
            if node.draining != draining {
                node.draining = draining;
                node_changed = Some(node.clone());
            }
        }
        if let Some(node) = node_changed {
            self.store.put_node(&node).await?;
            tracing::info!(node = %node_id, draining, "node drain state changed");
        }
        let grace_ms = i64::from(self.config.heartbeat_interval_ms) * 3;
        let effects = cluster.heartbeat(node_id, &running, grace_ms, unix_ms());
        // A heartbeat does not wait for etcd: what it decided is delivered
        // once written, and the next heartbeat reconciles again.
        drop(self.apply(&cluster, effects));
        Ok(())
    }

    pub async fn rank_report(
        &self,
        job_id: &JobId,
        attempt: u32,
        rank: u32,
        outcome: RankOutcome,
    ) -> Result<(), CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        let effects = cluster.rank_report(job_id, attempt, rank, outcome, unix_ms());
        let flushed = self.apply(&cluster, effects);
        drop(cluster);
        // Answered once durable: an agent that is told OK never needs to
        // report it again.
        flushed.wait().await
    }

    /// Stores a rank's metric report (on disk, not in etcd); a failure to
    /// store is logged, never sent back to the rank.
    pub fn record_metrics(&self, job_id: &JobId, point: &crate::metrics::Point) {
        if let Err(error) = self.metrics.append(job_id.as_str(), point) {
            tracing::warn!(job = %job_id, %error, "could not store a metric report");
        }
    }

    /// Stores ranks' batches of reports and notes; a failure to store is
    /// logged, never sent back to the rank. Batches that arrive together
    /// are written together (one append per job, on the blocking pool, by
    /// [`Self::metrics_loop`]); the call returns once its batch is stored,
    /// so a read after it sees it.
    pub async fn record_batches(
        &self,
        batches: Vec<(
            JobId,
            Vec<crate::metrics::Point>,
            Vec<crate::metrics::StoredEvent>,
        )>,
    ) {
        if batches.is_empty() {
            return;
        }
        let (done, stored) = oneshot::channel();
        {
            // All under one hold of the queue, so the writer takes them in
            // one round; the last carries the call's waiter.
            let mut queue = self.metrics_queue.lock().unwrap_or_else(|e| e.into_inner());
            let mut done = Some(done);
            let count = batches.len();
            for (index, (job_id, points, notes)) in batches.into_iter().enumerate() {
                let waiter = if index + 1 == count {
                    done.take()
                } else {
                    None
                };
                queue.push((job_id, points, notes, waiter));
            }
        }
        self.metrics_ready.notify_one();
        let _ = stored.await;
    }

    /// Writes queued metric batches until shutdown, each round's batches
    /// grouped by job.
    pub async fn metrics_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.metrics_ready.notified() => false,
            };
            let queued =
                std::mem::take(&mut *self.metrics_queue.lock().unwrap_or_else(|e| e.into_inner()));
            let mut by_job: std::collections::BTreeMap<
                JobId,
                (Vec<crate::metrics::Point>, Vec<crate::metrics::StoredEvent>),
            > = std::collections::BTreeMap::new();
            let mut waiters = Vec::with_capacity(queued.len());
            for (job_id, points, notes, done) in queued {
                let entry = by_job.entry(job_id).or_default();
                entry.0.extend(points);
                entry.1.extend(notes);
                waiters.push(done);
            }
            let store = self.metrics.clone();
            let written = tokio::task::spawn_blocking(move || {
                for (job_id, (points, notes)) in by_job {
                    if let Err(error) = store.append_batch(job_id.as_str(), &points, &notes) {
                        tracing::warn!(job = %job_id, %error, "could not store a metrics batch");
                    }
                }
            })
            .await;
            if let Err(error) = written {
                tracing::warn!(%error, "metrics writer failed");
            }
            for waiter in waiters.into_iter().flatten() {
                let _ = waiter.send(());
            }
            if stopping {
                return;
            }
        }
    }

    /// The job's attempt and state, without copying its record (rank
    /// credentials are checked against it on every report).
    pub async fn job_attempt(
        &self,
        job_id: &JobId,
    ) -> Result<(u32, flamingo_common::JobState), CoordinatorError> {
        let live = self
            .cluster
            .lock()
            .await
            .jobs
            .get(job_id)
            .map(|job| (job.attempt, job.state));
        match live {
            Some(found) => Ok(found),
            None => self.job(job_id).await.map(|job| (job.attempt, job.state)),
        }
    }

    /// Stores a checkpoint's benchmark scores with the job (on disk, with
    /// its metrics) and marks them on its timeline. Unlike a rank's report
    /// this is not progress: the hang watchdog does not see it.
    pub async fn record_eval(
        &self,
        job_id: &JobId,
        mut record: crate::metrics::EvalRecord,
    ) -> Result<(), CoordinatorError> {
        self.job(job_id).await?;
        let invalid = |field: &str, message: &str| {
            CoordinatorError::Invalid(flamingo_common::CommonError::InvalidField {
                field: format!("eval_report.{field}"),
                message: message.to_string(),
            })
        };
        if record.dataset.is_empty() {
            return Err(invalid(
                "dataset",
                "empty; name the benchmark (coco, vqav2, ...)",
            ));
        }
        if record.scores.is_empty() {
            return Err(invalid("scores", "empty; report at least one shot count"));
        }
        if record.scores.iter().any(|score| !score.mean.is_finite()) {
            return Err(invalid("scores.mean", "not a finite number"));
        }
        record.unix_ms = unix_ms();
        self.metrics
            .append_eval(job_id.as_str(), &record)
            .map_err(|error| metrics_error(job_id, error))
    }

    /// The job's stored eval reports, in arrival order.
    pub async fn evals(
        &self,
        job_id: &JobId,
    ) -> Result<Vec<crate::metrics::EvalRecord>, CoordinatorError> {
        self.job(job_id).await?;
        self.metrics
            .evals(job_id.as_str())
            .map_err(|error| metrics_error(job_id, error))
    }

    pub fn metrics_store(&self) -> &crate::metrics::MetricsStore {
        &self.metrics
    }

    /// Every metric report stored for the job.
    pub async fn metrics(
        &self,
        job_id: &JobId,
    ) -> Result<Vec<crate::metrics::Point>, CoordinatorError> {
        self.job(job_id).await?;
        self.metrics
            .read(job_id.as_str())
            .map_err(|error| metrics_error(job_id, error))
    }

    /// Rank 0 finished `step` (kept in memory; it feeds hang detection).
    pub async fn progress(&self, job_id: &JobId, attempt: u32, step: u64) {
        self.cluster
            .lock()
            .await
            .progress(job_id, attempt, step, unix_ms());
    }

    /// Makes a checkpoint the job's latest (one etcd write of the job
    /// record, cursor included) and returns the retired checkpoints' paths.
    /// Until the write succeeds the previous checkpoint stays the latest.
    pub async fn commit_checkpoint(
        &self,
        job_id: &JobId,
        record: flamingo_common::CheckpointRecord,
    ) -> Result<Vec<String>, CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        let before = cluster.jobs.get(job_id).cloned();
        if let Some(job) = &before {
            check_checkpoint_path(job, &record)?;
        }
        let attempt = record.attempt;
        let (effects, retired) = cluster
            .commit_checkpoint(job_id, record, unix_ms())
            .map_err(|refused| match refused {
                CommitRefused::UnknownJob => CoordinatorError::JobNotFound(job_id.0.clone()),
                CommitRefused::Stale {
                    current_attempt,
                    state,
                } => CoordinatorError::StaleAttempt {
                    job_id: job_id.0.clone(),
                    attempt,
                    current_attempt,
                    state: state.as_str().to_string(),
                },
            })?;
        let event_seqs: Vec<u64> = effects.events.iter().map(|event| event.seq).collect();
        let flushed = self.apply(&cluster, effects);
        drop(cluster);
        if let Err(error) = flushed.wait().await {
            // Not durable: the commit did not happen. The job keeps the
            // checkpoints it had, and the commit's event is not written.
            let mut cluster = self.cluster.lock().await;
            if let (Some(job), Some(before)) = (cluster.jobs.get_mut(job_id), before) {
                job.checkpoints = before.checkpoints;
            }
            let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
            outbox
                .events
                .retain(|event| !(&event.job_id == job_id && event_seqs.contains(&event.seq)));
            return Err(error);
        }
        Ok(retired)
    }

    /// Hang detection; runs every second.
    pub async fn tick(&self) -> Result<(), CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        let effects = cluster.tick(unix_ms());
        drop(self.apply(&cluster, effects));
        Ok(())
    }

    /// Runs [`Self::tick`] until shutdown.
    pub async fn watch_hangs(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(error) = self.tick().await {
                tracing::warn!(%error, "hang check could not record its decision");
            }
            if let Err(error) = self.retire_finished().await {
                tracing::warn!(%error, "retention could not move a finished job out of etcd");
            }
        }
    }

    pub async fn deregister(&self, node_id: &NodeId) -> Result<(), CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        if !cluster.nodes.contains_key(node_id) {
            return Ok(());
        }
        let effects = cluster.node_lost(node_id, "its agent shut down", unix_ms());
        self.store.delete_node(node_id).await?;
        let flushed = self.apply(&cluster, effects);
        drop(cluster);
        flushed.wait().await?;
        tracing::info!(node = %node_id, "node deregistered");
        Ok(())
    }

    /// The agent endpoint that holds the log of `rank`.
    pub async fn log_endpoint(
        &self,
        job_id: &JobId,
        rank: u32,
    ) -> Result<String, CoordinatorError> {
        let cluster = self.cluster.lock().await;
        let job = cluster
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordinatorError::JobNotFound(job_id.0.clone()))?;
        let record = job
            .ranks
            .iter()
            .find(|record| record.rank == rank)
            .ok_or_else(|| CoordinatorError::Logs {
                job_id: job_id.0.clone(),
                rank,
                message: format!("no such rank (the job has {} ranks)", job.ranks.len()),
            })?;
        cluster
            .nodes
            .get(&record.node)
            .map(|node| node.agent_endpoint.clone())
            .ok_or_else(|| CoordinatorError::Logs {
                job_id: job_id.0.clone(),
                rank,
                message: format!("node {} is gone; its log went with it", record.node),
            })
    }

    /// How long a node may go unheard before it is lost.
    fn lease_ms(&self) -> i64 {
        i64::from(self.config.lease_ttl_seconds) * 1000
    }

    /// How long a node whose agent's stream closed has to attach again:
    /// a heartbeat and a half (an agent that lives reconnects at once).
    fn detach_grace_ms(&self) -> i64 {
        (i64::from(self.config.heartbeat_interval_ms) * 3 / 2).min(self.lease_ms())
    }

    /// Loses the nodes past their deadline (their records leave etcd).
    pub async fn expire_nodes(&self) -> Result<(), CoordinatorError> {
        let mut cluster = self.cluster.lock().await;
        let (lost, effects) = cluster.expire_nodes(self.lease_ms(), unix_ms());
        if lost.is_empty() {
            return Ok(());
        }
        for node_id in &lost {
            tracing::warn!(node = %node_id, "node lost: not heard from in time");
            self.store.delete_node(node_id).await?;
        }
        drop(self.apply(&cluster, effects));
        Ok(())
    }

    /// Runs [`Self::expire_nodes`] four times a second until shutdown.
    pub async fn watch_liveness(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            if let Err(error) = self.expire_nodes().await {
                tracing::warn!(%error, "could not record a lost node; retrying");
            }
        }
    }
}

/// A commit names the checkpoint folder of its step inside the job's run
/// folder, exactly: the paths committed are the ones retention later hands
/// to rank 0 to delete, so a path from anywhere else is refused (and
/// nothing is committed or deleted).
fn check_checkpoint_path(
    job: &JobRecord,
    record: &flamingo_common::CheckpointRecord,
) -> Result<(), CoordinatorError> {
    let refused = |message: String| {
        CoordinatorError::Invalid(flamingo_common::CommonError::invalid(
            "commit_checkpoint.path",
            message,
        ))
    };
    let flamingo_common::JobKind::Train { config_json } = &job.spec.kind else {
        return Err(refused(format!(
            "job {} is a {} job; only train jobs commit checkpoints",
            job.id,
            job.spec.kind.label()
        )));
    };
    let run: flamingo_common::train::TrainJob = serde_json::from_str(config_json)
        .map_err(|error| refused(format!("the job's run settings do not decode: {error}")))?;
    let expected = run.checkpoint_dir(record.step).display().to_string();
    if record.path != expected {
        return Err(refused(format!(
            "'{}' is not step {}'s checkpoint folder of this run ({expected}); nothing was committed or deleted",
            record.path, record.step
        )));
    }
    Ok(())
}

/// The metrics store failed for `job_id` (its disk, not the request).
fn metrics_error(job_id: &JobId, error: std::io::Error) -> CoordinatorError {
    CoordinatorError::Metrics {
        job_id: job_id.0.clone(),
        message: error.to_string(),
    }
}
