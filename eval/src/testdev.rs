//! EvalAI submissions for a test-dev run (no annotations, so no score), as
//! OpenFlamingo writes them (its `fill_vqa_testdev_results`): every answer
//! normalised as the VQA metric normalises it, and every question of the
//! whole test set present, unanswered ones with "".
//! - VQAv2: `[{"question_id", "answer"}]`, the answered questions first.
//! - VizWiz: `[{"image", "answer"}]`, in the test questions' order.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::datasets::{Dataset, Task};
use crate::metrics::vqa::normalize;
use crate::run::Outputs;

/// Per (shots, seed): the submission's file name and its JSON.
pub fn submissions(dataset: &Dataset, outputs: &Outputs, rices: bool) -> Vec<(String, Value)> {
    let all = dataset.testdev.as_deref().unwrap_or_default();
    let selection = if rices { "rices" } else { "random" };
    outputs
        .iter()
        .map(|((shots, seed), predictions)| {
            let answers: HashMap<String, String> = predictions
                .iter()
                .map(|p| (p.id.to_string(), normalize(&p.prediction)))
                .collect();
            let entries: Vec<Value> = match dataset.task {
                Task::Vizwiz => all
                    .iter()
                    .map(|(question, image)| {
                        let answer = answers.get(&question.to_string()).cloned();
                        json!({"image": image, "answer": answer.unwrap_or_default()})
                    })
                    .collect(),
                _ => predictions
                    .iter()
                    .map(|p| json!({"question_id": p.id, "answer": normalize(&p.prediction)}))
                    .chain(
                        all.iter()
                            .filter(|(question, _)| !answers.contains_key(&question.to_string()))
                            .map(|(question, _)| json!({"question_id": question, "answer": ""})),
                    )
                    .collect(),
            };
            (
                format!(
                    "{}-testdev_{shots}_{selection}_{seed}.json",
                    dataset.task.name()
                ),
                Value::Array(entries),
            )
        })
        .collect()
}
