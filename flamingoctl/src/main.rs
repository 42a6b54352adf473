//! `flamingoctl`: the command line of flamingo. Each command is a module
//! with its flags and a `run` that returns the exit code; the work is done
//! by the libraries (`flamingo-client` for the coordinator's job API,
//! `flamingo-launch` for local clusters, Slurm and Kubernetes, the engine,
//! the data library and the evaluation suite). Every command takes
//! `--json`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod certs;
mod checkpoints;
mod cluster;
mod context;
mod data;
mod eval;
mod export;
mod inference;
mod jobs;
mod launch;
mod metrics;
mod model;
mod slurm;
mod tensorboard;
mod tiny;
mod train;

use context::Context;

#[derive(Parser)]
#[command(name = "flamingoctl", version, about = "Run and watch flamingo jobs")]
struct Cli {
    /// Coordinator address (default: the local cluster's, else http://127.0.0.1:7070).
    #[arg(long, global = true, env = "FLAMINGO_COORDINATOR")]
    coordinator: Option<String>,
    /// Local state (cluster record, logs); default $FLAMINGO_HOME/cluster or ~/.flamingo/cluster.
    #[arg(long, global = true, env = "FLAMINGO_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster (etcd, coordinator, N agents) in the background.
    Up(cluster::UpArgs),
    /// Stop the local cluster and everything it runs.
    Down,
    /// Submit a job: a training run (`--config job.toml` and OpenFlamingo's
    /// flags, as `flamingoctl train`), `--job collective-check`, or a command
    /// after `--` run once per rank.
    Launch(Box<launch::LaunchArgs>),
    /// Inside a Slurm batch job: what the sbatch script runs.
    #[command(subcommand, hide = true)]
    Slurm(slurm::SlurmCommand),
    /// Show one job.
    Status(jobs::JobArg),
    /// A training job's committed checkpoints.
    Checkpoints(jobs::JobArg),
    /// The benchmark scores stored with a training job (`flamingoctl eval
    /// --job`): per checkpoint, dataset and shot count; a table or --json.
    Evals(jobs::JobArg),
    /// A job's metric reports (step, rank, attempt, time, values): a table,
    /// --csv, or --json.
    Metrics(metrics::MetricsArgs),
    /// List jobs.
    List,
    /// Stop a job and wait until its ranks are gone.
    Stop(jobs::JobArg),
    /// Print a rank's stdout and stderr.
    Logs(jobs::LogsArgs),
    /// Follow a job's events until it ends.
    Wait(jobs::WaitArgs),
    /// List the cluster's nodes.
    Nodes,
    /// Log-probabilities of a prompt's tokens given its images.
    Score(inference::InferenceArgs),
    /// Continue a prompt about images (greedy or beam search; ends at <|endofchunk|>).
    Generate(inference::GenerateArgs),
    /// OpenFlamingo's few-shot benchmarks (COCO, Flickr30K, VQAv2, OK-VQA, TextVQA, VizWiz, HatefulMemes, ImageNet).
    Eval(Box<eval::EvalArgs>),
    /// Write a tiny random Flamingo (open_clip + MPT files and a model spec) for tests and demos.
    TinyModel(tiny::TinyModelArgs),
    /// Write a run's checkpoint as OpenFlamingo's trainable state dict (.pt as torch.save
    /// writes it, or .safetensors), loadable as a model spec's `[flamingo] checkpoint`.
    Export(export::ExportArgs),
    /// Model files: convert PyTorch pickles to safetensors.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Train on this machine: --nproc rank processes (OpenFlamingo's flag names).
    Train(Box<train::TrainArgs>),
    /// Datasets: index, inspect, pack and synthesize shards; measure preprocessing.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// The cluster's audit log, newest first: who launched, stopped,
    /// registered, deregistered or committed what, and whether it was
    /// refused (admins).
    Audit {
        /// How many records.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The cluster's certificates: issue (users, nodes), list, revoke.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let context = Context::new(cli.coordinator, cli.state_dir, cli.json);
    // The local cluster's admin credential unless FLAMINGO_TLS_* name one
    // (a rank, another user); set before anything connects.
    flamingo_client::cluster::ClusterState::use_admin_credentials(&context.state_dir);
    match run(cli.command, &context).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command, context: &Context) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up(args) => cluster::up(&args, context).await,
        Command::Down => cluster::down(context),
        Command::Nodes => cluster::nodes(context).await,
        Command::Launch(args) => launch::run(*args, context).await,
        Command::Slurm(command) => slurm::run(command).await,
        Command::Status(args) => jobs::status(&args, context).await,
        Command::Checkpoints(args) => jobs::checkpoints(&args, context).await,
        Command::Evals(args) => jobs::evals(&args, context).await,
        Command::List => jobs::list(context).await,
        Command::Stop(args) => jobs::stop(&args, context).await,
        Command::Logs(args) => jobs::logs(&args, context).await,
        Command::Wait(args) => jobs::wait(&args, context).await,
        Command::Metrics(args) => metrics::run(&args, context).await,
        Command::Score(args) => inference::score(&args, context),
        Command::Generate(args) => inference::generate(&args, context),
        Command::Eval(args) => eval::run(&args, context).await,
        Command::TinyModel(args) => tiny::run(&args),
        Command::Export(args) => export::run(&args, context).await,
        Command::Model(command) => model::run(&command, context),
        Command::Train(args) => train::run(&args),
        Command::Data(command) => data::run(command, context).await,
        Command::Certs(command) => certs::run(command, context),
        Command::Audit { limit } => certs::audit(limit, context).await,
    }
}
