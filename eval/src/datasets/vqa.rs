//! The VQA-format datasets (VQAv2, OK-VQA, TextVQA, VizWiz): questions and
//! annotations paired by question id, and EvalAI's test-dev questions.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::{bad, field, read_json, require, string, Example, Result, Task};

/// Which questions a VQA split holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Split {
    Train,
    Val,
    /// EvalAI's test-dev: questions without annotations.
    TestDev,
}

/// VQA-format questions (`questions[]`: `question_id`, `image_id`,
/// `question`) and annotations (`annotations[]`: `question_id`,
/// `answers[].answer`), paired by question id.
pub(super) fn vqa(
    task: Task,
    dir: &Path,
    which: Split,
    raw_answers: &mut Vec<(String, String)>,
) -> Result<Vec<Example>> {
    let train = which == Split::Train;
    let split = if train { "train" } else { "val" };
    // VQAv2's COCO file names carry the split and year.
    let mut coco = format!("{split}2014");
    let (questions, annotations, images) = match (task, which) {
        (Task::Vqav2, Split::TestDev) => {
            coco = "test2015".to_string();
            (
                "v2_OpenEnded_mscoco_test-dev2015_questions.json".to_string(),
                String::new(),
                coco.clone(),
            )
        }
        (_, Split::TestDev) => (
            "test_questions_vqa_format.json".to_string(),
            String::new(),
            "test".to_string(),
        ),
        (Task::Vqav2, _) => (
            format!("v2_OpenEnded_mscoco_{split}2014_questions.json"),
            format!("v2_mscoco_{split}2014_annotations.json"),
            format!("{split}2014"),
        ),
        (Task::OkVqa, _) => (
            format!("OpenEnded_mscoco_{split}2014_questions.json"),
            format!("mscoco_{split}2014_annotations.json"),
            format!("{split}2014"),
        ),
        (Task::Textvqa, _) => (
            format!("{split}_questions_vqa_format.json"),
            format!("{split}_annotations_vqa_format.json"),
            "train_images".to_string(),
        ),
        _ => (
            format!("{split}_questions_vqa_format.json"),
            format!("{split}_annotations_vqa_format.json"),
            split.to_string(),
        ),
    };
    let role = if train {
        "the demonstrations' questions"
    } else {
        "the questions to answer"
    };
    let questions_path = require(dir.join(&questions), task, role)?;
    let image_dir = require(dir.join(&images), task, "the images")?;
    let mut answers: HashMap<String, Vec<String>> = HashMap::new();
    if which == Split::TestDev {
        let examples = vqa_examples(task, &questions_path, &image_dir, &coco, &mut answers, None)?;
        return Ok(examples);
    }
    let annotations_path = require(dir.join(&annotations), task, "their human answers")?;
    let annotations_json = read_json(&annotations_path)?;
    for (index, annotation) in annotations_json
        .get("annotations")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(&annotations_path, "no \"annotations\" list"))?
        .iter()
        .enumerate()
    {
        let id = field(annotation, "question_id", &annotations_path, index)?.to_string();
        let list = field(annotation, "answers", &annotations_path, index)?
            .as_array()
            .ok_or_else(|| {
                bad(
                    &annotations_path,
                    format!("entry {index}: \"answers\" should be a list"),
                )
            })?
            .iter()
            .map(|answer| {
                let stored = string(answer, "answer", &annotations_path, index)?;
                if let Some(raw) = answer.get("raw_answer").and_then(Value::as_str) {
                    raw_answers.push((raw.to_string(), stored.clone()));
                }
                Ok(stored)
            })
            .collect::<Result<Vec<_>>>()?;
        answers.insert(id, list);
    }
    vqa_examples(
        task,
        &questions_path,
        &image_dir,
        &coco,
        &mut answers,
        Some(&annotations_path),
    )
}

/// The questions of `questions_path` with their images and, when
/// `annotations_path` is given, the human answers `answers` holds for them.
fn vqa_examples(
    task: Task,
    questions_path: &Path,
    image_dir: &Path,
    coco: &str,
    answers: &mut HashMap<String, Vec<String>>,
    annotations_path: Option<&Path>,
) -> Result<Vec<Example>> {
    let questions_json = read_json(questions_path)?;
    let questions = questions_json
        .get("questions")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(questions_path, "no \"questions\" list"))?;
    let mut examples = Vec::with_capacity(questions.len());
    for (index, question) in questions.iter().enumerate() {
        let id = field(question, "question_id", questions_path, index)?.clone();
        if id.as_u64().is_none() {
            return Err(bad(
                questions_path,
                format!("entry {index}: question_id {id} is not a non-negative integer"),
            ));
        }
        let image_id = field(question, "image_id", questions_path, index)?;
        let file = match task {
            Task::Vqav2 | Task::OkVqa => {
                let number = image_id.as_u64().ok_or_else(|| {
                    bad(
                        questions_path,
                        format!("entry {index}: image_id should be a number"),
                    )
                })?;
                format!("COCO_{coco}_{number:012}.jpg")
            }
            Task::Textvqa => format!(
                "{}.jpg",
                image_id
                    .as_str()
                    .map_or(image_id.to_string(), str::to_string)
            ),
            _ => image_id
                .as_str()
                .ok_or_else(|| {
                    bad(
                        questions_path,
                        format!("entry {index}: image_id should be a file name"),
                    )
                })?
                .to_string(),
        };
        let (references, target) = match annotations_path {
            Some(annotations_path) => {
                let references = answers.remove(&id.to_string()).ok_or_else(|| {
                    bad(
                        questions_path,
                        format!(
                            "question {id} has no entry in {}",
                            annotations_path.display()
                        ),
                    )
                })?;
                let target = references.first().cloned().ok_or_else(|| {
                    bad(
                        annotations_path,
                        format!("question {id} has an empty answer list"),
                    )
                })?;
                (references, target)
            }
            // Test-dev: nothing to score against, never a demonstration.
            None => (Vec::new(), String::new()),
        };
        examples.push(Example {
            id,
            image: image_dir.join(file),
            text: Some(string(question, "question", questions_path, index)?),
            target,
            references,
            class_id: None,
        });
    }
    Ok(examples)
}

/// Every question of EvalAI's test set, as (question_id, image_id).
pub(super) fn testdev_questions(task: Task, dir: &Path) -> Result<Vec<(Value, Value)>> {
    let name = match task {
        Task::Vqav2 => "v2_OpenEnded_mscoco_test2015_questions.json",
        _ => "test_questions_vqa_format.json",
    };
    let path = dir.join(name);
    if !path.exists() {
        return Err(bad(&path, format!("missing; EvalAI's whole test set, whose questions a submission must all answer ({} --testdev reads: {})", task.name(),
            task.testdev_layout().unwrap_or_default())));
    }
    let json = read_json(&path)?;
    let questions = json
        .get("questions")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(&path, "no \"questions\" list"))?;
    questions
        .iter()
        .enumerate()
        .map(|(index, question)| {
            Ok((
                field(question, "question_id", &path, index)?.clone(),
                field(question, "image_id", &path, index)?.clone(),
            ))
        })
        .collect()
}
