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
use crate::decoder::{Decoder, KvCache};
use crate::perceiver::{PerceiverConfig, PerceiverResampler};
use crate::vision::VisionTransformer;
use crate::{ModelError, Result, Weights};

/// Sizes of OpenFlamingo's cross-attention blocks (`helpers.py` defaults).
const XATTN_DIM_HEAD: i64 = 64;
const XATTN_HEADS: i64 = 8;
const XATTN_FF_MULT: i64 = 4;

/// Left padding during generation: which keys are real, and the rotary
/// positions of the tokens of the current step (Hugging Face's generate
/// derives them from the attention mask: cumulative count − 1).
#[derive(Debug)]
pub(crate) struct Padding {
    pub key_mask: Tensor,
    pub positions: Option<Tensor>,
}

impl Padding {
    /// For the prompt: `mask` `[rows, t]`, 1 = real token.
    pub fn for_prompt(mask: &Tensor) -> Self {
        let mask = mask.to_kind(Kind::Bool);
        let positions = mask.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1;
        let positions = positions.masked_fill(&mask.logical_not(), 1);
        Self {
            key_mask: mask,
            positions: Some(positions),
        }
    }

    /// After `reorder` (beam sources) and one new real token per row.
    pub fn advance(&self, reorder: Option<&Tensor>) -> Self {
        let mask = match reorder {
            Some(sources) => self.key_mask.index_select(0, sources),
            None => self.key_mask.shallow_clone(),
        };
        let rows = mask.size()[0];
        let mask = Tensor::cat(
            &[
                mask,
                Tensor::ones([rows, 1], (Kind::Bool, self.key_mask.device())),
            ],
            1,
        );
        let positions = mask
            .to_kind(Kind::Int64)
            .sum_dim_intlist(-1, true, Kind::Int64)
            - 1;
        Self {
            key_mask: mask,
            positions: Some(positions),
        }
    }
}

/// What incremental decoding carries from step to step.
#[derive(Debug)]
pub(crate) struct Decoding {
    pub(crate) cache: KvCache,
    pub(crate) cached_locations: Tensor,
    pub(crate) padding: Option<Padding>,
}

#[derive(Debug)]
pub struct Flamingo {
    pub(crate) vision: VisionTransformer,
    perceiver: PerceiverResampler,
    decoder: Decoder,
    /// One entry per decoder layer; `Some` where a block precedes it.
    cross_attention: Vec<Option<GatedCrossAttentionBlock>>,
    pub(crate) media_token_id: i64,
    /// Every weight, under OpenFlamingo's state-dict names (the LM's under
    /// `lang_encoder.` + its Hugging Face name); filled by the loader.
    parameters: Vec<(String, Tensor)>,
    /// Weights not read yet (a lazy load), by name: their tensors above
    /// are shape-only stand-ins until [`Flamingo::materialize`] or a
    /// sharded trainer reads their values.
    unread: std::collections::HashMap<String, crate::safetensors::LazyTensor>,
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
            return Err(ModelError::Setting {
                field: "cross_attn_every_n_layers",
                message: "must be at least 1".to_string(),
            });
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
            parameters: Vec::new(),
            unread: Default::default(),
        })
    }

    pub(crate) fn set_parameters(&mut self, parameters: Vec<(String, Tensor)>) {
        self.parameters = parameters;
    }

    pub(crate) fn set_unread(
        &mut self,
        unread: impl IntoIterator<Item = (String, crate::safetensors::LazyTensor)>,
    ) {
        self.unread = unread.into_iter().collect();
    }

    /// Where the values of weight `name` lie, when it was not read (a lazy
    /// load).
    pub fn unread(&self, name: &str) -> Option<&crate::safetensors::LazyTensor> {
        self.unread.get(name)
    }

    /// Whether any weight is still unread.
    pub fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// Reads every weight left unread into its tensor.
    pub fn materialize(&mut self) -> Result<()> {
        for (name, tensor) in &self.parameters {
            if let Some(lazy) = self.unread.get(name) {
                let values = lazy.read()?;
                let mut target = tensor.shallow_clone();
                tch::no_grad(|| target.set_data(&values));
            }
        }
        self.unread.clear();
        Ok(())
    }

    /// Every weight by name. The tensors share storage and autograd state
    /// with the model's own, so `set_requires_grad` on them takes effect.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.parameters
    }

    /// What OpenFlamingo trains (`factory.py`): the perceiver, the gated
    /// cross-attention layers and, unless frozen, the LM's input embedding
    /// (tied to the output projection in MPT).
    pub fn trainable_parameters(&self, train_embeddings: bool) -> Vec<(String, Tensor)> {
        let embedding = format!("lang_encoder.{}", self.decoder.input_embedding_name());
        self.parameters
            .iter()
            .filter(|(name, _)| {
                name.starts_with("perceiver.")
                    || name.starts_with("lang_encoder.gated_cross_attn_layers.")
                    || (train_embeddings && *name == embedding)
            })
            .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
            .collect()
    }

    /// Whether trainable weight `name` is the weight of a bias-free Linear
    /// in the perceiver or a gated cross-attention block (`to_q`, `to_kv`,
    /// `to_out`, and the feed-forwards' two matrices): the weights that
    /// only ever enter matrix products, which bf16 autocast casts to bf16
    /// at each use. A bf16 copy of such a weight gives the same products
    /// and gradients as autocast's cast. Norm weights and biases, the
    /// latents, the time embeddings and the tanh gates are not.
    /// Decided by the name alone, so it holds while the weight's values are
    /// elsewhere (a sharded unit released, a lazy load).
    pub fn is_linear_weight(&self, name: &str) -> bool {
        let module = if let Some(rest) = name.strip_prefix("perceiver.layers.") {
            // `<i>.0.to_q`, `<i>.1.1` (the feed-forward's matrices).
            rest.split_once('.').map(|(_, module)| module)
        } else if let Some(rest) = name.strip_prefix("lang_encoder.gated_cross_attn_layers.") {
            // `<i>.attn.to_q`, `<i>.ff.1`.
            rest.split_once('.').map(|(_, module)| module)
        } else {
            None
        };
        let Some(module) = module.and_then(|module| module.strip_suffix(".weight")) else {
            return false;
        };
        matches!(
            module,
            "0.to_q"
                | "0.to_kv"
                | "0.to_out"
                | "1.1"
                | "1.3"
                | "attn.to_q"
                | "attn.to_kv"
                | "attn.to_out"
                | "ff.1"
                | "ff.3"
        )
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// `vision_x`: `[b, t_img, frames = 1, 3, h, w]` → media latents
    /// `[b, t_img, 64, vis_dim]` (the frozen tower runs without gradients).
    pub fn encode_vision(&self, vision_x: &Tensor) -> Result<Tensor> {
        let features = self.vision_features(vision_x)?;
        self.perceive(&features)
    }

    /// The frozen vision tower alone, without gradients: `vision_x`
    /// `[b, t_img, frames = 1, 3, h, w]` → patch features
    /// `[b, t_img, 1, tokens, vis_dim]`.
    pub fn vision_features(&self, vision_x: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| {
            let mut hidden = self.vision_start(vision_x)?;
            for index in 0..self.vision.block_count() {
                hidden = self.vision_block(index, &hidden);
            }
            Ok(self.vision_end(vision_x, &hidden))
        })
    }

    /// The vision tower's residual blocks (each a unit of its own).
    pub fn vision_block_count(&self) -> usize {
        self.vision.block_count()
    }

    /// [`Self::vision_features`] in pieces, as the training engine runs
    /// the tower unit by unit: the patch embedding (`vision_x` checked and
    /// flattened to images) → [`Self::vision_block`] for each block →
    /// [`Self::vision_end`]. Without a graph: the tower is frozen.
    pub fn vision_start(&self, vision_x: &Tensor) -> Result<Tensor> {
        let size = vision_x.size();
        let [batch, media, frames, channels, height, width] = size[..] else {
            return Err(ModelError::Input {
                input: "vision_x",
                message: format!(
                    "vision_x must be [batch, images, frames, 3, height, width], got {size:?}"
                ),
            });
        };
        if frames != 1 {
            return Err(ModelError::Input {
                input: "vision_x",
                message: format!(
                    "only single-frame media are supported (frames = 1), got {frames}"
                ),
            });
        }
        let images = vision_x.reshape([batch * media * frames, channels, height, width]);
        tch::no_grad(|| self.vision.embed(&images))
    }

    /// Vision block `index` of [`Self::vision_start`]'s output.
    pub fn vision_block(&self, index: usize, hidden: &Tensor) -> Tensor {
        tch::no_grad(|| self.vision.block(index, hidden))
    }

    /// The patch features `[batch, images, frames, patches, width]` of the
    /// last block's output for `vision_x`.
    pub fn vision_end(&self, vision_x: &Tensor, hidden: &Tensor) -> Tensor {
        let tokens = tch::no_grad(|| self.vision.patch_tokens(hidden));
        let size = vision_x.size();
        let token_size = tokens.size();
        tokens.reshape([size[0], size[1], size[2], token_size[1], token_size[2]])
    }

    /// The Perceiver resampler: patch features → media latents.
    pub fn perceive(&self, features: &Tensor) -> Result<Tensor> {
        self.perceiver.forward(features)
    }

    /// The resampler's layers (each a unit of its own).
    pub fn perceiver_depth(&self) -> usize {
        self.perceiver.depth()
    }

    /// [`Self::perceive`] in pieces, as the training engine runs it unit by
    /// unit: the media tokens every layer attends to and the learned
    /// latents (the first layer's input) → [`Self::perceiver_layer`] for
    /// each layer, the last ending with the final norm.
    pub fn perceiver_inputs(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        self.perceiver.inputs(features)
    }

    /// Perceiver layer `index` over `media_tokens` and the latents before it.
    pub fn perceiver_layer(&self, index: usize, media_tokens: &Tensor, latents: &Tensor) -> Tensor {
        self.perceiver.layer(index, media_tokens, latents)
    }

    pub(crate) fn check_image_count(&self, media: &Tensor, lang_x: &Tensor) -> Result<()> {
        let images_in_text = lang_x
            .eq(self.media_token_id)
            .to_kind(Kind::Int64)
            .sum_dim_intlist(-1, false, Kind::Int64)
            .max()
            .int64_value(&[]);
        let images_given = media.size()[1];
        if images_in_text > images_given {
            return Err(ModelError::Input { input: "lang_x", message: format!(
                "the text has {images_in_text} <image> tokens but only {images_given} images were given"
            ) });
        }
        Ok(())
    }

    /// Runs the language side over `tokens` `[b, t]` that follow `cache.len()`
    /// cached positions, updating the cache; returns logits `[b, t, vocab]`.
    pub(crate) fn step(
        &self,
        tokens: &Tensor,
        media: &Tensor,
        mask: MediaMask<'_>,
        cache: Option<&mut KvCache>,
        padding: Option<&Padding>,
    ) -> Result<Tensor> {
        let length = tokens.size()[1];
        let past = cache.as_ref().map_or(0, |cache| cache.len());
        let context = self.decoder.attention_context_padded(
            length,
            past,
            tokens.device(),
            padding.map(|padding| &padding.key_mask),
            padding.and_then(|padding| padding.positions.as_ref()),
        );
        let config = self.decoder.config();
        let mut hidden = self.decoder.embed(tokens);
        let mut cache = cache;
        for (index, (layer, block)) in self
            .decoder
            .layers()
            .iter()
            .zip(&self.cross_attention)
            .enumerate()
        {
            if let Some(block) = block {
                hidden = block.forward(&hidden, media, mask)?;
            }
            let layer_cache = cache.as_mut().map(|cache| &mut cache.layers[index]);
            hidden = layer.forward(&hidden, &context, config, layer_cache);
        }
        Ok(self.decoder.head(&hidden))
    }

    /// Logits `[b, t, vocab]` for text `lang_x` `[b, t]` conditioned on the
    /// images `vision_x`; each token attends to the latest `<image>` at or
    /// before it.
    pub fn forward(&self, vision_x: &Tensor, lang_x: &Tensor) -> Result<Tensor> {
        self.forward_masked(vision_x, lang_x, None)
    }

    /// [`Flamingo::forward`] for a left-padded batch: `attention_mask`
    /// `[b, t]` is 1 for real tokens and 0 for padding (positions stay the
    /// plain indices, as in OpenFlamingo's forward).
    pub fn forward_masked(
        &self,
        vision_x: &Tensor,
        lang_x: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let media = self.encode_vision(vision_x)?;
        self.check_image_count(&media, lang_x)?;
        let media_locations = lang_x.eq(self.media_token_id);
        let padding = attention_mask.map(|mask| Padding {
            key_mask: mask.to_kind(Kind::Bool),
            positions: None,
        });
        self.step(
            lang_x,
            &media,
            MediaMask::Locations(&media_locations),
            None,
            padding.as_ref(),
        )
    }

    /// One incremental step over `tokens` `[rows, 1]`, with OpenFlamingo's
    /// media bookkeeping (`FlamingoLMMixin.forward`): if any row's new token
    /// is `<image>`, this step locates media within the new tokens alone and
    /// those locations replace the cached ones; otherwise every token attends
    /// to the last image of the cached locations. (Upstream keeps the cached
    /// locations per row and does not reorder them with beams; neither do we.)
    pub(crate) fn cached_step(
        &self,
        tokens: &Tensor,
        media: &Tensor,
        cached_locations: &mut Tensor,
        cache: &mut KvCache,
        padding: Option<&Padding>,
    ) -> Result<Tensor> {
        let new_locations = tokens.eq(self.media_token_id);
        if new_locations.any().int64_value(&[]) == 1 {
            let logits = tch::no_grad(|| {
                self.step(
                    tokens,
                    media,
                    MediaMask::Locations(&new_locations),
                    Some(cache),
                    padding,
                )
            })?;
            *cached_locations = new_locations;
            Ok(logits)
        } else {
            tch::no_grad(|| {
                self.step(
                    tokens,
                    media,
                    MediaMask::Cached(cached_locations),
                    Some(cache),
                    padding,
                )
            })
        }
    }

    /// Runs the prompt `[rows, t]` (with its padding mask, if any) and
    /// returns its logits and the state incremental steps continue from.
    pub(crate) fn start_decoding(
        &self,
        prompt: &Tensor,
        media: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Decoding)> {
        let prompt_locations = prompt.eq(self.media_token_id);
        let mut state = Decoding {
            cache: KvCache::new(self.decoder.layers().len()),
            cached_locations: prompt_locations.shallow_clone(),
            padding: attention_mask.map(Padding::for_prompt),
        };
        let logits = tch::no_grad(|| {
            self.step(
                prompt,
                media,
                MediaMask::Locations(&prompt_locations),
                Some(&mut state.cache),
                state.padding.as_ref(),
            )
        })?;
        Ok((logits, state))
    }

    /// Feeds one new token per row; `reorder` first keeps, for each row, the
    /// state of row `reorder[row]` (beam search).
    pub(crate) fn continue_decoding(
        &self,
        state: &mut Decoding,
        tokens: &Tensor,
        media: &Tensor,
        reorder: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(sources) = reorder {
            state.cache.reorder(sources);
        }
        state.padding = state.padding.take().map(|padding| padding.advance(reorder));
        self.cached_step(
            tokens,
            media,
            &mut state.cached_locations,
            &mut state.cache,
            state.padding.as_ref(),
        )
    }

    /// Greedy decoding with a key/value cache and cached media, as
    /// OpenFlamingo's `generate` with `num_beams = 1`: the prompt attends to
    /// its images as in [`Flamingo::forward`]; new tokens follow
    /// [`Flamingo::cached_step`]. A sequence stops after `eos_token_id`
    /// (`<|endofchunk|>`); finished rows are padded with it until all stop.
    /// Returns the new tokens `[b, ≤ max_new_tokens]`. `attention_mask`
    /// (`[b, t]`, 1 = real) allows a left-padded batch.
    pub fn generate_greedy(
        &self,
        vision_x: &Tensor,
        lang_x: &Tensor,
        attention_mask: Option<&Tensor>,
        max_new_tokens: i64,
        eos_token_id: i64,
    ) -> Result<Tensor> {
        let media = self.encode_vision(vision_x)?;
        self.check_image_count(&media, lang_x)?;
        let batch = lang_x.size()[0];
        let mut finished = Tensor::zeros([batch], (Kind::Bool, lang_x.device()));
        let mut generated: Vec<Tensor> = Vec::new();
        let (mut logits, mut state) = self.start_decoding(lang_x, &media, attention_mask)?;
        for _ in 0..max_new_tokens {
            let last = logits.select(1, -1);
            let chosen = last.argmax(-1, false);
            let next = chosen.where_self(
                &finished.logical_not(),
                &Tensor::full_like(&chosen, eos_token_id),
            );
            finished = finished.logical_or(&next.eq(eos_token_id));
            generated.push(next.shallow_clone());
            if finished.all().int64_value(&[]) == 1 {
                break;
            }
            let next = next.unsqueeze(1);
            logits = self.continue_decoding(&mut state, &next, &media, None)?;
        }
        if generated.is_empty() {
            return Ok(Tensor::zeros([batch, 0], (Kind::Int64, lang_x.device())));
        }
        Ok(Tensor::stack(&generated, 1))
    }
}

/// The pieces the training engine gathers, runs and frees one at a time
/// (FSDP units, reference §2.5): the vision tower's ends (patch embedding,
/// positions, `ln_pre`, `ln_post`, `proj`) and each of its residual
/// blocks, the perceiver's inputs (latents, frame and time embeddings) and
/// each of its layers (the last with the final norm), the text ends of the
/// LM (input embedding, final norm, output head), and each decoder layer
/// and each cross-attention block on its own. Units this small keep what a
/// rank holds whole at once near one decoder layer: the 1B bench shape's
/// perceiver is 252 MiB whole, a layer of it 42 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Vision,
    VisionBlock(usize),
    Perceiver,
    PerceiverLayer(usize),
    Text,
    CrossAttention(usize),
    Layer(usize),
}

/// What every decoder layer of one training forward pass shares: the
/// attention context (positions, causal and padding mask) and the
/// `<image>` locations the cross-attention masks follow.
#[derive(Debug)]
pub struct TextInputs {
    context: crate::decoder::AttentionContext,
    media_locations: Tensor,
}

impl Flamingo {
    /// Which unit a weight (by its name in [`Flamingo::named_parameters`])
    /// belongs to.
    pub fn unit_of(&self, name: &str) -> Unit {
        if let Some(vision_name) = name.strip_prefix("vision_encoder.") {
            return vision_name
                .strip_prefix("transformer.resblocks.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse().ok())
                .map_or(Unit::Vision, Unit::VisionBlock);
        }
        if let Some(perceiver_name) = name.strip_prefix("perceiver.") {
            let layer = perceiver_name
                .strip_prefix("layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse().ok());
            let last = self.perceiver.depth().checked_sub(1);
            return match (layer, last) {
                (Some(index), _) => Unit::PerceiverLayer(index),
                (None, Some(last)) if perceiver_name.starts_with("norm.") => {
                    Unit::PerceiverLayer(last)
                }
                _ => Unit::Perceiver,
            };
        }
        let Some(lm_name) = name.strip_prefix("lang_encoder.") else {
            return Unit::Text;
        };
        let index = |rest: &str| rest.split('.').next().and_then(|index| index.parse().ok());
        if let Some(rest) = lm_name.strip_prefix("gated_cross_attn_layers.") {
            return index(rest).map_or(Unit::Text, Unit::CrossAttention);
        }
        self.decoder
            .layer_suffix(lm_name)
            .and_then(index)
            .map_or(Unit::Text, Unit::Layer)
    }

    /// Decoder layers (each with its cross-attention block, if any).
    pub fn layer_count(&self) -> usize {
        self.decoder.layers().len()
    }

    /// Whether layer `index` has a cross-attention block (and so uses the
    /// media latents).
    pub fn layer_sees_media(&self, index: usize) -> bool {
        matches!(self.cross_attention.get(index), Some(Some(_)))
    }

    /// The shared inputs of the decoder layers for `lang_x` `[b, t]`
    /// (`attention_mask`: 1 = real token), after checking that `media_count`
    /// images cover the text's `<image>` tokens.
    pub fn text_inputs(
        &self,
        lang_x: &Tensor,
        attention_mask: Option<&Tensor>,
        media: &Tensor,
    ) -> Result<TextInputs> {
        self.check_image_count(media, lang_x)?;
        let key_mask = attention_mask.map(|mask| mask.to_kind(Kind::Bool));
        let context = self.decoder.attention_context_padded(
            lang_x.size()[1],
            0,
            lang_x.device(),
            key_mask.as_ref(),
            None,
        );
        Ok(TextInputs {
            context,
            media_locations: lang_x.eq(self.media_token_id),
        })
    }

    /// Token embeddings `[b, t] → [b, t, hidden]`.
    pub fn embed(&self, lang_x: &Tensor) -> Tensor {
        self.decoder.embed(lang_x)
    }

    /// Decoder layer `index` as the training engine runs it, in two units
    /// (`hidden` `[b, t, hidden]` → the same shape): the cross-attention
    /// block before it (`None` where the layer has none)...
    pub fn cross_attend(
        &self,
        index: usize,
        hidden: &Tensor,
        media: &Tensor,
        inputs: &TextInputs,
    ) -> Result<Option<Tensor>> {
        match self.cross_attention.get(index) {
            Some(Some(block)) => Ok(Some(block.forward(
                hidden,
                media,
                MediaMask::Locations(&inputs.media_locations),
            )?)),
            Some(None) => Ok(None),
            None => Err(self.no_layer(index)),
        }
    }

    /// ... and the decoder layer itself.
    pub fn decoder_layer(
        &self,
        index: usize,
        hidden: &Tensor,
        inputs: &TextInputs,
    ) -> Result<Tensor> {
        let layer = self
            .decoder
            .layers()
            .get(index)
            .ok_or_else(|| self.no_layer(index))?;
        Ok(layer.forward(hidden, &inputs.context, self.decoder.config(), None))
    }

    fn no_layer(&self, index: usize) -> ModelError {
        ModelError::Input {
            input: "layer",
            message: format!(
                "layer {index} does not exist (the LM has {})",
                self.layer_count()
            ),
        }
    }

    /// Final norm and output head: `[b, t, hidden]` → logits `[b, t, vocab]`.
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        self.decoder.head(hidden)
    }
}
