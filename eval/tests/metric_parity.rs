//! Our metrics against the reference implementations on fixtures made
//! here: VQA accuracy against OpenFlamingo's `eval/vqa_metric.py` (equal,
//! per question and overall), ROC-AUC against scikit-learn's
//! `roc_auc_score`. The reference runs in the test venv's Python
//! (`tests/reference/metrics_reference.py`; scripts/setup.sh installs it).

use std::collections::HashMap;
use std::path::Path;

use flamingo_eval::metrics::{cider, roc::roc_auc, vqa};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Answers as people type them, with the spellings the normalisation
/// folds together.
const ANSWERS: [&str; 34] = [
    "yes",
    "Yes",
    "yes.",
    "no",
    "No!",
    "two",
    "2",
    "Two.",
    "the red one",
    "red",
    "a red circle",
    "red circle",
    "dont know",
    "don't know",
    "1,000",
    "1000",
    "3.5",
    "3.5.",
    "black/white",
    "black and white",
    "black white",
    "left-hand side",
    "left hand side",
    "t-shirt",
    "tshirt",
    "isnt it",
    "(blue)",
    "blue",
    "  blue\t",
    "an apple",
    "apple",
    "none",
    "0",
    "mr. smith's dog",
];

fn pick<'a>(rng: &mut StdRng, choices: &[&'a str]) -> &'a str {
    choices[rng.random_range(0..choices.len())]
}

/// Runs `tests/reference/<script> <dir>` (needs Java for the PTB
/// tokenizer) and reads the `reference.json` it writes.
fn reference(script: &str, dir: &Path) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    flamingo_common::testing::run_python(&path, &[dir.as_os_str()]);
    serde_json::from_slice(&std::fs::read(dir.join("reference.json")).expect("reference.json"))
        .expect("the reference writes JSON")
}

fn write(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec(value).expect("JSON")).expect("a fixture file");
}

#[test]
fn vqa_accuracy_and_roc_auc_equal_the_reference_implementations() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let mut rng = StdRng::seed_from_u64(7);

    // 400 questions; humans mostly agree on one of two spellings, and the
    // prediction is one of the pool or a generation to post-process.
    let mut questions = Vec::new();
    let mut annotations = Vec::new();
    let mut results = Vec::new();
    let mut humans: HashMap<u64, Vec<String>> = HashMap::new();
    let mut predictions = Vec::new();
    for index in 0..400u64 {
        let question_id = 1000 + index * 7;
        let favourite = pick(&mut rng, &ANSWERS);
        let answers: Vec<String> = (0..10)
            .map(|_| {
                if rng.random_bool(0.6) {
                    favourite.to_string()
                } else {
                    pick(&mut rng, &ANSWERS).to_string()
                }
            })
            .collect();
        let prediction = match rng.random_range(0..3) {
            0 => favourite.to_string(),
            1 => pick(&mut rng, &ANSWERS).to_string(),
            _ => vqa::postprocess_generation(&format!(
                "{}, really Question: what?",
                pick(&mut rng, &ANSWERS)
            ))
            .to_string(),
        };
        questions.push(json!({
            "image_id": index, "question": "What is it?", "question_id": question_id,
        }));
        annotations.push(json!({
            "image_id": index,
            "question_id": question_id,
            "question_type": "what is",
            "answer_type": "other",
            "multiple_choice_answer": favourite,
            "answers": answers.iter().enumerate().map(|(id, answer)| json!({
                "answer": answer, "answer_confidence": "yes", "answer_id": id + 1,
            })).collect::<Vec<_>>(),
        }));
        results.push(json!({"question_id": question_id, "answer": prediction}));
        humans.insert(question_id, answers);
        predictions.push((question_id, prediction));
    }
    write(
        &dir.join("questions.json"),
        &json!({
            "info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
            "data_subtype": "val2014", "license": {}, "questions": questions,
        }),
    );
    write(
        &dir.join("annotations.json"),
        &json!({"annotations": annotations}),
    );
    write(&dir.join("results.json"), &Value::Array(results));

    // ROC-AUC: random scores, scores with many ties, and a perfect split.
    let mut roc_cases = Vec::new();
    for case in 0..6 {
        let n = 50 + case * 37;
        let labels: Vec<bool> = (0..n).map(|i| i % 3 == 0 || rng.random_bool(0.3)).collect();
        let scores: Vec<f64> = labels
            .iter()
            .map(|&positive| match case % 3 {
                0 => rng.random::<f64>() + if positive { 0.2 } else { 0.0 },
                1 => (rng.random_range(0..5) as f64) / 4.0,
                _ => {
                    if positive {
                        0.9
                    } else {
                        0.1
                    }
                }
            })
            .collect();
        roc_cases.push((labels, scores));
    }
    write(
        &dir.join("roc.json"),
        &Value::Array(
            roc_cases
                .iter()
                .map(|(labels, scores)| json!({"labels": labels, "scores": scores}))
                .collect(),
        ),
    );

    let reference = reference("metrics_reference.py", dir);

    let ours = vqa::evaluate(&predictions, &humans).unwrap();
    for (question, score) in &ours.per_question {
        let theirs = reference["per_question"][question.to_string()]
            .as_f64()
            .unwrap();
        assert_eq!(
            *score,
            theirs,
            "question {question}: prediction {:?}, answers {:?}",
            predictions.iter().find(|(q, _)| q == question).unwrap().1,
            humans[question]
        );
    }
    assert_eq!(ours.overall, reference["overall"].as_f64().unwrap());
    // The fixture is not trivial: some questions score 0, some 100, some between.
    let scores: Vec<f64> = ours.per_question.iter().map(|(_, s)| *s).collect();
    assert!(scores.contains(&0.0) && scores.contains(&100.0));
    assert!(scores.iter().any(|s| *s > 0.0 && *s < 100.0));

    for (index, (labels, scores)) in roc_cases.iter().enumerate() {
        let theirs = reference["roc_auc"][index].as_f64().unwrap();
        let ours = roc_auc(labels, scores).unwrap();
        assert!(
            (ours - theirs).abs() <= 1e-12,
            "case {index}: ours {ours}, scikit-learn {theirs}"
        );
    }
}

/// COCO-style captions of the synthetic shapes, written the ways people
/// write them: capitals, final periods, commas, possessives, negations,
/// quotes, brackets, numbers and abbreviations.
fn caption(rng: &mut StdRng) -> String {
    let count = pick(rng, &["Two", "two", "3", "three", "A", "One", "Several"]);
    let size = pick(rng, &["small", "big", "tiny", "", "large"]);
    let colour = pick(rng, &["red", "blue", "green", "yellow", "dark-blue"]);
    let shape = pick(
        rng,
        &["circles", "squares", "triangles", "shapes", "circle"],
    );
    let relation = pick(
        rng,
        &[
            "left of",
            "right of",
            "above",
            "below",
            "next to",
            "on top of",
        ],
    );
    let other = pick(
        rng,
        &[
            "a blue square",
            "the red circle",
            "Mr. Smith's box",
            "a 3.5 in. dot",
            "(a green dot)",
            "\"the\" star",
        ],
    );
    let tail = pick(
        rng,
        &[
            ".",
            "",
            " .",
            ", it isn't clear.",
            "!",
            "... maybe",
            ", don't you think?",
            " -- mostly",
            "; that's it",
        ],
    );
    format!("{count} {size} {colour} {shape} {relation} {other}{tail}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn cider_equals_pycocoevalcaps_with_the_same_tokenisation() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let mut rng = StdRng::seed_from_u64(11);
    let images: Vec<(u64, String, Vec<String>)> = (0..80u64)
        .map(|id| {
            let references: Vec<String> = (0..5).map(|_| caption(&mut rng)).collect();
            let candidate = if rng.random_bool(0.3) {
                references[0].clone()
            } else {
                caption(&mut rng)
            };
            (id * 3 + 1, candidate, references)
        })
        .collect();
    write(
        &dir.join("captions.json"),
        &json!({"images": images.iter().map(|(id, candidate, references)| json!({
            "id": id, "candidate": candidate, "references": references,
        })).collect::<Vec<_>>()}),
    );
    let reference = reference("cider_reference.py", dir);

    // The tokenisation, caption by caption.
    for (id, candidate, references) in &images {
        assert_eq!(
            cider::tokenize(candidate),
            reference["candidates"][id.to_string()].as_str().unwrap(),
            "candidate of image {id}: {candidate:?}"
        );
        for (index, caption) in references.iter().enumerate() {
            assert_eq!(
                cider::tokenize(caption),
                reference["references"][id.to_string()][index]
                    .as_str()
                    .unwrap(),
                "reference {index} of image {id}: {caption:?}"
            );
        }
    }
    // The scores, in the reference's image order.
    let by_id: HashMap<String, &(u64, String, Vec<String>)> = images
        .iter()
        .map(|image| (image.0.to_string(), image))
        .collect();
    let order: Vec<&(u64, String, Vec<String>)> = reference["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| by_id[id.as_str().unwrap()])
        .collect();
    let candidates: Vec<String> = order
        .iter()
        .map(|image| cider::tokenize(&image.1))
        .collect();
    let references: Vec<Vec<String>> = order
        .iter()
        .map(|image| image.2.iter().map(|c| cider::tokenize(c)).collect())
        .collect();
    let (overall, per_image) = cider::cider(&candidates, &references).unwrap();
    for (index, score) in per_image.iter().enumerate() {
        let theirs = reference["per_image"][index].as_f64().unwrap();
        assert!(
            (score - theirs).abs() <= 1e-6,
            "image {}: ours {score}, pycocoevalcap {theirs}",
            order[index].0
        );
    }
    let theirs = reference["overall"].as_f64().unwrap();
    assert!(
        (overall - theirs).abs() <= 1e-6,
        "ours {overall}, pycocoevalcap {theirs}"
    );
    assert!(
        overall > 0.1,
        "the fixture has matching captions: {overall}"
    );
}
