//! `flamingoctl metrics JOB`: every rank's per-step reports as a table,
//! CSV or JSON, or as TensorBoard event files (`--tensorboard DIR`,
//! `--follow` until the job ends).

use std::path::PathBuf;
use std::process::ExitCode;

use flamingo_common::progress::Progress;

use crate::context::Context;
use crate::tensorboard;

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    job: String,
    #[arg(long)]
    csv: bool,
    /// Write TensorBoard event files into DIR/<job>/ instead (point
    /// `tensorboard --logdir DIR` at it).
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    /// With --tensorboard: keep adding points until the job ends.
    #[arg(long, requires = "tensorboard")]
    follow: bool,
}

pub async fn run(args: &MetricsArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let (mut session, job) = context.session_for(&args.job).await?;
    let Some(dir) = &args.tensorboard else {
        let points = session.metrics(&job).await?;
        print!(
            "{}",
            flamingo_client::render::metrics(&points, context.json, args.csv)
        );
        return Ok(ExitCode::SUCCESS);
    };
    let record = session.job(&job).await?;
    let mut writer = tensorboard::JobEvents::new(&dir.join(record.id.as_str()));
    let mut written = 0usize;
    let mut progress = Progress::new("tensorboard", None).counting("points");
    let place = format!("written under {}", writer.dir().display());
    loop {
        // The state first: points stored before it turned terminal are all
        // in the fetch that follows.
        let done = !args.follow || session.job(&job).await?.state.is_terminal();
        let points = session.metrics_from(&job, written as u64).await?;
        written += writer.write_points(&points)?;
        progress.update(written as u64, &place, None);
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    progress.finish();
    // The checkpoints' benchmark scores, as a run of their own.
    let evals = session.evals(&job).await?;
    let scores = tensorboard::write_evals(writer.dir(), &evals)?;
    eprintln!(
        "{written} point(s) and {scores} checkpoint(s)' eval scores {place}; view them with:"
    );
    eprintln!("tensorboard --logdir {}", dir.display());
    Ok(ExitCode::SUCCESS)
}
