//! What the two ways of holding the trainable state share: the interface
//! the trainer drives ([`ParameterState`]), the trainable parameters' places
//! in the flat state ([`Slot`]), the embedding rows that train, and one
//! optimizer update's settings.

use flamingo_model::Flamingo;
use flamingo_preprocess::FlamingoTokenizer;
use tch::{Kind, Tensor};

use super::TrainError;
use crate::optim::AdamW;
use crate::units::{Gathered, UnitPlan};

/// A trainable parameter's place in the flat state.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) tensor: Tensor,
    pub(crate) offset: i64,
    pub(crate) numel: i64,
}

/// The trainable parameters in flat-state order, weight-decayed ones
/// first (so each group is one range): the slots, the total length and
/// where the decayed range ends.
pub(crate) fn slots(model: &Flamingo, train_embeddings: bool) -> (Vec<Slot>, i64, i64) {
    let mut trainable = model.trainable_parameters(train_embeddings);
    trainable.sort_by_key(|(name, _)| !is_decayed(name));
    let mut offset = 0;
    let mut decayed = 0;
    let mut slots = Vec::with_capacity(trainable.len());
    for (name, tensor) in trainable {
        let numel = tensor.numel() as i64;
        if is_decayed(&name) {
            decayed = offset + numel;
        }
        slots.push(Slot {
            name,
            tensor,
            offset,
            numel,
        });
        offset += numel;
    }
    (slots, offset, decayed)
}

/// Upstream's weight-decay group: the gated cross-attention.
pub(crate) fn is_decayed(name: &str) -> bool {
    name.contains("gated_cross_attn")
}

/// The (name, shape, offset) of every slot, for planning units.
pub(crate) fn layout_of(slots: &[Slot]) -> Vec<(String, Vec<i64>, i64)> {
    slots
        .iter()
        .map(|slot| (slot.name.clone(), slot.tensor.size(), slot.offset))
        .collect()
}

/// The input embedding's place in the flat state and the rows that train
/// (upstream's gradient mask: only `<image>` and `<|endofchunk|>`).
#[derive(Debug)]
pub(crate) struct EmbeddingRows {
    pub(crate) offset: i64,
    pub(crate) rows: i64,
    pub(crate) width: i64,
    /// `[rows, 1]`: 1 on the rows that train.
    pub(crate) mask: Tensor,
}

impl EmbeddingRows {
    /// The embedding among `slots`, if it trains.
    pub(crate) fn find(
        model: &Flamingo,
        tokenizer: &FlamingoTokenizer,
        slots: &[Slot],
    ) -> Option<Self> {
        let name = format!("lang_encoder.{}", model.decoder().input_embedding_name());
        let slot = slots.iter().find(|slot| slot.name == name)?;
        let rows = slot.tensor.size()[0];
        let mask = Tensor::zeros([rows, 1], (Kind::Float, slot.tensor.device()));
        for id in [
            tokenizer.media_token_id(),
            tokenizer.end_of_chunk_token_id(),
        ] {
            let _ = mask.get(i64::from(id)).fill_(1.0);
        }
        Some(Self {
            offset: slot.offset,
            rows,
            width: slot.numel / rows,
            mask,
        })
    }

    /// Zeroes the gradient of the rows that do not train, where `gradient`
    /// holds the flat-state range `[start, start + len)` (and maybe
    /// padding after it).
    pub(crate) fn mask(&self, gradient: &Tensor, start: i64, len: i64) {
        let within = self.offset - start;
        if within >= 0 && within < len {
            let _ = gradient
                .narrow(0, within, self.rows * self.width)
                .view([self.rows, self.width])
                .g_mul_(&self.mask);
        }
    }
}

/// One optimizer update.
pub(crate) struct Update<'a> {
    pub(crate) optimizer: &'a AdamW,
    /// The step count after this update.
    pub(crate) step: u64,
    pub(crate) lr: f64,
    pub(crate) weight_decay: f64,
    pub(crate) max_grad_norm: f64,
}

/// Bytes this rank holds between steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Trainable values: all of them, or (`full`) this rank's shards.
    pub parameter_bytes: i64,
    /// Gradients held through a step (a `full` unit's whole gradient exists
    /// only until it is reduce-scattered).
    pub gradient_bytes: i64,
    /// AdamW's two moments: all of them for `no_shard`, 1/world otherwise.
    pub optimizer_bytes: i64,
    /// Frozen weights: all of them, or (`full`) this rank's shards.
    pub frozen_bytes: i64,
    /// `full`: the most bytes of whole (gathered) units alive at once, the
    /// unit in use and the one being prefetched.
    pub gathered_peak_bytes: i64,
}

/// How a rank holds the trainable state: [`super::replicated::Replicated`]
/// (`no_shard`, `shard_grad_op`) or [`super::sharded::ShardedUnits`]
/// (`full`, `hybrid`).
pub(crate) trait ParameterState {
    /// Trainable elements (unpadded).
    fn total(&self) -> i64;
    fn device(&self) -> tch::Device;
    /// The model's weights, grouped in units.
    fn plans(&self) -> &[UnitPlan];
    /// Where each trainable parameter sits in the flat state: (name, shape,
    /// offset).
    fn layout(&self) -> Vec<(String, Vec<i64>, i64)>;
    /// The ranges of the flat state whose values and optimizer state `rank`
    /// holds, clipped to the real elements; a checkpoint file holds them
    /// one after another.
    fn ranges_of(&self, rank: i64) -> Vec<(i64, i64)>;
    /// How many ranks the state is split over (`hybrid`: a node's).
    fn shard_world(&self) -> i64;
    /// Whether this rank writes its part of a checkpoint.
    fn writes_checkpoints(&self) -> bool;
    /// This rank's part of the state over `ranges_of(its rank)`:
    /// (parameters, first moments, second moments), concatenated.
    fn owned_state(&self) -> (Tensor, Tensor, Tensor);
    /// Restores this rank's part from the whole state (flat, unpadded).
    fn restore(&mut self, parameters: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor);
    /// The trainable values, flat (unpadded); under `full` every rank must
    /// call it (it gathers).
    fn flat_parameters(&self) -> Result<Tensor, TrainError>;
    fn memory(&self) -> MemoryUse;

    /// Whether forward and backward go unit by unit (`full`, `hybrid`,
    /// `--gradient_checkpointing`; units are recomputed in backward only
    /// with the latter).
    fn recomputes(&self) -> bool;
    /// Starts making unit `index`'s whole weights available (a gather
    /// under `full`; nothing otherwise).
    fn start_gather(&self, index: usize) -> Result<Gathered, TrainError>;
    /// Whether unit `next` is gathered while unit `current` runs (its
    /// forward, or its backward from a kept graph), so that the gather
    /// overlaps compute; otherwise it starts once `current` is done, and
    /// one unit less is held.
    fn prefetches(&self, _current: usize, _next: usize) -> bool {
        true
    }
    /// Waits for `gathered` and points the model at it; `ahead` bytes are
    /// being gathered meanwhile.
    fn install(&mut self, gathered: Gathered, ahead: i64) -> Result<Gathered, TrainError>;
    /// Done with a unit: under `full` its whole weights are dropped.
    fn release(&self, index: usize, gathered: Gathered);
    /// Done with a unit's forward whose graph is kept for its backward:
    /// under `full` its whole weights' bytes are freed, the buffers kept
    /// for [`ParameterState::start_regather`] (see [`crate::units::park`]).
    fn park(&self, index: usize, gathered: Gathered) -> Result<Gathered, TrainError> {
        let _ = index;
        Ok(gathered)
    }
    /// Starts gathering a parked unit again into its buffers.
    fn start_regather(&self, index: usize, gathered: Gathered) -> Result<Gathered, TrainError> {
        let _ = index;
        Ok(gathered)
    }
    /// After a plain (whole-model) backward: moves gradients that must be
    /// summed elsewhere than in `.grad` (bf16 working copies') there.
    fn fold_gradients(&mut self) {}
    /// Adds a unit's weight gradients (one per trainable member, `None`
    /// where unused) to what the step accumulates; they are dropped as
    /// soon as they are placed.
    fn sink(&mut self, index: usize, grads: Vec<Option<Tensor>>) -> Result<(), TrainError>;

    /// Drops the step's gradients (a skipped step).
    fn discard_gradients(&mut self);
    /// Reduces, clips and applies the step's gradients; returns the global
    /// gradient norm before clipping.
    fn update(&mut self, update: &Update<'_>) -> Result<f64, TrainError>;
}
