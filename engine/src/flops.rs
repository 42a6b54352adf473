//! The model FLOPs of one training micro-batch, for the MFU the ranks
//! report. Counted as PyTorch's `FlopCounterMode` counts them (matrix
//! products and convolutions, a multiply-add being 2; the test checks this
//! against it on the Python OpenFlamingo): from the model's weights and the
//! batch's shape —
//! - every linear weight `[out, in]` costs `2·out·in` per token it is
//!   applied to: the vision tower's per image token, the perceiver's `to_kv`
//!   per media token and latent and its other weights per latent, the
//!   cross-attention blocks' `to_kv` per media latent and their other
//!   weights per text token, the decoder's per text token; a tied input
//!   embedding is the output head, `2·vocab·width` per text token;
//! - attention's two score products cost `4·queries·keys·width` per layer;
//! - what trains (perceiver, cross-attention, the embedding unless frozen)
//!   costs 3× its forward (input and weight gradients); the frozen decoder
//!   2× (input gradients only); the frozen vision tower runs forward only.
//!
//! Recomputation under gradient checkpointing is not counted (MFU counts
//! the model's FLOPs, not the hardware's).

use flamingo_model::flamingo::{Flamingo, Unit};

/// Per-token costs of the model's parts (forward FLOPs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlopModel {
    /// Vision tower: per image token (patches + class token).
    vision_per_token: f64,
    /// Patch embedding (convolution): per patch.
    vision_per_patch: f64,
    /// The pooled token's projection: per image.
    vision_per_image: f64,
    vision_layers: f64,
    vision_width: f64,
    /// Perceiver: `to_kv` per media token and latent; the rest per latent.
    perceiver_kv: f64,
    perceiver_latent: f64,
    /// Sum over perceiver layers of the attention's inner width.
    perceiver_inner: f64,
    latents: f64,
    /// Cross-attention: `to_kv` per media latent; the rest per text token.
    cross_kv: f64,
    cross_text: f64,
    cross_inner: f64,
    /// Frozen decoder weights per text token, its layers and width.
    decoder: f64,
    decoder_layers: f64,
    hidden: f64,
    /// The tied embedding used as the output head, per text token.
    head: f64,
    head_trains: bool,
    /// Patches per image (the grid, without the class token).
    patches: f64,
}

fn layer_index(name: &str, marker: &str) -> Option<usize> {
    let rest = name.split_once(marker)?.1;
    rest.split('.').next()?.parse().ok()
}

impl FlopModel {
    /// `embedding_name`: the decoder's input embedding (as named in
    /// [`Flamingo::named_parameters`]); `patches`: patches per image.
    pub fn new(
        model: &Flamingo,
        embedding_name: &str,
        train_embeddings: bool,
        patches: i64,
    ) -> Self {
        let config = model.decoder().config();
        let mut counts = FlopModel {
            decoder_layers: config.layers as f64,
            hidden: config.hidden_size as f64,
            head_trains: train_embeddings,
            patches: patches as f64,
            ..FlopModel::default()
        };
        let mut vision_layers = std::collections::BTreeSet::new();
        for (name, tensor) in model.named_parameters() {
            let size = tensor.size();
            let product = |dims: &[i64]| dims.iter().product::<i64>() as f64;
            if name == embedding_name {
                if config.tie_word_embeddings {
                    counts.head = 2.0 * product(&size);
                }
                continue;
            }
            match (model.unit_of(name), size.len()) {
                (Unit::Vision, 4) => {
                    // The patch embedding: width × (3·p·p) per patch.
                    counts.vision_per_patch += 2.0 * product(&size);
                    counts.vision_width = size[0] as f64;
                }
                (Unit::Vision | Unit::VisionBlock(_), 2) => {
                    if let Some(index) = layer_index(name, ".resblocks.") {
                        vision_layers.insert(index);
                        counts.vision_per_token += 2.0 * product(&size);
                    } else if name.ends_with(".proj") {
                        counts.vision_per_image += 2.0 * product(&size);
                    }
                }
                (Unit::PerceiverLayer(_), 2) if name.contains(".layers.") => {
                    if name.ends_with(".to_kv.weight") {
                        counts.perceiver_kv += 2.0 * product(&size);
                    } else {
                        counts.perceiver_latent += 2.0 * product(&size);
                    }
                    if name.ends_with(".to_q.weight") {
                        counts.perceiver_inner += size[0] as f64;
                    }
                }
                (Unit::Perceiver, 2) if name.ends_with(".latents") => {
                    counts.latents = size[0] as f64;
                }
                (_, 2) if name.starts_with("lang_encoder.gated_cross_attn_layers.") => {
                    if name.ends_with(".to_kv.weight") {
                        counts.cross_kv += 2.0 * product(&size);
                    } else {
                        counts.cross_text += 2.0 * product(&size);
                    }
                    if name.ends_with(".to_q.weight") {
                        counts.cross_inner += size[0] as f64;
                    }
                }
                (Unit::Text | Unit::Layer(_), 2) => counts.decoder += 2.0 * product(&size),
                _ => {}
            }
        }
        counts.vision_layers = vision_layers.len() as f64;
        counts
    }

    /// FLOPs of a forward and backward pass over `batch` samples of
    /// `images` image slots and `tokens` text tokens each.
    pub fn batch_flops(&self, batch: f64, images: f64, tokens: f64) -> f64 {
        let pictures = batch * images;
        let vision_tokens = self.patches + 1.0;
        let vision = pictures
            * (self.vision_per_patch * self.patches
                + self.vision_per_image
                + self.vision_per_token * vision_tokens
                + self.vision_layers * 4.0 * vision_tokens * vision_tokens * self.vision_width);
        let media = self.patches + self.latents;
        let perceiver = pictures
            * (self.perceiver_kv * media
                + self.perceiver_latent * self.latents
                + 4.0 * self.latents * media * self.perceiver_inner);
        let media_latents = images * self.latents;
        let cross = batch
            * (self.cross_kv * media_latents
                + self.cross_text * tokens
                + 4.0 * tokens * media_latents * self.cross_inner);
        let decoder = batch
            * (self.decoder * tokens + self.decoder_layers * 4.0 * tokens * tokens * self.hidden);
        let head = batch * self.head * tokens;
        let attention_of_decoder =
            batch * self.decoder_layers * 4.0 * tokens * tokens * self.hidden;
        vision
            + 3.0 * perceiver
            + 3.0 * cross
            // Frozen weights: input gradients only; the attention's score
            // products differentiate both of their operands.
            + 2.0 * decoder
            + attention_of_decoder
            + if self.head_trains { 3.0 } else { 2.0 } * head
    }
}
