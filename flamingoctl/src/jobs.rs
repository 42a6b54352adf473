//! The job commands: `status`, `list`, `checkpoints`, `evals`, `stop`,
//! `logs` and `wait`. A job id may also name a Slurm job
//! (`launch --scheduler slurm`): its own coordinator answers while it runs,
//! and its folder afterwards.

use std::process::ExitCode;

use flamingo_client::render;
use flamingo_launch::slurm;

use crate::context::{exit_code_for, Context};

#[derive(Debug, clap::Args)]
pub struct JobArg {
    job: String,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    job: String,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    #[arg(long, short)]
    follow: bool,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    job: String,
    /// Also stream rank 0's output.
    #[arg(long, short)]
    follow: bool,
}

pub async fn status(args: &JobArg, context: &Context) -> anyhow::Result<ExitCode> {
    if let Some(record) = context.slurm_record(&args.job)? {
        print!("{}", slurm::follow::status(&record, context.json).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let job = context.session().await?.job(&args.job).await?;
    context.print_job(&job);
    Ok(ExitCode::SUCCESS)
}

pub async fn list(context: &Context) -> anyhow::Result<ExitCode> {
    let jobs = context.session().await?.list().await?;
    if context.json {
        let values: Vec<_> = jobs.iter().map(render::job_json).collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
    } else {
        print!("{}", render::jobs_text(&jobs));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn checkpoints(args: &JobArg, context: &Context) -> anyhow::Result<ExitCode> {
    let (mut session, job) = context.session_for(&args.job).await?;
    let job = session.job(&job).await?;
    if context.json {
        let values: Vec<_> = job
            .checkpoints
            .iter()
            .map(render::checkpoint_json)
            .collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
    } else {
        print!("{}", render::checkpoints_text(&job));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn evals(args: &JobArg, context: &Context) -> anyhow::Result<ExitCode> {
    let (mut session, job) = context.session_for(&args.job).await?;
    let reports = session.evals(&job).await?;
    print!("{}", render::evals(&reports, context.json));
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(args: &JobArg, context: &Context) -> anyhow::Result<ExitCode> {
    if let Some(record) = context.slurm_record(&args.job)? {
        print!("{}", slurm::follow::stop(&record, context.json).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let job = context.session().await?.stop(&args.job).await?;
    context.print_job(&job);
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(args: &LogsArgs, context: &Context) -> anyhow::Result<ExitCode> {
    if let Some(record) = context.slurm_record(&args.job)? {
        if record.job_id().is_none() && record.final_job()?.is_none() {
            // Still in Slurm's queue (or starting): no rank has run yet.
            eprint!("{}", slurm::follow::status(&record, false).await?);
            eprintln!("no logs yet: the ranks start when Slurm runs the batch job");
            return Ok(ExitCode::SUCCESS);
        }
        // The job's coordinator is gone once it ended: its ranks' logs are
        // in the job's folder.
        if let (None, Some(job_id)) = (record.coordinator(), record.job_id()) {
            let path = slurm::rank_log(&record, job_id, args.rank).ok_or_else(|| {
                anyhow::anyhow!(
                    "no log of rank {} under {}/agents",
                    args.rank,
                    record.dir.display()
                )
            })?;
            std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::stdout())?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let (mut session, job) = context.session_for(&args.job).await?;
    session
        .logs(&job, args.rank, args.follow, context.json)
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn wait(args: &WaitArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let job = match context.slurm_record(&args.job)? {
        Some(record) => slurm::follow::wait(&record, !context.json, args.follow).await?,
        None => {
            let mut session = context.session().await?;
            session.wait(&args.job, !context.json, args.follow).await?
        }
    };
    context.print_job(&job);
    Ok(exit_code_for(&job))
}
