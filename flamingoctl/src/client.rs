//! Finding and connecting to the coordinator, with errors that say what was
//! tried and what to do.

use std::path::Path;
use std::time::Duration;

use flamingo_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::local::ClusterState;

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// `--coordinator` / `FLAMINGO_COORDINATOR`, else the local cluster's record,
/// else the default address.
pub fn resolve(flag: Option<&str>, state_dir: &Path) -> String {
    if let Some(address) = flag {
        return address.to_string();
    }
    match ClusterState::load(state_dir) {
        Ok(Some(state)) => state.coordinator,
        _ => DEFAULT_COORDINATOR.to_string(),
    }
}

/// The innermost cause, phrased briefly: `connection refused`.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current: &(dyn std::error::Error + 'static) = error;
    while let Some(source) = current.source() {
        current = source;
    }
    if let Some(io) = current.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::TimedOut => "timed out".to_string(),
            _ => io.to_string(),
        };
    }
    current.to_string()
}

pub fn unreachable_message(address: &str, cause: &str) -> String {
    format!(
        "cannot reach coordinator at {address} ({cause}); is the cluster up? try: flamingoctl up"
    )
}

pub async fn connect(address: &str) -> anyhow::Result<JobServiceClient<Channel>> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|_| {
            anyhow::anyhow!(
                "coordinator address '{address}' is not a URL (e.g. http://127.0.0.1:7070)"
            )
        })?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!(unreachable_message(address, &root_cause(&error))))?;
    Ok(JobServiceClient::new(channel))
}

/// Turns a failed call into a message naming the coordinator when the
/// connection, not the request, was the problem.
pub fn call_error(address: &str, status: tonic::Status) -> anyhow::Error {
    if status.code() == tonic::Code::Unavailable && status.message().contains("transport") {
        anyhow::anyhow!(unreachable_message(address, status.message()))
    } else {
        anyhow::anyhow!("{}", status.message())
    }
}
