//! Running a model over a benchmark: prompts for each scored example,
//! batched generation (beam search, `<|endofchunk|>` ends) or class-name
//! log-likelihoods, post-processing, and the metric.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use flamingo_model::preprocess::{clip_preprocess, RgbImage};
use flamingo_model::{BeamSettings, Flamingo, FlamingoTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::datasets::{Dataset, Example, Task};
use crate::metrics;
use crate::prompts;
use crate::select;

/// How demonstrations are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Random { query_set_size: usize },
    Rices,
}

/// Settings of one evaluation run (all shots and trials of one dataset).
#[derive(Debug, Clone)]
pub struct Settings {
    pub shots: Vec<usize>,
    pub seeds: Vec<u64>,
    pub selection: Selection,
    pub num_samples: Option<usize>,
    pub batch_size: usize,
    pub num_beams: i64,
    /// Classification: average the class log-likelihoods over up to 6
    /// orders of the demonstrations (OpenFlamingo's
    /// `--classification_prompt_ensembling`).
    pub ensemble: bool,
    /// Where RICES features of the training split are cached.
    pub features_dir: PathBuf,
    /// This process's share: batches `rank`, `rank + world`, …
    pub rank: usize,
    pub world: usize,
}

/// A model ready to evaluate.
pub struct Model {
    pub model: Flamingo,
    pub tokenizer: FlamingoTokenizer,
    pub device: Device,
    pub kind: Kind,
    pub image_size: usize,
    /// Identifies the weights in feature-cache keys (the spec's path and
    /// contents).
    pub identity: String,
}

/// One scored example's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    /// Position in the test split.
    pub index: usize,
    pub id: Value,
    pub prompt: String,
    /// Ids of the demonstrations, in prompt order.
    pub demos: Vec<Value>,
    /// The image files given with the prompt, in order.
    pub images: Vec<PathBuf>,
    /// What the model generated (generation tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The post-processed answer or caption, or the predicted class name.
    pub prediction: String,
    /// Classification: the probability the score is computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// Scores of one dataset: per shots, the trials' scores, in OpenFlamingo's
/// results format.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShotResult {
    pub shots: usize,
    pub trials: Vec<f64>,
    pub mean: f64,
    pub stddev: f64,
}

impl ShotResult {
    pub fn new(shots: usize, trials: Vec<f64>) -> Self {
        let mean = trials.iter().sum::<f64>() / trials.len().max(1) as f64;
        let variance =
            trials.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / trials.len().max(1) as f64;
        Self {
            shots,
            trials,
            mean,
            stddev: variance.sqrt(),
        }
    }
}

/// Prompts are cut to this many tokens, as OpenFlamingo's evaluation cuts
/// them (from the right, as its tokenizer call does).
const MAX_PROMPT_TOKENS: usize = 2000;

/// Preprocessed images, kept while the run reuses them (demonstrations
/// recur across examples).
struct ImageCache {
    size: usize,
    kept: HashMap<PathBuf, Tensor>,
}

const IMAGE_CACHE_ENTRIES: usize = 4096;

impl ImageCache {
    fn get(&mut self, path: &Path) -> anyhow::Result<Tensor> {
        if let Some(tensor) = self.kept.get(path) {
            return Ok(tensor.shallow_clone());
        }
        let image = RgbImage::open(path)
            .with_context(|| format!("{}: cannot read the image", path.display()))?;
        let tensor = clip_preprocess(&image, self.size)
            .with_context(|| format!("{}: cannot preprocess the image", path.display()))?;
        if self.kept.len() < IMAGE_CACHE_ENTRIES {
            self.kept.insert(path.to_path_buf(), tensor.shallow_clone());
        }
        Ok(tensor)
    }
}

/// A progress line on stderr: redrawn on a terminal, every tenth of the way
/// otherwise.
struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
    last_tenth: usize,
}

impl Progress {
    fn new(label: String, total: usize) -> Self {
        use std::io::IsTerminal;
        Self {
            label,
            total,
            done: 0,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    fn advance(&mut self, count: usize) {
        self.done += count;
        let tenth = self.done * 10 / self.total.max(1);
        if !self.terminal && tenth == self.last_tenth && self.done < self.total {
            return;
        }
        self.last_tenth = tenth;
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-9);
        let eta = (self.total - self.done.min(self.total)) as f64 / rate.max(1e-9);
        let width = 24;
        let filled = (self.done * width / self.total.max(1)).min(width);
        let line = format!(
            "{} {}/{} [{}{}] {rate:.2} samples/s ETA {eta:.0}s",
            self.label,
            self.done,
            self.total,
            "=".repeat(filled),
            " ".repeat(width - filled)
        );
        if self.terminal {
            eprint!("\r{line}   ");
            if self.done >= self.total {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }
}

impl Model {
    fn images(&self, cache: &mut ImageCache, lists: &[Vec<&Path>]) -> anyhow::Result<Tensor> {
        let longest = lists.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let size = self.image_size as i64;
        let batch = Tensor::zeros(
            [lists.len() as i64, longest, 1, 3, size, size],
            (Kind::Float, Device::Cpu),
        );
        for (row, paths) in lists.iter().enumerate() {
            for (slot, path) in paths.iter().enumerate() {
                batch
                    .get(row as i64)
                    .get(slot as i64)
                    .get(0)
                    .copy_(&cache.get(path)?);
            }
        }
        Ok(batch.to_device(self.device).to_kind(self.kind))
    }

    /// Token ids left-padded to the longest, and the attention mask.
    fn texts(&self, prompts: &[String]) -> anyhow::Result<(Tensor, Tensor)> {
        let encoded = prompts
            .iter()
            .map(|prompt| {
                let mut tokens = self.tokenizer.encode(prompt, true)?;
                // OpenFlamingo's tokenizer call: truncation=True, max_length=2000.
                tokens.truncate(MAX_PROMPT_TOKENS);
                Ok(tokens)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let pad = i64::from(self.tokenizer.pad_token_id());
        let mut ids = Vec::with_capacity(encoded.len() * longest);
        let mut mask = Vec::with_capacity(encoded.len() * longest);
        for tokens in &encoded {
            let padding = longest - tokens.len();
            ids.extend(std::iter::repeat_n(pad, padding));
            mask.extend(std::iter::repeat_n(0i64, padding));
            ids.extend(tokens.iter().map(|id| i64::from(*id)));
            mask.extend(std::iter::repeat_n(1i64, tokens.len()));
        }
        let shape = [encoded.len() as i64, longest as i64];
        Ok((
            Tensor::from_slice(&ids).view(shape).to_device(self.device),
            Tensor::from_slice(&mask).view(shape).to_device(self.device),
        ))
    }

    /// L2-normalised CLIP embeddings of `examples`' images, `[n, d]` on the
    /// CPU.
    fn embeddings(
        &self,
        cache: &mut ImageCache,
        examples: &[&Example],
        batch_size: usize,
    ) -> anyhow::Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in examples.chunks(batch_size.max(1)) {
            let pixels = chunk
                .iter()
                .map(|example| cache.get(&example.image))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let images = Tensor::stack(&pixels, 0)
                .to_device(self.device)
                .to_kind(self.kind);
            parts.push(self.model.image_embeddings(&images)?.to_device(Device::Cpu));
        }
        Ok(Tensor::cat(&parts, 0))
    }

    /// The training split's RICES features, from `dir` when cached there by
    /// an earlier run with the same model and images, else computed and
    /// cached.
    fn train_features(
        &self,
        cache: &mut ImageCache,
        dataset: &Dataset,
        settings: &Settings,
    ) -> anyhow::Result<Tensor> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.identity.hash(&mut hasher);
        for example in &dataset.train {
            example.image.hash(&mut hasher);
        }
        let key = format!(
            "{}-{:016x}.safetensors",
            dataset.task.name(),
            hasher.finish()
        );
        let path = settings.features_dir.join(key);
        if let Ok(tensors) = Tensor::read_safetensors(&path) {
            if let Some((_, features)) = tensors.into_iter().find(|(name, _)| name == "features") {
                if features.size().first() == Some(&(dataset.train.len() as i64)) {
                    eprintln!(
                        "RICES: {} cached features from {}",
                        dataset.train.len(),
                        path.display()
                    );
                    return Ok(features);
                }
            }
        }
        let mut progress = Progress::new(
            format!("RICES features ({})", dataset.task.name()),
            dataset.train.len(),
        );
        let mut parts = Vec::new();
        let examples: Vec<&Example> = dataset.train.iter().collect();
        for chunk in examples.chunks(64) {
            parts.push(self.embeddings(cache, chunk, settings.batch_size)?);
            progress.advance(chunk.len());
        }
        let features = Tensor::cat(&parts, 0);
        std::fs::create_dir_all(&settings.features_dir).with_context(|| {
            format!(
                "creating the RICES feature cache {}",
                settings.features_dir.display()
            )
        })?;
        // Ranks of a distributed run may compute the same features at once.
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        Tensor::write_safetensors(&[("features", &features)], &partial)?;
        std::fs::rename(&partial, &path)?;
        eprintln!("RICES: features cached in {}", path.display());
        Ok(features)
    }
}

/// One batch's model inputs and what they were made from.
struct Inputs {
    texts: Vec<String>,
    /// Training indices of each row's demonstrations, in prompt order.
    demo_orders: Vec<Vec<usize>>,
    image_lists: Vec<Vec<PathBuf>>,
    vision_x: Tensor,
    lang_x: Tensor,
    mask: Tensor,
}

/// Ensemble members for `demos` demonstrations: min(6, demos!).
fn permutations(demos: usize) -> usize {
    let mut product = 1;
    for n in 1..=demos {
        product *= n;
        if product >= 6 {
            return 6;
        }
    }
    product
}

/// The prompts for the examples of one trial; `demos[i]` are training
/// indices in prompt order.
pub struct Plan {
    pub seed: u64,
    pub subset: Vec<usize>,
    pub demos: Vec<Vec<usize>>,
}

/// Chooses the scored examples and their demonstrations for `shots` and
/// `seed` (RICES needs the model for image embeddings).
fn plan(
    model: &Model,
    cache: &mut ImageCache,
    dataset: &Dataset,
    settings: &Settings,
    shots: usize,
    seed: u64,
    train_features: Option<&Tensor>,
) -> anyhow::Result<Plan> {
    let subset = select::test_subset(dataset.test.len(), settings.num_samples, seed);
    let count = prompts::effective_shots(shots);
    let demos = match (settings.selection, train_features) {
        (Selection::Rices, Some(features)) => {
            let queries: Vec<&Example> = subset.iter().map(|index| &dataset.test[*index]).collect();
            let embedded = model.embeddings(cache, &queries, settings.batch_size)?;
            select::rices(features, &embedded, count)
        }
        (Selection::Random { query_set_size }, _) => {
            let pool = select::query_set(dataset.train.len(), query_set_size, seed);
            subset
                .iter()
                .map(|index| select::random_demos(&pool, count, seed, *index))
                .collect()
        }
        (Selection::Rices, None) => bail!("RICES selection needs the training split's features"),
    };
    Ok(Plan {
        seed,
        subset,
        demos,
    })
}

/// Runs one trial (`shots`, `seed`) over this rank's batches and returns
/// its predictions.
fn trial(
    model: &Model,
    cache: &mut ImageCache,
    dataset: &Dataset,
    settings: &Settings,
    plan: &Plan,
    shots: usize,
    progress: &mut Progress,
) -> anyhow::Result<Vec<Prediction>> {
    let task = dataset.task;
    let positions: Vec<usize> = (0..plan.subset.len()).collect();
    let mut predictions = Vec::new();
    for (batch_index, batch) in positions.chunks(settings.batch_size.max(1)).enumerate() {
        if batch_index % settings.world != settings.rank {
            continue;
        }
        let classification = task.kind() == crate::datasets::Kind::Classification;
        let orders = if classification && settings.ensemble {
            permutations(prompts::effective_shots(shots))
        } else {
            1
        };
        // Demonstration orders, shuffled further for each ensemble member
        // (as `random.shuffle` in place does upstream).
        let mut demo_orders: Vec<Vec<usize>> = batch
            .iter()
            .map(|position| plan.demos[*position].clone())
            .collect();
        let mut summed: Option<Vec<Vec<f64>>> = None;
        let mut first: Option<Inputs> = None;
        for order in 0..orders {
            if orders > 1 {
                for (demos, position) in demo_orders.iter_mut().zip(batch) {
                    select::shuffle(demos, plan.seed, plan.subset[*position], order);
                }
            }
            let mut texts = Vec::with_capacity(batch.len());
            let mut image_lists: Vec<Vec<PathBuf>> = Vec::with_capacity(batch.len());
            for (position, order) in batch.iter().zip(&demo_orders) {
                let query = &dataset.test[plan.subset[*position]];
                let demos: Vec<&Example> =
                    order.iter().map(|index| &dataset.train[*index]).collect();
                texts.push(prompts::prompt(task, &demos, query, shots));
                image_lists.push(
                    prompts::images(&demos, query, shots)
                        .into_iter()
                        .map(Path::to_path_buf)
                        .collect(),
                );
            }
            let paths: Vec<Vec<&Path>> = image_lists
                .iter()
                .map(|list| list.iter().map(PathBuf::as_path).collect())
                .collect();
            let vision_x = model.images(cache, &paths)?;
            let (lang_x, mask) = model.texts(&texts)?;
            if classification {
                let rows = class_rows(model, dataset, &vision_x, &lang_x, &mask)?;
                summed = Some(match summed {
                    None => rows,
                    Some(mut total) => {
                        for (total, row) in total.iter_mut().zip(rows) {
                            for (sum, value) in total.iter_mut().zip(row) {
                                *sum += value;
                            }
                        }
                        total
                    }
                });
            }
            if first.is_none() {
                first = Some(Inputs {
                    texts,
                    demo_orders: demo_orders.clone(),
                    image_lists,
                    vision_x,
                    lang_x,
                    mask,
                });
            }
        }
        let Inputs {
            texts,
            demo_orders,
            image_lists,
            vision_x,
            lang_x,
            mask,
        } = first.expect("at least one demonstration order");
        let outcomes: Vec<Outcome> = match task.kind() {
            crate::datasets::Kind::Classification => {
                let rows: Vec<Vec<f64>> = summed
                    .expect("classification scored every order")
                    .into_iter()
                    .map(|row| row.into_iter().map(|sum| sum / orders as f64).collect())
                    .collect();
                class_outcomes(dataset, rows)
            }
            _ => {
                let settings = BeamSettings {
                    num_beams: settings.num_beams,
                    max_new_tokens: task.max_new_tokens(),
                    length_penalty: 0.0,
                    eos_token_id: i64::from(model.tokenizer.end_of_chunk_token_id()),
                    pad_token_id: i64::from(model.tokenizer.pad_token_id()),
                };
                let new_tokens = tch::no_grad(|| {
                    model
                        .model
                        .generate_beam(&vision_x, &lang_x, Some(&mask), settings)
                })?;
                let rows: Vec<Vec<i64>> =
                    Vec::<Vec<i64>>::try_from(&new_tokens.to_device(Device::Cpu))?;
                rows.into_iter()
                    .map(|row| {
                        let ids: Vec<u32> = row.into_iter().map(|id| id as u32).collect();
                        let output = model.tokenizer.decode(&ids, true)?;
                        let prediction = match task {
                            Task::Coco | Task::Flickr30k => prompts::postprocess_caption(&output),
                            _ => metrics::vqa::postprocess_generation(&output).to_string(),
                        };
                        Ok((Some(output), prediction, None))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
            }
        };
        for ((((position, prompt), images), demos), (output, prediction, score)) in batch
            .iter()
            .zip(texts)
            .zip(&image_lists)
            .zip(&demo_orders)
            .zip(outcomes)
        {
            let index = plan.subset[*position];
            predictions.push(Prediction {
                index,
                id: dataset.test[index].id.clone(),
                prompt,
                demos: demos
                    .iter()
                    .map(|demo| dataset.train[*demo].id.clone())
                    .collect(),
                images: images.clone(),
                output,
                prediction,
                score,
            });
        }
        progress.advance(batch.len());
    }
    Ok(predictions)
}

/// A batch row's raw output (generation), prediction and class probability.
type Outcome = (Option<String>, String, Option<f64>);

/// Class-name log-likelihoods (mean over each name's tokens), `[row][class]`.
fn class_rows(
    model: &Model,
    dataset: &Dataset,
    vision_x: &Tensor,
    lang_x: &Tensor,
    mask: &Tensor,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let classes = dataset
        .class_names
        .iter()
        .map(|name| {
            Ok(model
                .tokenizer
                .encode(name, false)?
                .into_iter()
                .map(i64::from)
                .collect::<Vec<i64>>())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let logprobs = tch::no_grad(|| {
        model
            .model
            .class_logprobs(vision_x, lang_x, Some(mask), &classes, true)
    })?
    .to_device(Device::Cpu);
    Ok(Vec::<Vec<f64>>::try_from(&logprobs)?)
}

/// The top class of each row of class log-likelihoods and its softmax
/// probability over the classes.
fn class_outcomes(dataset: &Dataset, rows: Vec<Vec<f64>>) -> Vec<Outcome> {
    rows.into_iter()
        .map(|row| {
            let (best, top) =
                row.iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, v)| {
                        if *v > bv {
                            (i, *v)
                        } else {
                            (bi, bv)
                        }
                    });
            let log_total = row.iter().map(|v| (v - top).exp()).sum::<f64>().ln() + top;
            (
                None,
                dataset.class_names[best].clone(),
                Some((top - log_total).exp()),
            )
        })
        .collect()
}

/// The metric over all ranks' predictions, in OpenFlamingo's scale: CIDEr
/// × 100, VQA accuracy in percent, ROC-AUC and top-1 as fractions.
pub fn score(dataset: &Dataset, predictions: &[Prediction]) -> anyhow::Result<f64> {
    if predictions.is_empty() {
        bail!("no predictions to score");
    }
    let task = dataset.task;
    match task {
        Task::Coco | Task::Flickr30k => {
            let candidates: Vec<String> = predictions
                .iter()
                .map(|p| metrics::cider::tokenize(&p.prediction))
                .collect();
            let references: Vec<Vec<String>> = predictions
                .iter()
                .map(|p| {
                    dataset.test[p.index]
                        .references
                        .iter()
                        .map(|r| metrics::cider::tokenize(r))
                        .collect()
                })
                .collect();
            let (value, _) =
                metrics::cider::cider(&candidates, &references).map_err(anyhow::Error::msg)?;
            Ok(value * 100.0)
        }
        Task::Vqav2 | Task::OkVqa | Task::Textvqa | Task::Vizwiz => {
            let answers: HashMap<u64, Vec<String>> = predictions
                .iter()
                .map(|p| {
                    (
                        p.id.as_u64().unwrap_or_default(),
                        dataset.test[p.index].references.clone(),
                    )
                })
                .collect();
            let pairs: Vec<(u64, String)> = predictions
                .iter()
                .map(|p| (p.id.as_u64().unwrap_or_default(), p.prediction.clone()))
                .collect();
            Ok(metrics::vqa::evaluate(&pairs, &answers)
                .map_err(anyhow::Error::msg)?
                .overall)
        }
        Task::HatefulMemes => {
            let labels: Vec<bool> = predictions
                .iter()
                .map(|p| dataset.test[p.index].class_id == Some(1))
                .collect();
            let scores: Vec<f64> = predictions
                .iter()
                .map(|p| {
                    let probability = p.score.unwrap_or(0.5);
                    if p.prediction == "yes" {
                        probability
                    } else {
                        1.0 - probability
                    }
                })
                .collect();
            metrics::roc::roc_auc(&labels, &scores).map_err(anyhow::Error::msg)
        }
        Task::Imagenet => {
            let correct = predictions
                .iter()
                .filter(|p| p.prediction == dataset.test[p.index].target)
                .count();
            Ok(correct as f64 / predictions.len() as f64)
        }
    }
}

/// What one rank produced: per (shots, seed), its predictions.
pub type Outputs = Vec<((usize, u64), Vec<Prediction>)>;

/// Runs every (shots, seed) trial of `settings` over this rank's share.
pub fn predict(model: &Model, dataset: &Dataset, settings: &Settings) -> anyhow::Result<Outputs> {
    if settings.world == 0 || settings.rank >= settings.world {
        bail!(
            "rank {} is outside a world of {}",
            settings.rank,
            settings.world
        );
    }
    if dataset.task == Task::OkVqa {
        eprintln!(
            "warning: OK-VQA answers are scored without OpenFlamingo's stemming (NLTK's tagger and WordNet are not available); scores can be slightly lower than the reference's"
        );
    }
    let mut cache = ImageCache {
        size: model.image_size,
        kept: HashMap::new(),
    };
    let train_features = match settings.selection {
        Selection::Rices => Some(model.train_features(&mut cache, dataset, settings)?),
        Selection::Random { .. } => None,
    };
    let mut outputs = Vec::new();
    for &shots in &settings.shots {
        for &seed in &settings.seeds {
            let plan = plan(
                model,
                &mut cache,
                dataset,
                settings,
                shots,
                seed,
                train_features.as_ref(),
            )?;
            let mine = plan
                .subset
                .chunks(settings.batch_size.max(1))
                .enumerate()
                .filter(|(batch, _)| batch % settings.world == settings.rank)
                .map(|(_, chunk)| chunk.len())
                .sum();
            let mut progress = Progress::new(
                format!("{} {shots}-shot seed {seed}", dataset.task.name()),
                mine,
            );
            let predictions = trial(
                model,
                &mut cache,
                dataset,
                settings,
                &plan,
                shots,
                &mut progress,
            )?;
            outputs.push(((shots, seed), predictions));
        }
    }
    Ok(outputs)
}

/// Scores gathered outputs (every rank's, in any order) per shots.
pub fn results(
    dataset: &Dataset,
    settings: &Settings,
    outputs: Outputs,
) -> anyhow::Result<Vec<ShotResult>> {
    let mut merged: HashMap<(usize, u64), Vec<Prediction>> = HashMap::new();
    for (key, predictions) in outputs {
        merged.entry(key).or_default().extend(predictions);
    }
    settings
        .shots
        .iter()
        .map(|&shots| {
            let trials = settings
                .seeds
                .iter()
                .map(|&seed| {
                    let mut predictions = merged.remove(&(shots, seed)).unwrap_or_default();
                    predictions.sort_by_key(|p| p.index);
                    score(dataset, &predictions).with_context(|| {
                        format!("{} {shots}-shot seed {seed}", dataset.task.name())
                    })
                })
                .collect::<anyhow::Result<Vec<f64>>>()?;
            Ok(ShotResult::new(shots, trials))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensembles_have_min_6_factorial_members() {
        let counts: Vec<usize> = (0..6).map(permutations).collect();
        assert_eq!(counts, vec![1, 1, 2, 6, 6, 6]);
    }

    #[test]
    fn population_stddev_as_numpy() {
        let result = ShotResult::new(4, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(result.mean, 2.5);
        assert!((result.stddev - 1.25f64.sqrt()).abs() < 1e-15);
    }
}
