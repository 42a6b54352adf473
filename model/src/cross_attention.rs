//! Gated cross-attention (reference §1.3, OpenFlamingo `helpers.py`): text
//! tokens attend to the resampled media latents; tanh gates (initialised to
//! zero upstream, so the block starts as the identity) scale both branches.
//!
//! Masking: a token's "text time" is the number of `<image>` tokens at or
//! before it; media `j` has time `j + 1`. With `only_attend_immediate_media`
//! (hard-wired upstream) a token sees only the latents of the media whose
//! time equals its own; tokens before the first image get zero attention
//! output. In cached mode (generation) every new token takes the text time of
//! the last cached image.

use tch::{Kind, Tensor};

use crate::layers::{merge_heads, split_heads, stable_softmax, FeedForward, LayerNorm, Linear};
use crate::recompute::Cheap;
use crate::{ModelError, Result, Weights};

/// Which media each text token may attend to.
#[derive(Debug, Clone, Copy)]
pub enum MediaMask<'a> {
    /// `[batch, text_len]` booleans marking `<image>` tokens in the text.
    Locations(&'a Tensor),
    /// `[batch, cached_len]` `<image>` markers of the text seen so far; every
    /// incoming token attends to the last of those images.
    Cached(&'a Tensor),
}

#[derive(Debug)]
pub struct MaskedCrossAttention {
    norm: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: i64,
    scale: f64,
    only_attend_immediate_media: bool,
}

impl MaskedCrossAttention {
    pub fn load(
        weights: &mut Weights,
        prefix: &str,
        dim: i64,
        dim_visual: i64,
        dim_head: i64,
        heads: i64,
    ) -> Result<Self> {
        let inner = dim_head * heads;
        Ok(Self {
            norm: LayerNorm::load(weights, &format!("{prefix}.norm"), dim)?,
            to_q: Linear::load(weights, &format!("{prefix}.to_q.weight"), dim, inner)?,
            to_kv: Linear::load(
                weights,
                &format!("{prefix}.to_kv.weight"),
                dim_visual,
                2 * inner,
            )?,
            to_out: Linear::load(weights, &format!("{prefix}.to_out.weight"), inner, dim)?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
            only_attend_immediate_media: true,
        })
    }

    /// Attend to all earlier media instead of only the most recent one (not
    /// used by OpenFlamingo's released models).
    pub fn attend_all_previous_media(mut self) -> Self {
        self.only_attend_immediate_media = false;
        self
    }

    /// `text`: [b, t_txt, d]; `media`: [b, t_img, n, d_visual].
    pub fn forward(&self, text: &Tensor, media: &Tensor, mask: MediaMask<'_>) -> Result<Tensor> {
        let text_size = text.size();
        let media_size = media.size();
        let (&[batch, text_len, _], &[_, media_count, latents, _]) =
            (&text_size[..], &media_size[..])
        else {
            return Err(ModelError::Input { input: "media", message: format!(
                "cross-attention expects text [b, t, d] and media [b, t_img, n, d], got {text_size:?} and {media_size:?}"
            ) });
        };
        let queries = split_heads(
            &self.to_q.forward(&self.norm.forward_recorded(text)),
            self.heads,
        ) * self.scale;
        let media_flat = media.reshape([batch, media_count * latents, media_size[3]]);
        let keys_values = self.to_kv.forward(&media_flat).chunk(2, -1);
        let keys = split_heads(&keys_values[0], self.heads);
        let values = split_heads(&keys_values[1], self.heads);
        let text_time = match mask {
            MediaMask::Locations(locations) => {
                if locations.size() != [batch, text_len] {
                    return Err(ModelError::Input {
                        input: "media_locations",
                        message: format!(
                            "media locations {:?} do not match the text [{batch}, {text_len}]",
                            locations.size()
                        ),
                    });
                }
                locations.to_kind(Kind::Int64).cumsum(-1, Kind::Int64)
            }
            MediaMask::Cached(locations) => {
                let seen = locations
                    .to_kind(Kind::Int64)
                    .sum_dim_intlist(-1, true, Kind::Int64);
                seen.expand([batch, text_len], false)
            }
        };
        // Media j (0-based) has time j + 1; each of its latents shares it.
        let media_time = Tensor::arange_start(1, media_count + 1, (Kind::Int64, text.device()))
            .repeat_interleave_self_int(latents, 0, None)
            .view([1, 1, 1, media_count * latents]);
        let token_time = text_time.view([batch, 1, text_len, 1]);
        let attended = if self.only_attend_immediate_media {
            // PyTorch's fused attention (the memory-efficient kernel on a
            // GPU) with a boolean mask. A token before the first image has
            // no media to see: its row is let see everything, so that the
            // softmax stays finite, and its output is then zeroed, as
            // upstream does — no gradient flows through that row either.
            let before_any_media = text_time.eq(0).view([batch, 1, text_len, 1]);
            let allowed = token_time
                .eq_tensor(&media_time)
                .logical_or(&before_any_media);
            Tensor::scaled_dot_product_attention(
                &queries,
                &keys,
                &values,
                Some(&allowed),
                0.0,
                false,
                // The queries already carry the scale, as upstream's do.
                1.0,
                false,
            )
            .masked_fill(&before_any_media, 0.0)
        } else {
            // Upstream's explicit softmax: a token before any media keeps a
            // uniform row over the masked scores, which fused attention
            // would not reproduce.
            let scores = queries.matmul(&keys.transpose(-1, -2));
            let lowest = crate::layers::lowest(scores.kind());
            let scores =
                scores.masked_fill(&token_time.ge_tensor(&media_time).logical_not(), lowest);
            stable_softmax(&scores).matmul(&values)
        };
        Ok(self.to_out.forward(&merge_heads(&attended)))
    }
}

/// `x = tanh(attn_gate)·XAttn(x, media) + x; x = tanh(ff_gate)·FF(x) + x`.
#[derive(Debug)]
pub struct GatedCrossAttentionBlock {
    attention: MaskedCrossAttention,
    attention_gate: Tensor,
    feed_forward: FeedForward,
    feed_forward_gate: Tensor,
}

impl GatedCrossAttentionBlock {
    /// Loads `<prefix>.attn.*`, `<prefix>.attn_gate`, `<prefix>.ff.*` and
    /// `<prefix>.ff_gate` with OpenFlamingo's sizes (8 heads of 64, ff ×4)
    /// unless given otherwise.
    pub fn load(
        weights: &mut Weights,
        prefix: &str,
        dim: i64,
        dim_visual: i64,
        dim_head: i64,
        heads: i64,
        ff_mult: i64,
    ) -> Result<Self> {
        Ok(Self {
            attention: MaskedCrossAttention::load(
                weights,
                &format!("{prefix}.attn"),
                dim,
                dim_visual,
                dim_head,
                heads,
            )?,
            attention_gate: weights.take(&format!("{prefix}.attn_gate"), &[1])?,
            feed_forward: FeedForward::load(weights, &format!("{prefix}.ff"), dim, ff_mult)?,
            feed_forward_gate: weights.take(&format!("{prefix}.ff_gate"), &[1])?,
        })
    }

    pub fn forward(&self, text: &Tensor, media: &Tensor, mask: MediaMask<'_>) -> Result<Tensor> {
        // The residuals are recorded for selective recompute
        // ([`crate::recompute`]); the block's output is not (the next
        // layer's input).
        let attended = crate::recompute::cheap(Cheap::GatedResidual {
            branch: self.attention.forward(text, media, mask)?,
            gate: self.attention_gate.shallow_clone(),
            skip: text.shallow_clone(),
        });
        Ok(crate::recompute::gated_residual(
            &self.feed_forward.forward(&attended),
            &self.feed_forward_gate,
            &attended,
        ))
    }
}
