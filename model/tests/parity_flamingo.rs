//! Parity with OpenFlamingo's own `Flamingo` model: vision tower, perceiver,
//! decoder and gated cross-attention assembled for MPT, GPT-NeoX and LLaMA
//! with cross_attn_every_n_layers 1 and 2 and non-zero gates must give the
//! same logits to 1e-4 in fp32, and greedy generation (KV cache, cached
//! media) the same tokens as OpenFlamingo's `generate`.

mod common;

use flamingo_model::{
    BeamSettings, Decoder, DecoderConfig, Flamingo, VisionConfig, VisionTransformer, Weights,
};

const MEDIA_TOKEN: i64 = 48;

fn tiny_vision() -> VisionConfig {
    VisionConfig {
        image_size: 28,
        patch_size: 7,
        width: 32,
        layers: 2,
        heads: 4,
        mlp_ratio: 4.0,
        output_dim: 16,
        quick_gelu: true,
        tokens_after_ln_post: false,
    }
}

#[test]
fn flamingo_matches_open_flamingo_for_every_family_and_interval() {
    let dir = common::reference_dir("flamingo_reference.py");
    for family in ["mpt", "gpt_neox", "llama"] {
        for every in [1, 2] {
            let case = dir.path().join(format!("{family}_every{every}"));
            let config = std::fs::read_to_string(case.join("lm/config.json")).unwrap();
            let mut lm_weights =
                Weights::read_safetensors(&case.join("lm/model.safetensors")).unwrap();
            let decoder = Decoder::load(
                &mut lm_weights,
                DecoderConfig::from_hf_json(&config).unwrap(),
            )
            .unwrap();
            lm_weights.expect_consumed("").unwrap();

            let mut weights =
                Weights::read_safetensors(&case.join("flamingo.safetensors")).unwrap();
            let vision_x = weights
                .take("input.vision_x", &[2, 2, 1, 3, 28, 28])
                .unwrap();
            let lang_x = weights.take("input.lang_x", &[2, 12]).unwrap();
            let expected = weights.take("output.logits", &[2, 12, 50]).unwrap();
            let greedy = weights.take("output.greedy", &[2, 6]).unwrap();
            let vision =
                VisionTransformer::load(&mut weights, "vision_encoder", tiny_vision()).unwrap();
            let model = Flamingo::load(&mut weights, vision, decoder, every, MEDIA_TOKEN).unwrap();
            let logits = model.forward(&vision_x, &lang_x).unwrap();
            for key in ["output.beam3", "output.beam2_lp05"] {
                assert!(weights.contains(key), "{key} missing from the reference");
            }
            let difference = (&logits - &expected).abs().max().double_value(&[]);
            assert!(
                difference <= 1e-4,
                "{family}, every {every}: max abs logit difference {difference}"
            );

            // Greedy decoding with the KV cache and cached media gives
            // OpenFlamingo's (Hugging Face generate's) tokens exactly.
            let tokens = model
                .generate_greedy(&vision_x, &lang_x, None, 6, 49)
                .unwrap();
            assert_eq!(
                Vec::<Vec<i64>>::try_from(&tokens).unwrap(),
                Vec::<Vec<i64>>::try_from(&greedy).unwrap(),
                "{family}, every {every}: greedy tokens"
            );

            // Beam search gives Hugging Face's beams exactly (3 beams, length
            // penalty 1; 2 beams, length penalty 0.5).
            for (key, beams, max_new_tokens, length_penalty) in [
                ("output.beam3", 3, 6, 1.0),
                ("output.beam2_lp05", 2, 5, 0.5),
            ] {
                let expected_beam = weights.remove(key).unwrap();
                let settings = BeamSettings {
                    num_beams: beams,
                    max_new_tokens,
                    length_penalty,
                    eos_token_id: 49,
                    pad_token_id: 49,
                };
                let beam = model
                    .generate_beam(&vision_x, &lang_x, None, settings)
                    .unwrap();
                assert_eq!(
                    Vec::<Vec<i64>>::try_from(&beam).unwrap(),
                    Vec::<Vec<i64>>::try_from(&expected_beam).unwrap(),
                    "{family}, every {every}: {key}"
                );
            }

            // With an EOS the model produces, hypotheses finish at different
            // lengths and the finished set decides.
            let eos = weights.remove("input.beam_eos").unwrap().int64_value(&[0]);
            let expected_eos = weights.remove("output.beam3_eos").unwrap();
            let settings = BeamSettings {
                num_beams: 3,
                max_new_tokens: 6,
                length_penalty: 1.0,
                eos_token_id: eos,
                pad_token_id: 47,
            };
            let beam = model
                .generate_beam(&vision_x, &lang_x, None, settings)
                .unwrap();
            assert_eq!(
                Vec::<Vec<i64>>::try_from(&beam).unwrap(),
                Vec::<Vec<i64>>::try_from(&expected_eos).unwrap(),
                "{family}, every {every}: beams with EOS {eos}"
            );

            // A left-padded batch: logits at the real positions, greedy and
            // 3-beam tokens, as OpenFlamingo/HF with an attention mask.
            let padded_x = weights.remove("input.padded_x").unwrap();
            let padded_mask = weights.remove("input.padded_mask").unwrap();
            let expected_padded = weights.remove("output.padded_logits").unwrap();
            let padded = model
                .forward_masked(&vision_x, &padded_x, Some(&padded_mask))
                .unwrap();
            let real = padded_mask.to_kind(tch::Kind::Bool).unsqueeze(-1);
            let difference = (&padded - &expected_padded)
                .abs()
                .masked_fill(&real.logical_not(), 0.0)
                .max()
                .double_value(&[]);
            assert!(
                difference <= 1e-4,
                "{family}, every {every}: padded logits differ by {difference}"
            );
            let padded_greedy = model
                .generate_greedy(&vision_x, &padded_x, Some(&padded_mask), 6, 49)
                .unwrap();
            assert_eq!(
                Vec::<Vec<i64>>::try_from(&padded_greedy).unwrap(),
                Vec::<Vec<i64>>::try_from(&weights.remove("output.padded_greedy").unwrap())
                    .unwrap(),
                "{family}, every {every}: padded greedy"
            );
            let settings = BeamSettings {
                num_beams: 3,
                max_new_tokens: 5,
                length_penalty: 1.0,
                eos_token_id: 49,
                pad_token_id: 47,
            };
            let padded_beam = model
                .generate_beam(&vision_x, &padded_x, Some(&padded_mask), settings)
                .unwrap();
            assert_eq!(
                Vec::<Vec<i64>>::try_from(&padded_beam).unwrap(),
                Vec::<Vec<i64>>::try_from(&weights.remove("output.padded_beam3").unwrap()).unwrap(),
                "{family}, every {every}: padded beams"
            );
            weights.expect_consumed("").unwrap();

            // The cache is consistent with a full pass: re-reading prompt and
            // new tokens without a cache predicts each new token again.
            let sequence = tch::Tensor::cat(&[&lang_x, &tokens], 1);
            let full = model.forward(&vision_x, &sequence).unwrap();
            let predicted = full.narrow(1, 11, 6).argmax(-1, false);
            assert_eq!(
                Vec::<Vec<i64>>::try_from(&predicted).unwrap(),
                Vec::<Vec<i64>>::try_from(&tokens).unwrap(),
                "{family}, every {every}: cached and uncached decoding disagree"
            );

            // The images matter: other pixels, other logits after an <image>.
            let other = model.forward(&(&vision_x * -1.0), &lang_x).unwrap();
            let moved = (&other - &logits).abs().max().double_value(&[]);
            assert!(
                moved > 1e-3,
                "{family}, every {every}: logits ignore the images ({moved})"
            );
        }
    }
}

#[test]
fn more_image_tokens_than_images_is_an_error() {
    let dir = common::reference_dir("flamingo_reference.py");
    let case = dir.path().join("llama_every2");
    let config = std::fs::read_to_string(case.join("lm/config.json")).unwrap();
    let mut lm_weights = Weights::read_safetensors(&case.join("lm/model.safetensors")).unwrap();
    let decoder = Decoder::load(
        &mut lm_weights,
        DecoderConfig::from_hf_json(&config).unwrap(),
    )
    .unwrap();
    let mut weights = Weights::read_safetensors(&case.join("flamingo.safetensors")).unwrap();
    let vision_x = weights
        .take("input.vision_x", &[2, 2, 1, 3, 28, 28])
        .unwrap();
    let lang_x = weights.take("input.lang_x", &[2, 12]).unwrap();
    let vision = VisionTransformer::load(&mut weights, "vision_encoder", tiny_vision()).unwrap();
    let model = Flamingo::load(&mut weights, vision, decoder, 2, MEDIA_TOKEN).unwrap();
    let one_image = vision_x.narrow(1, 0, 1);
    let error = model.forward(&one_image, &lang_x).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid input: the text has 2 <image> tokens but only 1 images were given"
    );
}
