//! Scores: the metric over a trial's predictions, and the per-shots
//! results in OpenFlamingo's format.

use std::collections::HashMap;

use serde::Serialize;

use crate::datasets::{Dataset, Task};
use crate::error::{EvalError, Result};
use crate::metrics;
use crate::output::metric_name;
use crate::run::{Outputs, Prediction, Settings};

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

/// The metric over all ranks' predictions, in OpenFlamingo's scale: CIDEr
/// × 100, VQA accuracy in percent, ROC-AUC and top-1 as fractions.
pub fn score(dataset: &Dataset, predictions: &[Prediction]) -> Result<f64> {
    if predictions.is_empty() {
        return Err(EvalError::Metric {
            metric: metric_name(dataset.task),
            message: "no predictions to score".into(),
        });
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
            let (value, _) = metrics::cider::cider(&candidates, &references)?;
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
            Ok(metrics::vqa::evaluate(&pairs, &answers)?.overall)
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
            metrics::roc::roc_auc(&labels, &scores)
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

/// Every rank's outputs as one: per (shots, seed) in first-seen order, the
/// predictions of all ranks sorted by test index.
pub fn merge(parts: impl IntoIterator<Item = Outputs>) -> Outputs {
    let mut merged: Outputs = Vec::new();
    for (key, predictions) in parts.into_iter().flatten() {
        match merged.iter_mut().find(|(existing, _)| *existing == key) {
            Some((_, all)) => all.extend(predictions),
            None => merged.push((key, predictions)),
        }
    }
    for (_, predictions) in &mut merged {
        predictions.sort_by_key(|prediction| prediction.index);
    }
    merged
}

/// Scores gathered outputs (every rank's, in any order) per shots.
pub fn results(
    dataset: &Dataset,
    settings: &Settings,
    outputs: Outputs,
) -> Result<Vec<ShotResult>> {
    let mut merged: HashMap<(usize, u64), Vec<Prediction>> = merge([outputs]).into_iter().collect();
    settings
        .shots
        .iter()
        .map(|&shots| {
            let trials = settings
                .seeds
                .iter()
                .map(|&seed| {
                    let predictions = merged.remove(&(shots, seed)).unwrap_or_default();
                    score(dataset, &predictions).map_err(|error| EvalError::Metric {
                        metric: metric_name(dataset.task),
                        message: format!(
                            "{} {shots}-shot seed {seed}: {error}",
                            dataset.task.name()
                        ),
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            Ok(ShotResult::new(shots, trials))
        })
        .collect()
}
