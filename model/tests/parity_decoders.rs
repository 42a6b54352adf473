//! Parity with Hugging Face transformers: tiny random MPT (6 heads, so the
//! interleaved ALiBi slopes are used), GPT-NeoX (parallel residual with half
//! rotary; sequential with full rotary) and LLaMA (grouped key/value heads)
//! models, saved as Hugging Face model directories, must give the same logits
//! to 1e-4 in fp32 when loaded from config.json + model.safetensors.

use std::path::Path;

mod common;

use flamingo_model::{Decoder, DecoderConfig, DecoderFamily, Weights};

fn reference() -> tempfile::TempDir {
    common::reference_dir("decoder_reference.py")
}

fn load(model_dir: &Path) -> Decoder {
    let config = std::fs::read_to_string(model_dir.join("config.json")).expect("config.json");
    let config = DecoderConfig::from_hf_json(&config).expect("config parses");
    let mut weights =
        Weights::read_safetensors(&model_dir.join("model.safetensors")).expect("weights read");
    let decoder = Decoder::load(&mut weights, config).expect("decoder loads");
    weights.expect_consumed("").expect("every weight is used");
    decoder
}

#[test]
fn decoders_match_hugging_face_logits() {
    let dir = reference();
    let mut outputs = Weights::read_safetensors(&dir.path().join("reference.safetensors")).unwrap();
    let input_ids = outputs.take("input_ids", &[2, 11]).unwrap();
    for (name, family) in [
        ("mpt", DecoderFamily::Mpt),
        ("gpt_neox", DecoderFamily::GptNeox),
        ("gpt_neox_sequential", DecoderFamily::GptNeox),
        ("llama", DecoderFamily::Llama),
    ] {
        let decoder = load(&dir.path().join(name));
        assert_eq!(decoder.config().family, family);
        let expected = outputs
            .take(&format!("logits.{name}"), &[2, 11, 50])
            .unwrap();
        let logits = decoder.forward(&input_ids);
        let difference = (&logits - &expected).abs().max().double_value(&[]);
        let spread = expected.std(true).double_value(&[]);
        assert!(
            difference <= 1e-4,
            "{name}: max abs logit difference {difference}"
        );
        assert!(
            spread > 0.1,
            "{name}: reference logits are too flat to test anything ({spread})"
        );
    }
}

#[test]
fn a_prefix_gives_the_same_logits_as_the_full_sequence() {
    // Causality: logits for the first k tokens do not depend on later ones.
    let dir = reference();
    let mut outputs = Weights::read_safetensors(&dir.path().join("reference.safetensors")).unwrap();
    let input_ids = outputs.take("input_ids", &[2, 11]).unwrap();
    for name in ["mpt", "gpt_neox", "llama"] {
        let decoder = load(&dir.path().join(name));
        let full = decoder.forward(&input_ids);
        let prefix = decoder.forward(&input_ids.narrow(1, 0, 5));
        let difference = (full.narrow(1, 0, 5) - prefix)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            difference <= 1e-5,
            "{name}: prefix logits differ by {difference}"
        );
    }
}
