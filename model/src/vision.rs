//! The CLIP vision transformer in open_clip's layout and weight names
//! (reference §1.1): `conv1` patch embedding (no bias), `class_embedding`,
//! `positional_embedding`, `ln_pre`, residual blocks
//! (`transformer.resblocks.{i}`: `ln_1`, `attn.in_proj_*`/`attn.out_proj.*`,
//! `ln_2`, `mlp.c_fc`/`mlp.c_proj`), `ln_post` and `proj`.
//!
//! Flamingo uses the patch tokens (CLS dropped). The released checkpoints
//! were trained on the tokens *before* `ln_post` (open_clip ≤ 2.22 returned
//! those), so that is the default; `tokens_after_ln_post` switches to what
//! open_clip ≥ 2.23 returns.

use tch::Tensor;

use crate::layers::{merge_heads, split_heads, LayerNorm, Linear};
use crate::{ModelError, Result, Weights};

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub mlp_ratio: f64,
    /// Width of the pooled, projected embedding (`proj`'s columns).
    pub output_dim: i64,
    /// OpenAI's CLIP weights use QuickGELU (`x·σ(1.702x)`); others GELU.
    pub quick_gelu: bool,
    /// Return patch tokens after `ln_post` instead of before.
    pub tokens_after_ln_post: bool,
}

impl VisionConfig {
    /// open_clip's `ViT-L-14` with OpenAI's weights, as OpenFlamingo uses it.
    pub fn vit_l_14() -> Self {
        Self {
            image_size: 224,
            patch_size: 14,
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_ratio: 4.0,
            output_dim: 768,
            quick_gelu: true,
            tokens_after_ln_post: false,
        }
    }

    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    pub fn mlp_width(&self) -> i64 {
        (self.width as f64 * self.mlp_ratio) as i64
    }
}

#[derive(Debug)]
struct ResidualBlock {
    ln_1: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: i64,
    quick_gelu: bool,
}

impl ResidualBlock {
    fn load(weights: &mut Weights, prefix: &str, config: &VisionConfig) -> Result<Self> {
        let width = config.width;
        let mlp = config.mlp_width();
        let in_proj = Linear::from_parts(
            weights.take(
                &format!("{prefix}.attn.in_proj_weight"),
                &[3 * width, width],
            )?,
            Some(weights.take(&format!("{prefix}.attn.in_proj_bias"), &[3 * width])?),
        );
        Ok(Self {
            ln_1: LayerNorm::load(weights, &format!("{prefix}.ln_1"), width)?,
            in_proj,
            out_proj: Linear::load_with_bias(
                weights,
                &format!("{prefix}.attn.out_proj"),
                width,
                width,
            )?,
            ln_2: LayerNorm::load(weights, &format!("{prefix}.ln_2"), width)?,
            c_fc: Linear::load_with_bias(weights, &format!("{prefix}.mlp.c_fc"), width, mlp)?,
            c_proj: Linear::load_with_bias(weights, &format!("{prefix}.mlp.c_proj"), mlp, width)?,
            heads: config.heads,
            quick_gelu: config.quick_gelu,
        })
    }

    fn attention(&self, input: &Tensor) -> Tensor {
        let qkv = self.in_proj.forward(input).chunk(3, -1);
        let queries = split_heads(&qkv[0], self.heads);
        let keys = split_heads(&qkv[1], self.heads);
        let values = split_heads(&qkv[2], self.heads);
        // softmax(q·kᵀ/√d)·v, unmasked, as nn.MultiheadAttention computes it
        // (PyTorch's fused kernels: flash attention on a GPU).
        let attended = Tensor::scaled_dot_product_attention(
            &queries,
            &keys,
            &values,
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.out_proj.forward(&merge_heads(&attended))
    }

    fn activation(&self, input: &Tensor) -> Tensor {
        if self.quick_gelu {
            input * (input * 1.702).sigmoid()
        } else {
            input.gelu("none")
        }
    }

    fn forward(&self, input: &Tensor) -> Tensor {
        let attended = input + self.attention(&self.ln_1.forward_to_matmul(input));
        let hidden = self.activation(&self.c_fc.forward(&self.ln_2.forward_to_matmul(&attended)));
        &attended + self.c_proj.forward(&hidden)
    }
}

/// Output of the vision tower for a batch of images.
#[derive(Debug)]
pub struct VisionOutput {
    /// `[n, grid², width]`: patch tokens, CLS dropped.
    pub patch_tokens: Tensor,
    /// `[n, output_dim]`: `ln_post(CLS) · proj`, CLIP's image embedding.
    pub pooled: Tensor,
}

#[derive(Debug)]
pub struct VisionTransformer {
    config: VisionConfig,
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResidualBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl VisionTransformer {
    /// Loads the tower from open_clip names under `prefix` (`visual` in an
    /// open_clip CLIP state dict, `vision_encoder` in OpenFlamingo's).
    pub fn load(weights: &mut Weights, prefix: &str, config: VisionConfig) -> Result<Self> {
        let width = config.width;
        let patch = config.patch_size;
        let positions = config.grid() * config.grid() + 1;
        let blocks = (0..config.layers)
            .map(|index| {
                ResidualBlock::load(
                    weights,
                    &format!("{prefix}.transformer.resblocks.{index}"),
                    &config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1: weights.take(&format!("{prefix}.conv1.weight"), &[width, 3, patch, patch])?,
            class_embedding: weights.take(&format!("{prefix}.class_embedding"), &[width])?,
            positional_embedding: weights.take(
                &format!("{prefix}.positional_embedding"),
                &[positions, width],
            )?,
            ln_pre: LayerNorm::load(weights, &format!("{prefix}.ln_pre"), width)?,
            blocks,
            ln_post: LayerNorm::load(weights, &format!("{prefix}.ln_post"), width)?,
            proj: weights.take(&format!("{prefix}.proj"), &[width, config.output_dim])?,
            config,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Residual blocks.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The patch embedding, class token, positions and `ln_pre`: `images`
    /// `[n, 3, image_size, image_size]` → the first block's input
    /// `[n, 1 + patches, width]`.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let size = images.size();
        let expected = [3, self.config.image_size, self.config.image_size];
        if size.len() != 4 || size[1..] != expected {
            return Err(ModelError::Input {
                input: "images",
                message: format!(
                    "images must be [n, 3, {0}, {0}], got {size:?}",
                    self.config.image_size
                ),
            });
        }
        let batch = size[0];
        let width = self.config.width;
        let patches = images
            .conv2d::<Tensor>(&self.conv1, None, [self.config.patch_size], [0], [1], 1)
            .reshape([batch, width, -1])
            .permute([0, 2, 1]);
        let class_token = self
            .class_embedding
            .to_kind(patches.kind())
            .view([1, 1, width])
            .expand([batch, 1, width], false);
        let tokens = Tensor::cat(&[class_token, patches], 1)
            + self.positional_embedding.to_kind(images.kind());
        Ok(self.ln_pre.forward(&tokens))
    }

    /// Residual block `index` (below [`Self::block_count`]).
    pub fn block(&self, index: usize, hidden: &Tensor) -> Tensor {
        self.blocks[index].forward(hidden)
    }

    /// The patch tokens `[n, patches, width]` from the last block's output.
    pub fn patch_tokens(&self, hidden: &Tensor) -> Tensor {
        let source = if self.config.tokens_after_ln_post {
            self.ln_post.forward(hidden)
        } else {
            hidden.shallow_clone()
        };
        let patch_count = hidden.size()[1] - 1;
        source.narrow(1, 1, patch_count)
    }

    /// `images`: `[n, 3, image_size, image_size]`, already CLIP-normalised.
    pub fn forward(&self, images: &Tensor) -> Result<VisionOutput> {
        let mut hidden = self.embed(images)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden);
        }
        let pooled = self
            .ln_post
            .forward(&hidden)
            .select(1, 0)
            .matmul(&self.proj.to_kind(images.kind()));
        Ok(VisionOutput {
            patch_tokens: self.patch_tokens(&hidden),
            pooled,
        })
    }
}
