//! The training step on a rank: OpenFlamingo's recipe (reference §2) over
//! the trainable parameters held as one flat fp32 buffer.
//!
//! - Parameters: the perceiver, the gated cross-attention layers and, unless
//!   frozen, the input embedding, of which only the `<image>` and
//!   `<|endofchunk|>` rows train (upstream's gradient mask). Frozen weights
//!   never get gradients.
//! - Loss: per dataset, the sum of token cross-entropies over the tokens of
//!   every rank divided by their global count, times the dataset's loss
//!   multiplier. This is the mean loss of the global batch, so the result
//!   does not depend on how the batch is split over ranks (upstream averages
//!   per-rank means, which does).
//! - Step: LAION and MMC4 micro-batches accumulate into one optimizer step;
//!   a non-finite loss on any rank skips the step everywhere (counted);
//!   gradients are clipped to a global norm of 1.0; AdamW with weight decay
//!   on the gated cross-attention only; the schedule's rate.
//! - Strategies: `no_shard` all-reduces the flat gradient and every rank
//!   updates everything; `shard_grad_op` reduce-scatters it, each rank keeps
//!   and updates 1/world of the optimizer state and parameters, and the
//!   updated parameters are all-gathered; `full` keeps 1/world of every
//!   unit's trainable and frozen weights, gathers a unit just before use
//!   (prefetching the next), frees it after, recomputes it in backward and
//!   reduce-scatters its gradient at once (see [`crate::units`]).
//! - `--gradient_checkpointing` (always on under `full`): the forward pass
//!   keeps only each unit's input; backward recomputes one unit at a time.

use flamingo_collectives::{ProcessGroup, ReduceOp};
use flamingo_model::Flamingo;
use flamingo_preprocess::FlamingoTokenizer;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::batch::TrainBatch;
use crate::clip::clip_factor;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use crate::units::{self, Gathered, UnitPlan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    NoShard,
    ShardGradOp,
    Full,
    /// `full` inside each node, replicated across nodes (FSDP's
    /// HYBRID_SHARD): units are gathered from the node's ranks only, and
    /// gradient shards are all-reduced between the nodes.
    Hybrid,
}

impl Strategy {
    /// Whether every unit's weights are sharded (`full`, `hybrid`).
    pub fn shards_units(self) -> bool {
        matches!(self, Self::Full | Self::Hybrid)
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "no_shard" => Ok(Self::NoShard),
            "shard_grad_op" => Ok(Self::ShardGradOp),
            "full" => Ok(Self::Full),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!(
                "--fsdp_sharding_strategy '{other}' (use full, hybrid, shard_grad_op or no_shard)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub strategy: Strategy,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub adamw: AdamWConfigSerde,
    pub max_grad_norm: f64,
    pub loss_multiplier_laion: f64,
    pub loss_multiplier_mmc4: f64,
    pub gradient_accumulation_steps: u64,
    pub freeze_lm_embeddings: bool,
    /// `--precision amp_bf16`: the forward pass under bf16 autocast.
    #[serde(default)]
    pub amp_bf16: bool,
    /// `--gradient_checkpointing`: keep only unit inputs in forward and
    /// recompute in backward (implied by `full`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// AdamW's hyper-parameters in the saved config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfigSerde {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl From<AdamWConfigSerde> for AdamWConfig {
    fn from(config: AdamWConfigSerde) -> Self {
        Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
        }
    }
}

impl Default for AdamWConfigSerde {
    fn default() -> Self {
        let config = AdamWConfig::default();
        Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    pub loss_laion: Option<f64>,
    pub loss_mmc4: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] flamingo_model::ModelError),
    #[error("collective: {0}")]
    Collective(#[from] flamingo_collectives::CollectiveError),
    #[error("{0}")]
    Config(String),
}

/// A parameter's place in the flat buffer.
#[derive(Debug)]
struct Slot {
    name: String,
    tensor: Tensor,
    offset: i64,
    numel: i64,
}

pub struct Trainer<'g> {
    model: Flamingo,
    group: Option<&'g ProcessGroup>,
    /// `full`, `hybrid`: the ranks a unit is sharded over (all of them, or
    /// the node's).
    shard_group: Option<&'g ProcessGroup>,
    /// `hybrid`: the ranks holding the same shard on other nodes.
    replicate_group: Option<&'g ProcessGroup>,
    config: TrainConfig,
    optimizer: AdamW,
    slots: Vec<Slot>,
    units: Vec<UnitPlan>,
    /// `no_shard`, `shard_grad_op`: all trainable values (padded to a
    /// multiple of the world size); the model's parameters are views into
    /// it. `full`: this rank's shard of every unit, one after another.
    flat: Tensor,
    total: i64,
    /// `[0, decayed)` of the flat state takes weight decay.
    decayed: i64,
    /// The input embedding's place in the flat state (offset, rows, width)
    /// and a `[rows, 1]` mask, 1 on the rows that train.
    embedding_mask: Option<(i64, i64, i64, Tensor)>,
    /// Optimizer state over `flat` (`no_shard`, `full`) or over this rank's
    /// shard of it (`shard_grad_op`).
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Gradients summed by the recomputing pass over the micro-steps: of
    /// the whole flat state, or (`full`) of this rank's shards, reduced.
    accumulated: Option<Tensor>,
    /// The most bytes of gathered (whole) units alive at once (`full`).
    gathered_peak: i64,
    /// Seconds per phase of the step, when timing is on (see
    /// [`Trainer::time_phases`]).
    phases: Option<PhaseTimer>,
    /// Optimizer steps taken.
    step: u64,
    micro_steps: u64,
    skipped_steps: u64,
    /// Losses accumulated over the micro-steps of the current step.
    pending_laion: Vec<f64>,
    pending_mmc4: Vec<f64>,
    pending_non_finite: bool,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Trainer")
            .field("step", &self.step)
            .field("parameters", &self.total)
            .finish()
    }
}

/// Gathers units in the order a pass uses them, one ahead (`full`).
struct Prefetcher {
    order: Vec<usize>,
    position: usize,
    ahead: Option<Gathered>,
}

impl<'g> Trainer<'g> {
    /// A trainer over `group` (every rank; `None` alone). `hybrid` needs
    /// its node groups: see [`Trainer::new_hybrid`]; here it is `full`
    /// with the whole group as one node.
    pub fn new(
        model: Flamingo,
        tokenizer: &FlamingoTokenizer,
        group: Option<&'g ProcessGroup>,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        Self::with_groups(model, tokenizer, group, group, None, config)
    }

    /// `hybrid`: `node` holds this node's ranks (units are sharded over
    /// them) and `replicas` the ranks with this rank's local rank on every
    /// node (their gradient shards are summed).
    pub fn new_hybrid(
        model: Flamingo,
        tokenizer: &FlamingoTokenizer,
        group: &'g ProcessGroup,
        node: &'g ProcessGroup,
        replicas: &'g ProcessGroup,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        Self::with_groups(
            model,
            tokenizer,
            Some(group),
            Some(node),
            Some(replicas),
            config,
        )
    }

    fn with_groups(
        model: Flamingo,
        tokenizer: &FlamingoTokenizer,
        group: Option<&'g ProcessGroup>,
        shard_group: Option<&'g ProcessGroup>,
        replicate_group: Option<&'g ProcessGroup>,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        if config.gradient_accumulation_steps == 0 {
            return Err(TrainError::Config(
                "--gradient_accumulation_steps must be at least 1".into(),
            ));
        }
        let mut trainable = model.trainable_parameters(!config.freeze_lm_embeddings);
        // Weight-decayed parameters first, so each group is one range.
        trainable.sort_by_key(|(name, _)| !is_decayed(name));
        let world = group.map_or(1, |group| group.world_size());
        let device = trainable
            .first()
            .map_or(tch::Device::Cpu, |(_, tensor)| tensor.device());
        let mut offset = 0;
        let mut slots = Vec::with_capacity(trainable.len());
        let mut decayed = 0;
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
        let total = offset;
        let embedding_name = format!("lang_encoder.{}", model.decoder().input_embedding_name());
        let embedding_mask = slots
            .iter()
            .find(|slot| slot.name == embedding_name)
            .map(|slot| {
                let rows = slot.tensor.size()[0];
                let mask = Tensor::zeros([rows, 1], (Kind::Float, device));
                for id in [
                    tokenizer.media_token_id(),
                    tokenizer.end_of_chunk_token_id(),
                ] {
                    let _ = mask.get(i64::from(id)).fill_(1.0);
                }
                (slot.offset, rows, slot.numel / rows, mask)
            });
        let layout: Vec<(String, Vec<i64>, i64)> = slots
            .iter()
            .map(|slot| (slot.name.clone(), slot.tensor.size(), slot.offset))
            .collect();
        let mut units = units::plan(&model, &layout, is_decayed)?;
        let flat = if config.strategy.shards_units() {
            Self::shard_units(&mut units, group, shard_group, device)?
        } else {
            let padded = flamingo_collectives::pad_to_multiple(total.max(1), world);
            let flat = Tensor::zeros([padded], (Kind::Float, device));
            tch::no_grad(|| {
                for slot in &mut slots {
                    let mut view = flat.narrow(0, slot.offset, slot.numel);
                    view.copy_(&slot.tensor.detach().reshape([-1]).to_kind(Kind::Float));
                    let shaped = view.view(slot.tensor.size().as_slice());
                    slot.tensor.set_data(&shaped);
                    let _ = slot.tensor.set_requires_grad(true);
                }
            });
            // Every rank starts from rank 0's values, as DDP and FSDP do.
            if let Some(group) = group.filter(|group| group.world_size() > 1) {
                group.broadcast(&flat, 0)?;
            }
            flat
        };
        let state_len = match config.strategy {
            Strategy::NoShard | Strategy::Full | Strategy::Hybrid => flat.numel() as i64,
            Strategy::ShardGradOp => flamingo_collectives::shard_len(total.max(1), world),
        };
        let accumulated = (config.strategy.shards_units() || config.gradient_checkpointing)
            .then(|| flat.zeros_like());
        Ok(Self {
            optimizer: AdamW::new(config.adamw.into()),
            exp_avg: Tensor::zeros([state_len], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([state_len], (Kind::Float, device)),
            model,
            group,
            shard_group,
            replicate_group,
            config,
            slots,
            units,
            flat,
            total,
            decayed,
            embedding_mask,
            accumulated,
            gathered_peak: 0,
            phases: None,
            step: 0,
            micro_steps: 0,
            skipped_steps: 0,
            pending_laion: Vec::new(),
            pending_mmc4: Vec::new(),
            pending_non_finite: false,
        })
    }

    /// `full`: keeps this rank's shard of every unit (rank 0's trainable
    /// values, as FSDP's `sync_module_states`) and frees the whole weights.
    /// Returns the local flat state: the trainable shards one after another.
    fn shard_units(
        units: &mut [UnitPlan],
        group: Option<&ProcessGroup>,
        shard_group: Option<&ProcessGroup>,
        device: tch::Device,
    ) -> Result<Tensor, TrainError> {
        let world = shard_group.map_or(1, |group| group.world_size());
        let rank = shard_group.map_or(0, |group| group.rank());
        let mut local_len = 0;
        for plan in units.iter_mut() {
            plan.shard_len = if plan.len == 0 {
                0
            } else {
                flamingo_collectives::shard_len(plan.len, world)
            };
            plan.shard_offset = local_len;
            local_len += plan.shard_len;
        }
        let flat = Tensor::zeros([local_len.max(1)], (Kind::Float, device));
        for plan in units.iter_mut() {
            if plan.shard_len > 0 {
                let whole = units::concatenate(
                    &plan.trainable,
                    plan.shard_len * world,
                    Kind::Float,
                    device,
                );
                if let Some(group) = group.filter(|_| world > 1) {
                    group.broadcast(&whole, 0)?;
                }
                tch::no_grad(|| {
                    flat.narrow(0, plan.shard_offset, plan.shard_len)
                        .copy_(&whole.narrow(0, rank * plan.shard_len, plan.shard_len))
                });
                for member in &plan.trainable {
                    let _ = member.tensor.set_requires_grad(true);
                }
            }
            if plan.frozen_len > 0 {
                let length = flamingo_collectives::shard_len(plan.frozen_len, world);
                let whole =
                    units::concatenate(&plan.frozen, length * world, plan.frozen_kind, device);
                plan.frozen_shard = Some(whole.narrow(0, rank * length, length).copy());
            }
            units::release(plan);
        }
        Ok(flat)
    }

    pub fn model(&self) -> &Flamingo {
        &self.model
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    pub fn strategy(&self) -> Strategy {
        self.config.strategy
    }

    /// Trainable elements.
    pub fn parameter_count(&self) -> i64 {
        self.total
    }

    /// Bytes of the trainable values this rank holds between steps: the
    /// whole flat buffer (`no_shard`, `shard_grad_op`) or its shards (`full`).
    pub fn parameter_bytes(&self) -> i64 {
        4 * self.flat.numel() as i64
    }

    /// Bytes of the frozen weights this rank holds between steps: all of
    /// them, or (`full`) its shards.
    pub fn frozen_bytes(&self) -> i64 {
        self.units
            .iter()
            .map(|plan| match (&plan.frozen_shard, self.config.strategy) {
                (Some(shard), Strategy::Full | Strategy::Hybrid) => {
                    shard.numel() as i64 * shard.kind().elt_size_in_bytes() as i64
                }
                (_, Strategy::Full | Strategy::Hybrid) => 0,
                _ => plan.frozen_len * plan.frozen_kind.elt_size_in_bytes() as i64,
            })
            .sum()
    }

    /// Bytes of gradients held through a step: of every trainable value,
    /// or (`full`) of this rank's shards (a unit's whole gradient exists
    /// only until it is reduce-scattered).
    pub fn gradient_bytes(&self) -> i64 {
        4 * self.flat.numel() as i64
    }

    /// Bytes of this rank's optimizer state (AdamW's two moments): all of it
    /// for `no_shard`, 1/world for `shard_grad_op` and `full`.
    pub fn optimizer_bytes(&self) -> i64 {
        4 * 2 * self.exp_avg.numel() as i64
    }

    /// `full`: the most bytes of whole (gathered) units that were alive at
    /// once: the unit in use and the one being prefetched.
    /// Starts (or stops) timing the phases of each step: vision, perceiver,
    /// layers forward and backward, head, optimizer, … On a GPU every phase
    /// boundary synchronises the device, so this slows the step a little;
    /// it is for profiling.
    pub fn time_phases(&mut self, on: bool) {
        self.phases = on.then(|| PhaseTimer::new(self.flat.device()));
    }

    /// The seconds spent per phase since timing started, in first-seen order.
    pub fn phase_times(&self) -> Vec<(&'static str, f64)> {
        self.phases
            .as_ref()
            .map_or_else(Vec::new, |timer| timer.totals.clone())
    }

    fn mark(&mut self, phase: &'static str) {
        if let Some(timer) = &mut self.phases {
            timer.mark(phase);
        }
    }

    pub fn gathered_peak_bytes(&self) -> i64 {
        self.gathered_peak
    }

    /// The trainable values, flat (unpadded), for checks and checkpoints.
    /// Under `full` this gathers them: every rank must call it.
    pub fn flat_parameters(&self) -> Result<Tensor, TrainError> {
        if !self.config.strategy.shards_units() {
            return Ok(self.flat.narrow(0, 0, self.total).copy());
        }
        let whole = Tensor::zeros([self.total], (Kind::Float, self.flat.device()));
        for plan in self.units.iter().filter(|plan| plan.len > 0) {
            let gathered = self.gather_trainable(plan)?;
            tch::no_grad(|| {
                whole
                    .narrow(0, plan.start, plan.len)
                    .copy_(&gathered.narrow(0, 0, plan.len))
            });
        }
        Ok(whole)
    }

    fn gather_trainable(&self, plan: &UnitPlan) -> Result<Tensor, TrainError> {
        let shard = self.flat.narrow(0, plan.shard_offset, plan.shard_len);
        match self.shard_group.filter(|group| group.world_size() > 1) {
            Some(group) => Ok(group.all_gather_flat(&shard.copy(), plan.len)?),
            None => Ok(shard.copy()),
        }
    }

    /// Where each trainable parameter sits in the flat buffer:
    /// (name, shape, offset).
    pub fn layout(&self) -> Vec<(String, Vec<i64>, i64)> {
        self.slots
            .iter()
            .map(|slot| {
                let shape = self
                    .units
                    .iter()
                    .flat_map(|plan| &plan.trainable)
                    .find(|member| member.name == slot.name)
                    .map_or_else(|| slot.tensor.size(), |member| member.shape.clone());
                (slot.name.clone(), shape, slot.offset)
            })
            .collect()
    }

    /// The ranges of the flat state whose values and optimizer state `rank`
    /// holds (all of it for `no_shard`), clipped to the real elements; a
    /// checkpoint file holds them one after another.
    /// Under `hybrid`, `rank` is a rank within the node (the first node's
    /// ranks write checkpoints: see [`Self::writes_checkpoints`]).
    pub fn ranges_of(&self, rank: i64) -> Vec<(i64, i64)> {
        let world = self.group.map_or(1, |group| group.world_size());
        match self.config.strategy {
            Strategy::NoShard => vec![(0, self.total)],
            Strategy::ShardGradOp => {
                let length = flamingo_collectives::shard_len(self.total.max(1), world);
                let start = (rank * length).min(self.total);
                vec![(start, ((rank + 1) * length).min(self.total))]
            }
            Strategy::Full | Strategy::Hybrid => self
                .units
                .iter()
                .filter(|plan| plan.len > 0)
                .map(|plan| plan.owned_by(rank))
                .filter(|(start, end)| end > start)
                .collect(),
        }
    }

    /// This rank's index among the ranks its state is split over.
    fn rank(&self) -> i64 {
        let group = if self.config.strategy.shards_units() {
            self.shard_group
        } else {
            self.group
        };
        group.map_or(0, |group| group.rank())
    }

    /// How many ranks the state is split over (`hybrid`: a node's).
    pub fn shard_world(&self) -> i64 {
        match self.config.strategy {
            Strategy::NoShard => 1,
            Strategy::ShardGradOp => self.group.map_or(1, |group| group.world_size()),
            Strategy::Full | Strategy::Hybrid => {
                self.shard_group.map_or(1, |group| group.world_size())
            }
        }
    }

    /// Whether this rank writes its part of a checkpoint: every rank for
    /// `shard_grad_op` and `full`, rank 0 for `no_shard`, the first node's
    /// ranks for `hybrid` (the other nodes hold copies).
    pub fn writes_checkpoints(&self) -> bool {
        match self.config.strategy {
            Strategy::NoShard => self.group.is_none_or(|group| group.rank() == 0),
            Strategy::ShardGradOp | Strategy::Full => true,
            Strategy::Hybrid => self.replicate_group.is_none_or(|group| group.rank() == 0),
        }
    }

    /// For each range of [`Self::ranges_of`] this rank: (flat-state start,
    /// local start, length).
    fn owned_pieces(&self) -> Vec<(i64, i64, i64)> {
        let rank = self.rank();
        match self.config.strategy {
            Strategy::NoShard => vec![(0, 0, self.total)],
            Strategy::ShardGradOp => self
                .ranges_of(rank)
                .into_iter()
                .map(|(start, end)| (start, start, end - start))
                .collect(),
            Strategy::Full | Strategy::Hybrid => self
                .units
                .iter()
                .filter(|plan| plan.len > 0)
                .map(|plan| {
                    let (start, end) = plan.owned_by(rank);
                    (start, plan.shard_offset, end - start)
                })
                .filter(|(_, _, length)| *length > 0)
                .collect(),
        }
    }

    /// Where the optimizer state of local flat position 0 starts
    /// (`shard_grad_op` keeps state for its shard only).
    fn state_base(&self) -> i64 {
        match self.config.strategy {
            Strategy::ShardGradOp => self.ranges_of(self.rank())[0].0,
            Strategy::NoShard | Strategy::Full | Strategy::Hybrid => 0,
        }
    }

    /// This rank's part of the state, for a checkpoint: (parameters,
    /// first moments, second moments) over [`Self::ranges_of`] this rank,
    /// concatenated.
    pub fn owned_state(&self) -> (Tensor, Tensor, Tensor) {
        let base = self.state_base();
        let pieces = self.owned_pieces();
        let take = |source: &Tensor, state: bool| {
            let parts: Vec<Tensor> = pieces
                .iter()
                .map(|(_, local, length)| {
                    let start = if state { local - base } else { *local };
                    source.narrow(0, start, *length)
                })
                .collect();
            if parts.is_empty() {
                Tensor::zeros([0], (Kind::Float, source.device()))
            } else {
                Tensor::cat(&parts, 0)
            }
        };
        (
            take(&self.flat, false),
            take(&self.exp_avg, true),
            take(&self.exp_avg_sq, true),
        )
    }

    /// Restores the whole state (flat, unpadded, as assembled from any
    /// world size's shards) and the step counters.
    pub fn restore(
        &mut self,
        parameters: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: u64,
        skipped_steps: u64,
    ) -> Result<(), TrainError> {
        if parameters.numel() as i64 != self.total {
            return Err(TrainError::Config(format!(
                "the checkpoint holds {} trainable values but this model has {}; is it the same model spec and --freeze_lm_embeddings?",
                parameters.numel(),
                self.total
            )));
        }
        let device = self.flat.device();
        let (parameters, exp_avg, exp_avg_sq) = (
            parameters.to_device(device),
            exp_avg.to_device(device),
            exp_avg_sq.to_device(device),
        );
        let base = self.state_base();
        tch::no_grad(|| {
            if !self.config.strategy.shards_units() {
                self.flat.narrow(0, 0, self.total).copy_(&parameters);
            }
            for (start, local, length) in self.owned_pieces() {
                if self.config.strategy.shards_units() {
                    self.flat
                        .narrow(0, local, length)
                        .copy_(&parameters.narrow(0, start, length));
                }
                self.exp_avg
                    .narrow(0, local - base, length)
                    .copy_(&exp_avg.narrow(0, start, length));
                self.exp_avg_sq
                    .narrow(0, local - base, length)
                    .copy_(&exp_avg_sq.narrow(0, start, length));
            }
        });
        self.step = step;
        self.skipped_steps = skipped_steps;
        Ok(())
    }

    fn all_reduce_sum(&self, value: f64) -> Result<f64, TrainError> {
        match self.group {
            Some(group) if group.world_size() > 1 => {
                Ok(group.all_reduce_scalar(value, ReduceOp::Sum)?)
            }
            _ => Ok(value),
        }
    }

    /// The summed token cross-entropy of `logits` against the shifted
    /// labels, this rank's token count and the global (sum, count).
    fn token_loss(&self, logits: &Tensor, labels: &Tensor) -> Result<LossParts, TrainError> {
        let length = logits.size()[1];
        let vocab = logits.size()[2];
        let shifted_labels = labels.narrow(1, 1, length - 1).reshape([-1]);
        let tokens = shifted_labels.ne(-100).sum(Kind::Int64).int64_value(&[]) as f64;
        let global_tokens = self.all_reduce_sum(tokens)?.max(1.0);
        let summed = logits
            .narrow(1, 0, length - 1)
            .to_kind(Kind::Float)
            .reshape([-1, vocab])
            .cross_entropy_loss::<Tensor>(&shifted_labels, None, Reduction::Sum, -100, 0.0);
        let global_sum = self.all_reduce_sum(summed.double_value(&[]))?;
        Ok(LossParts {
            summed,
            global_sum,
            global_tokens,
        })
    }

    /// Forward and backward of one dataset's micro-batch; returns its loss
    /// (the global batch's mean token loss).
    fn accumulate_one(&mut self, batch: &TrainBatch, multiplier: f64) -> Result<f64, TrainError> {
        if self.accumulated.is_some() {
            return self.accumulate_by_units(batch, multiplier);
        }
        let device = batch.input_ids.device();
        self.mark("data");
        let logits = crate::autocast::bf16(self.config.amp_bf16, device, || {
            self.model.forward_masked(
                &batch.vision_x,
                &batch.input_ids,
                Some(&batch.attention_mask),
            )
        })?;
        let loss = self.token_loss(&logits, &batch.labels)?;
        let scale =
            multiplier / (loss.global_tokens * self.config.gradient_accumulation_steps as f64);
        // The global sum is the same on every rank, so all skip together.
        self.mark("forward and loss");
        if loss.global_sum.is_finite() {
            (loss.summed * scale).backward();
        } else {
            self.pending_non_finite = true;
        }
        self.mark("backward");
        Ok(loss.global_sum / loss.global_tokens)
    }

    fn unit_index(&self, unit: flamingo_model::Unit) -> usize {
        self.units
            .iter()
            .position(|plan| plan.unit == unit)
            .expect("every unit has a plan")
    }

    /// Waits for the next unit of the pass, starts gathering the one after,
    /// and points the model at the waited-for unit's whole weights.
    fn acquire(&mut self, fetch: &mut Prefetcher) -> Result<(usize, Gathered), TrainError> {
        let index = fetch.order[fetch.position];
        let current = match fetch.ahead.take() {
            Some(gathered) => gathered,
            None => self.start_gather(index)?,
        };
        fetch.position += 1;
        if let Some(&next) = fetch.order.get(fetch.position) {
            fetch.ahead = Some(self.start_gather(next)?);
        }
        let ahead = fetch.ahead.as_ref().map_or(0, |gathered| gathered.bytes);
        self.gathered_peak = self.gathered_peak.max(current.bytes + ahead);
        Ok((index, units::install(&self.units, current)?))
    }

    fn start_gather(&self, index: usize) -> Result<Gathered, TrainError> {
        // Outside `full` the plans hold no shards: nothing is gathered and
        // the model keeps every weight.
        let group = self
            .shard_group
            .filter(|_| self.config.strategy.shards_units());
        units::start_gather(&self.units, index, &self.flat, group)
    }

    /// Done with a unit: under `full` its whole weights are dropped.
    fn release(&self, index: usize, gathered: Gathered) {
        if self.config.strategy.shards_units() {
            units::release(&self.units[index]);
        }
        drop(gathered);
    }

    /// Backpropagates `upstream` from `output` (recomputed with a graph)
    /// into the `leading` inputs and the trainable weights of unit `index`:
    /// (the inputs' gradients, the weights' gradients), `None` where one
    /// took no part.
    #[allow(clippy::type_complexity)]
    fn backward_unit(
        &self,
        index: usize,
        output: &Tensor,
        upstream: &Tensor,
        leading: &[&Tensor],
    ) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>), TrainError> {
        let mut wrt = leading.to_vec();
        wrt.extend(
            self.units[index]
                .trainable
                .iter()
                .map(|member| &member.tensor),
        );
        let upstream = upstream.to_kind(output.kind());
        let mut grads = units::gradients(&[output], &[&upstream], &wrt)?;
        let weights = grads.split_off(leading.len());
        Ok((grads, weights))
    }

    /// Adds a unit's weight gradients (one per trainable member, `None`
    /// where unused) to the accumulated gradient; under `full` the unit's
    /// whole gradient is reduce-scattered first and only this rank's shard
    /// is kept.
    fn sink(&mut self, index: usize, grads: &[Option<Tensor>]) -> Result<(), TrainError> {
        let plan = &self.units[index];
        if plan.len == 0 {
            return Ok(());
        }
        let world = self.shard_group.map_or(1, |group| group.world_size());
        let device = self.flat.device();
        let padded = if self.config.strategy.shards_units() {
            plan.shard_len * world
        } else {
            plan.len
        };
        let whole = Tensor::zeros([padded], (Kind::Float, device));
        tch::no_grad(|| {
            for (member, grad) in plan.trainable.iter().zip(grads) {
                if let Some(grad) = grad {
                    whole
                        .narrow(0, member.offset, member.numel)
                        .copy_(&grad.reshape([-1]).to_kind(Kind::Float));
                }
            }
        });
        let accumulated = self
            .accumulated
            .as_ref()
            .expect("the recomputing pass accumulates");
        if !self.config.strategy.shards_units() {
            let _ = accumulated.narrow(0, plan.start, plan.len).g_add_(&whole);
            return Ok(());
        }
        if let Some((offset, rows, width, mask)) = &self.embedding_mask {
            let within = offset - plan.start;
            if within >= 0 && within < plan.len {
                let _ = whole
                    .narrow(0, within, rows * width)
                    .view([*rows, *width])
                    .g_mul_(mask);
            }
        }
        let shard = match self.shard_group.filter(|_| world > 1) {
            Some(group) => {
                let shard = Tensor::empty([plan.shard_len], (Kind::Float, device));
                group.reduce_scatter_tensor(&shard, &whole, ReduceOp::Sum)?;
                shard
            }
            None => whole,
        };
        // `hybrid`: the other nodes computed the same shard's gradient on
        // their own samples.
        if let Some(replicas) = self.replicate_group.filter(|group| group.world_size() > 1) {
            replicas.all_reduce(&shard, ReduceOp::Sum)?;
        }
        let _ = accumulated
            .narrow(0, plan.shard_offset, plan.shard_len)
            .g_add_(&shard);
        Ok(())
    }

    /// The recomputing pass (`full`, `--gradient_checkpointing`): forward
    /// unit by unit without a graph, keeping each layer's input; the loss
    /// and the head's backward; then each layer recomputed with a graph and
    /// backpropagated on its own, last to first, the media latents'
    /// gradient summed over the cross-attention blocks; then the input
    /// embedding and the perceiver. The vision tower only runs forward.
    fn accumulate_by_units(
        &mut self,
        batch: &TrainBatch,
        multiplier: f64,
    ) -> Result<f64, TrainError> {
        use flamingo_model::Unit;
        let amp = self.config.amp_bf16;
        let device = batch.input_ids.device();
        let layers = self.model.layer_count();
        let (vision, perceiver, text) = (
            self.unit_index(Unit::Vision),
            self.unit_index(Unit::Perceiver),
            self.unit_index(Unit::Text),
        );
        let layer_units: Vec<usize> = (0..layers)
            .map(|index| self.unit_index(Unit::Layer(index)))
            .collect();
        let embedding_trains = self.units[text].len > 0;
        let mut order = vec![vision, perceiver, text];
        order.extend(&layer_units);
        order.push(text);
        order.extend(layer_units.iter().rev());
        if embedding_trains {
            order.push(text);
        }
        order.push(perceiver);
        let mut fetch = Prefetcher {
            order,
            position: 0,
            ahead: None,
        };
        let bf16 =
            |f: &dyn Fn() -> Result<Tensor, TrainError>| crate::autocast::bf16(amp, device, f);

        // Forward, keeping only unit inputs.
        self.mark("data");
        let (index, gathered) = self.acquire(&mut fetch)?;
        let features = bf16(&|| Ok(self.model.vision_features(&batch.vision_x)?))?;
        self.release(index, gathered);
        self.mark("vision forward");
        let (index, gathered) = self.acquire(&mut fetch)?;
        let media = tch::no_grad(|| bf16(&|| Ok(self.model.perceive(&features)?)))?;
        self.release(index, gathered);
        self.mark("perceiver forward");
        let inputs =
            self.model
                .text_inputs(&batch.input_ids, Some(&batch.attention_mask), &media)?;
        let (index, gathered) = self.acquire(&mut fetch)?;
        let mut hidden = tch::no_grad(|| bf16(&|| Ok(self.model.embed(&batch.input_ids))))?;
        self.release(index, gathered);
        let mut layer_inputs = Vec::with_capacity(layers);
        for layer in 0..layers {
            let (index, gathered) = self.acquire(&mut fetch)?;
            let next = tch::no_grad(|| {
                bf16(&|| Ok(self.model.layer(layer, &hidden, &media, &inputs)?))
            })?;
            self.release(index, gathered);
            layer_inputs.push(std::mem::replace(&mut hidden, next));
        }
        self.mark("embedding and layers forward");

        // The head, the loss and the head's backward.
        let (index, gathered) = self.acquire(&mut fetch)?;
        let last = hidden.detach().set_requires_grad(true);
        let logits = bf16(&|| Ok(self.model.head(&last)))?;
        let loss = self.token_loss(&logits, &batch.labels)?;
        let mean = loss.global_sum / loss.global_tokens;
        if !loss.global_sum.is_finite() {
            // Every rank sees the same sum, so all stop here together.
            self.pending_non_finite = true;
            self.release(index, gathered);
            return Ok(mean);
        }
        let scale = Tensor::from(
            multiplier / (loss.global_tokens * self.config.gradient_accumulation_steps as f64),
        )
        .to_kind(loss.summed.kind())
        .to_device(device);
        let (mut leading, mut text_grads) =
            self.backward_unit(text, &loss.summed, &scale, &[&last])?;
        drop(logits);
        let mut upstream = leading
            .remove(0)
            .expect("the loss depends on the last hidden state");
        self.release(index, gathered);
        self.mark("head, loss and head backward");

        // Layers, last to first.
        let media_leaf = media.detach().set_requires_grad(true);
        let mut media_grad: Option<Tensor> = None;
        for layer in (0..layers).rev() {
            let (index, gathered) = self.acquire(&mut fetch)?;
            let input = layer_inputs
                .pop()
                .expect("one input per layer")
                .set_requires_grad(true);
            let output = bf16(&|| Ok(self.model.layer(layer, &input, &media_leaf, &inputs)?))?;
            let sees_media = self.model.layer_sees_media(layer);
            let mut leading = vec![&input];
            if sees_media {
                leading.push(&media_leaf);
            }
            let (mut inputs_grads, grads) =
                self.backward_unit(index, &output, &upstream, &leading)?;
            upstream = inputs_grads
                .remove(0)
                .expect("a layer's output depends on its input");
            if let Some(grad) = inputs_grads.pop().flatten().filter(|_| sees_media) {
                media_grad = Some(match media_grad.take() {
                    Some(sum) => sum + grad.to_kind(Kind::Float),
                    None => grad.to_kind(Kind::Float),
                });
            }
            self.sink(index, &grads)?;
            self.release(index, gathered);
        }
        self.mark("layers recompute and backward");

        // The input embedding (its `<image>` / `<|endofchunk|>` rows).
        if embedding_trains {
            let (index, gathered) = self.acquire(&mut fetch)?;
            let embedded = bf16(&|| Ok(self.model.embed(&batch.input_ids)))?;
            let (_, grads) = self.backward_unit(index, &embedded, &upstream, &[])?;
            for (sum, grad) in text_grads.iter_mut().zip(grads) {
                *sum = match (sum.take(), grad) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
            }
            self.sink(index, &text_grads)?;
            self.release(index, gathered);
        }

        // The perceiver, from the media latents' summed gradient.
        let (index, gathered) = self.acquire(&mut fetch)?;
        if let Some(media_grad) = media_grad {
            let resampled = bf16(&|| Ok(self.model.perceive(&features)?))?;
            let (_, grads) = self.backward_unit(index, &resampled, &media_grad, &[])?;
            self.sink(index, &grads)?;
        }
        self.release(index, gathered);
        self.mark("embedding and perceiver backward");
        Ok(mean)
    }

    /// One micro-step: the LAION batch (if any), then the MMC4 batch (if
    /// any). After `gradient_accumulation_steps` of them the optimizer steps
    /// and a report is returned.
    pub fn micro_step(
        &mut self,
        laion: Option<&TrainBatch>,
        mmc4: Option<&TrainBatch>,
    ) -> Result<Option<StepReport>, TrainError> {
        if let Some(batch) = laion {
            let loss = self.accumulate_one(batch, self.config.loss_multiplier_laion)?;
            self.pending_laion.push(loss);
        }
        if let Some(batch) = mmc4 {
            let loss = self.accumulate_one(batch, self.config.loss_multiplier_mmc4)?;
            self.pending_mmc4.push(loss);
        }
        self.micro_steps += 1;
        if !self
            .micro_steps
            .is_multiple_of(self.config.gradient_accumulation_steps)
        {
            return Ok(None);
        }
        self.mark("data");
        let report = self.apply();
        self.mark("optimizer");
        report.map(Some)
    }

    /// The whole flat gradient (`no_shard`, `shard_grad_op`): what the
    /// parameters' `.grad` hold plus what the recomputing pass summed (in
    /// the latter's buffer, which [`Self::zero_gradients`] clears after the
    /// update).
    fn flat_gradient(&self) -> Tensor {
        let gradient = match &self.accumulated {
            Some(accumulated) => accumulated.shallow_clone(),
            None => self.flat.zeros_like(),
        };
        tch::no_grad(|| {
            for slot in &self.slots {
                let grad = slot.tensor.grad();
                if grad.defined() {
                    let _ = gradient
                        .narrow(0, slot.offset, slot.numel)
                        .g_add_(&grad.reshape([-1]));
                }
            }
        });
        gradient
    }

    fn zero_gradients(&mut self) {
        for slot in &mut self.slots {
            slot.tensor.zero_grad();
        }
        if let Some(accumulated) = &mut self.accumulated {
            let _ = accumulated.zero_();
        }
    }

    fn apply(&mut self) -> Result<StepReport, TrainError> {
        let mean = |losses: &[f64]| {
            (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64)
        };
        let loss_laion = mean(&self.pending_laion);
        let loss_mmc4 = mean(&self.pending_mmc4);
        self.pending_laion.clear();
        self.pending_mmc4.clear();
        let lr = self.config.schedule.lr(self.step);
        let non_finite = std::mem::take(&mut self.pending_non_finite);
        let any_non_finite = self.all_reduce_sum(f64::from(u8::from(non_finite)))? > 0.0;
        if any_non_finite {
            self.zero_gradients();
            self.skipped_steps += 1;
            return Ok(StepReport {
                step: self.step,
                loss_laion,
                loss_mmc4,
                lr,
                grad_norm: f64::NAN,
                skipped: true,
            });
        }
        if self.config.strategy.shards_units() {
            return self.apply_full(loss_laion, loss_mmc4, lr);
        }
        let gradient = self.flat_gradient();
        for slot in &mut self.slots {
            slot.tensor.zero_grad();
        }
        if let Some((offset, rows, width, mask)) = &self.embedding_mask {
            let _ = gradient
                .narrow(0, *offset, rows * width)
                .view([*rows, *width])
                .g_mul_(mask);
        }
        let world = self.group.map_or(1, |group| group.world_size());
        let rank = self.rank();
        let (mut shard_gradient, shard_start) = match (self.config.strategy, self.group) {
            (_, Some(group)) if world > 1 && self.config.strategy == Strategy::ShardGradOp => {
                let shard =
                    group.reduce_scatter_flat(&gradient.narrow(0, 0, self.total), ReduceOp::Sum)?;
                (
                    shard,
                    rank * flamingo_collectives::shard_len(self.total, world),
                )
            }
            (_, Some(group)) if world > 1 => {
                group.all_reduce(&gradient, ReduceOp::Sum)?;
                (gradient, 0)
            }
            _ => (gradient, 0),
        };
        let local_squares = squared_norm(&shard_gradient);
        let squares = match self.config.strategy {
            Strategy::ShardGradOp => self.all_reduce_sum(local_squares)?,
            _ => local_squares,
        };
        let grad_norm = self.clip(&mut shard_gradient, squares);
        self.step += 1;
        let length = shard_gradient.numel() as i64;
        let shard = self.flat.narrow(0, shard_start, length);
        // The shard's decayed and undecayed parts, each with its own decay.
        let split = (self.decayed - shard_start).clamp(0, length);
        for (start, len, decay) in [
            (0, split, self.config.weight_decay),
            (split, length - split, 0.0),
        ] {
            if len == 0 {
                continue;
            }
            self.optimizer.update_fused(
                &shard.narrow(0, start, len),
                &shard_gradient.narrow(0, start, len),
                &self.exp_avg.narrow(0, start, len),
                &self.exp_avg_sq.narrow(0, start, len),
                self.step,
                lr,
                decay,
            );
        }
        drop(shard_gradient);
        self.zero_gradients();
        if let (Strategy::ShardGradOp, Some(group)) = (self.config.strategy, self.group) {
            if world > 1 {
                let gathered = group.all_gather_flat(&shard.copy(), self.total)?;
                tch::no_grad(|| self.flat.narrow(0, 0, self.total).copy_(&gathered));
            }
        }
        Ok(StepReport {
            step: self.step,
            loss_laion,
            loss_mmc4,
            lr,
            grad_norm,
            skipped: false,
        })
    }

    /// Scales `gradient` down to the clipping norm, given Σg² over every
    /// rank's part; returns the norm.
    fn clip(&self, gradient: &mut Tensor, squares: f64) -> f64 {
        let grad_norm = squares.sqrt();
        let factor = clip_factor(grad_norm, self.config.max_grad_norm);
        if factor < 1.0 {
            *gradient *= factor;
        }
        grad_norm
    }

    /// `full`: the accumulated shards are already reduced; clip by the
    /// global norm and update each unit's shard with its own decay.
    fn apply_full(
        &mut self,
        loss_laion: Option<f64>,
        loss_mmc4: Option<f64>,
        lr: f64,
    ) -> Result<StepReport, TrainError> {
        let mut gradient = self
            .accumulated
            .as_ref()
            .expect("full accumulates")
            .shallow_clone();
        // Each node holds every shard once (`hybrid`: the same on every
        // node), so the sum over one node's ranks is the global norm.
        let local_squares = squared_norm(&gradient);
        let squares = match self.shard_group.filter(|group| group.world_size() > 1) {
            Some(group) => group.all_reduce_scalar(local_squares, ReduceOp::Sum)?,
            None => local_squares,
        };
        let grad_norm = self.clip(&mut gradient, squares);
        self.step += 1;
        for plan in self.units.iter().filter(|plan| plan.shard_len > 0) {
            let (offset, len) = (plan.shard_offset, plan.shard_len);
            self.optimizer.update_fused(
                &self.flat.narrow(0, offset, len),
                &gradient.narrow(0, offset, len),
                &self.exp_avg.narrow(0, offset, len),
                &self.exp_avg_sq.narrow(0, offset, len),
                self.step,
                lr,
                if plan.decay {
                    self.config.weight_decay
                } else {
                    0.0
                },
            );
        }
        drop(gradient);
        self.zero_gradients();
        Ok(StepReport {
            step: self.step,
            loss_laion,
            loss_mmc4,
            lr,
            grad_norm,
            skipped: false,
        })
    }
}

/// Wall time per phase; on a GPU each mark waits for the device first.
#[derive(Debug)]
struct PhaseTimer {
    device: tch::Device,
    last: std::time::Instant,
    totals: Vec<(&'static str, f64)>,
}

impl PhaseTimer {
    fn new(device: tch::Device) -> Self {
        Self {
            device,
            last: std::time::Instant::now(),
            totals: Vec::new(),
        }
    }

    /// Charges the time since the last mark to `phase`.
    fn mark(&mut self, phase: &'static str) {
        if let tch::Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        let now = std::time::Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        match self.totals.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, total)) => *total += seconds,
            None => self.totals.push((phase, seconds)),
        }
    }
}

/// A micro-batch's loss: this rank's summed token cross-entropy (with its
/// graph) and the global sum and token count.
struct LossParts {
    summed: Tensor,
    global_sum: f64,
    global_tokens: f64,
}

/// Σ g², accumulated in double without a squared copy of `gradient`.
fn squared_norm(gradient: &Tensor) -> f64 {
    let norm = gradient
        .norm_scalaropt_dtype(2.0, Kind::Double)
        .double_value(&[]);
    norm * norm
}

/// Upstream's weight-decay group: the gated cross-attention.
fn is_decayed(name: &str) -> bool {
    name.contains("gated_cross_attn")
}
