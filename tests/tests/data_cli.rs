//! `flamingoctl data` end to end: `inspect --json` prints, in shard order,
//! what OpenFlamingo's Python preprocessing makes of the fixture shards
//! (data/tests/reference/data_reference.py); `synth`, `index` and
//! `pack` write shards that inspect reads back; `index --accept` judges
//! each shard once.

use std::path::{Path, PathBuf};
use std::process::Command;

use flamingo_tests::ClusterSandbox;

fn python() -> PathBuf {
    std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn flamingoctl(dir: &Path, args: &[&str]) -> (String, String) {
    let output = Command::new(ClusterSandbox::binary("flamingoctl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("flamingoctl runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{args:?}: {stderr}");
    (stdout, stderr)
}

#[test]
fn inspect_prints_what_open_flamingo_computes() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/tests/reference/data_reference.py");
    let status = Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let expected: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("expected.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
    for dataset in ["laion", "mmc4"] {
        let (stdout, stderr) = flamingoctl(
            dir.path(),
            &[
                "data",
                "inspect",
                "--dataset",
                dataset,
                "--shards",
                &format!("{dataset}-000.tar"),
                "--tokenizer",
                "lm",
                "--no-augment",
                "--json",
            ],
        );
        let ours: Vec<serde_json::Value> = stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let theirs: Vec<&serde_json::Value> = expected
            .iter()
            .filter(|line| line["dataset"] == dataset)
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{dataset}");
        let mut rejected = 0;
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a["key"], b["key"]);
            if b.get("rejected").is_some() {
                assert!(a["rejected"].is_string(), "{a} vs {b}");
                rejected += 1;
                continue;
            }
            for field in ["input_ids", "attention_mask", "labels", "num_images"] {
                assert_eq!(a[field], b[field], "{dataset} {} {field}", a["key"]);
            }
            assert!(a["image_order"].is_array());
        }
        assert!(rejected >= 4, "{dataset}: the fixture's broken samples");
        assert!(stderr.contains(&format!("{rejected} skipped")), "{stderr}");
    }
}

#[test]
fn synth_index_and_pack_write_readable_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, _) = flamingoctl(
        dir.path(),
        &[
            "data",
            "synth",
            "--form",
            "mmc4",
            "--out",
            "syn",
            "--samples",
            "30",
            "--per-shard",
            "8",
            "--json",
        ],
    );
    let written: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(written["samples"], 30);
    assert_eq!(
        written["shards"].as_str().unwrap(),
        "syn/mmc4-{00000..00003}.tar"
    );
    std::fs::remove_file(dir.path().join("syn/mmc4-00001.tar.index.json")).unwrap();
    let (stdout, _) = flamingoctl(dir.path(), &["data", "index", "syn/mmc4.toml", "--json"]);
    let indexed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (indexed["shards"].as_u64(), indexed["samples"].as_u64()),
        (Some(4), Some(30))
    );
    assert!(dir.path().join("syn/mmc4-00001.tar.index.json").exists());
    // The validating pass: every shard judged once, then kept while
    // current; --force judges again.
    let accept = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["data", "index", "syn/mmc4.toml", "--accept", "--json"];
        args.extend_from_slice(extra);
        let (stdout, stderr) = flamingoctl(dir.path(), &args);
        // Progress off a terminal: whole lines, no carriage returns.
        assert!(!stderr.contains('\r'), "{stderr:?}");
        assert!(
            stderr.lines().any(|line| line.starts_with("judged")),
            "{stderr:?}"
        );
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let first = accept(&[]);
    assert_eq!(
        (first["judged"].as_u64(), first["current"].as_u64()),
        (Some(4), Some(0))
    );
    let judged: u64 = first["outcomes"]
        .as_object()
        .unwrap()
        .values()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert_eq!(judged, 30, "{first}");
    let fingerprint = first["fingerprint"].as_str().unwrap();
    assert!(dir
        .path()
        .join(format!("syn/mmc4-00003.tar.accept-{fingerprint}.json"))
        .exists());
    let again = accept(&[]);
    assert_eq!(
        (again["judged"].as_u64(), again["current"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(again["outcomes"], first["outcomes"]);
    let forced = accept(&["--force"]);
    assert_eq!(forced["judged"].as_u64(), Some(4));
    let (stdout, stderr) = flamingoctl(
        dir.path(),
        &[
            "data",
            "inspect",
            "--dataset",
            "mmc4",
            "--shards",
            "syn/mmc4-{00000..00003}.tar",
            "--tokenizer",
            "syn/tokenizer",
            "--json",
        ],
    );
    assert_eq!(stdout.lines().count(), 30);
    assert!(stderr.contains("30 kept, 0 skipped"), "{stderr}");

    // Pack image–caption pairs from a folder, then read them back.
    let pairs = dir.path().join("pairs");
    std::fs::create_dir(&pairs).unwrap();
    for index in 0..5 {
        let (_, members) = flamingo_data::synthetic::laion_sample(1, index, 32);
        std::fs::write(pairs.join(format!("p{index}.png")), &members[0].1).unwrap();
        std::fs::write(pairs.join(format!("p{index}.txt")), &members[1].1).unwrap();
    }
    let (stdout, _) = flamingoctl(
        dir.path(),
        &[
            "data",
            "pack",
            "--form",
            "laion",
            "--input",
            "pairs",
            "--out",
            "packed/pairs-{}.tar",
            "--per-shard",
            "2",
            "--json",
        ],
    );
    let packed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(packed["samples"], 5);
    let (stdout, _) = flamingoctl(
        dir.path(),
        &[
            "data",
            "inspect",
            "--dataset",
            "laion",
            "--shards",
            packed["shards"].as_str().unwrap(),
            "--tokenizer",
            "syn/tokenizer",
            "--json",
        ],
    );
    let keys: Vec<String> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(keys, ["p0", "p1", "p2", "p3", "p4"]);
}
