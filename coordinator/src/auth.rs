//! Who is calling, and what they may do.
//!
//! Every request arrives over mutual TLS; the client certificate names a
//! user (with a role), a node or a service (see `flamingo-security`).
//! Revoked serials (the CA folder's `revoked` list, re-read every few
//! seconds) are refused on every call. Under `--insecure` (loopback only)
//! nobody is authenticated and every caller is treated as a local admin.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flamingo_common::{JobKind, JobRecord, JobSpec};
use flamingo_security::{Identity, PeerCertificate, RankToken, Revocations, Role};
use tonic::{Request, Status};

/// How long a rank credential is valid (an attempt running longer keeps
/// its stream; a reconnect after this needs a restart).
const RANK_TOKEN_SECONDS: i64 = 7 * 24 * 3600;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--insecure`: no credentials exist; full rights.
    Local,
    Peer(Identity),
}

impl Caller {
    /// The name a job records as its submitter.
    pub fn principal(&self) -> String {
        match self {
            Caller::Local => "local".to_string(),
            Caller::Peer(identity) => identity.principal(),
        }
    }

    fn role(&self) -> Option<Role> {
        match self {
            Caller::Local => Some(Role::Admin),
            Caller::Peer(Identity::User { role, .. }) => Some(*role),
            Caller::Peer(_) => None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role() == Some(Role::Admin)
    }

    /// Whether the caller launched `job` or is an admin.
    pub fn owns(&self, job: &JobRecord) -> bool {
        self.is_admin() || (self.role().is_some() && job.spec.submitter == self.principal())
    }
}

/// The coordinator's authentication and authorization settings.
pub struct Auth {
    secure: bool,
    revoked: RwLock<Revocations>,
    revoked_path: Option<PathBuf>,
    rank_secret: Option<Vec<u8>>,
    allow_command_jobs: bool,
    /// The coordinator's client credentials for dialling agents' log
    /// services.
    pub agent_tls: Option<flamingo_security::ClientTls>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("secure", &self.secure)
            .field("allow_command_jobs", &self.allow_command_jobs)
            .finish()
    }
}

impl Auth {
    pub fn new(
        secure: bool,
        revoked_path: Option<PathBuf>,
        rank_secret: Option<Vec<u8>>,
        allow_command_jobs: bool,
        agent_tls: Option<flamingo_security::ClientTls>,
    ) -> Arc<Self> {
        let revoked = revoked_path
            .as_deref()
            .map(Revocations::load)
            .unwrap_or_default();
        Arc::new(Self {
            secure,
            revoked: RwLock::new(revoked),
            revoked_path,
            rank_secret,
            allow_command_jobs,
            agent_tls,
        })
    }

    /// Re-reads the revocation list every `every` until the process ends.
    pub fn watch_revocations(self: &Arc<Self>, every: Duration) {
        let Some(path) = self.revoked_path.clone() else {
            return;
        };
        let auth = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                let Some(auth) = auth.upgrade() else { break };
                let fresh = Revocations::load(&path);
                let mut current = auth.revoked.write().unwrap_or_else(|e| e.into_inner());
                if *current != fresh {
                    tracing::info!(revoked = fresh.serials.len(), "revocation list reloaded");
                    *current = fresh;
                }
            }
        });
    }

    /// The verified caller of `request`.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if !self.secure {
            return Ok(Caller::Local);
        }
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate (flamingo needs one issued by the cluster CA)",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = PeerCertificate::from_der(leaf)
            .map_err(|error| Status::unauthenticated(error.to_string()))?;
        let revoked = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        if revoked.contains(&peer.serial) {
            return Err(Status::unauthenticated(format!(
                "certificate {} of {} is revoked",
                peer.serial, peer.identity
            )));
        }
        Ok(Caller::Peer(peer.identity))
    }

    /// Who `request` comes from, for the audit log (also when it is
    /// refused).
    pub fn who<T>(&self, request: &Request<T>) -> String {
        match self.caller(request) {
            Ok(caller) => caller.principal(),
            Err(_) => match request.peer_certs().and_then(|certs| {
                certs
                    .first()
                    .and_then(|cert| PeerCertificate::from_der(cert).ok())
            }) {
                Some(peer) => format!("{} (serial {})", peer.identity.principal(), peer.serial),
                None => "unauthenticated".to_string(),
            },
        }
    }

    /// A user with at least `role`.
    pub fn user<T>(&self, request: &Request<T>, role: Role, what: &str) -> Result<Caller, Status> {
        let caller = self.caller(request)?;
        match caller.role() {
            Some(held) if held >= role => Ok(caller),
            Some(held) => Err(Status::permission_denied(format!(
                "{what}: needs the {} role; {} has {}",
                role.label(),
                caller.principal(),
                held.label()
            ))),
            None => Err(Status::permission_denied(format!(
                "{what}: a user's call; {} is not a user",
                describe(&caller)
            ))),
        }
    }

    /// May `caller` launch `spec`?
    pub fn admit(&self, caller: &Caller, spec: &JobSpec) -> Result<(), Status> {
        if let JobKind::Command { .. } = spec.kind {
            if !self.allow_command_jobs {
                return Err(Status::permission_denied(
                    "command jobs are off on this cluster (start the coordinator with --allow-command-jobs; admins only)",
                ));
            }
            if !caller.is_admin() {
                return Err(Status::permission_denied(format!(
                    "command jobs run any program on every node: admins only ({} is not one)",
                    caller.principal()
                )));
            }
        }
        Ok(())
    }

    /// The node `node_id` itself (its own certificate).
    pub fn node<T>(&self, request: &Request<T>, node_id: &str) -> Result<(), Status> {
        match self.caller(request)? {
            Caller::Local => Ok(()),
            Caller::Peer(Identity::Node { id }) if id == node_id => Ok(()),
            caller => Err(Status::permission_denied(format!(
                "only node {node_id}'s own certificate may speak for it; this is {}",
                describe(&caller)
            ))),
        }
    }

    /// A rank of `job_id`'s attempt `attempt` on a node, with that
    /// attempt's credential.
    pub fn rank<T>(
        &self,
        request: &Request<T>,
        job_id: &str,
        attempt: u32,
        token: &str,
    ) -> Result<(), Status> {
        let caller = self.caller(request)?;
        if caller == Caller::Local {
            return Ok(());
        }
        if !matches!(caller, Caller::Peer(Identity::Node { .. })) {
            return Err(Status::permission_denied(format!(
                "a rank's call; {} is not a node",
                describe(&caller)
            )));
        }
        self.rank_token(job_id, attempt, token)
    }

    /// Whether `token` is `job_id`'s attempt `attempt`'s credential (always
    /// on a cluster without TLS).
    pub fn rank_token(&self, job_id: &str, attempt: u32, token: &str) -> Result<(), Status> {
        if !self.secure {
            return Ok(());
        }
        let Some(secret) = &self.rank_secret else {
            return Err(Status::failed_precondition(
                "the coordinator has no rank key (--rank-secret-file)",
            ));
        };
        let verified = RankToken::verify(secret, token)
            .map_err(|error| Status::unauthenticated(error.to_string()))?;
        if verified.job_id != job_id || verified.attempt != attempt {
            return Err(Status::permission_denied(format!(
                "the rank credential is for job {} attempt {}, not job {job_id} attempt {attempt}",
                verified.job_id, verified.attempt
            )));
        }
        Ok(())
    }

    /// A credential for `job_id`'s attempt `attempt`; empty without a key.
    pub fn mint(&self, job_id: &str, attempt: u32) -> String {
        self.rank_secret
            .as_deref()
            .map(|secret| RankToken::mint(secret, job_id, attempt, RANK_TOKEN_SECONDS))
            .unwrap_or_default()
    }

    /// `job` as `caller` may see it: the environment's values only for its
    /// submitter and admins.
    pub fn redact(&self, caller: &Caller, mut job: JobRecord) -> JobRecord {
        if !caller.owns(&job) {
            for value in job.spec.env.values_mut() {
                *value = "(hidden)".to_string();
            }
        }
        job
    }
}

fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Local => "the local caller".to_string(),
        Caller::Peer(identity) => identity.to_string(),
    }
}
