//! What an evaluation writes: OpenFlamingo's results JSON, the scores as a
//! table, every prediction as a JSON line, and EvalAI's test-dev
//! submission files.

use std::path::{Path, PathBuf};

use crate::datasets::{self, Dataset, Task};
use crate::run::{Outputs, ShotResult};
use crate::{EvalError, Result};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `results` for `task` into `path` as OpenFlamingo's results JSON
/// (`{dataset: [{shots, trials, mean, stddev}]}`), keeping the other
/// datasets already there.
pub fn write_results(path: &Path, task: Task, results: &[ShotResult]) -> Result<()> {
    let mut all = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
            .map_err(|error| EvalError::Settings {
                field: "results",
                message: format!("{}: exists but is not a results JSON object ({error}); move it away or choose another --results", path.display()),
            })?,
        Err(_) => serde_json::Map::new(),
    };
    all.insert(
        task.name().to_string(),
        serde_json::to_value(results).expect("results serialize"),
    );
    let text = serde_json::to_string_pretty(&all).expect("results serialize") + "\n";
    std::fs::write(path, text).map_err(io(path))
}

/// The name of `task`'s metric.
pub fn metric_name(task: Task) -> &'static str {
    match task.kind() {
        datasets::Kind::Captioning => "CIDEr",
        datasets::Kind::Vqa => "VQA accuracy",
        datasets::Kind::Classification if task == Task::HatefulMemes => "ROC-AUC",
        datasets::Kind::Classification => "top-1",
    }
}

/// The results as a table: one row per shot count with its mean, standard
/// deviation and trials.
pub fn table(task: Task, selection: &str, results: &[ShotResult]) -> String {
    let mut out = format!(
        "{} ({}, {selection} demonstrations)\n{:>6}  {:>10}  {:>8}  trials\n",
        task.name(),
        metric_name(task),
        "shots",
        "mean",
        "stddev"
    );
    for result in results {
        let trials: Vec<String> = result.trials.iter().map(|t| format!("{t:.4}")).collect();
        out.push_str(&format!(
            "{:>6}  {:>10.4}  {:>8.4}  {}\n",
            result.shots,
            result.mean,
            result.stddev,
            trials.join(" ")
        ));
    }
    out
}

/// Every prediction as a JSON line with its shots and seed.
pub fn write_predictions(path: &Path, outputs: &Outputs) -> Result<()> {
    let mut text = String::new();
    for ((shots, seed), predictions) in outputs {
        for prediction in predictions {
            let mut line = serde_json::to_value(prediction).expect("predictions serialize");
            line["shots"] = (*shots).into();
            line["seed"] = (*seed).into();
            text.push_str(&line.to_string());
            text.push('\n');
        }
    }
    std::fs::write(path, text).map_err(io(path))
}

/// A test-dev run's EvalAI files in `dir`, one per shot count and trial;
/// returns their paths.
pub fn write_submissions(
    dir: &Path,
    dataset: &Dataset,
    outputs: &Outputs,
    rices: bool,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    for (name, json) in crate::testdev::submissions(dataset, outputs, rices) {
        let path = dir.join(name);
        std::fs::write(&path, json.to_string()).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}
