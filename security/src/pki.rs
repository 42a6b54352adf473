//! The cluster's certificate authority: a folder holding the CA, the
//! certificates it issued, the revocation list and the rank-credential key.
//!
//! ```text
//! <dir>/ca.pem  ca.key             the authority (key 0600)
//! <dir>/certs/<who>.pem  <who>.key every issued certificate (keys 0600)
//! <dir>/revoked                    revoked serials, one per line
//! <dir>/rank.secret                the key rank credentials are signed with
//! <dir>/dashboard.token            what the dashboard asks for
//! <dir>/dashboard.token            what the dashboard asks for
//! ```

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::{Identity, PeerCertificate};
use crate::{Result, SecurityError, AGENT_NAME};

/// How long the authority itself is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A certificate with less than this left is issued again by [`Pki::ensure`].
const RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);

/// A certificate issued by the authority, on disk.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: Identity,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// One row of [`Pki::list`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedSummary {
    pub identity: Identity,
    pub file: PathBuf,
    pub serial: String,
    pub not_after: i64,
    pub revoked: bool,
}

/// The authority's folder.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Opens the authority in `dir`, creating it (and the rank key) on the
    /// first call; later calls reuse what is there.
    pub fn init(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        create_private_dir(&dir.join("certs"))?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        if !pki.ca_cert().exists() {
            pki.create_ca()?;
        }
        for secret_path in [pki.rank_secret_path(), pki.dashboard_token_path()] {
            if !secret_path.exists() {
                let mut secret = [0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                write_private(&secret_path, crate::identity::hex(&secret).as_bytes())?;
            }
        }
        Ok(pki)
    }

    /// Opens an existing authority.
    pub fn open(dir: &Path) -> Result<Self> {
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        if !pki.ca_key().exists() {
            return Err(SecurityError::file(
                &pki.ca_key(),
                "no certificate authority here (flamingoctl up creates one)",
            ));
        }
        Ok(pki)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn rank_secret_path(&self) -> PathBuf {
        self.dir.join("rank.secret")
    }
    /// The token the dashboard, its API and `/metrics` ask for.
    pub fn dashboard_token_path(&self) -> PathBuf {
        self.dir.join("dashboard.token")
    }
    pub fn dashboard_token(&self) -> Result<String> {
        Ok(read(&self.dashboard_token_path())?.trim().to_string())
    }
    pub fn revoked_path(&self) -> PathBuf {
        self.dir.join("revoked")
    }
    fn paths(&self, identity: &Identity) -> (PathBuf, PathBuf) {
        let stem = identity.file_stem();
        let certs = self.dir.join("certs");
        (
            certs.join(format!("{stem}.pem")),
            certs.join(format!("{stem}.key")),
        )
    }

    fn create_ca(&self) -> Result<()> {
        let key = KeyPair::generate().map_err(|error| SecurityError::Ca(error.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "flamingo cluster CA");
        name.push(DnType::OrganizationName, "flamingo");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = to_time(now - Duration::from_secs(300));
        params.not_after = to_time(now + CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|error| SecurityError::Ca(error.to_string()))?;
        write_private(&self.ca_key(), key.serialize_pem().as_bytes())?;
        write_public(&self.ca_cert(), cert.pem().as_bytes())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key_pem = read(&self.ca_key())?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|error| SecurityError::file(&self.ca_key(), error))?;
        let cert_pem = read(&self.ca_cert())?;
        Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|error| SecurityError::file(&self.ca_cert(), error))
    }

    /// Issues a certificate for `identity`, valid for `validity` from now.
    /// Services and nodes are also named by `hosts` (DNS names or IPs) so
    /// clients that check the address they dialled accept them.
    pub fn issue(
        &self,
        identity: &Identity,
        validity: Duration,
        hosts: &[String],
    ) -> Result<Issued> {
        let now = SystemTime::now();
        self.issue_window(
            identity,
            now - Duration::from_secs(300),
            now + validity,
            hosts,
        )
    }

    /// [`Pki::issue`] with an explicit validity window (tests issue expired
    /// certificates with it).
    pub fn issue_window(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
        hosts: &[String],
    ) -> Result<Issued> {
        identity.validate()?;
        let issuer = self.issuer()?;
        let key =
            KeyPair::generate().map_err(|error| SecurityError::Certificate(error.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.principal());
        name.push(DnType::OrganizationName, "flamingo");
        params.distinguished_name = name;
        params.subject_alt_names = subject_alt_names(identity, hosts)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_time(not_before);
        params.not_after = to_time(not_after);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|error| SecurityError::Certificate(error.to_string()))?;
        let (cert_path, key_path) = self.paths(identity);
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&cert_path, cert.pem().as_bytes())?;
        let peer = PeerCertificate::from_der(cert.der())?;
        tracing::info!(%identity, serial = %peer.serial, "certificate issued");
        Ok(Issued {
            identity: identity.clone(),
            cert: cert_path,
            key: key_path,
            serial: peer.serial,
            not_after: peer.not_after,
        })
    }

    /// The certificate already issued to `identity` when it is valid for
    /// another day and not revoked, else a new one.
    pub fn ensure(
        &self,
        identity: &Identity,
        validity: Duration,
        hosts: &[String],
    ) -> Result<Issued> {
        let (cert_path, key_path) = self.paths(identity);
        if cert_path.exists() && key_path.exists() {
            if let Ok(peer) = read_certificate(&cert_path) {
                let left = peer.not_after - unix_now();
                let revoked = self.revocations().contains(&peer.serial);
                if left > RENEW_BEFORE.as_secs() as i64 && !revoked && peer.identity == *identity {
                    return Ok(Issued {
                        identity: identity.clone(),
                        cert: cert_path,
                        key: key_path,
                        serial: peer.serial,
                        not_after: peer.not_after,
                    });
                }
            }
        }
        self.issue(identity, validity, hosts)
    }

    /// Every certificate in `certs/`, oldest expiry first.
    pub fn list(&self) -> Result<Vec<IssuedSummary>> {
        let revoked = self.revocations();
        let dir = self.dir.join("certs");
        let entries = std::fs::read_dir(&dir).map_err(|error| SecurityError::file(&dir, error))?;
        let mut rows = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|ext| ext.to_str()) != Some("pem") {
                continue;
            }
            let peer = read_certificate(&path)?;
            rows.push(IssuedSummary {
                revoked: revoked.contains(&peer.serial),
                identity: peer.identity,
                file: path,
                serial: peer.serial,
                not_after: peer.not_after,
            });
        }
        rows.sort_by(|a, b| a.not_after.cmp(&b.not_after).then(a.serial.cmp(&b.serial)));
        Ok(rows)
    }

    /// Revokes by serial, or every certificate issued to a node or user
    /// named `who`; returns the serials revoked.
    pub fn revoke(&self, who: &str) -> Result<Vec<String>> {
        let matches: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|row| {
                row.serial == who.to_ascii_lowercase()
                    || match &row.identity {
                        Identity::Node { id } => id == who,
                        Identity::User { name, .. } => name == who,
                        Identity::Service { name } => name == who,
                    }
            })
            .map(|row| row.serial)
            .collect();
        if matches.is_empty() {
            return Err(SecurityError::Invalid {
                name: "revoke".into(),
                message: format!(
                    "no certificate has serial or holder '{who}' (see flamingoctl certs list)"
                ),
            });
        }
        let mut revoked = self.revocations();
        revoked.serials.extend(matches.iter().cloned());
        let mut text = String::from("# serials revoked by flamingoctl certs revoke\n");
        for serial in &revoked.serials {
            text.push_str(serial);
            text.push('\n');
        }
        write_public(&self.revoked_path(), text.as_bytes())?;
        Ok(matches)
    }

    pub fn revocations(&self) -> Revocations {
        Revocations::load(&self.revoked_path())
    }

    /// The key rank credentials are signed with.
    pub fn rank_secret(&self) -> Result<Vec<u8>> {
        read_secret(&self.rank_secret_path())
    }
}

/// Serials no server accepts any more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    pub serials: BTreeSet<String>,
}

impl Revocations {
    /// The list in `path`; none when it does not exist.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Self {
            serials: text
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_ascii_lowercase)
                .collect(),
        }
    }
    pub fn contains(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }
}

/// Reads a secret file (hex) written by [`Pki::init`].
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    let text = read(path)?;
    let text = text.trim();
    if text.len() < 32 || !text.len().is_multiple_of(2) {
        return Err(SecurityError::file(
            path,
            "not a hex key of at least 16 bytes",
        ));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .map_err(|_| SecurityError::file(path, "not a hex key"))
}

/// The identity and expiry of a PEM certificate file.
pub fn read_certificate(path: &Path) -> Result<PeerCertificate> {
    let text = read(path)?;
    let der = pem_der(&text).ok_or_else(|| SecurityError::file(path, "no PEM certificate"))?;
    PeerCertificate::from_der(&der).map_err(|error| SecurityError::file(path, error))
}

fn pem_der(text: &str) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(text.as_bytes()).ok()?;
    Some(parsed.contents)
}

fn subject_alt_names(identity: &Identity, hosts: &[String]) -> Result<Vec<SanType>> {
    let ia5 = |text: &str| {
        text.to_string()
            .try_into()
            .map_err(|_| SecurityError::Invalid {
                name: "host".into(),
                message: format!("'{text}' is not ASCII"),
            })
    };
    let mut names = vec![SanType::URI(ia5(&identity.uri())?)];
    let service_name = match identity {
        Identity::Service { name } => match name.as_str() {
            "coordinator" => Some(crate::COORDINATOR_NAME),
            "data-service" => Some(crate::DATA_SERVICE_NAME),
            "etcd" => Some(crate::ETCD_NAME),
            _ => None,
        },
        Identity::Node { .. } => Some(AGENT_NAME),
        Identity::User { .. } => None,
    };
    if let Some(dns) = service_name {
        names.push(SanType::DnsName(ia5(dns)?));
        for host in hosts {
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => names.push(SanType::IpAddress(ip)),
                Err(_) => names.push(SanType::DnsName(ia5(host)?)),
            }
        }
    }
    Ok(names)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn to_time(at: SystemTime) -> OffsetDateTime {
    let seconds = at
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|error| SecurityError::file(path, error))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|error| SecurityError::file(dir, error))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|error| SecurityError::file(dir, error))
}

/// Writes `bytes` to `path` with mode `mode`, through a temporary file
/// renamed into place (a reader never sees half a key).
fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|error| SecurityError::file(&tmp, error))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| SecurityError::file(&tmp, error))?;
    std::fs::rename(&tmp, path).map_err(|error| SecurityError::file(path, error))
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_mode(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_mode(path, bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[test]
    fn issues_named_certificates_with_private_keys_and_revokes_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki")).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(pki.dir()), 0o700);
        assert_eq!(mode(&pki.ca_key()), 0o600);
        let alice = Identity::user("alice", Role::Submitter);
        let issued = pki
            .issue(&alice, Duration::from_secs(3 * 86400), &[])
            .unwrap();
        assert_eq!(mode(&issued.key), 0o600);
        let peer = read_certificate(&issued.cert).unwrap();
        assert_eq!(peer.identity, alice);
        assert_eq!(peer.serial, issued.serial);
        assert!((peer.not_after - unix_now() - 3 * 86400).abs() < 5);
        // Reused while valid, re-issued once revoked.
        let again = pki
            .ensure(&alice, Duration::from_secs(7 * 24 * 3600), &[])
            .unwrap();
        assert_eq!(again.serial, issued.serial);
        assert_eq!(pki.revoke("alice").unwrap(), vec![issued.serial.clone()]);
        assert!(pki.revocations().contains(&issued.serial));
        let renewed = pki.ensure(&alice, Duration::from_secs(3600), &[]).unwrap();
        assert_ne!(renewed.serial, issued.serial);
        assert!(pki
            .revoke("nobody")
            .unwrap_err()
            .to_string()
            .contains("certs list"));
        // A second init keeps the authority.
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        Pki::init(pki.dir()).unwrap();
        assert_eq!(std::fs::read(pki.ca_cert()).unwrap(), ca);
        assert_eq!(pki.rank_secret().unwrap().len(), 32);
        assert_eq!(pki.dashboard_token().unwrap().len(), 64);
    }
}
