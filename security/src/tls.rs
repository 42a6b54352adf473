//! tonic's mutual-TLS settings from the certificate files a process is
//! given (`--tls-ca/--tls-cert/--tls-key`, or `FLAMINGO_TLS_*`).

use std::path::{Path, PathBuf};

use tonic::transport::{
    Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity, ServerTlsConfig,
};

use crate::{Result, SecurityError, ENV_CA, ENV_CERT, ENV_KEY};

/// A server's or client's TLS flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM) peers are checked against.
    #[arg(long = "tls-ca", env = "FLAMINGO_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by the cluster CA.
    #[arg(long = "tls-cert", env = "FLAMINGO_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(long = "tls-key", env = "FLAMINGO_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// Plain text, no authentication: only on a loopback address, and
    /// never on a shared machine.
    #[arg(long)]
    pub insecure: bool,
}

/// Loaded client credentials.
#[derive(Debug, Clone)]
pub struct ClientTls {
    ca: Certificate,
    identity: TlsIdentity,
}

impl TlsFiles {
    pub fn new(ca: &Path, cert: &Path, key: &Path) -> Self {
        Self {
            ca: Some(ca.to_path_buf()),
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            insecure: false,
        }
    }

    /// All three files, or none (`None`); some but not all is an error
    /// naming the missing flag.
    fn files(&self) -> Result<Option<(&Path, &Path, &Path)>> {
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            _ => {
                let missing: Vec<&str> = [
                    ("--tls-ca", self.ca.is_none()),
                    ("--tls-cert", self.cert.is_none()),
                    ("--tls-key", self.key.is_none()),
                ]
                .into_iter()
                .filter(|(_, absent)| *absent)
                .map(|(flag, _)| flag)
                .collect();
                Err(SecurityError::Invalid {
                    name: missing.join(", "),
                    message: "missing: TLS needs the CA, the certificate and its key".into(),
                })
            }
        }
    }

    /// The server's settings, requiring a client certificate from the CA;
    /// `None` with `--insecure` on a loopback `listen`. Without files and
    /// without `--insecure` this is an error that says what to give.
    pub fn server(
        &self,
        what: &str,
        listen: &std::net::SocketAddr,
    ) -> Result<Option<ServerTlsConfig>> {
        match self.files()? {
            Some((ca, cert, key)) => {
                let identity = TlsIdentity::from_pem(read(cert)?, read(key)?);
                Ok(Some(
                    ServerTlsConfig::new()
                        .identity(identity)
                        .client_ca_root(Certificate::from_pem(read(ca)?)),
                ))
            }
            None if self.insecure && crate::is_loopback(listen) => {
                tracing::warn!(
                    %listen,
                    "{what}: --insecure: plain text and no authentication; anyone on this machine can use it"
                );
                Ok(None)
            }
            None if self.insecure => Err(crate::insecure_refusal("--insecure", listen)),
            None => Err(SecurityError::Invalid {
                name: format!("{what}: --tls-ca, --tls-cert, --tls-key"),
                message:
                    "not given: flamingo serves only over mutual TLS. `flamingoctl up` issues \
                          the certificates (`flamingoctl certs issue` for other machines); \
                          --insecure allows plain text on 127.0.0.1 only"
                        .into(),
            }),
        }
    }

    /// The client's credentials, if any were given.
    pub fn client(&self) -> Result<Option<ClientTls>> {
        match self.files()? {
            Some((ca, cert, key)) => Ok(Some(ClientTls {
                ca: Certificate::from_pem(read(ca)?),
                identity: TlsIdentity::from_pem(read(cert)?, read(key)?),
            })),
            None => Ok(None),
        }
    }

    /// The files as `FLAMINGO_TLS_*` variables (for a child process).
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        [
            (ENV_CA, &self.ca),
            (ENV_CERT, &self.cert),
            (ENV_KEY, &self.key),
        ]
        .into_iter()
        .filter_map(|(name, path)| path.clone().map(|path| (name, path)))
        .collect()
    }

    /// The files as flags (for a child process).
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            ("--tls-ca", &self.ca),
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
        ]
        .into_iter()
        .filter_map(|(flag, path)| {
            path.as_ref()
                .map(|path| format!("{flag}={}", path.display()))
        })
        .collect();
        if self.insecure {
            args.push("--insecure".into());
        }
        args
    }
}

impl ClientTls {
    /// Settings for dialling a server whose certificate carries `domain`.
    pub fn config(&self, domain: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(domain)
    }
}

/// This process's client credentials from `FLAMINGO_TLS_*` (none when
/// unset).
pub fn client_tls_from_env() -> Result<Option<ClientTls>> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    TlsFiles {
        ca: var(ENV_CA),
        cert: var(ENV_CERT),
        key: var(ENV_KEY),
        insecure: false,
    }
    .client()
    .map_err(|error| SecurityError::Invalid {
        name: format!("{ENV_CA}, {ENV_CERT}, {ENV_KEY}"),
        message: error.to_string(),
    })
}

/// `http://` becomes `https://` when TLS is on.
pub fn upgrade_scheme(url: &str, tls: bool) -> String {
    match (tls, url.strip_prefix("http://")) {
        (true, Some(rest)) => format!("https://{rest}"),
        _ => url.to_string(),
    }
}

/// An endpoint for `url`: mutual TLS checking `domain` when `tls` is
/// given, plain text otherwise.
pub fn endpoint(url: &str, tls: Option<&ClientTls>, domain: &str) -> Result<Endpoint> {
    let url = upgrade_scheme(url, tls.is_some());
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|_| SecurityError::Invalid {
        name: url.clone(),
        message: "is not a URL (like http://10.0.0.5:7070)".into(),
    })?;
    match tls {
        Some(tls) => {
            endpoint
                .tls_config(tls.config(domain))
                .map_err(|error| SecurityError::Invalid {
                    name: url,
                    message: format!("TLS settings: {error}"),
                })
        }
        None => Ok(endpoint),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| SecurityError::file(path, error))
}
