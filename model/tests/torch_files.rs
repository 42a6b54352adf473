//! Reading `torch.save` checkpoints without Python, checked against the same
//! tensors written by safetensors (read by libtorch's own reader).

mod common;

use flamingo_model::Weights;
use tch::Tensor;

fn reference() -> tempfile::TempDir {
    common::reference_dir("torch_files_reference.py")
}

fn same(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.kind(), expected.kind(), "{what}: dtype");
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    assert!(actual.equal(expected), "{what}: values differ");
}

#[test]
fn state_dict_pickles_read_like_safetensors() {
    let dir = reference();
    let mut pickled = Weights::read(&dir.path().join("state_dict.bin")).unwrap();
    let mut expected = Weights::read(&dir.path().join("state_dict.safetensors")).unwrap();
    let mut keys: Vec<String> = expected.keys().cloned().collect();
    keys.sort();
    let mut pickled_keys: Vec<String> = pickled.keys().cloned().collect();
    pickled_keys.sort();
    assert_eq!(pickled_keys, keys);
    for key in keys {
        same(
            &pickled.remove(&key).unwrap(),
            &expected.remove(&key).unwrap(),
            &key,
        );
    }
}

#[test]
fn training_checkpoints_flatten_to_dotted_names() {
    let dir = reference();
    let mut pickled = Weights::read(&dir.path().join("training.pt")).unwrap();
    let mut expected = Weights::read(&dir.path().join("training.safetensors")).unwrap();
    for key in [
        "model_state_dict.module.perceiver.latents",
        "optimizer_state_dict.state.0.exp_avg",
    ] {
        same(
            &pickled.remove(key).unwrap(),
            &expected.remove(key).unwrap(),
            key,
        );
    }
    // The step counter is a tensor too; nothing else (epoch, lr) is.
    let rest: Vec<&String> = pickled.keys().collect();
    assert_eq!(rest, vec!["optimizer_state_dict.state.0.step"]);
    // OpenFlamingo's `module.` prefixes come off by renaming.
    let model = Weights::read(&dir.path().join("training.pt"))
        .unwrap()
        .strip_prefix("model_state_dict.")
        .rename_prefix("module.", "");
    assert!(model.contains("perceiver.latents"));
}

#[test]
fn sharded_checkpoints_load_every_shard() {
    let dir = reference();
    let weights = Weights::read(&dir.path().join("sharded/model.safetensors.index.json")).unwrap();
    let mut keys: Vec<&String> = weights.keys().collect();
    keys.sort();
    assert_eq!(keys, vec!["a.weight", "b.weight", "c.bias"]);
}

#[test]
fn unreadable_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("weights.bin");
    std::fs::write(&bogus, b"not a zip").unwrap();
    let message = Weights::read(&bogus).unwrap_err().to_string();
    assert!(
        message.starts_with(&bogus.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("not a zip-format torch.save file"),
        "{message}"
    );
    let message = Weights::read(&dir.path().join("weights.onnx"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("unknown weight format"), "{message}");
}
