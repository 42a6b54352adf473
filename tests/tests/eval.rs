//! `flamingoctl eval` end to end on synthetic benchmarks written in the
//! layouts OpenFlamingo's evaluation reads.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;

use flamingo_common::testing::run_python;
use flamingo_tests::{flamingoctl, synth_eval, synthetic_laion_and_tiny_model};
use serde_json::{json, Value};

/// (task, shots): every generation task and HatefulMemes (ImageNet's
/// evaluation is broken at OpenFlamingo's HEAD: it reads a missing `ocr`
/// key, reference §4.2).
const TASKS: [(&str, &str); 7] = [
    ("coco", "0,2,4"),
    ("flickr30k", "4"),
    ("vqav2", "0,4"),
    ("ok_vqa", "4"),
    ("textvqa", "4"),
    ("vizwiz", "4"),
    ("hateful_memes", "0,4"),
];

fn file_name(path: &Value) -> String {
    Path::new(path.as_str().expect("a path"))
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// With RICES demonstrations (deterministic), the prompt of every scored
/// example and the images that go with it equal what OpenFlamingo's own
/// evaluate.py builds on the same files, for every shot count, including
/// the 0-shot trick. One documented difference: upstream passes the two
/// 0-shot demonstrations' images to classification although their text has
/// no `<image>`, so the query's `<image>` attends to a demonstration's
/// picture; we pass the query image alone.
#[test]
fn rices_prompts_equal_openflamingo_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_laion_and_tiny_model(dir.path(), 24);
    for (task, _) in TASKS {
        synth_eval(dir.path(), task, "40", "10");
    }
    let reference_json = dir.path().join("reference.json");
    let mut reference_args: Vec<std::ffi::OsString> = vec![
        dir.path().join("tiny").into(),
        reference_json.clone().into(),
    ];
    for (task, shots) in TASKS {
        let data = dir.path().join(task);
        reference_args.push(format!("{task}:{}:{shots}", data.display()).into());
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../eval/tests/reference/prompts_reference.py");
    let args: Vec<&OsStr> = reference_args.iter().map(|arg| arg.as_os_str()).collect();
    run_python(&script, &args);
    let reference: HashMap<String, HashMap<String, Value>> =
        serde_json::from_str(&std::fs::read_to_string(&reference_json).unwrap()).unwrap();

    let mut compared = 0;
    for (task, shots) in TASKS {
        let predictions = format!("{task}.jsonl");
        let mut args = vec![
            "eval",
            "--model",
            "tiny/model.toml",
            "--dataset",
            task,
            "--data-dir",
            task,
            "--rices",
            "--batch-size",
            "3",
            "--features-dir",
            "features",
            "--predictions",
            &predictions,
            "--shots",
        ];
        args.extend(shots.split(','));
        flamingoctl(dir.path(), &args);
        let text = std::fs::read_to_string(dir.path().join(&predictions)).unwrap();
        let ours: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        for shot in shots.split(',') {
            let expected = &reference[&format!("{task}/{shot}")];
            let mine: HashMap<String, &Value> = ours
                .iter()
                .filter(|p| p["shots"].as_u64() == shot.parse::<u64>().ok())
                .map(|p| {
                    let id = match &p["id"] {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    };
                    (id, p)
                })
                .collect();
            let mut expected_ids: Vec<&String> = expected.keys().collect();
            let mut our_ids: Vec<&String> = mine.keys().collect();
            expected_ids.sort();
            our_ids.sort();
            assert_eq!(
                our_ids, expected_ids,
                "{task} {shot}-shot: the scored examples differ"
            );
            for (id, want) in expected {
                let got = mine[id];
                assert_eq!(
                    got["prompt"], want["prompt"],
                    "{task} {shot}-shot example {id}: prompt"
                );
                let our_images: Vec<String> = got["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(file_name)
                    .collect();
                let mut their_images: Vec<String> = want["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|name| name.as_str().unwrap().to_string())
                    .collect();
                if task == "hateful_memes" && shot == "0" {
                    assert_eq!(
                        their_images.len(),
                        3,
                        "upstream passes the text-only demos' images"
                    );
                    their_images.drain(..2);
                }
                assert_eq!(
                    our_images, their_images,
                    "{task} {shot}-shot example {id}: images"
                );
                compared += 1;
            }
        }
    }
    assert_eq!(
        compared,
        10 * 11,
        "every test example of every (task, shots) was compared"
    );
}

/// Missing files are named with what belongs there.
#[test]
fn missing_dataset_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_laion_and_tiny_model(dir.path(), 24);
    flamingoctl(
        dir.path(),
        &["data", "synth-eval", "--dataset", "vqav2", "--out", "vqa"],
    );
    std::fs::remove_file(dir.path().join("vqa/v2_mscoco_val2014_annotations.json")).unwrap();
    let output = std::process::Command::new(flamingo_tests::ClusterSandbox::binary("flamingoctl"))
        .current_dir(dir.path())
        .args([
            "eval",
            "--model",
            "tiny/model.toml",
            "--dataset",
            "vqav2",
            "--data-dir",
            "vqa",
            "--shots",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("vqa/v2_mscoco_val2014_annotations.json: missing; their human answers"),
        "{stderr}"
    );
}

/// Scores and predictions of a results/predictions pair, with image paths
/// reduced to file names (ranks get absolute paths).
fn outcome(dir: &Path, results: &str, predictions: &str) -> (Value, Vec<Value>) {
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(results)).expect("results written"))
            .expect("results are JSON");
    let predictions = std::fs::read_to_string(dir.join(predictions))
        .expect("predictions written")
        .lines()
        .map(|line| {
            let mut value: Value = serde_json::from_str(line).expect("a JSON line");
            let names: Vec<Value> = value["images"]
                .as_array()
                .expect("images")
                .iter()
                .map(|path| Value::String(file_name(path)))
                .collect();
            value["images"] = Value::Array(names);
            value
        })
        .collect();
    (results, predictions)
}

/// `flamingoctl launch --job eval` on two ranks of a real cluster (agents,
/// Gloo gather) gives the same scores and predictions as one process, for
/// generation (COCO, RICES and random) and classification (HatefulMemes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_eval_on_two_ranks_equals_one_process() {
    let sandbox = flamingo_tests::ClusterSandbox::start(flamingo_tests::SandboxOptions {
        nodes: 1,
        slots_per_node: 2,
        lease_ttl_seconds: 4,
    })
    .await
    .unwrap();
    let dir = sandbox.path().join("work");
    std::fs::create_dir_all(&dir).unwrap();
    synthetic_laion_and_tiny_model(&dir, 24);
    for (task, shots, extra) in [
        ("coco", "0 4", "--rices"),
        ("coco", "2", ""),
        ("hateful_memes", "0 2", ""),
        ("hateful_memes", "3", "--classification-prompt-ensembling"),
    ] {
        synth_eval(&dir, task, "24", "11");
        let mut flags = vec![
            "--model",
            "tiny/model.toml",
            "--dataset",
            task,
            "--data-dir",
            task,
            "--batch-size",
            "2",
            "--features-dir",
            "features",
        ];
        if !extra.is_empty() {
            flags.push(extra);
        }
        flags.push("--shots");
        flags.extend(shots.split(' '));
        let mut one = vec![
            "eval",
            "--results",
            "one.json",
            "--predictions",
            "one.jsonl",
        ];
        one.extend(&flags);
        flamingoctl(&dir, &one);
        let mut two = vec![
            "launch",
            "--nodes",
            "1",
            "--slots-per-node",
            "2",
            "--job",
            "eval",
            "--wait",
            "--",
            "--results",
            "two.json",
            "--predictions",
            "two.jsonl",
        ];
        two.extend(&flags);
        let output =
            std::process::Command::new(flamingo_tests::ClusterSandbox::binary("flamingoctl"))
                .current_dir(&dir)
                .args(&two)
                .env("FLAMINGO_COORDINATOR", sandbox.coordinator_endpoint())
                .env("FLAMINGO_STATE_DIR", dir.join("state"))
                .output()
                .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (one_results, one_predictions) = outcome(&dir, "one.json", "one.jsonl");
        let (two_results, two_predictions) = outcome(&dir, "two.json", "two.jsonl");
        assert_eq!(one_results, two_results, "{task} {shots}: scores");
        assert_eq!(one_predictions.len(), 11 * shots.split(' ').count());
        assert_eq!(
            one_predictions, two_predictions,
            "{task} {shots}: predictions"
        );
        for file in ["one.json", "two.json"] {
            std::fs::remove_file(dir.join(file)).unwrap();
        }
    }
}

/// Every file in `from` copied to `to`, renamed by `rename`.
fn copy_images(from: &Path, to: &Path, rename: impl Fn(&str) -> String) {
    std::fs::create_dir_all(to).expect("the folder");
    for entry in std::fs::read_dir(from).expect("the images") {
        let entry = entry.expect("an image");
        let name = entry.file_name().to_string_lossy().into_owned();
        std::fs::copy(entry.path(), to.join(rename(&name))).expect("a copy");
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the file")).expect("JSON")
}

/// `--testdev` answers EvalAI's test-dev questions (here the val questions
/// again, so the answers must be the val run's) and writes a submission per
/// shot count and trial that answers every question of the whole test set
/// ("" for those not asked), in VQAv2's and VizWiz's formats; no scores.
#[test]
fn testdev_writes_evalai_submissions_for_every_test_question() {
    use flamingo_eval::metrics::vqa::normalize;
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    synthetic_laion_and_tiny_model(dir, 24);
    for task in ["vqav2", "vizwiz"] {
        synth_eval(dir, task, "16", "5");
        let data = dir.join(task);
        let extra = [json!(90_000_001u64), json!(90_000_002u64)];
        let (testdev_name, all_name) = if task == "vqav2" {
            copy_images(&data.join("val2014"), &data.join("test2015"), |name| {
                name.replace("val2014", "test2015")
            });
            std::fs::copy(
                data.join("v2_OpenEnded_mscoco_val2014_questions.json"),
                data.join("v2_OpenEnded_mscoco_test-dev2015_questions.json"),
            )
            .unwrap();
            (
                "v2_OpenEnded_mscoco_val2014_questions.json",
                "v2_OpenEnded_mscoco_test2015_questions.json",
            )
        } else {
            copy_images(&data.join("val"), &data.join("test"), str::to_string);
            (
                "val_questions_vqa_format.json",
                "test_questions_vqa_format.json",
            )
        };
        // The whole test set: the test-dev questions and two more.
        let mut all = read_json(&data.join(testdev_name));
        let questions = all["questions"].as_array_mut().unwrap();
        let first = questions[0].clone();
        for id in &extra {
            let mut question = first.clone();
            question["question_id"] = id.clone();
            questions.push(question);
        }
        if task == "vizwiz" {
            // VizWiz reads its test questions from this one file.
            all["questions"].as_array_mut().unwrap().truncate(5);
        }
        std::fs::write(data.join(all_name), all.to_string()).unwrap();

        let common = [
            "eval",
            "--model",
            "tiny/model.toml",
            "--dataset",
            task,
            "--data-dir",
            task,
            "--shots",
            "0",
            "2",
            "--batch-size",
            "2",
            // Four of the five questions: the fifth is left unanswered.
            "--num-samples",
            "4",
        ];
        let mut val = common.to_vec();
        val.extend(["--predictions", "val.jsonl"]);
        flamingoctl(dir, &val);
        let mut testdev = common.to_vec();
        testdev.extend([
            "--testdev",
            "--testdev-dir",
            "evalai",
            "--results",
            "none.json",
        ]);
        flamingoctl(dir, &testdev);
        assert!(!dir.join("none.json").exists(), "test-dev has no scores");

        let predictions: Vec<Value> = std::fs::read_to_string(dir.join("val.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let all_ids: Vec<Value> = read_json(&data.join(all_name))["questions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["question_id"].clone())
            .collect();
        for shots in [0u64, 2] {
            let file = dir.join(format!("evalai/{task}-testdev_{shots}_random_42.json"));
            let submission = read_json(&file);
            let entries = submission.as_array().unwrap();
            let want: HashMap<String, String> = predictions
                .iter()
                .filter(|p| p["shots"] == shots)
                .map(|p| {
                    (
                        p["id"].to_string(),
                        normalize(p["prediction"].as_str().unwrap()),
                    )
                })
                .collect();
            assert_eq!(want.len(), 4);
            if task == "vqav2" {
                let got: HashMap<String, String> = entries
                    .iter()
                    .map(|e| {
                        assert_eq!(e.as_object().unwrap().len(), 2, "{e}");
                        (
                            e["question_id"].to_string(),
                            e["answer"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                assert_eq!(entries.len(), all_ids.len(), "every test question once");
                for id in &all_ids {
                    let expected = want.get(&id.to_string()).cloned().unwrap_or_default();
                    assert_eq!(got[&id.to_string()], expected, "question {id}");
                }
                for id in &extra {
                    assert_eq!(got[&id.to_string()], "", "unanswered: empty");
                }
            } else {
                let all = read_json(&data.join(all_name));
                let questions = all["questions"].as_array().unwrap();
                assert_eq!(entries.len(), questions.len());
                for (entry, question) in entries.iter().zip(questions) {
                    assert_eq!(entry["image"], question["image_id"]);
                    let expected = want
                        .get(&question["question_id"].to_string())
                        .cloned()
                        .unwrap_or_default();
                    assert_eq!(entry["answer"].as_str().unwrap(), expected);
                }
            }
        }
    }
}
