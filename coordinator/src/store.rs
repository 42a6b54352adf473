//! etcd persistence. Layout under the prefix (default `/flamingo`):
//!
//! - `nodes/<node id>`: NodeRecord JSON, written when the node registers
//!   and deleted when it is lost (whether it lives is kept in memory:
//!   heartbeats cost etcd nothing);
//! - `jobs/<job id>`: JobRecord JSON (spec, state, assignment, ranks);
//! - `events/<job id>/<seq, 12 digits>`: JobEvent JSON, the job's event log.

use etcd_client::{Client, GetOptions};
use flamingo_common::{JobEvent, JobId, JobRecord, NodeId, NodeRecord};

use crate::CoordinatorError;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// Under leader election: every write is made only while this
    /// coordinator's leadership key still exists with its revision.
    fence: Option<crate::leadership::Fence>,
}

/// What a restarted coordinator reads back.
pub struct Snapshot {
    pub nodes: Vec<NodeRecord>,
    pub jobs: Vec<JobRecord>,
    /// Revision to start the node watch after.
    pub revision: i64,
}

/// Decodes JSON records, naming the key of the first one that does not decode.
/// A record that does not decode: its key, its value, and why.
type Undecodable = (Vec<u8>, Vec<u8>, String);

/// Records that decode, and those that do not.
fn decode_all<T: serde::de::DeserializeOwned>(
    kvs: &[etcd_client::KeyValue],
) -> (Vec<T>, Vec<Undecodable>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for kv in kvs {
        match serde_json::from_slice(kv.value()) {
            Ok(record) => good.push(record),
            Err(error) => bad.push((kv.key().to_vec(), kv.value().to_vec(), error.to_string())),
        }
    }
    (good, bad)
}

/// The records that decode; each that does not is logged and left out (an
/// audit or event record is history, not state the coordinator needs).
fn decode_or_skip<T: serde::de::DeserializeOwned>(kvs: &[etcd_client::KeyValue]) -> Vec<T> {
    let (good, bad) = decode_all(kvs);
    for (key, _, why) in bad {
        tracing::warn!(key = %String::from_utf8_lossy(&key), "skipped a record that does not decode: {why}");
    }
    good
}

/// One state-changing call, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    pub unix_ms: i64,
    pub who: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

impl EtcdStore {
    /// Connects to etcd; with `tls`, over mutual TLS checking etcd's
    /// certificate for [`flamingo_security::ETCD_NAME`].
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&flamingo_security::ClientTls>,
    ) -> Result<Self, CoordinatorError> {
        // TLS when the endpoints say https (etcd started by flamingo); an
        // operator's own etcd may be plain text on a private network.
        let tls = tls.filter(|_| {
            endpoints
                .iter()
                .any(|endpoint| endpoint.starts_with("https://"))
        });
        let options = tls.map(|tls| {
            etcd_client::ConnectOptions::new().with_tls(tls.config(flamingo_security::ETCD_NAME))
        });
        let client = Client::connect(endpoints, options)
            .await
            .map_err(|source| CoordinatorError::Etcd {
                action: format!("connect to {}", endpoints.join(",")),
                message: source.to_string(),
            })?;
        Ok(Self {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            fence: None,
        })
    }

    /// The etcd client (leader election uses the same connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The key prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// From now on every write is fenced by `fence`.
    pub fn fenced(mut self, fence: crate::leadership::Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Runs `operations` as one transaction: under a fence, only while the
    /// leadership key still has its revision; a refused write marks the
    /// leadership lost and fails with [`CoordinatorError::Deposed`].
    async fn write(
        &self,
        operations: Vec<etcd_client::TxnOp>,
        action: String,
    ) -> Result<(), CoordinatorError> {
        let mut txn = etcd_client::Txn::new();
        if let Some(fence) = &self.fence {
            txn = txn.when([etcd_client::Compare::create_revision(
                fence.key.clone(),
                etcd_client::CompareOp::Equal,
                fence.revision,
            )]);
        }
        let response = self
            .client
            .clone()
            .txn(txn.and_then(operations))
            .await
            .map_err(Self::etcd_error(action))?;
        if !response.succeeded() {
            if let Some(fence) = &self.fence {
                fence.lost.cancel();
            }
            return Err(CoordinatorError::Deposed);
        }
        Ok(())
    }

    fn node_key(&self, node_id: &NodeId) -> String {
        format!("{}/nodes/{}", self.prefix, node_id)
    }

    fn job_key(&self, job_id: &JobId) -> String {
        format!("{}/jobs/{}", self.prefix, job_id)
    }

    fn event_key(&self, event: &JobEvent) -> String {
        format!("{}/events/{}/{:012}", self.prefix, event.job_id, event.seq)
    }

    fn etcd_error(action: String) -> impl FnOnce(etcd_client::Error) -> CoordinatorError {
        move |source| CoordinatorError::Etcd {
            action,
            message: source.to_string(),
        }
    }

    pub async fn load(&self) -> Result<Snapshot, CoordinatorError> {
        let mut client = self.client.clone();
        let nodes_prefix = format!("{}/nodes/", self.prefix);
        let response = client
            .get(nodes_prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Self::etcd_error(format!("read {nodes_prefix}")))?;
        let revision = response.header().map_or(0, |header| header.revision());
        let (nodes, bad_nodes) = decode_all::<NodeRecord>(response.kvs());
        let jobs_prefix = format!("{}/jobs/", self.prefix);
        let response = client
            .get(jobs_prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Self::etcd_error(format!("read {jobs_prefix}")))?;
        let (jobs, bad_jobs) = decode_all::<JobRecord>(response.kvs());
        for (key, value, why) in bad_nodes.into_iter().chain(bad_jobs) {
            self.quarantine(&key, value, &why).await?;
        }
        Ok(Snapshot {
            nodes,
            jobs,
            revision,
        })
    }

    /// Moves a record that does not decode out of the way (to
    /// `<prefix>/quarantine/<its key>`, in one transaction) so that the
    /// coordinator starts without it, and says so in its log.
    async fn quarantine(
        &self,
        key: &[u8],
        value: Vec<u8>,
        why: &str,
    ) -> Result<(), CoordinatorError> {
        let original = String::from_utf8_lossy(key).into_owned();
        let moved = format!(
            "{}/quarantine/{}",
            self.prefix,
            original
                .trim_start_matches(&self.prefix)
                .trim_start_matches('/')
        );
        self.write(
            vec![
                etcd_client::TxnOp::put(moved.clone(), value, None),
                etcd_client::TxnOp::delete(key.to_vec(), None),
            ],
            format!("quarantine {original}"),
        )
        .await?;
        tracing::error!(
            key = %original,
            quarantined = %moved,
            "a record in etcd does not decode ({why}); it was moved aside and the coordinator goes on without it \
             (inspect it with: etcdctl get {moved})"
        );
        Ok(())
    }

    /// A job record's key and value.
    pub fn job_put(&self, job: &JobRecord) -> (String, Vec<u8>) {
        let value = serde_json::to_vec(job).expect("job records serialise");
        (self.job_key(&job.id), value)
    }

    /// An event's key and value.
    pub fn event_put(&self, event: &JobEvent) -> (String, Vec<u8>) {
        let value = serde_json::to_vec(event).expect("events serialise");
        (self.event_key(event), value)
    }

    /// Writes every pair: transactions of up to 64 puts (etcd allows 128
    /// operations in one), sent together so etcd syncs them as one group.
    pub async fn put_all(&self, puts: Vec<(String, Vec<u8>)>) -> Result<(), CoordinatorError> {
        let mut transactions = Vec::new();
        let mut puts = puts.into_iter().peekable();
        while puts.peek().is_some() {
            let chunk: Vec<(String, Vec<u8>)> = puts.by_ref().take(64).collect();
            let first = chunk[0].0.clone();
            let count = chunk.len();
            let operations: Vec<etcd_client::TxnOp> = chunk
                .into_iter()
                .map(|(key, value)| etcd_client::TxnOp::put(key, value, None))
                .collect();
            transactions.push(self.write(
                operations,
                format!("write {first} (and {} more)", count - 1),
            ));
        }
        futures::future::try_join_all(transactions).await?;
        Ok(())
    }

    /// Appends an audit record (keys sort by time).
    pub async fn put_audit(&self, record: &AuditEntry) -> Result<(), CoordinatorError> {
        let key = format!(
            "{}/audit/{:020}-{:08x}",
            self.prefix,
            record.unix_ms,
            rand::random::<u32>()
        );
        let value = serde_json::to_vec(record).expect("audit records serialise");
        self.write(
            vec![etcd_client::TxnOp::put(key.clone(), value, None)],
            format!("write {key}"),
        )
        .await
    }

    /// The newest `limit` audit records, newest first.
    pub async fn audit(&self, limit: i64) -> Result<Vec<AuditEntry>, CoordinatorError> {
        let prefix = format!("{}/audit/", self.prefix);
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(
                etcd_client::SortTarget::Key,
                etcd_client::SortOrder::Descend,
            )
            .with_limit(limit);
        let response = self
            .client
            .clone()
            .get(prefix.clone(), Some(options))
            .await
            .map_err(Self::etcd_error(format!("read {prefix}")))?;
        Ok(decode_or_skip(response.kvs()))
    }

    pub async fn events(&self, job_id: &JobId) -> Result<Vec<JobEvent>, CoordinatorError> {
        let prefix = format!("{}/events/{}/", self.prefix, job_id);
        let response = self
            .client
            .clone()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Self::etcd_error(format!("read {prefix}")))?;
        let mut events: Vec<JobEvent> = decode_or_skip(response.kvs());
        events.sort_by_key(|event| event.seq);
        Ok(events)
    }

    pub async fn put_node(&self, node: &NodeRecord) -> Result<(), CoordinatorError> {
        let key = self.node_key(&node.node_id);
        let value = serde_json::to_vec(node).expect("node records serialise");
        self.write(
            vec![etcd_client::TxnOp::put(key.clone(), value, None)],
            format!("write {key}"),
        )
        .await
    }

    pub async fn delete_node(&self, node_id: &NodeId) -> Result<(), CoordinatorError> {
        let key = self.node_key(node_id);
        self.write(
            vec![etcd_client::TxnOp::delete(key.clone(), None)],
            format!("delete {key}"),
        )
        .await
    }

    /// Removes a job and its events from etcd in one transaction (the job
    /// left its retention period; its record lives on in the archive).
    pub async fn delete_job(&self, job_id: &JobId) -> Result<(), CoordinatorError> {
        let events = format!("{}/events/{}/", self.prefix, job_id);
        self.write(
            vec![
                etcd_client::TxnOp::delete(self.job_key(job_id), None),
                etcd_client::TxnOp::delete(
                    events,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            ],
            format!("delete job {job_id}"),
        )
        .await
    }
}
