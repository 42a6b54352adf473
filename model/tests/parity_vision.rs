//! Parity with open_clip: the CLIP vision transformer on tiny random weights
//! (QuickGELU and GELU variants) must give open_clip's own patch tokens
//! (before and after `ln_post`) and pooled embedding to 1e-5 in fp32.

mod common;

use flamingo_model::{VisionConfig, VisionTransformer, Weights};
use tch::Tensor;

fn reference() -> (tempfile::TempDir, Weights) {
    common::reference_weights("vision_reference.py", "vision.safetensors")
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    common::assert_close(actual, expected, 1e-5, what);
}

fn tiny(quick_gelu: bool, tokens_after_ln_post: bool) -> VisionConfig {
    VisionConfig {
        image_size: 28,
        patch_size: 7,
        width: 32,
        layers: 2,
        heads: 4,
        mlp_ratio: 4.0,
        output_dim: 16,
        quick_gelu,
        tokens_after_ln_post,
    }
}

#[test]
fn vision_transformer_matches_open_clip() {
    let (dir, mut weights) = reference();
    let images = weights.take("input.images", &[3, 3, 28, 28]).unwrap();
    for (prefix, quick_gelu) in [("visual", true), ("visual_gelu", false)] {
        let pre = weights
            .take(&format!("output.{prefix}.pre_ln_post_tokens"), &[3, 16, 32])
            .unwrap();
        let post = weights
            .take(&format!("output.{prefix}.tokens"), &[3, 16, 32])
            .unwrap();
        let pooled = weights
            .take(&format!("output.{prefix}.pooled"), &[3, 16])
            .unwrap();

        let tower = VisionTransformer::load(&mut weights, prefix, tiny(quick_gelu, false)).unwrap();
        weights.expect_consumed(&format!("{prefix}.")).unwrap();
        let output = tower.forward(&images).unwrap();
        assert_close(
            &output.patch_tokens,
            &pre,
            &format!("{prefix}: tokens before ln_post"),
        );
        assert_close(
            &output.pooled,
            &pooled,
            &format!("{prefix}: pooled embedding"),
        );

        // The switch for open_clip >= 2.23's behaviour.
        let mut again = Weights::read_safetensors(&dir.path().join("vision.safetensors")).unwrap();
        let after = VisionTransformer::load(&mut again, prefix, tiny(quick_gelu, true)).unwrap();
        assert_close(
            &after.forward(&images).unwrap().patch_tokens,
            &post,
            &format!("{prefix}: tokens after ln_post"),
        );
    }
}

#[test]
fn wrong_shapes_and_inputs_are_named() {
    let (_dir, mut weights) = reference();
    let mut config = tiny(true, false);
    config.width = 48;
    let error = VisionTransformer::load(&mut weights, "visual", config).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("has shape [32, 32], expected [144, 48]")
            || error.to_string().starts_with("weight visual."),
        "{error}"
    );
    let tower = VisionTransformer::load(&mut weights, "visual_gelu", tiny(false, false)).unwrap();
    let error = tower
        .forward(&Tensor::zeros([1, 3, 32, 32], tch::kind::FLOAT_CPU))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid input: images must be [n, 3, 28, 28], got [1, 3, 32, 32]"
    );
}
