//! `flamingo-worker rank train --config run.json`: one rank of a training
//! run, joining the process group from torchrun's environment.

use std::path::PathBuf;
use std::time::Duration;

use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig};
use flamingo_engine::job::TrainJob;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The resolved run configuration (JSON, as `flamingoctl train` writes it).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", args.config.display()))?;
    let job: TrainJob = serde_json::from_str(&text)
        .map_err(|error| anyhow::anyhow!("{}: {error}", args.config.display()))?;
    let world: i64 = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let group = if world > 1 {
        let config = ProcessGroupConfig::from_env(Backend::Gloo, Duration::from_secs(300))?;
        Some(ProcessGroup::new(&config)?)
    } else {
        None
    };
    flamingo_engine::run::run_rank(&job, group.as_ref())
}
