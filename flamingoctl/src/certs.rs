//! `flamingoctl certs`: the cluster CA's certificates — issue one for a
//! user, a node or a service, list them, revoke them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use flamingo_security::{Identity, Pki, Role};

use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Issue a certificate (and key, mode 0600) from the cluster CA.
    Issue(IssueArgs),
    /// Every certificate the CA issued: holder, serial, expiry, revoked.
    List,
    /// Revoke by serial, or every certificate of a node or user; the
    /// coordinator refuses them within 2 s.
    Revoke { who: String },
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// A user's certificate with this role (admin, submitter, viewer).
    #[arg(long, requires = "role", conflicts_with = "node")]
    user: Option<String>,
    #[arg(long)]
    role: Option<String>,
    /// A node's certificate (its agent and ranks use it).
    #[arg(long)]
    node: Option<String>,
    /// Valid for this many days.
    #[arg(long, default_value_t = 30)]
    days: u64,
    /// Also name these hosts (DNS names or IPs) in a node's certificate.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
}

/// The CA folder: `--pki`/`FLAMINGO_PKI`, else the local cluster's.
fn pki(context: &Context) -> anyhow::Result<Pki> {
    let dir = std::env::var_os("FLAMINGO_PKI")
        .map(PathBuf::from)
        .unwrap_or_else(|| context.state_dir.join("pki"));
    Ok(Pki::open(&dir)?)
}

pub fn run(command: CertsCommand, context: &Context) -> anyhow::Result<ExitCode> {
    let pki = pki(context)?;
    match command {
        CertsCommand::Issue(args) => {
            let identity = match (&args.user, &args.role, &args.node) {
                (Some(user), Some(role), None) => Identity::user(user, role.parse::<Role>()?),
                (None, None, Some(node)) => Identity::node(node),
                _ => anyhow::bail!("give --user NAME --role ROLE, or --node ID"),
            };
            let issued = pki.issue(
                &identity,
                Duration::from_secs(args.days * 24 * 3600),
                &args.hosts,
            )?;
            if context.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "identity": identity,
                        "serial": issued.serial,
                        "not_after": issued.not_after,
                        "ca": pki.ca_cert(),
                        "cert": issued.cert,
                        "key": issued.key,
                    })
                );
            } else {
                println!(
                    "issued to {identity}: serial {}, expires {}",
                    issued.serial,
                    unix_date(issued.not_after)
                );
                println!("  export FLAMINGO_TLS_CA={}", pki.ca_cert().display());
                println!("  export FLAMINGO_TLS_CERT={}", issued.cert.display());
                println!("  export FLAMINGO_TLS_KEY={}", issued.key.display());
            }
        }
        CertsCommand::List => {
            let rows = pki.list()?;
            if context.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<34} {:<32} {:<20} status", "holder", "serial", "expires");
                let now = flamingo_common::unix_ms() / 1000;
                for row in rows {
                    let status = if row.revoked {
                        "revoked"
                    } else if row.not_after < now {
                        "expired"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<34} {:<32} {:<20} {status}",
                        row.identity.to_string(),
                        row.serial,
                        unix_date(row.not_after)
                    );
                }
            }
        }
        CertsCommand::Revoke { who } => {
            let serials = pki.revoke(&who)?;
            println!("revoked {}: {}", who, serials.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `flamingoctl audit`: the coordinator's audit log, newest first.
pub async fn audit(limit: u32, context: &Context) -> anyhow::Result<ExitCode> {
    let records = context.session().await?.audit(limit).await?;
    if context.json {
        let rows: Vec<serde_json::Value> = records
            .iter()
            .map(|record| {
                serde_json::json!({
                    "unix_ms": record.unix_ms, "who": record.who, "action": record.action,
                    "target": record.target, "outcome": record.outcome,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<24} {:<18} {:<28} outcome",
        "when", "who", "action", "target"
    );
    for record in records {
        println!(
            "{:<20} {:<24} {:<18} {:<28} {}",
            unix_date(record.unix_ms / 1000),
            record.who,
            record.action,
            record.target,
            record.outcome
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `2026-12-04 21:00 UTC`.
fn unix_date(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let minutes = seconds.rem_euclid(86_400) / 60;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minutes / 60,
        minutes % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_civil() {
        assert_eq!(super::unix_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::unix_date(1_796_418_000), "2026-12-04 21:00 UTC");
    }
}
