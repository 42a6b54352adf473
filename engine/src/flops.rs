//! An estimate of the model FLOPs of one training step, for the MFU the
//! ranks report: multiply-adds count 2, from parameter counts per part and
//! what each part runs —
//! - the frozen vision tower: forward only, 2 · params per patch token;
//! - the perceiver (trained): forward and both backward products, 6 · params
//!   per patch token;
//! - the gated cross-attention blocks (trained): 6 · params per text token;
//! - the frozen decoder and its tied embedding/output head: forward and
//!   input gradients, 4 · params per text token (6 for the embedding when it
//!   trains).
//!
//! Attention's score products (quadratic in sequence length) are left out,
//! as in the usual 6·N·D estimate; at OpenFlamingo's 256 text tokens they
//! are a few per cent of the total. `bench/gpu_step` counts them too.

use flamingo_model::flamingo::{Flamingo, Unit};

/// Parameter counts of a model's parts and its images' patch tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlopModel {
    pub vision: f64,
    pub perceiver: f64,
    pub cross_attention: f64,
    pub decoder: f64,
    pub embedding: f64,
    pub embedding_trains: bool,
    /// Tokens the vision tower sees per image (patches + class token).
    pub patch_tokens: f64,
}

impl FlopModel {
    pub fn new(
        model: &Flamingo,
        embedding_name: &str,
        train_embeddings: bool,
        patch_tokens: i64,
    ) -> Self {
        let mut counts = FlopModel {
            vision: 0.0,
            perceiver: 0.0,
            cross_attention: 0.0,
            decoder: 0.0,
            embedding: 0.0,
            embedding_trains: train_embeddings,
            patch_tokens: patch_tokens as f64,
        };
        for (name, tensor) in model.named_parameters() {
            let numel = tensor.numel() as f64;
            let slot = if name == embedding_name {
                &mut counts.embedding
            } else if name.starts_with("lang_encoder.gated_cross_attn_layers.") {
                &mut counts.cross_attention
            } else {
                match model.unit_of(name) {
                    Unit::Vision => &mut counts.vision,
                    Unit::Perceiver => &mut counts.perceiver,
                    Unit::Text | Unit::Layer(_) => &mut counts.decoder,
                }
            };
            *slot += numel;
        }
        counts
    }

    /// FLOPs of a step over `images` images and `text_tokens` tokens.
    pub fn step_flops(&self, images: f64, text_tokens: f64) -> f64 {
        let patches = images * self.patch_tokens;
        let embedding = if self.embedding_trains { 6.0 } else { 4.0 };
        2.0 * self.vision * patches
            + 6.0 * self.perceiver * patches
            + 6.0 * self.cross_attention * text_tokens
            + 4.0 * self.decoder * text_tokens
            + embedding * self.embedding * text_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_part_counts_with_its_multiplier() {
        let model = FlopModel {
            vision: 10.0,
            perceiver: 3.0,
            cross_attention: 5.0,
            decoder: 7.0,
            embedding: 2.0,
            embedding_trains: false,
            patch_tokens: 4.0,
        };
        // 2 images × 4 patch tokens, 9 text tokens.
        let expected = 2.0 * 10.0 * 8.0
            + 6.0 * 3.0 * 8.0
            + 6.0 * 5.0 * 9.0
            + 4.0 * 7.0 * 9.0
            + 4.0 * 2.0 * 9.0;
        assert_eq!(model.step_flops(2.0, 9.0), expected);
        let trained = FlopModel {
            embedding_trains: true,
            ..model
        };
        assert_eq!(trained.step_flops(2.0, 9.0), expected + 2.0 * 2.0 * 9.0);
    }
}
