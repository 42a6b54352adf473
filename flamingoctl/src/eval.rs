//! `flamingoctl eval`: OpenFlamingo's few-shot benchmarks on this machine
//! (reference §4): one dataset, several shot counts and trials, results in
//! OpenFlamingo's JSON format and as a table.

use std::path::PathBuf;

use anyhow::{bail, Context};
use flamingo_eval::datasets::{self, Task};
use flamingo_eval::run::{self, Selection, Settings, ShotResult};
use flamingo_model::{load_flamingo_with, LoadOptions, ModelSpec};
use tch::Kind;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Model spec file (TOML: [vision], [language], [flamingo]).
    #[arg(long)]
    pub model: PathBuf,
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
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = flamingo_model::device::parse_device)]
    pub device: tch::Device,
    /// Weight and activation precision: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32", value_parser = crate::inference::parse_dtype)]
    pub dtype: Kind,
}

impl EvalArgs {
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
            features_dir,
            rank,
            world,
        })
    }

    pub fn load_model(&self) -> anyhow::Result<run::Model> {
        let spec = ModelSpec::from_file(&self.model)?;
        if let tch::Device::Cuda(_) = self.device {
            flamingo_model::device::prepare(self.device)?;
        }
        let options = LoadOptions {
            device: self.device,
            kind: self.dtype,
            ..LoadOptions::default()
        };
        let (model, tokenizer) = load_flamingo_with(&spec, options)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let spec_text = std::fs::read_to_string(&self.model).unwrap_or_default();
        let canonical = self
            .model
            .canonicalize()
            .unwrap_or_else(|_| self.model.clone());
        Ok(run::Model {
            model,
            tokenizer,
            device: self.device,
            kind: self.dtype,
            image_size: spec.vision.image_size as usize,
            identity: format!("{}\n{spec_text}", canonical.display()),
        })
    }
}

/// Writes `results` for `task` into `path`, keeping other datasets there.
pub fn write_results(
    path: &std::path::Path,
    task: Task,
    results: &[ShotResult],
) -> anyhow::Result<()> {
    let mut all = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
            .with_context(|| format!("{}: exists but is not a results JSON object; move it away or choose another --results", path.display()))?,
        Err(_) => serde_json::Map::new(),
    };
    all.insert(task.name().to_string(), serde_json::to_value(results)?);
    std::fs::write(path, serde_json::to_string_pretty(&all)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// The results as a table.
pub fn print_table(task: Task, selection: &str, results: &[ShotResult]) {
    let metric = match task.kind() {
        datasets::Kind::Captioning => "CIDEr",
        datasets::Kind::Vqa => "VQA accuracy",
        datasets::Kind::Classification if task == Task::HatefulMemes => "ROC-AUC",
        datasets::Kind::Classification => "top-1",
    };
    println!("{} ({metric}, {selection} demonstrations)", task.name());
    println!("{:>6}  {:>10}  {:>8}  trials", "shots", "mean", "stddev");
    for result in results {
        let trials: Vec<String> = result.trials.iter().map(|t| format!("{t:.4}")).collect();
        println!(
            "{:>6}  {:>10.4}  {:>8.4}  {}",
            result.shots,
            result.mean,
            result.stddev,
            trials.join(" ")
        );
    }
}

pub fn run(args: &EvalArgs, json_output: bool) -> anyhow::Result<()> {
    let settings = args.settings(0, 1)?;
    let dataset = datasets::load(args.dataset, &args.data_dir).map_err(anyhow::Error::msg)?;
    eprintln!(
        "{}: {} test examples, {} demonstrations to draw from",
        args.dataset.name(),
        dataset.test.len(),
        dataset.train.len()
    );
    let model = args.load_model()?;
    let started = std::time::Instant::now();
    let outputs = run::predict(&model, &dataset, &settings)?;
    if let Some(path) = &args.predictions {
        write_predictions(path, &outputs)?;
    }
    let scored: usize = outputs
        .iter()
        .map(|(_, predictions)| predictions.len())
        .sum();
    let results = run::results(&dataset, &settings, outputs)?;
    if let Some(path) = &args.results {
        write_results(path, args.dataset, &results)?;
    }
    let selection = if args.rices { "RICES" } else { "random" };
    if json_output {
        println!("{}", serde_json::json!({ args.dataset.name(): results }));
    } else {
        print_table(args.dataset, selection, &results);
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
    Ok(())
}

/// Every prediction as a JSON line with its shots and seed.
pub fn write_predictions(path: &std::path::Path, outputs: &run::Outputs) -> anyhow::Result<()> {
    let mut text = String::new();
    for ((shots, seed), predictions) in outputs {
        for prediction in predictions {
            let mut line = serde_json::to_value(prediction)?;
            line["shots"] = (*shots).into();
            line["seed"] = (*seed).into();
            text.push_str(&serde_json::to_string(&line)?);
            text.push('\n');
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
