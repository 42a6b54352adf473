//! Finding and connecting to the coordinator: `--coordinator`, then
//! `FLAMINGO_COORDINATOR` (both given by the caller), then the local
//! cluster's record, then [`DEFAULT_COORDINATOR`].

use std::path::Path;
use std::time::Duration;

use flamingo_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::cluster::ClusterState;
use crate::{ClientError, Result};

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// `flag` (`--coordinator` / `FLAMINGO_COORDINATOR`), else the local
/// cluster's record in `state_dir`, else the default address.
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

/// A job API client of the coordinator at `address`, with this process's
/// credentials (`FLAMINGO_TLS_*`).
pub async fn connect(address: &str) -> Result<JobServiceClient<Channel>> {
    let tls =
        flamingo_security::client_tls_from_env().map_err(|error| ClientError::Credentials {
            message: error.to_string(),
        })?;
    connect_with(address, tls.as_ref()).await
}

/// A job API client of the coordinator at `address`: mutual TLS with `tls`,
/// plain text without. With several addresses (comma separated: every
/// coordinator under leader election), the first that answers, which is
/// the leader (standbys do not listen).
pub async fn connect_with(
    address: &str,
    tls: Option<&flamingo_security::ClientTls>,
) -> Result<JobServiceClient<Channel>> {
    let addresses = flamingo_security::addresses(address);
    if addresses.len() <= 1 {
        return connect_one(address.trim(), tls).await;
    }
    let mut causes = Vec::new();
    for one in &addresses {
        match connect_one(one, tls).await {
            Ok(client) => return Ok(client),
            Err(ClientError::Unreachable { address, cause }) => {
                causes.push(format!("{address}: {cause}"))
            }
            Err(other) => return Err(other),
        }
    }
    Err(ClientError::Unreachable {
        address: address.to_string(),
        cause: causes.join("; "),
    })
}

async fn connect_one(
    address: &str,
    tls: Option<&flamingo_security::ClientTls>,
) -> Result<JobServiceClient<Channel>> {
    let endpoint = flamingo_security::endpoint(address, tls, flamingo_security::COORDINATOR_NAME)
        .map_err(|_| ClientError::BadAddress {
            address: address.to_string(),
        })?
        .connect_timeout(Duration::from_secs(3))
        // A deadline on every call's answer (a stream's first message
        // header, not the stream itself): a stuck coordinator fails a
        // command instead of hanging it.
        .timeout(Duration::from_secs(60));
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| ClientError::Unreachable {
            address: address.to_string(),
            cause: root_cause(&error),
        })?;
    Ok(JobServiceClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_coordinators_are_named_with_what_to_do() {
        let port = flamingo_common::net::free_local_port().unwrap();
        let address = format!("http://127.0.0.1:{port}");
        let message = connect(&address).await.unwrap_err().to_string();
        assert_eq!(
            message,
            format!("cannot reach coordinator at {address} (connection refused); is the cluster up? try: flamingoctl up")
        );
        let bad = connect("127.0.0.1 7070").await.unwrap_err().to_string();
        assert!(bad.contains("is not a URL"), "{bad}");
    }

    #[test]
    fn the_flag_wins_then_the_record_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve(None, dir.path()), DEFAULT_COORDINATOR);
        assert_eq!(resolve(Some("http://c:1"), dir.path()), "http://c:1");
    }
}
