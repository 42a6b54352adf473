//! `flamingoctl launch`: a job for the local cluster's coordinator, a
//! Slurm batch job with its own control plane (`--scheduler slurm`), or
//! Kubernetes objects (`--scheduler k8s`). A training run is resolved and
//! checked here, before anything waits in a queue.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use flamingo_common::jobs::{DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES};
use flamingo_common::train::{TrainFlags, TrainJob};
use flamingo_common::{JobKind, JobSpec};
use flamingo_launch::k8s::{self, K8sFlags};
use flamingo_launch::slurm::{self, SlurmFlags};

use crate::context::{exit_code_for, Context};
use crate::train::PolicyFlags;

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Nodes: N, or MIN:MAX for a training job that continues on fewer
    /// nodes when some are lost and grows back when they return.
    #[arg(long, value_parser = parse_nodes)]
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
    train: TrainFlags,
    #[command(flatten)]
    policy: PolicyFlags,
    /// Where the job runs: local (this coordinator's agents), slurm
    /// (an sbatch job with its own control plane) or k8s (render the
    /// Kubernetes objects); see deploy/README.md.
    #[arg(long, default_value = "local")]
    scheduler: String,
    #[command(flatten)]
    k8s: K8sFlags,
    #[command(flatten)]
    slurm: SlurmFlags,
    /// With --wait, inside a cluster: delete this Kubernetes Job (the
    /// job's agents) once the job ended (the k8s launcher does).
    #[arg(long, hide = true, requires = "wait")]
    delete_k8s_job: Option<String>,
}

impl LaunchArgs {
    /// Whether this is a training run (`--job train`, or a run's flags and
    /// no command).
    fn trains(&self) -> bool {
        match self.job.as_deref() {
            Some("train") => true,
            None => {
                self.argv.is_empty() && (self.train.config.is_some() || self.train.given("model"))
            }
            Some(_) => false,
        }
    }

    /// The name of the job for a scheduler: `--name`, the run's name, "job".
    fn job_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.train.text("run_name").map(String::from))
            .unwrap_or_else(|| "job".into())
    }

    /// The job spec, with the training run resolved for its world size.
    fn spec(&self) -> anyhow::Result<JobSpec> {
        let (min, max) = self.nodes;
        let train = match self.trains() {
            true => Some(crate::train::cluster_job(
                &self.train,
                max * self.slots_per_node,
                self.name.as_deref(),
            )?),
            false => None,
        };
        spec_from(SpecArgs {
            nodes: max,
            min_nodes: if min == max { 0 } else { min },
            slots_per_node: self.slots_per_node,
            job: self.job.clone(),
            name: self.name.clone(),
            env: self.env.clone(),
            min_bytes: self.min_bytes,
            max_bytes: self.max_bytes,
            backend: self.backend.clone(),
            argv: self.argv.clone(),
            train,
            policy: self.policy.policy(),
        })
    }
}

pub async fn run(args: LaunchArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let args = eval_job(args, context).await?;
    match args.scheduler.as_str() {
        "local" => on_cluster(&args, context).await,
        "slurm" => on_slurm(&args, context).await,
        "k8s" => on_kubernetes(&args, context).await,
        other => bail!("--scheduler {other}: use local, slurm or k8s"),
    }
}

/// `--job eval -- EVAL FLAGS`: a command job whose ranks each run
/// `flamingoctl eval` on their share; a training job's id is resolved here,
/// where the coordinator is known (the ranks get its checkpoint folder).
async fn eval_job(mut args: LaunchArgs, context: &Context) -> anyhow::Result<LaunchArgs> {
    if args.job.as_deref() != Some("eval") {
        return Ok(args);
    }
    // `--job=VALUE` and `--step=S` as two arguments each.
    let mut argv: Vec<String> = crate::eval::launch_argv(&args.argv)?
        .into_iter()
        .flat_map(|arg| match arg.split_once('=') {
            Some((flag @ ("--job" | "--step"), value)) => vec![flag.to_string(), value.to_string()],
            _ => vec![arg],
        })
        .collect();
    let value_of = |argv: &[String], flag: &str| {
        let position = argv.iter().position(|arg| arg == flag)?;
        Some((position + 1, argv.get(position + 1)?.clone()))
    };
    if let Some((position, value)) = value_of(&argv, "--job") {
        let step = value_of(&argv, "--step").and_then(|(_, step)| step.parse().ok());
        let dir = crate::checkpoints::resolve(&context.address, Path::new(&value), step).await?;
        argv[position] = std::path::absolute(dir)?.display().to_string();
        // A cluster job's scores go to its dashboard page.
        let reported = argv
            .iter()
            .any(|arg| arg == "--no-report" || arg.starts_with("--report-to"));
        if !Path::new(&value).exists() && !reported {
            argv.extend(["--report-to".to_string(), value]);
        }
    }
    args.job = Some("command".to_string());
    args.argv = argv;
    Ok(args)
}

/// A job for this context's coordinator (the local cluster's, by default).
async fn on_cluster(args: &LaunchArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let spec = args.spec()?;
    let mut session = context.session().await?;
    let job = session.launch(&spec).await?;
    if !args.wait {
        match context.json {
            true => context.print_job(&job),
            false => println!("{}", job.id),
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("launched {}", job.id);
    let job = session
        .wait(job.id.as_str(), !context.json, args.follow)
        .await?;
    context.print_job(&job);
    if let Some(agents) = &args.delete_k8s_job {
        let client = k8s::client().await?;
        // The pod's own namespace (its service account's).
        let namespace =
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .map(|text| text.trim().to_string())
                .unwrap_or_else(|_| client.default_namespace().to_string());
        k8s::delete_job(&client, &namespace, agents).await?;
        eprintln!("deleted Job {namespace}/{agents} (the job's agents)");
    }
    Ok(exit_code_for(&job))
}

/// An sbatch job running its own control plane; the flags are checked
/// here, before anything waits in Slurm's queue.
async fn on_slurm(args: &LaunchArgs, context: &Context) -> anyhow::Result<ExitCode> {
    args.spec()?;
    let all: Vec<String> = std::env::args().collect();
    let submission = slurm::Submission {
        name: args.job_name(),
        nodes: args.nodes.1,
        slots_per_node: args.slots_per_node,
        launch_args: k8s::strip_flags(&all, &slurm::FLAGS_WITH_VALUE, &slurm::BARE_FLAGS),
        train: args.trains(),
        coordinator: context.explicit.then(|| context.address.clone()),
        // Joining a cluster: its CA issues the job's node certificates
        // (FLAMINGO_PKI, else the local cluster's in the state dir).
        pki: match context.explicit {
            true => std::env::var_os("FLAMINGO_PKI")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    flamingo_client::cluster::ClusterState::load(&context.state_dir)
                        .ok()
                        .flatten()
                        .and_then(|state| state.pki)
                }),
            false => None,
        },
    };
    let submitted = slurm::submit(submission, &args.slurm, args.k8s.dry_run)?;
    if args.k8s.dry_run {
        print!("{}", submitted.script);
        eprintln!(
            "(dry run: nothing submitted; the job's folder {} is ready for `sbatch {}`)",
            submitted.dir.display(),
            submitted.dir.join("flamingo.sbatch").display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let slurm_id = submitted.file.slurm_job_id.clone().unwrap_or_default();
    if context.json && !args.wait {
        println!(
            "{}",
            serde_json::json!({"slurm_job_id": slurm_id, "dir": submitted.dir})
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "submitted Slurm job {slurm_id}; folder {}",
        submitted.dir.display()
    );
    if !args.wait {
        println!("{slurm_id}");
        return Ok(ExitCode::SUCCESS);
    }
    let record = slurm::Record::load(&submitted.dir)?;
    let job = slurm::follow::wait(&record, !context.json, args.follow).await?;
    let record = slurm::Record::load(&submitted.dir)?;
    print!("{}", slurm::follow::status(&record, context.json).await?);
    Ok(exit_code_for(&job))
}

/// The control plane's and the job's Kubernetes objects: printed with
/// `--dry-run`, else applied through the API server.
async fn on_kubernetes(args: &LaunchArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let argv: Vec<String> = std::env::args().collect();
    let job = k8s::K8sJob {
        name: args.job_name(),
        nodes: args.nodes.1,
        slots_per_node: args.slots_per_node,
        launch_args: k8s::launch_args(&argv),
    };
    let flags = &args.k8s;
    if flags.dry_run {
        print!("{}", k8s::render(&job, flags)?);
        return Ok(ExitCode::SUCCESS);
    }
    let client = k8s::client().await?;
    let objects = k8s::objects(&job, flags)?;
    for line in k8s::apply(&client, &objects).await? {
        eprintln!("{line}");
    }
    let launcher = objects
        .iter()
        .filter(|object| object["kind"] == "Job")
        .filter_map(|object| object["metadata"]["name"].as_str())
        .find(|name| name.ends_with("-launch"))
        .unwrap_or_default();
    if context.json {
        println!(
            "{}",
            serde_json::json!({"namespace": flags.namespace, "launcher": launcher, "objects": objects.len()})
        );
    } else {
        println!(
            "follow it: kubectl -n {} logs -f job/{launcher}",
            flags.namespace
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds a job spec from `launch`'s flags.
pub struct SpecArgs {
    pub nodes: u32,
    /// Elastic jobs: the fewest nodes (0: `nodes`).
    pub min_nodes: u32,
    pub slots_per_node: u32,
    pub job: Option<String>,
    pub name: Option<String>,
    pub env: Vec<String>,
    pub min_bytes: Option<u64>,
    pub max_bytes: Option<u64>,
    pub backend: Option<String>,
    pub argv: Vec<String>,
    /// A resolved training run (the job is then `train`).
    pub train: Option<TrainJob>,
    pub policy: flamingo_common::JobPolicy,
}

/// `--nodes N` or `--nodes MIN:MAX` → (min, max).
pub fn parse_nodes(text: &str) -> Result<(u32, u32), String> {
    let number = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|_| format!("'{text}': expected N or MIN:MAX (whole numbers of nodes)"))
    };
    let (min, max) = match text.split_once(':') {
        Some((min, max)) => (number(min)?, number(max)?),
        None => (number(text)?, number(text)?),
    };
    // A single 0 is left to the spec's check ("nodes: must be at least 1").
    if text.contains(':') && (min == 0 || min > max) {
        return Err(format!("'{text}': need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

pub fn spec_from(args: SpecArgs) -> anyhow::Result<JobSpec> {
    let mut env = BTreeMap::new();
    if args.train.is_some() {
        if !args.argv.is_empty() {
            bail!("a train job takes no command after `--`");
        }
        // Ranks share the node's cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        env.insert(
            "OMP_NUM_THREADS".to_string(),
            (cores / args.slots_per_node.max(1)).max(1).to_string(),
        );
    }
    let kind = match (&args.train, args.job.as_deref(), args.argv.is_empty()) {
        (Some(job), _, _) => JobKind::Train {
            config_json: serde_json::to_string(job)?,
        },
        (None, Some("train"), _) => {
            bail!("--job train needs a run: give --config job.toml and/or --model and shards")
        }
        (None, Some("collective-check"), true) => JobKind::CollectiveCheck {
            min_bytes: args.min_bytes.unwrap_or(DEFAULT_MIN_BYTES),
            max_bytes: args.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
            backend: args.backend,
        },
        (None, Some("collective-check"), false) => {
            bail!("--job collective-check takes no command after `--`")
        }
        (None, Some("command") | None, false) => JobKind::Command { argv: args.argv },
        (None, Some("command") | None, true) => {
            bail!("nothing to run: give --job collective-check, or a command after `--` (e.g. -- python train.py)")
        }
        (None, Some(other), _) => {
            bail!(
                "--job '{other}' is not a known job kind (known: train, eval, collective-check, command)"
            )
        }
    };
    for pair in args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env '{pair}': expected KEY=VALUE"))?;
        env.insert(key.to_string(), value.to_string());
    }
    let spec = JobSpec {
        name: args.name.unwrap_or_default(),
        nodes: args.nodes,
        slots_per_node: args.slots_per_node,
        min_nodes: args.min_nodes,
        kind,
        env,
        policy: args.policy,
        // Set by the coordinator from the credential.
        submitter: String::new(),
    };
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(job: Option<&str>, argv: &[&str]) -> SpecArgs {
        SpecArgs {
            nodes: 2,
            min_nodes: 0,
            slots_per_node: 2,
            job: job.map(String::from),
            name: None,
            env: vec!["A=1".into()],
            min_bytes: None,
            max_bytes: Some(1 << 20),
            backend: None,
            argv: argv.iter().map(|text| text.to_string()).collect(),
            train: None,
            policy: flamingo_common::JobPolicy::default(),
        }
    }

    #[test]
    fn launch_flags_pick_the_job_kind() {
        let check = spec_from(args(Some("collective-check"), &[])).expect("check spec");
        assert!(matches!(
            check.kind,
            JobKind::CollectiveCheck {
                max_bytes: 1048576,
                ..
            }
        ));
        assert_eq!(check.env.get("A").map(String::as_str), Some("1"));
        let command = spec_from(args(None, &["sh", "-c", "true"])).expect("command spec");
        assert_eq!(
            command.kind,
            JobKind::Command {
                argv: vec!["sh".into(), "-c".into(), "true".into()]
            }
        );
        assert!(spec_from(args(None, &[]))
            .unwrap_err()
            .to_string()
            .contains("nothing to run"));
        assert!(spec_from(args(Some("train"), &[]))
            .unwrap_err()
            .to_string()
            .contains("needs a run"));
        assert!(spec_from(args(Some("bake"), &[]))
            .unwrap_err()
            .to_string()
            .contains("not a known job kind"));
        let mut train = args(None, &[]);
        train.train = Some(flamingo_common::train::TrainJob::default());
        let spec = spec_from(train).expect("train spec");
        let JobKind::Train { config_json } = &spec.kind else {
            panic!("not a train job: {spec:?}");
        };
        let job: flamingo_common::train::TrainJob =
            serde_json::from_str(config_json).expect("the run travels as JSON");
        assert_eq!(job, flamingo_common::train::TrainJob::default());
        assert!(spec.env.contains_key("OMP_NUM_THREADS"));
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn nodes_take_one_number_or_a_range() {
        assert_eq!(parse_nodes("4"), Ok((4, 4)));
        assert_eq!(parse_nodes("2:8"), Ok((2, 8)));
        assert!(parse_nodes("3:2").unwrap_err().contains("MIN <= MAX"));
        assert!(parse_nodes("0:2").unwrap_err().contains("MIN <= MAX"));
        assert!(parse_nodes("two").unwrap_err().contains("N or MIN:MAX"));
        let mut elastic = args(None, &["true"]);
        elastic.min_nodes = 1;
        assert!(spec_from(elastic)
            .unwrap_err()
            .to_string()
            .contains("only training jobs"));
    }
}
