//! ImageNet-1k without a classnames.txt: its 1000 synset folders get the
//! class names OpenFlamingo's evaluation prompts with (read here from the
//! installed open_flamingo package, the reference).

use flamingo_eval::datasets::{self, Task};

#[test]
fn imagenet_synset_folders_get_openflamingo_class_names() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    for index in 0..1000 {
        let class = format!("n{:08}", 1_000_000 + index * 37);
        for split in ["train", "val"] {
            let images = dir.join(split).join(&class);
            std::fs::create_dir_all(&images).unwrap();
            if split == "train" || index % 100 == 0 {
                std::fs::write(images.join("image.JPEG"), b"").unwrap();
            }
        }
    }
    let dataset = datasets::load(Task::Imagenet, dir).unwrap();
    let output = std::process::Command::new(flamingo_common::testing::venv_bin("python"))
        .args([
            "-c",
            "import json; from open_flamingo.eval.classification_utils import IMAGENET_CLASSNAMES as N; print(json.dumps(N))",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: Vec<String> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(dataset.class_names, reference);
    assert_eq!(dataset.train[0].target, "tench");
    assert_eq!(dataset.test.len(), 10);
    assert_eq!(dataset.test[9].target, reference[900]);

    // Other folder names are the class names (underscores as spaces).
    std::fs::rename(
        dir.join("train/n01000000"),
        dir.join("train/golden_retriever"),
    )
    .unwrap();
    std::fs::rename(dir.join("val/n01000000"), dir.join("val/golden_retriever")).unwrap();
    let dataset = datasets::load(Task::Imagenet, dir).unwrap();
    assert_eq!(dataset.class_names[0], "golden retriever");
    assert_eq!(dataset.class_names[1], "n01000037");
}
