//! Running a model over a benchmark: the scored examples and their
//! demonstrations, a prompt for each, batched generation (beam search,
//! `<|endofchunk|>` ends) or class-name log-likelihoods, and
//! post-processing. The metric is in [`crate::score`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flamingo_model::BeamSettings;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Device, Tensor};

pub use crate::model::Model;
use crate::model::{class_rows, ImageCache};
pub use crate::score::{merge, results, score, ShotResult};
use flamingo_common::progress::Progress;

use crate::datasets::{Dataset, Example, Task};
use crate::error::{EvalError, Result};
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
    /// OK-VQA's stemming: WordNet's folder (else the usual places).
    pub wordnet_dir: Option<PathBuf>,
}

impl Settings {
    /// This rank's batches of `positions`: batch b goes to rank b mod
    /// world, so batches are the same at any world size.
    fn my_batches<'p>(
        &self,
        positions: &'p [usize],
    ) -> impl Iterator<Item = &'p [usize]> + use<'p, '_> {
        positions
            .chunks(self.batch_size.max(1))
            .enumerate()
            .filter(move |(batch, _)| batch % self.world == self.rank)
            .map(|(_, chunk)| chunk)
    }
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
    pub shots: usize,
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
) -> Result<Plan> {
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
        (Selection::Rices, None) => {
            return Err(EvalError::Settings {
                field: "rices",
                message: "RICES selection needs the training split's features".into(),
            })
        }
    };
    Ok(Plan {
        shots,
        seed,
        subset,
        demos,
    })
}

/// What a trial works with.
struct Trial<'a> {
    model: &'a Model,
    dataset: &'a Dataset,
    settings: &'a Settings,
    plan: &'a Plan,
    stemmer: Option<&'a metrics::okvqa::Stemmer>,
}

/// Runs one trial (`shots`, `seed`) over this rank's batches and returns
/// its predictions.
fn trial(
    model: &Model,
    cache: &mut ImageCache,
    dataset: &Dataset,
    settings: &Settings,
    plan: &Plan,
    progress: &mut Progress,
    stemmer: Option<&metrics::okvqa::Stemmer>,
) -> Result<Vec<Prediction>> {
    let trial = Trial {
        model,
        dataset,
        settings,
        plan,
        stemmer,
    };
    let positions: Vec<usize> = (0..plan.subset.len()).collect();
    let mut predictions = Vec::new();
    for batch in settings.my_batches(&positions) {
        predictions.extend(trial.batch(cache, batch)?);
        progress.advance(batch.len() as u64);
    }
    Ok(predictions)
}

impl Trial<'_> {
    /// The predictions of one batch of test positions. Classification with
    /// prompt ensembling averages the class log-likelihoods over the
    /// demonstration orders; every row is recorded with the first order.
    fn batch(&self, cache: &mut ImageCache, batch: &[usize]) -> Result<Vec<Prediction>> {
        let task = self.dataset.task;
        let classification = task.kind() == crate::datasets::Kind::Classification;
        let orders = if classification && self.settings.ensemble {
            permutations(prompts::effective_shots(self.plan.shots))
        } else {
            1
        };
        // Demonstration orders, shuffled further for each ensemble member
        // (as `random.shuffle` in place does upstream).
        let mut demo_orders: Vec<Vec<usize>> = batch
            .iter()
            .map(|position| self.plan.demos[*position].clone())
            .collect();
        let mut summed: Option<Vec<Vec<f64>>> = None;
        let mut first: Option<Inputs> = None;
        for order in 0..orders {
            if orders > 1 {
                for (demos, position) in demo_orders.iter_mut().zip(batch) {
                    select::shuffle(demos, self.plan.seed, self.plan.subset[*position], order);
                }
            }
            let inputs = self.inputs(cache, batch, &demo_orders)?;
            if classification {
                let rows = class_rows(
                    self.model,
                    self.dataset,
                    &inputs.vision_x,
                    &inputs.lang_x,
                    &inputs.mask,
                )?;
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
            first.get_or_insert(inputs);
        }
        let inputs = first.expect("at least one demonstration order");
        let outcomes = match summed {
            Some(summed) => {
                let rows: Vec<Vec<f64>> = summed
                    .into_iter()
                    .map(|row| row.into_iter().map(|sum| sum / orders as f64).collect())
                    .collect();
                class_outcomes(self.dataset, rows)
            }
            None => self.generate(&inputs)?,
        };
        Ok(self.predictions(batch, inputs, outcomes))
    }

    /// The prompts and images of a batch for the demonstration orders.
    fn inputs(
        &self,
        cache: &mut ImageCache,
        batch: &[usize],
        demo_orders: &[Vec<usize>],
    ) -> Result<Inputs> {
        let (task, shots) = (self.dataset.task, self.plan.shots);
        let mut texts = Vec::with_capacity(batch.len());
        let mut image_lists: Vec<Vec<PathBuf>> = Vec::with_capacity(batch.len());
        for (position, order) in batch.iter().zip(demo_orders) {
            let query = &self.dataset.test[self.plan.subset[*position]];
            let demos: Vec<&Example> = order
                .iter()
                .map(|index| &self.dataset.train[*index])
                .collect();
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
        let vision_x = self.model.images(cache, &paths)?;
        let (lang_x, mask) = self.model.texts(&texts)?;
        Ok(Inputs {
            texts,
            demo_orders: demo_orders.to_vec(),
            image_lists,
            vision_x,
            lang_x,
            mask,
        })
    }

    /// Captioning and VQA: beam search, then the reference's
    /// post-processing (OK-VQA's answers stemmed).
    fn generate(&self, inputs: &Inputs) -> Result<Vec<Outcome>> {
        let (model, task) = (self.model, self.dataset.task);
        let settings = BeamSettings {
            num_beams: self.settings.num_beams,
            max_new_tokens: task.max_new_tokens(),
            length_penalty: 0.0,
            eos_token_id: i64::from(model.tokenizer.end_of_chunk_token_id()),
            pad_token_id: i64::from(model.tokenizer.pad_token_id()),
        };
        let new_tokens = tch::no_grad(|| {
            model.model.generate_beam(
                &inputs.vision_x,
                &inputs.lang_x,
                Some(&inputs.mask),
                settings,
            )
        })?;
        let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&new_tokens.to_device(Device::Cpu))?;
        rows.into_iter()
            .map(|row| {
                let ids: Vec<u32> = row.into_iter().map(|id| id as u32).collect();
                let output = model.tokenizer.decode(&ids, true)?;
                let prediction = match (task, self.stemmer) {
                    (Task::Coco | Task::Flickr30k, _) => prompts::postprocess_caption(&output),
                    (Task::OkVqa, Some(stemmer)) => metrics::okvqa::postprocess(&output, stemmer),
                    _ => metrics::vqa::postprocess_generation(&output).to_string(),
                };
                Ok((Some(output), prediction, None))
            })
            .collect()
    }

    /// The batch's rows as predictions.
    fn predictions(
        &self,
        batch: &[usize],
        inputs: Inputs,
        outcomes: Vec<Outcome>,
    ) -> Vec<Prediction> {
        let dataset = self.dataset;
        batch
            .iter()
            .zip(inputs.texts)
            .zip(&inputs.image_lists)
            .zip(&inputs.demo_orders)
            .zip(outcomes)
            .map(
                |((((position, prompt), images), demos), (output, prediction, score))| {
                    let index = self.plan.subset[*position];
                    Prediction {
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
                    }
                },
            )
            .collect()
    }
}

/// A batch row's raw output (generation), prediction and class probability.
type Outcome = (Option<String>, String, Option<f64>);

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

/// What one rank produced: per (shots, seed), its predictions.
pub type Outputs = Vec<((usize, u64), Vec<Prediction>)>;

/// Runs every (shots, seed) trial of `settings` over this rank's share.
pub fn predict(model: &Model, dataset: &Dataset, settings: &Settings) -> Result<Outputs> {
    if settings.world == 0 || settings.rank >= settings.world {
        return Err(EvalError::Settings {
            field: "world",
            message: format!(
                "rank {} is outside a world of {}",
                settings.rank, settings.world
            ),
        });
    }
    // OK-VQA's answers are stemmed; the dataset's own stems of its
    // human answers say which words are plural nouns.
    let stemmer = match dataset.task {
        Task::OkVqa => {
            let mut stemmer = metrics::okvqa::Stemmer::load(settings.wordnet_dir.as_deref())?;
            for (raw, stored) in &dataset.raw_answers {
                stemmer.learn(raw, stored);
            }
            Some(stemmer)
        }
        _ => None,
    };
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
            let mine: usize = settings.my_batches(&plan.subset).map(<[usize]>::len).sum();
            let mut progress = Progress::new(
                format!("{} {shots}-shot seed {seed}", dataset.task.name()),
                Some(mine as u64),
            );
            let predictions = trial(
                model,
                &mut cache,
                dataset,
                settings,
                &plan,
                &mut progress,
                stemmer.as_ref(),
            )?;
            outputs.push(((shots, seed), predictions));
        }
    }
    Ok(outputs)
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
