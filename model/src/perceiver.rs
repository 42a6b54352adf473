//! The Perceiver resampler (reference §1.2, OpenFlamingo `helpers.py`):
//! turns each image's patch tokens into a fixed number of latents.
//!
//! Per layer: `latents += Attn(media, latents)`, then `latents += FF(latents)`;
//! a final LayerNorm closes. Attention normalises media and latents
//! separately, takes queries from the latents and keys/values from the
//! concatenation `[media; latents]`, with no biases. Each image (time step) is
//! resampled independently. Optional frame and media-time embeddings exist
//! upstream (`max_num_frames`, `max_num_media`); the released models use
//! neither, but they load and apply when present.

use tch::Tensor;

use crate::layers::{merge_heads, split_heads, FeedForward, LayerNorm, Linear};
use crate::{ModelError, Result, Weights};

#[derive(Debug, Clone, PartialEq)]
pub struct PerceiverConfig {
    pub dim: i64,
    pub depth: i64,
    pub dim_head: i64,
    pub heads: i64,
    pub num_latents: i64,
    pub ff_mult: i64,
    pub max_num_media: Option<i64>,
    pub max_num_frames: Option<i64>,
}

impl PerceiverConfig {
    /// OpenFlamingo's settings for a vision width `dim` (1024 for ViT-L/14).
    pub fn open_flamingo(dim: i64) -> Self {
        Self {
            dim,
            depth: 6,
            dim_head: 64,
            heads: 8,
            num_latents: 64,
            ff_mult: 4,
            max_num_media: None,
            max_num_frames: None,
        }
    }
}

#[derive(Debug)]
struct PerceiverAttention {
    norm_media: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: i64,
    scale: f64,
}

impl PerceiverAttention {
    fn load(weights: &mut Weights, prefix: &str, config: &PerceiverConfig) -> Result<Self> {
        let inner = config.dim_head * config.heads;
        Ok(Self {
            norm_media: LayerNorm::load(weights, &format!("{prefix}.norm_media"), config.dim)?,
            norm_latents: LayerNorm::load(weights, &format!("{prefix}.norm_latents"), config.dim)?,
            to_q: Linear::load(weights, &format!("{prefix}.to_q.weight"), config.dim, inner)?,
            to_kv: Linear::load(
                weights,
                &format!("{prefix}.to_kv.weight"),
                config.dim,
                2 * inner,
            )?,
            to_out: Linear::load(
                weights,
                &format!("{prefix}.to_out.weight"),
                inner,
                config.dim,
            )?,
            heads: config.heads,
            scale: (config.dim_head as f64).powf(-0.5),
        })
    }

    /// `media`: [b, t, n_media, d]; `latents`: [b, t, n_latents, d].
    fn forward(&self, media: &Tensor, latents: &Tensor) -> Tensor {
        // The norms and the concatenation are recorded for selective
        // recompute ([`crate::recompute`]).
        let media = self.norm_media.forward_recorded(media);
        let latents = self.norm_latents.forward_recorded(latents);
        let queries = self.to_q.forward(&latents);
        let keys_values =
            self.to_kv
                .forward(&crate::recompute::cheap(crate::recompute::Cheap::Cat {
                    parts: vec![media, latents],
                    dim: -2,
                }));
        let halves = keys_values.chunk(2, -1);
        let queries = split_heads(&queries, self.heads) * self.scale;
        let keys = split_heads(&halves[0], self.heads);
        let values = split_heads(&halves[1], self.heads);
        // PyTorch's fused attention over [b, h·t, n, d] (fused kernels take
        // 4-D inputs); no mask, and the queries already carry the scale.
        let shape = queries.size();
        let fold = |x: &Tensor| {
            let size = x.size();
            x.reshape([size[0], size[1] * size[2], size[3], size[4]])
        };
        let attended = Tensor::scaled_dot_product_attention(
            &fold(&queries),
            &fold(&keys),
            &fold(&values),
            None::<&Tensor>,
            0.0,
            false,
            1.0,
            false,
        );
        self.to_out
            .forward(&merge_heads(&attended.reshape(shape.as_slice())))
    }
}

#[derive(Debug)]
pub struct PerceiverResampler {
    config: PerceiverConfig,
    latents: Tensor,
    frame_embs: Option<Tensor>,
    media_time_embs: Option<Tensor>,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    norm: LayerNorm,
}

impl PerceiverResampler {
    /// Builds the resampler from weights named as OpenFlamingo's state dict
    /// names them under `prefix` (e.g. `perceiver`).
    pub fn load(weights: &mut Weights, prefix: &str, config: PerceiverConfig) -> Result<Self> {
        let dim = config.dim;
        let latents = weights.take(&format!("{prefix}.latents"), &[config.num_latents, dim])?;
        let frame_embs = match config.max_num_frames {
            Some(frames) => Some(weights.take(&format!("{prefix}.frame_embs"), &[frames, dim])?),
            None => None,
        };
        let media_time_embs = match config.max_num_media {
            Some(media) => {
                Some(weights.take(&format!("{prefix}.media_time_embs"), &[media, 1, dim])?)
            }
            None => None,
        };
        let layers = (0..config.depth)
            .map(|index| {
                Ok((
                    PerceiverAttention::load(
                        weights,
                        &format!("{prefix}.layers.{index}.0"),
                        &config,
                    )?,
                    FeedForward::load(
                        weights,
                        &format!("{prefix}.layers.{index}.1"),
                        dim,
                        config.ff_mult,
                    )?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::load(weights, &format!("{prefix}.norm"), dim)?;
        Ok(Self {
            config,
            latents,
            frame_embs,
            media_time_embs,
            layers,
            norm,
        })
    }

    pub fn config(&self) -> &PerceiverConfig {
        &self.config
    }

    /// `features`: [b, t_img, frames, tokens, d] → [b, t_img, num_latents, d].
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (media_tokens, mut latents) = self.inputs(features)?;
        if self.layers.is_empty() {
            return Ok(self.norm.forward_to_matmul(&latents));
        }
        for index in 0..self.layers.len() {
            latents = self.layer(index, &media_tokens, &latents);
        }
        Ok(latents)
    }

    /// Layers (attention and feed-forward each).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// [`Self::forward`] in pieces, as the training engine runs it a layer
    /// at a time: the media tokens every layer attends to (`features` with
    /// the frame and time embeddings, `[b, t_img, frames · tokens, d]`) and
    /// the learned latents, `[b, t_img, num_latents, d]`, the first layer's
    /// input.
    pub fn inputs(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = features.size();
        let [batch, media, frames, tokens, dim] = size[..] else {
            return Err(ModelError::Input {
                input: "features",
                message: format!(
                    "perceiver input must be [batch, media, frames, tokens, dim], got {size:?}"
                ),
            });
        };
        if dim != self.config.dim {
            return Err(ModelError::Input {
                input: "features",
                message: format!(
                    "perceiver expects feature width {}, got {dim}",
                    self.config.dim
                ),
            });
        }
        // Out-of-place adds throughout: the input must not be modified.
        let with_frames = match &self.frame_embs {
            Some(frame_embs) => {
                let limit = frame_embs.size()[0];
                if frames > limit {
                    return Err(ModelError::Input {
                        input: "features",
                        message: format!(
                            "{frames} frames per media exceed max_num_frames = {limit}"
                        ),
                    });
                }
                features + frame_embs.narrow(0, 0, frames).view([1, 1, frames, 1, dim])
            }
            None => features.shallow_clone(),
        };
        let flat = with_frames.reshape([batch, media, frames * tokens, dim]);
        let media_tokens = match &self.media_time_embs {
            Some(time_embs) => {
                let limit = time_embs.size()[0];
                if media > limit {
                    return Err(ModelError::Input {
                        input: "features",
                        message: format!("{media} media exceed max_num_media = {limit}"),
                    });
                }
                flat + time_embs.narrow(0, 0, media).unsqueeze(0)
            }
            None => flat,
        };
        let latents = self
            .latents
            .view([1, 1, self.config.num_latents, dim])
            .expand([batch, media, self.config.num_latents, dim], false);
        Ok((media_tokens, latents))
    }

    /// Layer `index` of [`Self::inputs`]' media tokens and the latents
    /// before it; the last layer also applies the final norm.
    pub fn layer(&self, index: usize, media_tokens: &Tensor, latents: &Tensor) -> Tensor {
        let (attention, feed_forward) = &self.layers[index];
        let latents = attention.forward(media_tokens, latents) + latents;
        let latents = feed_forward.forward(&latents) + &latents;
        if index + 1 == self.layers.len() {
            // The media latents enter only the cross-attention's key/value
            // projections.
            self.norm.forward_to_matmul(&latents)
        } else {
            latents
        }
    }
}
