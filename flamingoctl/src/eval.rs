//! `flamingoctl eval`: OpenFlamingo's few-shot benchmarks on this machine
//! (reference §4): one dataset, several shot counts and trials, results in
//! OpenFlamingo's JSON format and as a table.

use std::path::{Path, PathBuf};

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use flamingo_eval::datasets::{self, Task};
use flamingo_eval::run::{self, Selection, Settings, ShotResult};
use flamingo_eval::{distributed, output};
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec};
use tch::{Kind, Tensor};

use crate::context::Context;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Model spec file (TOML: [vision], [language], [flamingo]).
    #[arg(long, required_unless_present = "job")]
    pub model: Option<PathBuf>,
    /// Evaluate a training run's checkpoint instead: a cluster job id, a
    /// run folder or a checkpoint folder (its model is the run's --model).
    #[arg(long, conflicts_with = "model")]
    pub job: Option<String>,
    /// With --job: the checkpoint at this step (default: the latest).
    #[arg(long, requires = "job")]
    pub step: Option<u64>,
    /// The benchmark.
    #[arg(long, value_enum)]
    pub dataset: Task,
    /// The dataset's folder, in the layout OpenFlamingo's evaluation reads
    /// (errors name each missing file).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Numbers of demonstrations (0 uses two text-only demonstrations).
    #[arg(long, num_args = 1.., default_values_t = [0usize, 4, 8, 16, 32])]
    pub shots: Vec<usize>,
    /// Trials per shot count (seeds 42, 43, … unless --seeds is given).
    #[arg(long)]
    pub trials: Option<usize>,
    /// One seed per trial.
    #[arg(long, num_args = 1..)]
    pub seeds: Vec<u64>,
    /// Demonstrations by CLIP similarity to the query image (RICES) instead of at random.
    #[arg(long)]
    pub rices: bool,
    /// Score this many test examples (drawn with the seed), not all.
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// Training examples random demonstrations are drawn from.
    #[arg(long, default_value_t = 2048)]
    pub query_set_size: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Classification: average class log-likelihoods over up to 6 orders of
    /// the demonstrations (OpenFlamingo's --classification_prompt_ensembling).
    #[arg(long)]
    pub classification_prompt_ensembling: bool,
    /// Beams of the beam search (captioning and VQA).
    #[arg(long, default_value_t = 3)]
    pub num_beams: i64,
    /// Write the scores here as OpenFlamingo's results JSON ({dataset: [{shots, trials, mean, stddev}]}); other datasets already in the file are kept.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Write every scored example (prompt, demonstrations, output, prediction) here as JSON lines.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// RICES feature cache (default ~/.cache/flamingo/rices).
    #[arg(long)]
    pub features_dir: Option<PathBuf>,
    /// Answer EvalAI's test-dev questions instead of the val split (VQAv2,
    /// VizWiz): no annotations, so no score; writes the submission files.
    #[arg(long)]
    pub testdev: bool,
    /// With --testdev: where the submission files go.
    #[arg(long, default_value = ".", requires = "testdev")]
    pub testdev_dir: PathBuf,
    /// OK-VQA's stemming: WordNet 3.0's folder (default: $WNSEARCHDIR,
    /// /usr/share/wordnet from Debian's wordnet-base, NLTK's corpora/wordnet).
    #[arg(long)]
    pub wordnet_dir: Option<PathBuf>,
    /// Store the scores with this cluster job, next to its loss curves on
    /// the dashboard (the default when --job names a cluster job).
    #[arg(long, requires = "job")]
    pub report_to: Option<String>,
    /// Do not store the scores with the training job.
    #[arg(long, conflicts_with = "report_to")]
    pub no_report: bool,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = flamingo_model::device::parse_device)]
    pub device: tch::Device,
    /// Weight and activation precision: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32", value_parser = crate::inference::parse_dtype)]
    pub dtype: Kind,
}

impl EvalArgs {
    /// How demonstrations are chosen, as the results name it.
    fn selection(&self) -> &'static str {
        if self.rices {
            "RICES"
        } else {
            "random"
        }
    }

    /// The trial seeds.
    pub fn seeds(&self) -> anyhow::Result<Vec<u64>> {
        match (self.trials, self.seeds.is_empty()) {
            (None, true) => Ok(vec![42]),
            (None, false) => Ok(self.seeds.clone()),
            (Some(trials), true) => Ok((0..trials as u64).map(|offset| 42 + offset).collect()),
            (Some(trials), false) if trials == self.seeds.len() => Ok(self.seeds.clone()),
            (Some(trials), false) => bail!(
                "--trials {trials} but {} --seeds were given; give one seed per trial",
                self.seeds.len()
            ),
        }
    }

    pub fn settings(&self, rank: usize, world: usize) -> anyhow::Result<Settings> {
        if self.batch_size == 0 || self.num_beams < 1 {
            bail!("--batch-size and --num-beams must be at least 1");
        }
        if self.shots.is_empty() {
            bail!("--shots needs at least one number of demonstrations");
        }
        let features_dir = match &self.features_dir {
            Some(dir) => dir.clone(),
            None => std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("flamingo/rices"),
        };
        Ok(Settings {
            shots: self.shots.clone(),
            seeds: self.seeds()?,
            selection: if self.rices {
                Selection::Rices
            } else {
                Selection::Random {
                    query_set_size: self.query_set_size,
                }
            },
            num_samples: self.num_samples,
            batch_size: self.batch_size,
            num_beams: self.num_beams,
            ensemble: self.classification_prompt_ensembling,
            features_dir,
            rank,
            world,
            wordnet_dir: self.wordnet_dir.clone(),
        })
    }

    /// The model: `--model`'s spec, or with a `checkpoint` folder (from
    /// `--job`), its run's spec with the checkpoint's trainable weights.
    pub fn load_model(&self, checkpoint: Option<&Path>) -> anyhow::Result<run::Model> {
        let (mut spec, spec_path) = match (&self.model, checkpoint) {
            (_, Some(dir)) => {
                let manifest_path = dir.join("manifest.json");
                let manifest = flamingo_engine::checkpoint::read_manifest(dir)?;
                let model = manifest.config["model"].as_str().ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: the run config names no model spec",
                        manifest_path.display()
                    )
                })?;
                let path = PathBuf::from(model);
                (ModelSpec::from_file(&path)?, path)
            }
            (Some(path), None) => (ModelSpec::from_file(path)?, path.clone()),
            (None, None) => bail!("give --model SPEC or --job JOB"),
        };
        // The checkpoint's trainable weights, in OpenFlamingo's names, replace
        // whatever checkpoint the spec names.
        let _exported;
        if let Some(dir) = checkpoint {
            let tensors = flamingo_engine::checkpoint::state_dict(dir)?;
            let folder = tempfile::tempdir()?;
            let file = folder.path().join("checkpoint.safetensors");
            Tensor::write_safetensors(&tensors, &file)?;
            spec.checkpoint = Some(file);
            _exported = folder;
            eprintln!("evaluating checkpoint {}", dir.display());
        }
        if let tch::Device::Cuda(_) = self.device {
            flamingo_model::device::prepare(self.device)?;
        }
        let options = LoadOptions {
            device: self.device,
            kind: self.dtype,
            ..LoadOptions::default()
        };
        let (model, tokenizer) = load_flamingo_with(&spec, options)
            .with_context(|| format!("loading {}", spec_path.display()))?;
        let spec_text = std::fs::read_to_string(&spec_path).unwrap_or_default();
        let canonical = spec_path.canonicalize().unwrap_or(spec_path);
        Ok(run::Model {
            model,
            tokenizer,
            device: self.device,
            kind: self.dtype,
            image_size: spec.vision.image_size as usize,
            identity: format!(
                "{}\n{spec_text}\n{}",
                canonical.display(),
                checkpoint
                    .map(|dir| dir.display().to_string())
                    .unwrap_or_default()
            ),
        })
    }
}

/// The val split, or with --testdev the test-dev questions.
fn load_dataset(args: &EvalArgs) -> anyhow::Result<datasets::Dataset> {
    Ok(if args.testdev {
        datasets::load_testdev(args.dataset, &args.data_dir)?
    } else {
        datasets::load(args.dataset, &args.data_dir)?
    })
}

/// OK-VQA's stemming needs WordNet: said before the model loads.
fn check_wordnet(args: &EvalArgs) -> anyhow::Result<()> {
    if args.dataset == Task::OkVqa {
        flamingo_eval::metrics::okvqa::Stemmer::load(args.wordnet_dir.as_deref())
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// What one run scored (on rank 0; the other ranks return none).
pub struct Scored {
    pub results: Vec<ShotResult>,
    /// Test examples scored per trial.
    pub samples: usize,
}

/// Runs the benchmark on this rank (and its share of the batches when
/// started as one of several); rank 0 scores, writes and prints.
fn evaluate(
    args: &EvalArgs,
    checkpoint: Option<&Path>,
    json_output: bool,
) -> anyhow::Result<Option<Scored>> {
    let group = distributed::process_group()?;
    let (rank, world) = group.as_ref().map_or((0, 1), |group| {
        (group.rank() as usize, group.world_size() as usize)
    });
    let settings = args.settings(rank, world)?;
    let dataset = load_dataset(args)?;
    eprintln!(
        "{}: {} test examples, {} demonstrations to draw from",
        args.dataset.name(),
        dataset.test.len(),
        dataset.train.len()
    );
    check_wordnet(args)?;
    let model = args.load_model(checkpoint)?;
    let started = std::time::Instant::now();
    let Some(outputs) = distributed::predict(&model, &dataset, &settings, group.as_ref())? else {
        return Ok(None);
    };
    if let Some(path) = &args.predictions {
        output::write_predictions(path, &outputs)?;
    }
    if args.testdev {
        let written = output::write_submissions(&args.testdev_dir, &dataset, &outputs, args.rices)?;
        if args.results.is_some() {
            eprintln!("test-dev has no annotations: no scores for --results");
        }
        let written: Vec<String> = written
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        eprintln!(
            "test-dev: no annotations, no score; EvalAI submission files:\n  {}",
            written.join("\n  ")
        );
        return Ok(None);
    }
    let scored: usize = outputs
        .iter()
        .map(|(_, predictions)| predictions.len())
        .sum();
    let runs = outputs.len().max(1);
    let results = run::results(&dataset, &settings, outputs)?;
    if let Some(path) = &args.results {
        output::write_results(path, args.dataset, &results)?;
    }
    if json_output {
        println!("{}", serde_json::json!({ args.dataset.name(): results }));
    } else {
        print!(
            "{}",
            output::table(args.dataset, args.selection(), &results)
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "evaluated {scored} examples in {seconds:.1}s ({:.2} samples/s){}",
        scored as f64 / seconds.max(1e-9),
        args.results
            .as_ref()
            .map(|path| format!("; results in {}", path.display()))
            .unwrap_or_default()
    );
    Ok(Some(Scored {
        results,
        samples: scored / runs,
    }))
}

/// `flamingoctl eval`: resolves `--job` (through the coordinator when it
/// names a cluster job), runs the benchmark, and on rank 0 stores the scores
/// with the training job. A rank of an eval job reaches the coordinator its
/// agent names.
pub async fn run(args: &EvalArgs, context: &Context) -> anyhow::Result<ExitCode> {
    let address = &context.address;
    let checkpoint = match &args.job {
        Some(job) => Some(crate::checkpoints::resolve(address, Path::new(job), args.step).await?),
        None => None,
    };
    let scored = evaluate(args, checkpoint.as_deref(), context.json)?;
    if let (Some(scored), Some(job), Some(checkpoint)) =
        (scored, report_target(args), checkpoint.as_deref())
    {
        let address =
            std::env::var("FLAMINGO_JOB_COORDINATOR").unwrap_or_else(|_| address.to_string());
        if let Err(error) = report(&address, &job, args, checkpoint, &scored).await {
            eprintln!(
                "warning: the scores were not stored with job {job}: {error:#}{}",
                args.results
                    .as_ref()
                    .map(|path| format!(" (they are in {})", path.display()))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The cluster job `args`' scores are stored with, if any: `--report-to`,
/// else `--job` when it names a cluster job rather than a folder here.
pub fn report_target(args: &EvalArgs) -> Option<String> {
    if args.no_report {
        return None;
    }
    args.report_to
        .clone()
        .or_else(|| args.job.clone().filter(|job| !Path::new(job).exists()))
}

/// Stores the scores of `checkpoint` with `job` on the coordinator at
/// `address` (the dashboard shows them next to the job's loss curves).
pub async fn report(
    address: &str,
    job: &str,
    args: &EvalArgs,
    checkpoint: &Path,
    scored: &Scored,
) -> anyhow::Result<()> {
    use flamingo_proto::v1 as pb;
    let manifest = flamingo_engine::checkpoint::read_manifest(checkpoint)?;
    let report = pb::EvalReport {
        job_id: job.to_string(),
        step: manifest.step,
        dataset: args.dataset.name().to_string(),
        metric: output::metric_name(args.dataset).to_string(),
        selection: args.selection().to_string(),
        scores: scored
            .results
            .iter()
            .map(|result| pb::EvalScore {
                shots: result.shots as u64,
                mean: result.mean,
                stddev: result.stddev,
                trials: result.trials.clone(),
            })
            .collect(),
        samples: scored.samples as u64,
        checkpoint: checkpoint.display().to_string(),
        unix_ms: 0,
        // An eval job's rank reports with its attempt's credential; a user
        // with their own certificate.
        rank_token: std::env::var(flamingo_security::ENV_RANK_TOKEN).unwrap_or_default(),
    };
    flamingo_client::Session::open(address)
        .await?
        .report_eval(report)
        .await?;
    eprintln!(
        "stored the scores with job {job} (step {}): its dashboard page shows them",
        manifest.step
    );
    Ok(())
}

#[derive(clap::Parser)]
#[command(name = "flamingoctl eval")]
struct EvalCli {
    #[command(flatten)]
    args: EvalArgs,
}

const PATH_FLAGS: [&str; 7] = [
    "--model",
    "--data-dir",
    "--results",
    "--predictions",
    "--features-dir",
    "--wordnet-dir",
    "--testdev-dir",
];

/// `flamingoctl launch --job eval -- EVAL FLAGS`: checks the flags and the
/// dataset here, then returns the command every rank runs (this binary's
/// `eval`, with absolute paths, since ranks need not share this directory's
/// view of relative ones).
pub fn launch_argv(argv: &[String]) -> anyhow::Result<Vec<String>> {
    use clap::Parser;
    let parsed = EvalCli::try_parse_from(
        std::iter::once("flamingoctl eval".to_string()).chain(argv.iter().cloned()),
    )
    .map_err(|error| {
        anyhow::anyhow!("--job eval: the flags after `--` are `flamingoctl eval`'s:\n{error}")
    })?;
    parsed.args.seeds()?;
    load_dataset(&parsed.args)?;
    check_wordnet(&parsed.args)?;
    if let Some(model) = &parsed.args.model {
        ModelSpec::from_file(model)?;
    }
    let cwd = std::env::current_dir()?;
    let absolute = |value: &str| cwd.join(value).display().to_string();
    let mut out = vec![
        std::env::current_exe()?.display().to_string(),
        "eval".to_string(),
    ];
    let mut next_is_path = false;
    for arg in argv {
        if next_is_path {
            out.push(absolute(arg));
            next_is_path = false;
        } else if let Some((flag, value)) = arg
            .split_once('=')
            .filter(|(flag, _)| PATH_FLAGS.contains(flag))
        {
            out.push(format!("{flag}={}", absolute(value)));
        } else {
            next_is_path = PATH_FLAGS.contains(&arg.as_str());
            out.push(arg.clone());
        }
    }
    Ok(out)
}
