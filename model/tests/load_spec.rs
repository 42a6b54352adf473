//! Loading from a model spec, end to end: a full open_clip CLIP state dict
//! (torch.save), an open_clip model config, a Hugging Face LM dir and an
//! OpenFlamingo checkpoint.pt, all written by the Python libraries, must give
//! OpenFlamingo's own logits and tokenization.

mod common;

use flamingo_model::{load_flamingo, ModelSpec, Weights};

const PROMPT: &str = "<image>Output: a cat on a sofa.<|endofchunk|><image>Output: a";

#[test]
fn a_spec_of_released_format_files_loads_and_matches_open_flamingo() {
    assert_spec_matches_open_flamingo("model.toml");
}

#[test]
fn the_same_lm_in_mosaic_gpt_naming_gives_the_same_logits() {
    // mpt-1b-redpajama-200b's format: model_type "mosaic_gpt", flat config,
    // ln_1/mlp.mlp_up/ln_f names, pytorch_model.bin without lm_head.
    assert_spec_matches_open_flamingo("mosaic.toml");
}

fn assert_spec_matches_open_flamingo(spec_name: &str) {
    let dir = common::reference_dir("released_format_reference.py");

    let spec = ModelSpec::from_file(&dir.path().join(spec_name)).expect("spec parses");
    let (model, tokenizer) = load_flamingo(&spec).expect("model loads");
    let mut reference =
        Weights::read(&dir.path().join("reference.safetensors")).expect("reference outputs");
    let lang_x = reference.remove("lang_x").expect("lang_x");
    let vision_x = reference.remove("vision_x").expect("vision_x");
    let expected = reference.remove("logits").expect("logits");

    let ids: Vec<i64> = tokenizer
        .encode(PROMPT, true)
        .expect("parity step")
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(
        ids,
        Vec::<i64>::try_from(&lang_x.get(0)).expect("parity step"),
        "tokenization"
    );
    let logits = model.forward(&vision_x, &lang_x).expect("parity step");
    assert_eq!(logits.size(), expected.size());
    let difference = (&logits - &expected).abs().max().double_value(&[]);
    assert!(
        difference <= 1e-4,
        "{spec_name}: max abs logit difference {difference}"
    );
}

#[test]
fn without_a_checkpoint_the_new_parts_start_as_the_identity() {
    // No checkpoint: perceiver and cross-attention start fresh with zero
    // gates, so the LM's logits are the plain LM's.
    let dir = common::reference_dir("released_format_reference.py");
    let spec_path = dir.path().join("fresh.toml");
    std::fs::write(
        &spec_path,
        "[vision]\narch = \"clip.json\"\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n",
    )
    .unwrap();
    let spec = ModelSpec::from_file(&spec_path).unwrap();
    let (model, tokenizer) = load_flamingo(&spec).unwrap();
    let mut reference = Weights::read(&dir.path().join("reference.safetensors")).unwrap();
    let vision_x = reference.remove("vision_x").unwrap();
    let text = "Output: a cat";
    let ids: Vec<i64> = tokenizer
        .encode(text, true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let lang_x = tch::Tensor::from_slice(&ids).unsqueeze(0);
    let with_images = model.forward(&vision_x, &lang_x).unwrap();
    let plain = model.decoder().forward(&lang_x);
    let difference = (&with_images - &plain).abs().max().double_value(&[]);
    assert!(
        difference <= 1e-6,
        "fresh gates must leave the LM unchanged ({difference})"
    );
    assert_eq!(with_images.size()[2] as usize, tokenizer.len());
}

#[test]
fn a_checkpoint_with_foreign_keys_is_refused_with_the_keys_listed() {
    let dir = common::reference_dir("released_format_reference.py");
    // Use the CLIP file as a "checkpoint": none of its keys belong to Flamingo.
    let spec_path = dir.path().join("wrong.toml");
    std::fs::write(
        &spec_path,
        "[vision]\narch = \"clip.json\"\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n[flamingo]\ncheckpoint = \"clip.bin\"\n",
    )
    .unwrap();
    let spec = ModelSpec::from_file(&spec_path).unwrap();
    let message = load_flamingo(&spec).unwrap_err().to_string();
    assert!(message.contains("clip.bin"), "{message}");
    assert!(
        message.contains("keys that belong to no part of the model"),
        "{message}"
    );
    assert!(message.contains("visual.conv1.weight"), "{message}");
}

#[test]
fn every_missing_key_is_listed_at_once() {
    // A checkpoint without the cross-attention layers: all of their keys
    // are reported together, with the count.
    let dir = common::reference_dir("released_format_reference.py");
    let mut checkpoint = Weights::read(&dir.path().join("checkpoint.pt")).unwrap();
    let keep: Vec<String> = checkpoint
        .keys()
        .filter(|key| !key.contains("gated_cross_attn"))
        .cloned()
        .collect();
    let mut tensors = Vec::new();
    for key in keep {
        let tensor = checkpoint.remove(&key).unwrap();
        tensors.push((key, tensor));
    }
    let trimmed = dir.path().join("trimmed.safetensors");
    tch::Tensor::write_safetensors(&tensors, &trimmed).unwrap();
    let spec_path = dir.path().join("trimmed.toml");
    std::fs::write(
        &spec_path,
        "[vision]\narch = \"clip.json\"\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n[flamingo]\ncheckpoint = \"trimmed.safetensors\"\n",
    )
    .unwrap();
    let spec = ModelSpec::from_file(&spec_path).unwrap();
    let message = load_flamingo(&spec).unwrap_err().to_string();
    // 2 layers × 11 tensors per gated cross-attention block.
    assert!(
        message.starts_with("missing weights (22 in all)"),
        "{message}"
    );
    assert!(
        message.contains("lang_encoder.gated_cross_attn_layers.0.attn_gate"),
        "{message}"
    );
    assert!(
        message.contains("lang_encoder.gated_cross_attn_layers.1.ff.3.weight"),
        "{message}"
    );
}
