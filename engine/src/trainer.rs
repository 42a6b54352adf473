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
//!   updated parameters are all-gathered.

use flamingo_collectives::{ProcessGroup, ReduceOp};
use flamingo_model::{Flamingo, FlamingoTokenizer};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::batch::TrainBatch;
use crate::clip::clip_factor;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    NoShard,
    ShardGradOp,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "no_shard" => Ok(Self::NoShard),
            "shard_grad_op" => Ok(Self::ShardGradOp),
            "full" | "hybrid" => Err(format!(
                "--fsdp_sharding_strategy {text} is not implemented yet (use no_shard or shard_grad_op)"
            )),
            other => Err(format!(
                "--fsdp_sharding_strategy '{other}' (use no_shard or shard_grad_op)"
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
    config: TrainConfig,
    optimizer: AdamW,
    slots: Vec<Slot>,
    /// All trainable values (padded to a multiple of the world size); the
    /// model's parameters are views into it.
    flat: Tensor,
    total: i64,
    /// `[0, decayed)` of the flat buffer takes weight decay.
    decayed: i64,
    /// The input embedding's place in the flat buffer (offset, rows,
    /// width) and a `[rows, 1]` mask, 1 on the rows that train.
    embedding_mask: Option<(i64, i64, i64, Tensor)>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
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

impl<'g> Trainer<'g> {
    pub fn new(
        model: Flamingo,
        tokenizer: &FlamingoTokenizer,
        group: Option<&'g ProcessGroup>,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        if config.gradient_accumulation_steps == 0 {
            return Err(TrainError::Config(
                "--gradient_accumulation_steps must be at least 1".into(),
            ));
        }
        let mut trainable = model.trainable_parameters(!config.freeze_lm_embeddings);
        // Weight-decayed parameters first, so each group is one range.
        trainable.sort_by_key(|(name, _)| !name.contains("gated_cross_attn"));
        let world = group.map_or(1, |group| group.world_size());
        let mut offset = 0;
        let mut slots = Vec::with_capacity(trainable.len());
        let mut decayed = 0;
        for (name, tensor) in trainable {
            let numel = tensor.numel() as i64;
            if name.contains("gated_cross_attn") {
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
        let padded = flamingo_collectives::pad_to_multiple(total.max(1), world);
        let flat = Tensor::zeros([padded], (Kind::Float, tch::Device::Cpu));
        let embedding_name = format!("lang_encoder.{}", model.decoder().input_embedding_name());
        let mut embedding_mask = None;
        tch::no_grad(|| {
            for slot in &mut slots {
                let mut view = flat.narrow(0, slot.offset, slot.numel);
                view.copy_(&slot.tensor.detach().reshape([-1]).to_kind(Kind::Float));
                let shaped = view.view(slot.tensor.size().as_slice());
                slot.tensor.set_data(&shaped);
                let _ = slot.tensor.set_requires_grad(true);
                if slot.name == embedding_name {
                    let rows = slot.tensor.size()[0];
                    let width = slot.numel / rows;
                    let mask = Tensor::zeros([rows, 1], (Kind::Float, tch::Device::Cpu));
                    for id in [
                        tokenizer.media_token_id(),
                        tokenizer.end_of_chunk_token_id(),
                    ] {
                        let _ = mask.get(i64::from(id)).fill_(1.0);
                    }
                    embedding_mask = Some((slot.offset, rows, width, mask));
                }
            }
        });
        // Every rank starts from rank 0's values, as DDP and FSDP do.
        if let Some(group) = group.filter(|group| group.world_size() > 1) {
            group.broadcast(&flat, 0)?;
        }
        let shard = Self::shard_len_for(&config, total, world);
        Ok(Self {
            optimizer: AdamW::new(config.adamw.into()),
            exp_avg: Tensor::zeros([shard], (Kind::Float, tch::Device::Cpu)),
            exp_avg_sq: Tensor::zeros([shard], (Kind::Float, tch::Device::Cpu)),
            model,
            group,
            config,
            slots,
            flat,
            total,
            decayed,
            embedding_mask,
            step: 0,
            micro_steps: 0,
            skipped_steps: 0,
            pending_laion: Vec::new(),
            pending_mmc4: Vec::new(),
            pending_non_finite: false,
        })
    }

    fn shard_len_for(config: &TrainConfig, total: i64, world: i64) -> i64 {
        match config.strategy {
            Strategy::NoShard => flamingo_collectives::pad_to_multiple(total.max(1), world),
            Strategy::ShardGradOp => flamingo_collectives::shard_len(total.max(1), world),
        }
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

    /// Trainable elements.
    pub fn parameter_count(&self) -> i64 {
        self.total
    }

    /// Bytes of this rank's trainable parameters (the flat buffer, held
    /// whole by every rank in both strategies).
    pub fn parameter_bytes(&self) -> i64 {
        4 * self.flat.numel() as i64
    }

    /// Bytes of this rank's optimizer state (AdamW's two moments): all of it
    /// for `no_shard`, 1/world for `shard_grad_op`.
    pub fn optimizer_bytes(&self) -> i64 {
        4 * 2 * self.exp_avg.numel() as i64
    }

    /// The trainable values, flat (unpadded), for checks and checkpoints.
    pub fn flat_parameters(&self) -> Tensor {
        self.flat.narrow(0, 0, self.total).copy()
    }

    /// Where each trainable parameter sits in the flat buffer:
    /// (name, shape, offset).
    pub fn layout(&self) -> Vec<(String, Vec<i64>, i64)> {
        self.slots
            .iter()
            .map(|slot| (slot.name.clone(), slot.tensor.size(), slot.offset))
            .collect()
    }

    /// The range of the flat buffer whose optimizer state this rank holds
    /// (all of it for `no_shard`), clipped to the real elements.
    pub fn owned_range(&self) -> (i64, i64) {
        let world = self.group.map_or(1, |group| group.world_size());
        let rank = self.group.map_or(0, |group| group.rank());
        match self.config.strategy {
            Strategy::NoShard => (0, self.total),
            Strategy::ShardGradOp => {
                let length = flamingo_collectives::shard_len(self.total.max(1), world);
                let start = (rank * length).min(self.total);
                (start, ((rank + 1) * length).min(self.total))
            }
        }
    }

    /// This rank's part of the state, for a checkpoint: (parameters,
    /// first moments, second moments) over [`Self::owned_range`].
    pub fn owned_state(&self) -> (Tensor, Tensor, Tensor) {
        let (start, end) = self.owned_range();
        let (shard_start, _) = match self.config.strategy {
            Strategy::NoShard => (0, 0),
            Strategy::ShardGradOp => self.owned_range(),
        };
        let length = end - start;
        (
            self.flat.narrow(0, start, length).copy(),
            self.exp_avg.narrow(0, start - shard_start, length).copy(),
            self.exp_avg_sq
                .narrow(0, start - shard_start, length)
                .copy(),
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
        let (start, end) = self.owned_range();
        let shard_start = match self.config.strategy {
            Strategy::NoShard => 0,
            Strategy::ShardGradOp => start,
        };
        tch::no_grad(|| {
            self.flat.narrow(0, 0, self.total).copy_(parameters);
            self.exp_avg
                .narrow(0, start - shard_start, end - start)
                .copy_(&exp_avg.narrow(0, start, end - start));
            self.exp_avg_sq
                .narrow(0, start - shard_start, end - start)
                .copy_(&exp_avg_sq.narrow(0, start, end - start));
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

    /// Forward and backward of one dataset's micro-batch; returns its loss
    /// (the global batch's mean token loss).
    fn accumulate_one(&mut self, batch: &TrainBatch, multiplier: f64) -> Result<f64, TrainError> {
        let device = batch.input_ids.device();
        let logits = crate::autocast::bf16(self.config.amp_bf16, device, || {
            self.model.forward_masked(
                &batch.vision_x,
                &batch.input_ids,
                Some(&batch.attention_mask),
            )
        })?;
        let length = logits.size()[1];
        let vocab = logits.size()[2];
        let shifted_labels = batch.labels.narrow(1, 1, length - 1).reshape([-1]);
        let tokens = shifted_labels.ne(-100).sum(Kind::Int64).int64_value(&[]) as f64;
        let global_tokens = self.all_reduce_sum(tokens)?;
        let summed = logits
            .narrow(1, 0, length - 1)
            .to_kind(Kind::Float)
            .reshape([-1, vocab])
            .cross_entropy_loss::<Tensor>(&shifted_labels, None, Reduction::Sum, -100, 0.0);
        let local_sum = summed.double_value(&[]);
        let global_sum = self.all_reduce_sum(local_sum)?;
        let scale =
            multiplier / (global_tokens.max(1.0) * self.config.gradient_accumulation_steps as f64);
        if local_sum.is_finite() {
            (summed * scale).backward();
        } else {
            self.pending_non_finite = true;
        }
        Ok(global_sum / global_tokens.max(1.0))
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
        self.apply().map(Some)
    }

    fn flat_gradient(&self) -> Tensor {
        let gradient = Tensor::empty_like(&self.flat);
        tch::no_grad(|| {
            let padding = gradient.numel() as i64 - self.total;
            let _ = gradient.narrow(0, self.total, padding).zero_();
            for slot in &self.slots {
                let grad = slot.tensor.grad();
                let mut target = gradient.narrow(0, slot.offset, slot.numel);
                if grad.defined() {
                    target.copy_(&grad.reshape([-1]));
                } else {
                    let _ = target.zero_();
                }
            }
        });
        gradient
    }

    fn zero_gradients(&mut self) {
        for slot in &mut self.slots {
            slot.tensor.zero_grad();
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
        let gradient = self.flat_gradient();
        self.zero_gradients();
        if let Some((offset, rows, width, mask)) = &self.embedding_mask {
            let _ = gradient
                .narrow(0, *offset, rows * width)
                .view([*rows, *width])
                .g_mul_(mask);
        }
        let world = self.group.map_or(1, |group| group.world_size());
        let rank = self.group.map_or(0, |group| group.rank());
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
        let local_squares = shard_gradient.square().sum(Kind::Double).double_value(&[]);
        let squares = match self.config.strategy {
            Strategy::ShardGradOp => self.all_reduce_sum(local_squares)?,
            Strategy::NoShard => local_squares,
        };
        let grad_norm = squares.sqrt();
        let factor = clip_factor(grad_norm, self.config.max_grad_norm);
        if factor < 1.0 {
            shard_gradient *= factor;
        }
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
            let mut parameter = shard.narrow(0, start, len);
            let mut exp_avg = self.exp_avg.narrow(0, start, len);
            let mut exp_avg_sq = self.exp_avg_sq.narrow(0, start, len);
            self.optimizer.update_parts(
                &mut parameter,
                &shard_gradient.narrow(0, start, len),
                &mut exp_avg,
                &mut exp_avg_sq,
                self.step,
                lr,
                decay,
            );
        }
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
}
