//! The MFU estimate's FLOPs equal what PyTorch's `FlopCounterMode` counts
//! for a training micro-batch of the Python OpenFlamingo (frozen vision
//! tower and decoder, trained perceiver, cross-attention and embedding) on
//! the same tiny released-format model.

mod common;

use flamingo_engine::flops::FlopModel;
use flamingo_model::{load_flamingo, ModelSpec};

#[test]
fn step_flops_match_torch_flop_counter() {
    let dir = tempfile::tempdir().expect("temp dir");
    common::run_reference("flops_reference.py", dir.path());
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("flops.json")).expect("flops.json"))
            .expect("JSON");
    let number = |key: &str| reference[key].as_f64().expect(key);

    let spec = ModelSpec::from_file(&dir.path().join("model.toml")).expect("spec");
    let (model, _tokenizer) = load_flamingo(&spec).expect("model loads");
    let embedding = format!("lang_encoder.{}", model.decoder().input_embedding_name());
    let patches = (spec.vision.image_size / spec.vision.patch_size).pow(2);
    let counted = FlopModel::new(&model, &embedding, true, patches).batch_flops(
        number("batch"),
        number("images"),
        number("tokens"),
    );
    let expected = number("flops");
    let error = (counted - expected).abs() / expected;
    eprintln!(
        "ours {counted:.0}, FlopCounterMode {expected:.0}: {:.3} % apart",
        error * 100.0
    );
    assert!(
        error < 0.002,
        "ours {counted:.0} vs FlopCounterMode {expected:.0} ({:.2} %)",
        error * 100.0
    );
}
