//! Who may stream, and what they may read.
//!
//! A stream needs a rank credential of the cluster (`FLAMINGO_RANK_TOKEN`,
//! checked with the cluster's rank key) or a user's certificate; every
//! shard pattern and the tokenizer a spec names must lie under one of the
//! prefixes the service was started with (`--allow-prefix`). `http(s)://`
//! sources are refused unless `--allow-http`.

use std::path::{Component, Path, PathBuf};

use flamingo_data::spec::DataSpec;
use flamingo_security::{Identity, PeerCertificate, RankToken, Role};
use tonic::{Request, Status};

#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Allowed locations: local folders, or URL prefixes (`s3://bucket/x/`).
    pub prefixes: Vec<String>,
    pub allow_http: bool,
    /// Over mutual TLS (otherwise `--insecure`: no caller checks).
    pub secure: bool,
    /// The cluster's rank key; rank credentials are checked with it.
    pub rank_secret: Option<Vec<u8>>,
}

impl Access {
    /// A stream's caller: a rank with a valid credential, or a user who may
    /// submit jobs.
    pub fn check_caller<T>(&self, request: &Request<T>, token: &str) -> Result<(), Status> {
        if !self.secure {
            return Ok(());
        }
        let cert = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = PeerCertificate::from_der(&cert)
            .map_err(|error| Status::unauthenticated(error.to_string()))?;
        match (&peer.identity, &self.rank_secret) {
            (Identity::User { role, .. }, _) if *role >= Role::Submitter => Ok(()),
            (Identity::Node { .. }, Some(secret)) => RankToken::verify(secret, token)
                .map(|_| ())
                .map_err(|error| {
                    Status::unauthenticated(format!(
                        "{error}: streams need a live rank's FLAMINGO_RANK_TOKEN"
                    ))
                }),
            (identity, _) => Err(Status::permission_denied(format!(
                "{identity} may not stream batches (a rank with its credential, or a submitter)"
            ))),
        }
    }

    /// Every location `spec_toml` names lies under an allowed prefix.
    pub fn check_spec(&self, spec_toml: &str) -> Result<(), Status> {
        let spec = DataSpec::from_toml(spec_toml, None).map_err(Status::from)?;
        let mut locations: Vec<&str> = spec
            .sources
            .iter()
            .map(|source| source.shards.as_str())
            .collect();
        locations.extend(spec.shards.as_deref());
        locations.push(&spec.tokenizer);
        for location in locations {
            self.check_location(location)?;
        }
        Ok(())
    }

    fn check_location(&self, location: &str) -> Result<(), Status> {
        let denied = |why: &str| {
            Status::permission_denied(format!(
                "{location}: {why}; this data service serves only {} (start it with --allow-prefix to add one)",
                self.prefixes.join(", ")
            ))
        };
        let lower = location.to_ascii_lowercase();
        if (lower.starts_with("http://") || lower.starts_with("https://")) && !self.allow_http {
            return Err(denied("http(s) sources are off (--allow-http)"));
        }
        let local = match location.strip_prefix("file://") {
            Some(path) => Some(path),
            None if !location.contains("://") => Some(location),
            None => None,
        };
        let allowed = match local {
            Some(path) => {
                let path = normal(Path::new(path))
                    .ok_or_else(|| denied("not an absolute path without '..'"))?;
                self.prefixes.iter().any(|prefix| {
                    let prefix = prefix.strip_prefix("file://").unwrap_or(prefix);
                    !prefix.contains("://")
                        && normal(Path::new(prefix)).is_some_and(|prefix| path.starts_with(prefix))
                })
            }
            None => {
                !location.contains("/../")
                    && self.prefixes.iter().any(|prefix| {
                        prefix.contains("://") && location.starts_with(prefix.as_str())
                    })
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(denied("outside the allowed prefixes"))
        }
    }
}

/// `path` made absolute without `..` or `.`; `None` when it is relative or
/// climbs.
fn normal(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_locations_under_a_prefix_pass() {
        let access = Access {
            prefixes: vec!["/srv/data".into(), "s3://bucket/laion/".into()],
            ..Access::default()
        };
        for fine in [
            "/srv/data/x-{0..3}.tar",
            "file:///srv/data/tok",
            "s3://bucket/laion/a.tar",
        ] {
            assert!(access.check_location(fine).is_ok(), "{fine}");
        }
        for refused in [
            "file:///etc/passwd",
            "/srv/data/../../etc/x.tar",
            "/srv/database/x.tar",
            "relative/x.tar",
            "s3://bucket/other/a.tar",
            "https://example.com/a.tar",
        ] {
            let status = access.check_location(refused).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{refused}");
            assert!(status.message().contains(refused), "{}", status.message());
        }
    }
}
