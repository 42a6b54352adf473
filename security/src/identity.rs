//! Who a certificate names.

use std::fmt;

use x509_parser::extensions::GeneralName;

use crate::{Result, SecurityError};

const URI_PREFIX: &str = "spiffe://flamingo/";

/// A user's role: what the coordinator lets the user do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only: jobs (without their environment's values), nodes, logs, curves.
    Viewer,
    /// Train, eval and collective-check jobs; stops and reads its own.
    Submitter,
    /// Everything: command jobs, other users' jobs, certificates.
    Admin,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = SecurityError;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "submitter" => Ok(Role::Submitter),
            "admin" => Ok(Role::Admin),
            other => Err(SecurityError::Invalid {
                name: "role".into(),
                message: format!("'{other}' (one of admin, submitter, viewer)"),
            }),
        }
    }
}

/// The holder of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Identity {
    User { name: String, role: Role },
    Node { id: String },
    Service { name: String },
}

impl Identity {
    pub fn user(name: &str, role: Role) -> Self {
        Identity::User {
            name: name.to_string(),
            role,
        }
    }
    pub fn node(id: &str) -> Self {
        Identity::Node { id: id.to_string() }
    }
    pub fn service(name: &str) -> Self {
        Identity::Service {
            name: name.to_string(),
        }
    }

    /// The SAN URI naming this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::User { name, role } => format!("{URI_PREFIX}user/{}/{name}", role.label()),
            Identity::Node { id } => format!("{URI_PREFIX}node/{id}"),
            Identity::Service { name } => format!("{URI_PREFIX}service/{name}"),
        }
    }

    /// Parses [`Identity::uri`]'s form.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let mut parts = rest.splitn(3, '/');
        let identity = match (parts.next()?, parts.next()?, parts.next()) {
            ("user", role, Some(name)) => Identity::user(name, role.parse().ok()?),
            ("node", id, None) => Identity::node(id),
            ("service", name, None) => Identity::service(name),
            _ => return None,
        };
        Some(identity)
    }

    /// A name fit for a file: `user-admin-alice`, `node-n0`, `service-etcd`.
    pub fn file_stem(&self) -> String {
        let raw = match self {
            Identity::User { name, role } => format!("user-{}-{name}", role.label()),
            Identity::Node { id } => format!("node-{id}"),
            Identity::Service { name } => format!("service-{name}"),
        };
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Checks a name before it goes into a certificate.
    pub fn validate(&self) -> Result<()> {
        let (field, value) = match self {
            Identity::User { name, .. } => ("user", name),
            Identity::Node { id } => ("node", id),
            Identity::Service { name } => ("service", name),
        };
        let fine = !value.is_empty()
            && value.len() <= 128
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
        if fine {
            Ok(())
        } else {
            Err(SecurityError::Invalid {
                name: field.into(),
                message: format!("'{value}': use 1 to 128 letters, digits, '-', '_', '.' or '@'"),
            })
        }
    }

    /// What this identity may be called in logs and job records.
    pub fn principal(&self) -> String {
        match self {
            Identity::User { name, .. } => name.clone(),
            Identity::Node { id } => format!("node:{id}"),
            Identity::Service { name } => format!("service:{name}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::User { name, role } => write!(f, "user {name} ({})", role.label()),
            Identity::Node { id } => write!(f, "node {id}"),
            Identity::Service { name } => write!(f, "service {name}"),
        }
    }
}

/// What a server learns from a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub identity: Identity,
    /// The serial number in lower-case hex (what revocation names).
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl PeerCertificate {
    /// Reads the identity from a DER certificate (already verified by TLS).
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| SecurityError::Certificate(format!("unreadable: {error}")))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|error| SecurityError::Certificate(format!("bad SAN: {error}")))?;
        let identity = names
            .into_iter()
            .flat_map(|extension| extension.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) => Identity::from_uri(uri),
                _ => None,
            })
            .ok_or_else(|| {
                SecurityError::Certificate(
                    "names no flamingo identity (no spiffe://flamingo/ SAN URI)".into(),
                )
            })?;
        Ok(Self {
            identity,
            serial: hex(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_foreign_ones_are_not_identities() {
        for identity in [
            Identity::user("alice", Role::Submitter),
            Identity::node("n0.rack1"),
            Identity::service("coordinator"),
        ] {
            assert_eq!(Identity::from_uri(&identity.uri()), Some(identity.clone()));
        }
        assert_eq!(Identity::from_uri("spiffe://other/node/n0"), None);
        assert_eq!(
            Identity::from_uri("spiffe://flamingo/user/root/alice"),
            None
        );
        assert_eq!(Identity::from_uri("spiffe://flamingo/node/a/b"), None);
        assert!(Identity::node("../x").validate().is_err());
        assert!(Identity::user("", Role::Admin).validate().is_err());
    }
}
