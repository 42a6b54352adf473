//! `flamingoctl`: local clusters (`up`, `down`) and jobs (`launch`, `status`,
//! `list`, `stop`, `logs`, `wait`, `nodes`). Every command takes `--json`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use flamingoctl::commands::{self, LaunchArgs, Session};
use flamingoctl::{client, render, up};

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
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        #[arg(long, default_value_t = 2)]
        slots_per_node: u32,
        /// Coordinator port (another free one if taken).
        #[arg(long, default_value_t = 7070)]
        port: u16,
        #[arg(long, default_value_t = 10)]
        lease_ttl_seconds: u32,
    },
    /// Stop the local cluster and everything it runs.
    Down,
    /// Submit a job: a training run (`--config job.toml` and OpenFlamingo's
    /// flags, as `flamingoctl train`), `--job collective-check`, or a command
    /// after `--` run once per rank.
    Launch {
        /// Nodes: N, or MIN:MAX for a training job that continues on fewer
        /// nodes when some are lost and grows back when they return.
        #[arg(long, value_parser = commands::parse_nodes)]
        nodes: (u32, u32),
        #[arg(long, default_value_t = 1)]
        slots_per_node: u32,
        /// train, eval (`flamingoctl eval` flags after `--`, the test set split
        /// across ranks), collective-check or command (default: train with
        /// --config or --model, command when argv is given).
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Extra environment for every rank, KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// collective-check: smallest message in bytes.
        #[arg(long)]
        min_bytes: Option<u64>,
        /// collective-check: largest message in bytes.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// collective-check: gloo or nccl.
        #[arg(long)]
        backend: Option<String>,
        /// Follow the job until it ends, then print its status.
        #[arg(long)]
        wait: bool,
        /// With --wait: also stream rank 0's output while the job runs.
        #[arg(long, short, requires = "wait")]
        follow: bool,
        #[arg(last = true)]
        argv: Vec<String>,
        #[command(flatten)]
        train: Box<flamingoctl::train::TrainFlags>,
        #[command(flatten)]
        policy: flamingoctl::train::PolicyFlags,
        /// Where the job runs: local (this coordinator's agents), slurm
        /// (an sbatch job with its own control plane) or k8s (render the
        /// Kubernetes objects); see deploy/README.md.
        #[arg(long, default_value = "local")]
        scheduler: String,
        #[command(flatten)]
        k8s: Box<flamingoctl::k8s::K8sFlags>,
        #[command(flatten)]
        slurm: Box<flamingoctl::slurm::SlurmFlags>,
        /// With --wait, inside a cluster: delete this Kubernetes Job (the
        /// job's agents) once the job ended (the k8s launcher does).
        #[arg(long, hide = true, requires = "wait")]
        delete_k8s_job: Option<String>,
    },
    /// Inside a Slurm batch job: what the sbatch script runs.
    #[command(subcommand, hide = true)]
    Slurm(SlurmCommand),
    /// Show one job.
    Status { job: String },
    /// A training job's committed checkpoints.
    Checkpoints { job: String },
    /// The benchmark scores stored with a training job (`flamingoctl eval
    /// --job`): per checkpoint, dataset and shot count; a table or --json.
    Evals { job: String },
    /// A job's metric reports (step, rank, attempt, time, values): a table,
    /// --csv, or --json.
    Metrics {
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
    },
    /// List jobs.
    List,
    /// Stop a job and wait until its ranks are gone.
    Stop { job: String },
    /// Print a rank's stdout and stderr.
    Logs {
        job: String,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        #[arg(long, short)]
        follow: bool,
    },
    /// Follow a job's events until it ends.
    Wait {
        job: String,
        /// Also stream rank 0's output.
        #[arg(long, short)]
        follow: bool,
    },
    /// List the cluster's nodes.
    Nodes,
    /// Log-probabilities of a prompt's tokens given its images.
    Score(flamingoctl::inference::InferenceArgs),
    /// Continue a prompt about images (greedy or beam search; ends at <|endofchunk|>).
    Generate(flamingoctl::inference::GenerateArgs),
    /// OpenFlamingo's few-shot benchmarks (COCO, Flickr30K, VQAv2, OK-VQA, TextVQA, VizWiz, HatefulMemes, ImageNet).
    Eval(Box<flamingoctl::eval::EvalArgs>),
    /// Write a tiny random Flamingo (open_clip + MPT files and a model spec) for tests and demos.
    TinyModel {
        /// LM tokenizer dir (tokenizer.json, tokenizer_config.json).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Width of the language model (its heads are width / 8).
        #[arg(long, default_value_t = 32)]
        lm_width: i64,
        #[arg(long, default_value_t = 2)]
        lm_layers: i64,
        /// Width of the vision tower (its images are 32 px, patches 8 px).
        #[arg(long, default_value_t = 32)]
        vision_width: i64,
    },
    /// Write a run's checkpoint as OpenFlamingo's trainable state dict (.pt as torch.save
    /// writes it, or .safetensors), loadable as a model spec's `[flamingo] checkpoint`.
    Export {
        /// A run folder (its latest checkpoint), a checkpoint folder, or a
        /// cluster job id (its latest committed checkpoint).
        run: PathBuf,
        /// Only `openflamingo` (the filtered trainable state dict).
        #[arg(long, default_value = "openflamingo")]
        format: String,
        /// A step of the run instead of the latest.
        #[arg(long)]
        step: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train on this machine: --nproc rank processes (OpenFlamingo's flag names).
    Train(Box<flamingoctl::train::TrainArgs>),
    /// Datasets: index, inspect, pack and synthesize shards; measure preprocessing.
    #[command(subcommand)]
    Data(flamingoctl::data::DataCommand),
}

#[derive(Subcommand)]
enum SlurmCommand {
    /// The batch job's body: control plane, agents, launch, follow, requeue.
    Run {
        #[arg(long)]
        job_dir: PathBuf,
    },
    /// One node's agent (srun starts one per node).
    Agent(flamingoctl::slurm::AgentArgs),
}

/// The Slurm job (by Slurm or flamingo id) `job` names, unless the
/// coordinator was given explicitly.
fn slurm_record(explicit: bool, job: &str) -> anyhow::Result<Option<flamingoctl::slurm::Record>> {
    if explicit {
        return Ok(None);
    }
    flamingoctl::slurm::find(&flamingoctl::slurm::slurm_dir(None), job)
}

/// The coordinator and flamingo job id for `job`: a running Slurm job's own
/// coordinator when `job` names one.
fn route(explicit: bool, address: &str, job: &str) -> anyhow::Result<(String, String)> {
    if let Some(record) = slurm_record(explicit, job)? {
        if let (Some(coordinator), Some(job_id)) = (record.coordinator(), record.job_id()) {
            return Ok((coordinator.to_string(), job_id.to_string()));
        }
        if let Some(job_id) = record.job_id() {
            return Ok((address.to_string(), job_id.to_string()));
        }
    }
    Ok((address.to_string(), job.to_string()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(2);
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(flamingo_common::paths::local_cluster_dir);
    let address = client::resolve(cli.coordinator.as_deref(), &state_dir);
    let explicit = cli.coordinator.is_some();
    let json = cli.json;
    match cli.command {
        Command::Up {
            nodes,
            slots_per_node,
            port,
            lease_ttl_seconds,
        } => {
            let state = up::up(
                &state_dir,
                &up::UpOptions {
                    nodes,
                    slots_per_node,
                    port,
                    lease_ttl_seconds,
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                println!("coordinator {}", state.coordinator);
            }
        }
        Command::Down => match up::down(&state_dir)? {
            Some(state) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"stopped": true, "coordinator": state.coordinator})
                    );
                } else {
                    println!("local cluster stopped");
                }
            }
            None => {
                if json {
                    println!("{}", serde_json::json!({"stopped": false}));
                } else {
                    println!(
                        "no local cluster recorded in {}; nothing to stop",
                        state_dir.display()
                    );
                }
            }
        },
        Command::Launch {
            nodes,
            slots_per_node,
            job,
            name,
            env,
            min_bytes,
            max_bytes,
            backend,
            wait,
            follow,
            argv,
            train,
            policy,
            scheduler,
            k8s,
            slurm,
            delete_k8s_job,
        } => {
            // An eval job: every rank runs `flamingoctl eval` on its share.
            let (job, argv) = if job.as_deref() == Some("eval") {
                let mut argv = flamingoctl::eval::launch_argv(&argv)?;
                // `--job=VALUE` and `--step=S` as two arguments each.
                argv = argv
                    .into_iter()
                    .flat_map(|arg| match arg.split_once('=') {
                        Some((flag @ ("--job" | "--step"), value)) => {
                            vec![flag.to_string(), value.to_string()]
                        }
                        _ => vec![arg],
                    })
                    .collect();
                // A training job's id is resolved here, where the coordinator
                // is known: the ranks get its checkpoint folder.
                if let Some(position) = argv.iter().position(|arg| arg == "--job") {
                    if let Some(value) = argv.get(position + 1).cloned() {
                        let step = argv
                            .iter()
                            .position(|arg| arg == "--step")
                            .and_then(|index| argv.get(index + 1))
                            .and_then(|step| step.parse().ok());
                        let dir = commands::resolve_checkpoint(
                            &address,
                            std::path::Path::new(&value),
                            step,
                        )
                        .await?;
                        argv[position + 1] = std::path::absolute(dir)?.display().to_string();
                        // A cluster job's scores go to its dashboard page.
                        let reported = argv
                            .iter()
                            .any(|arg| arg == "--no-report" || arg.starts_with("--report-to"));
                        if !std::path::Path::new(&value).exists() && !reported {
                            argv.extend(["--report-to".to_string(), value]);
                        }
                    }
                }
                (Some("command".to_string()), argv)
            } else {
                (job, argv)
            };
            let wants_train = match job.as_deref() {
                Some("train") => true,
                None => argv.is_empty() && (train.config.is_some() || train.model.is_some()),
                Some(_) => false,
            };
            match scheduler.as_str() {
                "local" => {}
                "slurm" => {
                    // The flags are checked here, before anything waits in
                    // Slurm's queue.
                    let job_name = name
                        .clone()
                        .or_else(|| train.run_name.clone())
                        .unwrap_or_else(|| "job".into());
                    let train_job = if wants_train {
                        Some(flamingoctl::train::cluster_job(
                            &train,
                            nodes.1 * slots_per_node,
                            name.as_deref(),
                            None,
                        )?)
                    } else {
                        None
                    };
                    commands::spec_from(LaunchArgs {
                        nodes: nodes.1,
                        min_nodes: if nodes.0 == nodes.1 { 0 } else { nodes.0 },
                        slots_per_node,
                        job: job.clone(),
                        name: name.clone(),
                        env: env.clone(),
                        min_bytes,
                        max_bytes,
                        backend: backend.clone(),
                        argv: argv.clone(),
                        train: train_job,
                        policy: policy.policy(),
                    })?;
                    let all: Vec<String> = std::env::args().collect();
                    let (dir, record) = flamingoctl::slurm::submit(
                        flamingoctl::slurm::Submission {
                            name: job_name,
                            nodes: nodes.1,
                            slots_per_node,
                            launch_args: flamingoctl::k8s::strip_flags(
                                &all,
                                &flamingoctl::slurm::FLAGS_WITH_VALUE,
                                &flamingoctl::slurm::BARE_FLAGS,
                            ),
                            train: wants_train,
                            coordinator: cli.coordinator.clone(),
                        },
                        &slurm,
                        k8s.dry_run,
                    )?;
                    if k8s.dry_run {
                        return Ok(0);
                    }
                    let slurm_id = record.slurm_job_id.clone().unwrap_or_default();
                    if json && !wait {
                        println!(
                            "{}",
                            serde_json::json!({"slurm_job_id": slurm_id, "dir": dir})
                        );
                        return Ok(0);
                    }
                    if !json || wait {
                        eprintln!("submitted Slurm job {slurm_id}; folder {}", dir.display());
                    }
                    if !wait {
                        println!("{slurm_id}");
                        return Ok(0);
                    }
                    let record = flamingoctl::slurm::Record::load(&dir)?;
                    let job = flamingoctl::slurm::wait(&record, !json, follow).await?;
                    let record = flamingoctl::slurm::Record::load(&dir)?;
                    flamingoctl::slurm::print_status(&record, json).await?;
                    return Ok(commands::exit_code_for(&job));
                }
                "k8s" => {
                    let job_name = name
                        .clone()
                        .or_else(|| train.run_name.clone())
                        .unwrap_or_else(|| "job".into());
                    let argv: Vec<String> = std::env::args().collect();
                    let k8s_job = flamingoctl::k8s::K8sJob {
                        name: job_name,
                        nodes: nodes.1,
                        slots_per_node,
                        launch_args: flamingoctl::k8s::launch_args(&argv),
                    };
                    if k8s.dry_run {
                        print!("{}", flamingoctl::k8s::render(&k8s_job, &k8s)?);
                        return Ok(0);
                    }
                    let client = flamingoctl::k8s::client().await?;
                    let objects = flamingoctl::k8s::objects(&k8s_job, &k8s);
                    for line in flamingoctl::k8s::apply(&client, &objects).await? {
                        eprintln!("{line}");
                    }
                    let launcher = objects
                        .iter()
                        .filter(|object| object["kind"] == "Job")
                        .filter_map(|object| object["metadata"]["name"].as_str())
                        .find(|name| name.ends_with("-launch"))
                        .unwrap_or_default();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"namespace": k8s.namespace, "launcher": launcher, "objects": objects.len()})
                        );
                    } else {
                        println!(
                            "follow it: kubectl -n {} logs -f job/{launcher}",
                            k8s.namespace
                        );
                    }
                    return Ok(0);
                }
                other => anyhow::bail!("--scheduler {other}: use local, slurm or k8s"),
            }
            let train_job = if wants_train {
                let cluster = flamingoctl::local::ClusterState::load(&state_dir)?;
                let data_service = cluster.and_then(|state| state.data_service);
                let resolved = flamingoctl::train::cluster_job(
                    &train,
                    nodes.1 * slots_per_node,
                    name.as_deref(),
                    data_service.as_deref(),
                )?;
                Some(resolved)
            } else {
                None
            };
            let spec = commands::spec_from(LaunchArgs {
                nodes: nodes.1,
                min_nodes: if nodes.0 == nodes.1 { 0 } else { nodes.0 },
                slots_per_node,
                job,
                name,
                env,
                min_bytes,
                max_bytes,
                backend,
                argv,
                train: train_job,
                policy: policy.policy(),
            })?;
            let mut session = Session::open(&address).await?;
            let job = session.launch(&spec).await?;
            if !wait {
                if json {
                    commands::print_job(&job, true)?;
                } else {
                    println!("{}", job.id);
                }
                return Ok(0);
            }
            eprintln!("launched {}", job.id);
            let job = session.wait(job.id.as_str(), !json, follow).await?;
            commands::print_job(&job, json)?;
            if let Some(agents) = delete_k8s_job {
                let client = flamingoctl::k8s::client().await?;
                // The pod's own namespace (its service account's).
                let namespace = std::fs::read_to_string(
                    "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
                )
                .map(|text| text.trim().to_string())
                .unwrap_or_else(|_| client.default_namespace().to_string());
                flamingoctl::k8s::delete_job(&client, &namespace, &agents).await?;
                eprintln!("deleted Job {namespace}/{agents} (the job's agents)");
            }
            return Ok(commands::exit_code_for(&job));
        }
        Command::Metrics {
            job,
            csv: _,
            tensorboard: Some(dir),
            follow,
        } => {
            let (address, job) = route(explicit, &address, &job)?;
            let mut session = Session::open(&address).await?;
            let record = session.job(&job).await?;
            let mut writer =
                flamingoctl::tensorboard::JobEvents::new(&dir.join(record.id.as_str()));
            let mut written = 0usize;
            loop {
                // The state first: points stored before it turned terminal
                // are all in the fetch that follows.
                let done = !follow || session.job(&job).await?.state.is_terminal();
                let points = session.metrics(&job).await?;
                written += writer.write_points(points.get(written..).unwrap_or_default())?;
                eprint!(
                    "\r{written} point(s) written under {}   ",
                    writer.dir().display()
                );
                if done {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
            // The checkpoints' benchmark scores, as a run of their own.
            let evals = session.evals(&job).await?;
            let scores = flamingoctl::tensorboard::write_evals(writer.dir(), &evals)?;
            if scores > 0 {
                eprint!(
                    "\r{written} point(s) and {scores} checkpoint(s)' eval scores written under {}",
                    writer.dir().display()
                );
            }
            eprintln!();
            eprintln!("tensorboard --logdir {}", dir.display());
        }
        Command::Metrics { job, csv, .. } => {
            let (address, job) = route(explicit, &address, &job)?;
            let mut session = Session::open(&address).await?;
            let points = session.metrics(&job).await?;
            print!("{}", render::metrics(&points, json, csv));
        }
        Command::Evals { job } => {
            let (address, job) = route(explicit, &address, &job)?;
            let mut session = Session::open(&address).await?;
            let reports = session.evals(&job).await?;
            print!("{}", render::evals(&reports, json));
        }
        Command::Checkpoints { job } => {
            let (address, job) = route(explicit, &address, &job)?;
            let mut session = Session::open(&address).await?;
            let job = session.job(&job).await?;
            if json {
                let values: Vec<_> = job
                    .checkpoints
                    .iter()
                    .map(render::checkpoint_json)
                    .collect();
                println!("{}", serde_json::to_string_pretty(&values)?);
            } else {
                print!("{}", render::checkpoints_text(&job));
            }
        }
        Command::Status { job } => {
            if let Some(record) = slurm_record(explicit, &job)? {
                flamingoctl::slurm::print_status(&record, json).await?;
                return Ok(0);
            }
            let mut session = Session::open(&address).await?;
            commands::print_job(&session.job(&job).await?, json)?;
        }
        Command::List => {
            let mut session = Session::open(&address).await?;
            let jobs = session.list().await?;
            if json {
                let values: Vec<_> = jobs.iter().map(render::job_json).collect();
                println!("{}", serde_json::to_string_pretty(&values)?);
            } else {
                print!("{}", render::jobs_text(&jobs));
            }
        }
        Command::Stop { job } => {
            if let Some(record) = slurm_record(explicit, &job)? {
                flamingoctl::slurm::stop(&record, json).await?;
                return Ok(0);
            }
            let mut session = Session::open(&address).await?;
            commands::print_job(&session.stop(&job).await?, json)?;
        }
        Command::Logs { job, rank, follow } => {
            if let Some(record) = slurm_record(explicit, &job)? {
                // The job's coordinator is gone once it ended: its ranks'
                // logs are in the job's folder.
                if let (None, Some(job_id)) = (record.coordinator(), record.job_id()) {
                    let path =
                        flamingoctl::slurm::rank_log(&record, job_id, rank).ok_or_else(|| {
                            anyhow::anyhow!(
                                "no log of rank {rank} under {}/agents",
                                record.dir.display()
                            )
                        })?;
                    std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::stdout())?;
                    return Ok(0);
                }
            }
            let (address, job) = route(explicit, &address, &job)?;
            let mut session = Session::open(&address).await?;
            session.logs(&job, rank, follow, json).await?;
        }
        Command::Wait { job, follow } => {
            if let Some(record) = slurm_record(explicit, &job)? {
                let job = flamingoctl::slurm::wait(&record, !json, follow).await?;
                commands::print_job(&job, json)?;
                return Ok(commands::exit_code_for(&job));
            }
            let mut session = Session::open(&address).await?;
            let job = session.wait(&job, !json, follow).await?;
            commands::print_job(&job, json)?;
            return Ok(commands::exit_code_for(&job));
        }
        Command::Slurm(SlurmCommand::Run { job_dir }) => {
            return flamingoctl::slurm::run_in_allocation(&job_dir).await;
        }
        Command::Slurm(SlurmCommand::Agent(args)) => {
            return Err(flamingoctl::slurm::exec_agent(&args));
        }
        Command::Score(args) => flamingoctl::inference::score(&args, json)?,
        Command::Generate(args) => flamingoctl::inference::generate(&args, json)?,
        Command::Eval(args) => flamingoctl::eval::command(&args, &address, json).await?,
        Command::Data(command) => flamingoctl::data::run(command, json).await?,
        Command::Train(args) => return flamingoctl::train::run(&args),
        Command::Export {
            run,
            step,
            out,
            format,
        } => {
            if format != "openflamingo" {
                anyhow::bail!("--format {format}: only openflamingo is supported");
            }
            let dir = commands::resolve_checkpoint(&address, &run, step).await?;
            let tensors =
                flamingo_engine::checkpoint::state_dict(&dir).map_err(anyhow::Error::msg)?;
            match out.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => tch::Tensor::write_safetensors(&tensors, &out)?,
                Some("pt" | "bin" | "pth") => {
                    flamingo_engine::checkpoint::write_torch_pickle(&tensors, &out)
                        .map_err(anyhow::Error::msg)?
                }
                _ => anyhow::bail!(
                    "--out {}: name it .safetensors, or .pt for torch.save's format (OpenFlamingo's checkpoint.pt)",
                    out.display()
                ),
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"checkpoint": dir, "out": out, "tensors": tensors.len()})
                );
            } else {
                println!(
                    "{} tensors from {} written to {}",
                    tensors.len(),
                    dir.display(),
                    out.display()
                );
            }
        }
        Command::TinyModel {
            tokenizer,
            out,
            seed,
            lm_width,
            lm_layers,
            vision_width,
        } => {
            let vocab =
                flamingo_preprocess::FlamingoTokenizer::from_dir(&tokenizer)?.len() as i64 - 3;
            let spec = flamingo_engine::tiny::write_tiny_model(
                &out,
                &tokenizer,
                vocab,
                flamingo_engine::tiny::TinyConfig {
                    seed,
                    lm_width,
                    lm_heads: (lm_width / 8).max(1),
                    lm_layers,
                    vision_width,
                    ..Default::default()
                },
            )?;
            println!("{}", spec.display());
        }
        Command::Nodes => {
            let mut session = Session::open(&address).await?;
            let nodes = session.nodes().await?;
            if json {
                let values: Vec<_> = nodes.iter().map(render::node_json).collect();
                println!("{}", serde_json::to_string_pretty(&values)?);
            } else {
                print!("{}", render::nodes_text(&nodes));
            }
        }
    }
    Ok(0)
}
