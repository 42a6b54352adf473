//! The Flamingo model (reference §1): a frozen CLIP vision tower, the
//! Perceiver resampler, and a decoder LM with a gated cross-attention block
//! before decoder layer `i` whenever `(i + 1) % cross_attn_every_n_layers == 0`
//! (OpenFlamingo's `FlamingoLMMixin.init_flamingo`; the block runs first,
//! then the original layer).
//!
//! Weight names follow OpenFlamingo's state dict: `vision_encoder.*`,
//! `perceiver.*`, `lang_encoder.gated_cross_attn_layers.{i}.*`; the decoder
//! keeps its Hugging Face names (see [`crate::Decoder`]).

use tch::{Kind, Tensor};

use crate::cross_attention::{GatedCrossAttentionBlock, MediaMask};
use crate::decoder::Decoder;
use crate::perceiver::{PerceiverConfig, PerceiverResampler};
use crate::vision::VisionTransformer;
use crate::{ModelError, Result, Weights};

/// Sizes of OpenFlamingo's cross-attention blocks (`helpers.py` defaults).
const XATTN_DIM_HEAD: i64 = 64;
const XATTN_HEADS: i64 = 8;
const XATTN_FF_MULT: i64 = 4;

#[derive(Debug)]
pub struct Flamingo {
    vision: VisionTransformer,
    perceiver: PerceiverResampler,
    decoder: Decoder,
    /// One entry per decoder layer; `Some` where a block precedes it.
    cross_attention: Vec<Option<GatedCrossAttentionBlock>>,
    media_token_id: i64,
}

impl Flamingo {
    /// Assembles the model. `weights` holds the vision tower, perceiver and
    /// cross-attention weights under OpenFlamingo's names.
    pub fn load(
        weights: &mut Weights,
        vision: VisionTransformer,
        decoder: Decoder,
        cross_attn_every_n_layers: i64,
        media_token_id: i64,
    ) -> Result<Self> {
        if cross_attn_every_n_layers < 1 {
            return Err(ModelError::Config(
                "cross_attn_every_n_layers must be at least 1".to_string(),
            ));
        }
        let vis_dim = vision.config().width;
        let perceiver = PerceiverResampler::load(
            weights,
            "perceiver",
            PerceiverConfig::open_flamingo(vis_dim),
        )?;
        let lang_dim = decoder.config().hidden_size;
        let cross_attention = (0..decoder.config().layers)
            .map(|index| {
                if (index + 1) % cross_attn_every_n_layers != 0 {
                    return Ok(None);
                }
                GatedCrossAttentionBlock::load(
                    weights,
                    &format!("lang_encoder.gated_cross_attn_layers.{index}"),
                    lang_dim,
                    vis_dim,
                    XATTN_DIM_HEAD,
                    XATTN_HEADS,
                    XATTN_FF_MULT,
                )
                .map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vision,
            perceiver,
            decoder,
            cross_attention,
            media_token_id,
        })
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// `vision_x`: `[b, t_img, frames = 1, 3, h, w]` → media latents
    /// `[b, t_img, 64, vis_dim]` (the frozen tower runs without gradients).
    pub fn encode_vision(&self, vision_x: &Tensor) -> Result<Tensor> {
        let size = vision_x.size();
        let [batch, media, frames, channels, height, width] = size[..] else {
            return Err(ModelError::Input(format!(
                "vision_x must be [batch, images, frames, 3, height, width], got {size:?}"
            )));
        };
        if frames != 1 {
            return Err(ModelError::Input(format!(
                "only single-frame media are supported (frames = 1), got {frames}"
            )));
        }
        let images = vision_x.reshape([batch * media * frames, channels, height, width]);
        let tokens = tch::no_grad(|| self.vision.forward(&images))?.patch_tokens;
        let token_size = tokens.size();
        let features = tokens.reshape([batch, media, frames, token_size[1], token_size[2]]);
        self.perceiver.forward(&features)
    }

    /// Logits `[b, t, vocab]` for text `lang_x` `[b, t]` conditioned on the
    /// images `vision_x`; each token attends to the latest `<image>` at or
    /// before it.
    pub fn forward(&self, vision_x: &Tensor, lang_x: &Tensor) -> Result<Tensor> {
        let media = self.encode_vision(vision_x)?;
        let media_locations = lang_x.eq(self.media_token_id);
        let images_in_text = media_locations
            .to_kind(Kind::Int64)
            .sum_dim_intlist(-1, false, Kind::Int64)
            .max()
            .int64_value(&[]);
        let images_given = media.size()[1];
        if images_in_text > images_given {
            return Err(ModelError::Input(format!(
                "the text has {images_in_text} <image> tokens but only {images_given} images were given"
            )));
        }
        let length = lang_x.size()[1];
        let context = self.decoder.attention_context(length, 0, lang_x.device());
        let config = self.decoder.config();
        let mut hidden = self.decoder.embed(lang_x);
        for (layer, block) in self.decoder.layers().iter().zip(&self.cross_attention) {
            if let Some(block) = block {
                hidden = block.forward(&hidden, &media, MediaMask::Locations(&media_locations))?;
            }
            hidden = layer.forward(&hidden, &context, config);
        }
        Ok(self.decoder.head(&hidden))
    }
}
