//! Several coordinators, one leader (`--leader-election`). Every
//! coordinator of a cluster points at the same etcd and key prefix; each
//! takes an etcd lease of `--leader-lease-seconds`, keeps it alive, and
//! campaigns through etcd's election API under `<prefix>/leader`. The
//! winner loads the cluster's state from etcd and only then listens; the
//! others wait in the campaign without listening, so agents, ranks and
//! clients (which know every coordinator's address) find the leader by
//! being refused by the rest.
//!
//! Fencing: the campaign creates the leader's key at a revision, and every
//! write the leader makes is a transaction that holds only while that key
//! still exists with that creation revision. A leader that stalled past its
//! lease (a long pause, a partition from etcd) and was replaced therefore
//! cannot write a thing: its first write fails, and it stops at once
//! (exits, to rejoin as a standby when restarted). The same happens when
//! its lease keep-alive fails.
//!
//! A standby takes over within about one lease of the leader's death: the
//! dead leader's key goes with its lease, the next campaigner is elected,
//! loads the state and listens.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::CoordinatorError;

/// What the leader's writes are fenced by.
#[derive(Clone, Debug)]
pub struct Fence {
    /// The leader's key under `<prefix>/leader/`.
    pub key: Vec<u8>,
    /// The key's creation revision.
    pub revision: i64,
    /// The lease that holds the key.
    pub lease: i64,
    /// Cancelled when the leadership is lost (a refused write, or the
    /// lease not kept alive).
    pub lost: CancellationToken,
}

fn etcd(action: &str) -> impl FnOnce(etcd_client::Error) -> CoordinatorError + '_ {
    move |source| CoordinatorError::Etcd {
        action: action.to_string(),
        message: source.to_string(),
    }
}

/// Campaigns until this coordinator leads (or `shutdown`); `identity` is
/// what the leader's key holds (its address, for operators).
pub async fn lead(
    mut client: etcd_client::Client,
    prefix: &str,
    identity: &str,
    lease_seconds: u32,
    shutdown: &CancellationToken,
) -> Result<Option<Fence>, CoordinatorError> {
    let ttl = i64::from(lease_seconds.max(2));
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(etcd("grant the leadership lease"))?
        .id();
    let lost = CancellationToken::new();
    let (mut keeper, mut answers) = client
        .lease_keep_alive(lease)
        .await
        .map_err(etcd("keep the leadership lease alive"))?;
    // Renewed four times a lease: a missed answer or an expired lease is
    // the end of this coordinator's leadership (or candidacy).
    {
        let lost = lost.clone();
        let every = Duration::from_millis((ttl as u64 * 1000) / 4);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let renewed = match keeper.keep_alive().await {
                    Ok(()) => tokio::time::timeout(every * 2, answers.message()).await,
                    Err(error) => Ok(Err(error)),
                };
                match renewed {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                    outcome => {
                        tracing::error!(
                            ?outcome,
                            "the leadership lease was not renewed; this coordinator stops"
                        );
                        lost.cancel();
                        return;
                    }
                }
            }
        });
    }
    let name = format!("{prefix}/leader");
    tracing::info!(%identity, election = %name, "standing by: campaigning for leadership");
    let started = std::time::Instant::now();
    let campaign = client.campaign(name.clone(), identity.to_string(), lease);
    let response = tokio::select! {
        response = campaign => response.map_err(etcd("campaign for leadership"))?,
        _ = lost.cancelled() => {
            return Err(CoordinatorError::Etcd {
                action: "campaign for leadership".into(),
                message: "the lease lapsed while standing by".into(),
            });
        }
        _ = shutdown.cancelled() => {
            lost.cancel();
            let _ = client.lease_revoke(lease).await;
            return Ok(None);
        }
    };
    let leader = response.leader().ok_or_else(|| CoordinatorError::Etcd {
        action: "campaign for leadership".into(),
        message: "etcd answered without a leader key".into(),
    })?;
    tracing::info!(
        %identity,
        key = %String::from_utf8_lossy(leader.key()),
        revision = leader.rev(),
        waited_ms = started.elapsed().as_millis() as u64,
        "leading"
    );
    Ok(Some(Fence {
        key: leader.key().to_vec(),
        revision: leader.rev(),
        lease,
        lost,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditEntry, EtcdStore};

    fn entry(who: &str) -> AuditEntry {
        AuditEntry {
            unix_ms: flamingo_common::unix_ms(),
            who: who.into(),
            action: "test".into(),
            target: "fence".into(),
            outcome: "ok".into(),
        }
    }

    /// A real etcd; coordinator A leads, stalls past its lease (its lease
    /// is revoked, as etcd does when it expires), B is elected: A's next
    /// write is refused and A learns it lost, B's goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leader_cannot_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = flamingo_launch::local::EtcdSpec {
            data_dir: dir.path().join("etcd"),
            client_port: flamingo_common::net::free_local_port().expect("port"),
            peer_port: flamingo_common::net::free_local_port().expect("port"),
            tls: None,
        };
        let mut etcd =
            flamingo_launch::local::spawn_etcd(&spec, &dir.path().join("etcd.log"), false)
                .expect("etcd starts");
        flamingo_launch::local::wait_for_port(&spec.endpoint(), Duration::from_secs(20))
            .expect("etcd listens");
        let endpoints = [spec.endpoint()];
        let shutdown = CancellationToken::new();
        let a = EtcdStore::connect(&endpoints, "/fence-test", None)
            .await
            .expect("connect");
        let b = EtcdStore::connect(&endpoints, "/fence-test", None)
            .await
            .expect("connect");
        let fence_a = lead(a.client(), a.prefix(), "a", 2, &shutdown)
            .await
            .expect("campaign")
            .expect("A leads");
        let a = a.fenced(fence_a.clone());
        a.put_audit(&entry("a-leading")).await.expect("A writes");
        let campaign_b = {
            let (b, shutdown) = (b.clone(), shutdown.clone());
            tokio::spawn(async move { lead(b.client(), b.prefix(), "b", 2, &shutdown).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!campaign_b.is_finished(), "B waits while A leads");
        a.client()
            .lease_revoke(fence_a.lease)
            .await
            .expect("A's lease lapses");
        let fence_b = tokio::time::timeout(Duration::from_secs(10), campaign_b)
            .await
            .expect("B is elected in time")
            .expect("joins")
            .expect("campaign")
            .expect("B leads");
        assert!(fence_b.revision > fence_a.revision);
        let b = b.fenced(fence_b);
        b.put_audit(&entry("b-leading")).await.expect("B writes");
        let refused = a.put_audit(&entry("a-deposed")).await;
        assert!(
            matches!(refused, Err(CoordinatorError::Deposed)),
            "{refused:?}"
        );
        assert!(fence_a.lost.is_cancelled());
        let written: Vec<String> = b
            .audit(10)
            .await
            .expect("audit")
            .into_iter()
            .map(|entry| entry.who)
            .collect();
        assert!(written.contains(&"a-leading".to_string()), "{written:?}");
        assert!(written.contains(&"b-leading".to_string()), "{written:?}");
        assert!(!written.contains(&"a-deposed".to_string()), "{written:?}");
        shutdown.cancel();
        let _ = etcd.kill();
        let _ = etcd.wait();
    }
}
