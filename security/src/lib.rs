//! Security for every flamingo link: the cluster's certificate authority
//! ([`Pki`]), who a certificate names ([`Identity`]), tonic's mutual-TLS
//! settings from certificate files ([`TlsFiles`]), and the per-(job,
//! attempt) credential a rank carries ([`RankToken`]).
//!
//! Every certificate names its holder in a SAN URI:
//! `spiffe://flamingo/user/<role>/<name>`, `spiffe://flamingo/node/<id>` or
//! `spiffe://flamingo/service/<name>`. Servers present a DNS name clients
//! check whatever address they dialled: [`COORDINATOR_NAME`],
//! [`DATA_SERVICE_NAME`], [`ETCD_NAME`], and [`AGENT_NAME`] for every
//! agent's log service.

mod error;
mod failover;
mod identity;
mod pki;
mod ratelimit;
mod tls;
mod token;

pub use error::SecurityError;
pub use failover::{addresses, Failover};
pub use identity::{Identity, PeerCertificate, Role};
pub use pki::{read_certificate, read_secret, Issued, IssuedSummary, Pki, Revocations};
pub use ratelimit::{RateBudget, RateLimitLayer, RateLimiter};
pub use tls::{client_tls_from_env, endpoint, upgrade_scheme, ClientTls, TlsFiles};
pub use token::RankToken;

pub type Result<T, E = SecurityError> = std::result::Result<T, E>;

/// The DNS name the coordinator's certificate carries.
pub const COORDINATOR_NAME: &str = "coordinator.flamingo";
/// The DNS name the data service's certificate carries.
pub const DATA_SERVICE_NAME: &str = "data.flamingo";
/// The DNS name etcd's certificate carries.
pub const ETCD_NAME: &str = "etcd.flamingo";
/// The DNS name every agent's certificate carries (its log service).
pub const AGENT_NAME: &str = "agent.flamingo";

/// Environment variables a process finds its credentials in; the agent sets
/// them for its ranks.
pub const ENV_CA: &str = "FLAMINGO_TLS_CA";
pub const ENV_CERT: &str = "FLAMINGO_TLS_CERT";
pub const ENV_KEY: &str = "FLAMINGO_TLS_KEY";
/// A rank's credential for its job's attempt.
pub const ENV_RANK_TOKEN: &str = "FLAMINGO_RANK_TOKEN";

/// Whether `address` (a socket address or a URL's host) is loopback, where
/// `--insecure` is allowed.
pub fn is_loopback(address: &std::net::SocketAddr) -> bool {
    address.ip().is_loopback()
}

/// The refusal for plain text on a non-loopback address.
pub fn insecure_refusal(flag: &str, address: &std::net::SocketAddr) -> SecurityError {
    SecurityError::InsecureNonLoopback {
        flag: flag.to_string(),
        address: address.to_string(),
    }
}
