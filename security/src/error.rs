use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("{name}: {message}")]
    Invalid { name: String, message: String },
    #[error("rank credential: {0}")]
    Token(String),
    #[error(
        "refusing plain text on {address} ({flag}): anyone on the network could use it. \
         Give --tls-ca, --tls-cert and --tls-key (flamingoctl up issues them; \
         `flamingoctl certs issue` for other machines), or listen on 127.0.0.1 with --insecure"
    )]
    InsecureNonLoopback { flag: String, address: String },
}

impl SecurityError {
    pub(crate) fn file(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}
