//! Decoder-only language models with Hugging Face's weight names and
//! numerics, one layer at a time so Flamingo can put a gated cross-attention
//! block before chosen layers:
//!
//! - MPT (`transformer.blocks.{i}`): LayerNorm without bias, fused `Wqkv`,
//!   ALiBi position bias, GELU MLP of 4 × d_model, no biases, tied embeddings.
//! - GPT-NeoX (`gpt_neox.layers.{i}`): per-head interleaved `query_key_value`,
//!   partial rotary embedding, parallel residual, biases everywhere.
//! - LLaMA (`model.layers.{i}`): RMSNorm, full rotary embedding, SwiGLU MLP,
//!   optional grouped key/value heads.
//!
//! Attention scores are masked with the lowest value of their own precision
//! and softmaxed in fp32, as the Hugging Face eager implementations do.

use tch::{Device, Kind, Tensor};

use crate::decoder_config::{DecoderConfig, DecoderFamily};
use crate::layers::{LayerNorm, Linear, RmsNorm};
use crate::{ModelError, Result, Weights};

#[derive(Debug)]
enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(weights: &mut Weights, prefix: &str, config: &DecoderConfig) -> Result<Self> {
        let dim = config.hidden_size;
        Ok(match config.family {
            DecoderFamily::Llama => {
                Norm::Rms(RmsNorm::load(weights, prefix, dim, config.norm_eps)?)
            }
            DecoderFamily::Mpt => Norm::Layer(LayerNorm::load_with(
                weights,
                prefix,
                dim,
                config.norm_eps,
                false,
            )?),
            DecoderFamily::GptNeox => Norm::Layer(LayerNorm::load_with(
                weights,
                prefix,
                dim,
                config.norm_eps,
                true,
            )?),
        })
    }

    fn forward(&self, input: &Tensor) -> Tensor {
        match self {
            // Every decoder norm is a pre-norm or the final norm before the
            // head: its output only enters matrix products.
            Norm::Layer(norm) => norm.forward_to_matmul(input),
            Norm::Rms(norm) => norm.forward(input),
        }
    }
}

fn linear(
    weights: &mut Weights,
    prefix: &str,
    input: i64,
    output: i64,
    bias: bool,
) -> Result<Linear> {
    if bias {
        Linear::load_with_bias(weights, prefix, input, output)
    } else {
        Linear::load(weights, &format!("{prefix}.weight"), input, output)
    }
}

/// Per-call attention inputs shared by every layer: rotary tables or the
/// ALiBi bias, and the causal mask, for `query_len` new positions after
/// `past_len` cached ones.
#[derive(Debug)]
pub struct AttentionContext {
    cos: Option<Tensor>,
    sin: Option<Tensor>,
    alibi: Option<Tensor>,
    /// True where attention is NOT allowed: `[query_len, key_len]`, or
    /// `[batch, 1, query_len, key_len]` with padding.
    blocked: Tensor,
}

#[derive(Debug)]
enum Mixer {
    Mpt {
        wqkv: Linear,
    },
    GptNeox {
        query_key_value: Linear,
    },
    Llama {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
}

#[derive(Debug)]
enum FeedForward {
    /// MPT and GPT-NeoX: `down(act(up(x)))`.
    Plain { up: Linear, down: Linear },
    /// LLaMA: `down(act(gate(x)) · up(x))`.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

#[derive(Debug)]
pub struct DecoderLayer {
    input_norm: Norm,
    mixer: Mixer,
    out_proj: Linear,
    post_norm: Norm,
    feed_forward: FeedForward,
}

/// A layer's (hidden, attention inner, feed-forward inner) widths.
fn sizes(config: &DecoderConfig) -> (i64, i64, i64) {
    (
        config.hidden_size,
        config.heads * config.head_dim,
        config.intermediate_size,
    )
}

/// One layer's weights, named under its prefix.
struct Prefixed<'a> {
    weights: &'a mut Weights,
    prefix: String,
    config: &'a DecoderConfig,
}

impl<'a> Prefixed<'a> {
    fn new(weights: &'a mut Weights, prefix: String, config: &'a DecoderConfig) -> Self {
        Self {
            weights,
            prefix,
            config,
        }
    }

    fn linear(&mut self, name: &str, input: i64, output: i64, bias: bool) -> Result<Linear> {
        linear(
            self.weights,
            &format!("{}.{name}", self.prefix),
            input,
            output,
            bias,
        )
    }

    fn norm(&mut self, name: &str) -> Result<Norm> {
        Norm::load(
            self.weights,
            &format!("{}.{name}", self.prefix),
            self.config,
        )
    }
}

impl DecoderLayer {
    fn load(weights: &mut Weights, index: i64, config: &DecoderConfig) -> Result<Self> {
        match config.family {
            DecoderFamily::Mpt => Self::load_mpt(weights, index, config),
            DecoderFamily::GptNeox => Self::load_gpt_neox(weights, index, config),
            DecoderFamily::Llama => Self::load_llama(weights, index, config),
        }
    }

    /// MPT's names (`transformer.blocks.N`): fused QKV, no biases.
    fn load_mpt(weights: &mut Weights, index: i64, config: &DecoderConfig) -> Result<Self> {
        let (hidden, inner, mlp) = sizes(config);
        let mut at = Prefixed::new(weights, format!("transformer.blocks.{index}"), config);
        Ok(Self {
            input_norm: at.norm("norm_1")?,
            mixer: Mixer::Mpt {
                wqkv: at.linear("attn.Wqkv", hidden, 3 * inner, false)?,
            },
            out_proj: at.linear("attn.out_proj", inner, hidden, false)?,
            post_norm: at.norm("norm_2")?,
            feed_forward: FeedForward::Plain {
                up: at.linear("ffn.up_proj", hidden, mlp, false)?,
                down: at.linear("ffn.down_proj", mlp, hidden, false)?,
            },
        })
    }

    /// GPT-NeoX's names (`gpt_neox.layers.N`): fused QKV.
    fn load_gpt_neox(weights: &mut Weights, index: i64, config: &DecoderConfig) -> Result<Self> {
        let (hidden, inner, mlp) = sizes(config);
        let (bias, mlp_bias) = (config.attention_bias, config.mlp_bias);
        let mut at = Prefixed::new(weights, format!("gpt_neox.layers.{index}"), config);
        Ok(Self {
            input_norm: at.norm("input_layernorm")?,
            mixer: Mixer::GptNeox {
                query_key_value: at.linear("attention.query_key_value", hidden, 3 * inner, bias)?,
            },
            out_proj: at.linear("attention.dense", inner, hidden, bias)?,
            post_norm: at.norm("post_attention_layernorm")?,
            feed_forward: FeedForward::Plain {
                up: at.linear("mlp.dense_h_to_4h", hidden, mlp, mlp_bias)?,
                down: at.linear("mlp.dense_4h_to_h", mlp, hidden, mlp_bias)?,
            },
        })
    }

    /// LLaMA's names (`model.layers.N`): separate Q, K, V (grouped K and V
    /// heads) and a gated feed-forward.
    fn load_llama(weights: &mut Weights, index: i64, config: &DecoderConfig) -> Result<Self> {
        let (hidden, inner, mlp) = sizes(config);
        let kv_inner = config.kv_heads * config.head_dim;
        let (bias, mlp_bias) = (config.attention_bias, config.mlp_bias);
        let mut at = Prefixed::new(weights, format!("model.layers.{index}"), config);
        Ok(Self {
            input_norm: at.norm("input_layernorm")?,
            mixer: Mixer::Llama {
                q_proj: at.linear("self_attn.q_proj", hidden, inner, bias)?,
                k_proj: at.linear("self_attn.k_proj", hidden, kv_inner, bias)?,
                v_proj: at.linear("self_attn.v_proj", hidden, kv_inner, bias)?,
            },
            out_proj: at.linear("self_attn.o_proj", inner, hidden, bias)?,
            post_norm: at.norm("post_attention_layernorm")?,
            feed_forward: FeedForward::Gated {
                gate: at.linear("mlp.gate_proj", hidden, mlp, mlp_bias)?,
                up: at.linear("mlp.up_proj", hidden, mlp, mlp_bias)?,
                down: at.linear("mlp.down_proj", mlp, hidden, mlp_bias)?,
            },
        })
    }

    /// Splits `[b, t, n·d]` into `[b, n, t, d]`.
    fn heads(input: &Tensor, heads: i64, head_dim: i64) -> Tensor {
        let size = input.size();
        input
            .reshape([size[0], size[1], heads, head_dim])
            .transpose(1, 2)
    }

    fn attention(
        &self,
        normed: &Tensor,
        context: &AttentionContext,
        config: &DecoderConfig,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let size = normed.size();
        let (batch, length) = (size[0], size[1]);
        let (heads, head_dim) = (config.heads, config.head_dim);
        let (mut queries, mut keys, values) = match &self.mixer {
            Mixer::Mpt { wqkv } => {
                let mut mixed = wqkv.forward(normed);
                if let Some(clip) = config.clip_qkv {
                    mixed = mixed.clamp(-clip, clip);
                }
                let parts = mixed.chunk(3, 2);
                (
                    Self::heads(&parts[0], heads, head_dim),
                    Self::heads(&parts[1], heads, head_dim),
                    Self::heads(&parts[2], heads, head_dim),
                )
            }
            Mixer::GptNeox { query_key_value } => {
                // Per head [q | k | v]: interleaved, unlike MPT's [Q | K | V].
                let mixed = query_key_value
                    .forward(normed)
                    .reshape([batch, length, heads, 3 * head_dim])
                    .transpose(1, 2);
                let parts = mixed.chunk(3, -1);
                (
                    parts[0].shallow_clone(),
                    parts[1].shallow_clone(),
                    parts[2].shallow_clone(),
                )
            }
            Mixer::Llama {
                q_proj,
                k_proj,
                v_proj,
            } => (
                Self::heads(&q_proj.forward(normed), heads, head_dim),
                Self::heads(&k_proj.forward(normed), config.kv_heads, head_dim),
                Self::heads(&v_proj.forward(normed), config.kv_heads, head_dim),
            ),
        };
        if let (Some(cos), Some(sin)) = (&context.cos, &context.sin) {
            queries = apply_rotary(&queries, cos, sin, config.rotary_dims);
            keys = apply_rotary(&keys, cos, sin, config.rotary_dims);
        }
        // Keys and values are cached after the rotary embedding, before the
        // grouped heads are repeated.
        let (keys, values) = match cache {
            Some(cache) => {
                let (keys, values) = match cache.take() {
                    Some((past_keys, past_values)) => (
                        Tensor::cat(&[past_keys, keys], 2),
                        Tensor::cat(&[past_values, values], 2),
                    ),
                    None => (keys, values),
                };
                *cache = Some((keys.shallow_clone(), values.shallow_clone()));
                (keys, values)
            }
            None => (keys, values),
        };
        let (keys, values) = if config.kv_heads != heads {
            let repeat = heads / config.kv_heads;
            (
                keys.repeat_interleave_self_int(repeat, 1, None),
                values.repeat_interleave_self_int(repeat, 1, None),
            )
        } else {
            (keys, values)
        };
        // softmax(q·kᵀ·scale + ALiBi, blocked keys at the dtype's lowest
        // value) · v through PyTorch's fused attention (the memory-efficient
        // kernel on a GPU): the bias and the mask ride in one float mask.
        let kind = queries.kind();
        let lowest = crate::layers::lowest(kind);
        let bias = match &context.alibi {
            Some(alibi) => alibi.to_kind(kind).masked_fill(&context.blocked, lowest),
            None => {
                Tensor::zeros([1], (kind, queries.device())).masked_fill(&context.blocked, lowest)
            }
        };
        let mixed = Tensor::scaled_dot_product_attention(
            &queries,
            &keys,
            &values.to_kind(kind),
            Some(&bias),
            0.0,
            false,
            config.softmax_scale,
            false,
        )
        .transpose(1, 2)
        .reshape([batch, length, heads * head_dim]);
        self.out_proj.forward(&mixed)
    }

    fn feed_forward(&self, normed: &Tensor, config: &DecoderConfig) -> Tensor {
        match &self.feed_forward {
            FeedForward::Plain { up, down } => {
                down.forward(&config.activation.apply(&up.forward(normed)))
            }
            FeedForward::Gated { gate, up, down } => {
                down.forward(&(config.activation.apply(&gate.forward(normed)) * up.forward(normed)))
            }
        }
    }

    /// One layer: `hidden` is `[batch, length, hidden_size]`. With a cache,
    /// the layer's keys and values for these positions are appended to it and
    /// attention covers everything cached so far.
    pub fn forward(
        &self,
        hidden: &Tensor,
        context: &AttentionContext,
        config: &DecoderConfig,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let attended = self.attention(&self.input_norm.forward(hidden), context, config, cache);
        if config.parallel_residual {
            let mlp = self.feed_forward(&self.post_norm.forward(hidden), config);
            mlp + attended + hidden
        } else {
            let after_attention = attended + hidden;
            let mlp = self.feed_forward(&self.post_norm.forward(&after_attention), config);
            mlp + after_attention
        }
    }
}

/// One layer's cached keys and values, `[batch, kv_heads, past, head_dim]`.
pub type LayerCache = Option<(Tensor, Tensor)>;

/// The key/value cache of a whole decoder, for incremental decoding.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|layer| layer.as_ref())
            .map_or(0, |(keys, _)| keys.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `x·cos + rotate_half(x)·sin` on the first `rotary_dims` of each head.
fn apply_rotary(input: &Tensor, cos: &Tensor, sin: &Tensor, rotary_dims: i64) -> Tensor {
    let head_dim = *input.size().last().expect("heads have a last dimension");
    let rotated_part = input.narrow(-1, 0, rotary_dims);
    let half = rotary_dims / 2;
    let first = rotated_part.narrow(-1, 0, half);
    let second = rotated_part.narrow(-1, half, half);
    let rotate_half = Tensor::cat(&[second.neg(), first], -1);
    let rotated = &rotated_part * cos + rotate_half * sin;
    if rotary_dims == head_dim {
        rotated
    } else {
        Tensor::cat(
            &[
                rotated,
                input.narrow(-1, rotary_dims, head_dim - rotary_dims),
            ],
            -1,
        )
    }
}

/// MPT's ALiBi slopes (Press et al. 2021, as MosaicML computes them): for
/// `n` heads rounded up to a power of two `m`, slope_i = 2^(-(i+1)·max/m);
/// when `n < m` the odd-indexed slopes come first. The older MosaicGPT code
/// (`round_to_power_of_two = false`) uses `m = n` and no reordering; the two
/// agree when `n` is a power of two.
fn alibi_slopes(heads: i64, bias_max: f64, round_to_power_of_two: bool) -> Tensor {
    let padded = if round_to_power_of_two {
        (heads as f64).log2().ceil().exp2() as i64
    } else {
        heads
    };
    let exponents = Tensor::arange_start(1, padded + 1, (Kind::Float, Device::Cpu))
        * (bias_max / padded as f64);
    let slopes = exponents.exp2().reciprocal();
    if padded == heads {
        slopes
    } else {
        let odd = slopes.slice(0, 1, padded, 2);
        let even = slopes.slice(0, 0, padded, 2);
        Tensor::cat(&[odd, even], 0).narrow(0, 0, heads)
    }
}

/// MosaicGPT's names → Hugging Face MPT's, in place: within each block
/// `ln_1`/`ln_2` → `norm_1`/`norm_2` and `mlp.mlp_up`/`mlp.mlp_down` →
/// `ffn.up_proj`/`ffn.down_proj`, and `transformer.ln_f` → `transformer.norm_f`.
/// Attention (`attn.Wqkv`, `attn.out_proj`) and `transformer.wte` are
/// named alike in both.
fn rename_mosaic_gpt(weights: &mut Weights) {
    let renamed: Vec<(String, String)> = weights
        .keys()
        .filter_map(|key| {
            if let Some(rest) = key.strip_prefix("transformer.ln_f.") {
                return Some((key.clone(), format!("transformer.norm_f.{rest}")));
            }
            let rest = key.strip_prefix("transformer.blocks.")?;
            let (index, tail) = rest.split_once('.')?;
            let tail = [
                ("ln_1.", "norm_1."),
                ("ln_2.", "norm_2."),
                ("mlp.mlp_up.", "ffn.up_proj."),
                ("mlp.mlp_down.", "ffn.down_proj."),
            ]
            .iter()
            .find_map(|(from, to)| tail.strip_prefix(from).map(|end| format!("{to}{end}")))?;
            Some((key.clone(), format!("transformer.blocks.{index}.{tail}")))
        })
        .collect();
    for (from, to) in renamed {
        weights.rename(&from, &to);
    }
}

#[derive(Debug)]
pub struct Decoder {
    config: DecoderConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Norm,
    lm_head: Tensor,
}

impl Decoder {
    /// Builds the model from Hugging Face names. Checkpoint buffers that the
    /// port recomputes (`rotary_emb.inv_freq`, NeoX's `attention.bias` and
    /// `masked_bias`) are dropped.
    pub fn load(weights: &mut Weights, config: DecoderConfig) -> Result<Self> {
        if config.mosaic_gpt {
            rename_mosaic_gpt(weights);
        }
        let (embed_key, norm_prefix, head_key) = match config.family {
            DecoderFamily::Mpt => (
                "transformer.wte.weight",
                "transformer.norm_f",
                "lm_head.weight",
            ),
            DecoderFamily::GptNeox => (
                "gpt_neox.embed_in.weight",
                "gpt_neox.final_layer_norm",
                "embed_out.weight",
            ),
            DecoderFamily::Llama => ("model.embed_tokens.weight", "model.norm", "lm_head.weight"),
        };
        let shape = [config.vocab_size, config.hidden_size];
        let embed = weights.take(embed_key, &shape)?;
        let layers = (0..config.layers)
            .map(|index| DecoderLayer::load(weights, index, &config))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::load(weights, norm_prefix, &config)?;
        let lm_head = match weights.take_optional(head_key, &shape)? {
            Some(head) => head,
            None if config.tie_word_embeddings => embed.shallow_clone(),
            None => {
                return Err(ModelError::MissingKey {
                    key: head_key.to_string(),
                })
            }
        };
        let recomputed: Vec<String> = weights
            .keys()
            .filter(|key| {
                key.ends_with("rotary_emb.inv_freq")
                    || key.ends_with("attention.masked_bias")
                    || key.ends_with("attention.bias")
            })
            .cloned()
            .collect();
        for key in recomputed {
            weights.discard(&key);
        }
        Ok(Self {
            config,
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// The Hugging Face name of the input embedding matrix.
    pub fn input_embedding_name(&self) -> &'static str {
        match self.config.family {
            DecoderFamily::Mpt => "transformer.wte.weight",
            DecoderFamily::GptNeox => "gpt_neox.embed_in.weight",
            DecoderFamily::Llama => "model.embed_tokens.weight",
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// For a Hugging Face weight name inside decoder layer `i`, the rest of
    /// the name after the layers' prefix (`"{i}.…"`); `None` for the
    /// embedding, final norm and head.
    pub fn layer_suffix<'n>(&self, name: &'n str) -> Option<&'n str> {
        let prefix = match self.config.family {
            DecoderFamily::Mpt => "transformer.blocks.",
            DecoderFamily::GptNeox => "gpt_neox.layers.",
            DecoderFamily::Llama => "model.layers.",
        };
        name.strip_prefix(prefix)
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Token embeddings `[b, t] → [b, t, hidden]`.
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, input_ids, -1, false, false)
    }

    /// Rotary tables / ALiBi and the causal mask for `query_len` positions
    /// following `past_len` cached ones.
    pub fn attention_context(
        &self,
        query_len: i64,
        past_len: i64,
        device: Device,
    ) -> AttentionContext {
        self.attention_context_padded(query_len, past_len, device, None, None)
    }

    /// Like [`Decoder::attention_context`] for left-padded batches:
    /// `key_mask` `[batch, past_len + query_len]` is true for real tokens (keys
    /// that are padding are never attended); `positions` `[batch, query_len]`
    /// overrides the rotary positions (Hugging Face's generate derives them
    /// from the attention mask).
    pub fn attention_context_padded(
        &self,
        query_len: i64,
        past_len: i64,
        device: Device,
        key_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
    ) -> AttentionContext {
        let key_len = past_len + query_len;
        let query_positions =
            Tensor::arange_start(past_len, key_len, (Kind::Int64, device)).view([query_len, 1]);
        let key_positions = Tensor::arange(key_len, (Kind::Int64, device)).view([1, key_len]);
        let causal = key_positions.gt_tensor(&query_positions);
        let blocked = match key_mask {
            Some(mask) => {
                let batch = mask.size()[0];
                causal
                    .unsqueeze(0)
                    .logical_or(&mask.logical_not().view([batch, 1, key_len]))
                    .unsqueeze(1)
            }
            None => causal,
        };
        let config = &self.config;
        let (cos, sin) = if config.rotary_dims > 0 {
            let exponents =
                Tensor::arange_start_step(0, config.rotary_dims, 2, (Kind::Int64, device))
                    .to_kind(Kind::Float)
                    / config.rotary_dims as f64;
            let inv_freq = Tensor::pow_scalar(config.rope_theta, &exponents).reciprocal();
            match positions {
                Some(positions) => {
                    // [batch, 1 (heads), query, rotary]
                    let batch = positions.size()[0];
                    let freqs = positions.to_kind(Kind::Float).view([batch, query_len, 1])
                        * inv_freq.view([1, 1, -1]);
                    let table = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
                    (Some(table.cos()), Some(table.sin()))
                }
                None => {
                    let positions = Tensor::arange_start(past_len, key_len, (Kind::Int64, device))
                        .to_kind(Kind::Float);
                    let freqs = positions.view([query_len, 1]) * inv_freq.view([1, -1]);
                    let table = Tensor::cat(&[&freqs, &freqs], -1);
                    (Some(table.cos()), Some(table.sin()))
                }
            }
        } else {
            (None, None)
        };
        let alibi = (config.family == DecoderFamily::Mpt).then(|| {
            // Bias for key j: slope·(j − (key_len − 1)), as HF slices MPT's table.
            let distance =
                Tensor::arange_start(1 - key_len, 1, (Kind::Int64, device)).to_kind(Kind::Float);
            alibi_slopes(config.heads, config.alibi_bias_max, !config.mosaic_gpt)
                .to_device(device)
                .view([config.heads, 1, 1])
                * distance.view([1, 1, key_len])
        });
        AttentionContext {
            cos,
            sin,
            alibi,
            blocked,
        }
    }

    /// Final norm and LM head: `[b, t, hidden] → [b, t, vocab]` logits.
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        self.final_norm
            .forward(hidden)
            .matmul(&self.lm_head.transpose(0, 1))
    }

    /// Full forward pass over `input_ids` `[b, t]` (no cache, no padding).
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let length = input_ids.size()[1];
        let context = self.attention_context(length, 0, input_ids.device());
        let mut hidden = self.embed(input_ids);
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &context, &self.config, None);
        }
        self.head(&hidden)
    }
}

impl KvCache {
    /// Keeps, for each new row, the cache row `sources[row]` (beam search
    /// reordering after beams were chosen).
    pub fn reorder(&mut self, sources: &Tensor) {
        for layer in self.layers.iter_mut() {
            if let Some((keys, values)) = layer.take() {
                *layer = Some((
                    keys.index_select(0, sources),
                    values.index_select(0, sources),
                ));
            }
        }
    }
}
