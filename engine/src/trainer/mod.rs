//! The training step on a rank: OpenFlamingo's recipe (reference §2) over
//! the trainable parameters held as flat fp32 state.
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
//! - Where the state lives is one of two types behind [`state::ParameterState`]:
//!   [`replicated::Replicated`] for `no_shard` and `shard_grad_op`, and
//!   [`sharded::ShardedUnits`] for `full` and `hybrid` (see [`crate::units`]).
//! - `full` and `hybrid` go unit by unit ([`recompute`]): without
//!   `--gradient_checkpointing` each unit keeps its graph while its
//!   gathered weights' bytes are freed until its backward gathers them
//!   again; with it (under any strategy) the forward pass keeps only each
//!   unit's input and backward recomputes one unit at a time.

mod loss;
mod phases;
mod recompute;
mod replicated;
mod sharded;
mod state;
mod working;

use flamingo_collectives::ProcessGroup;
use flamingo_common::train::{RecomputePolicy, Strategy};
use flamingo_model::Flamingo;
use flamingo_preprocess::FlamingoTokenizer;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::batch::TrainBatch;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use phases::{mark, PhaseTimer};
pub use recompute::RecomputePlan;
use replicated::Replicated;
use sharded::ShardedUnits;
pub use state::MemoryUse;
use state::{EmbeddingRows, ParameterState, Update};

/// What the step does, resolved from a run's configuration
/// ([`TrainConfig::for_job`]); saved with checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub strategy: Strategy,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub loss_multiplier_laion: f64,
    pub loss_multiplier_mmc4: f64,
    pub gradient_accumulation_steps: u64,
    pub freeze_lm_embeddings: bool,
    /// `--precision amp_bf16`: the forward pass under bf16 autocast.
    #[serde(default)]
    pub amp_bf16: bool,
    /// `--gradient_checkpointing`: keep only unit inputs in forward and
    /// recompute in backward (`recompute_policy` `full`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `--recompute_policy`: what backward recomputes.
    #[serde(default = "no_recompute")]
    pub recompute_policy: RecomputePolicy,
    /// `--activation_budget_gib`, for `recompute_policy` `auto`.
    #[serde(default)]
    pub activation_budget_gib: f64,
    /// Under `amp_bf16`: keep bf16 working copies of the trainable Linear
    /// weights, made once per optimizer step, instead of autocast's cast
    /// at every use (the same arithmetic; off with
    /// `--cast_weights_per_use`).
    #[serde(default)]
    pub bf16_weight_copies: bool,
    /// `--cuda_graphs`: the plain step's forward and backward as a CUDA
    /// graph per batch shape ([`crate::cuda_graph`]).
    #[serde(default)]
    pub cuda_graphs: bool,
}

fn no_recompute() -> RecomputePolicy {
    RecomputePolicy::None
}

impl TrainConfig {
    /// The step of `job` on `world` ranks (the schedule's length depends on
    /// the world size).
    pub fn for_job(job: &flamingo_common::train::TrainJob, world: u64) -> Self {
        Self {
            strategy: job.fsdp_sharding_strategy,
            schedule: Schedule {
                kind: job.lr_scheduler,
                base_lr: job.learning_rate,
                warmup_steps: job.warmup_steps,
                total_steps: job.total_steps(world),
            },
            weight_decay: job.weight_decay,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            loss_multiplier_laion: job.loss_multiplier_laion,
            loss_multiplier_mmc4: job.loss_multiplier_mmc4,
            gradient_accumulation_steps: job.gradient_accumulation_steps,
            freeze_lm_embeddings: job.freeze_lm_embeddings,
            amp_bf16: job.precision.autocast_bf16(),
            gradient_checkpointing: job.gradient_checkpointing,
            recompute_policy: job.recompute_policy,
            activation_budget_gib: job.activation_budget_gib,
            bf16_weight_copies: !job.cast_weights_per_use,
            cuda_graphs: job.cuda_graphs,
        }
    }

    /// The recompute policy in force (`full` under
    /// `--gradient_checkpointing`).
    pub fn recompute(&self) -> RecomputePolicy {
        if self.gradient_checkpointing {
            RecomputePolicy::Full
        } else {
            self.recompute_policy
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
    /// A training setting that cannot run; `field` is its flag.
    #[error("--{field}: {message}")]
    Setting {
        field: &'static str,
        message: String,
    },
    /// The model's weights cannot be grouped into units.
    #[error("unit layout: weight {weight}: {message}")]
    UnitLayout { weight: String, message: String },
    /// A checkpoint of another model.
    #[error("the checkpoint holds {checkpoint} trainable values but this model has {model}; is it the same model spec and --freeze_lm_embeddings?")]
    CheckpointSize { checkpoint: i64, model: i64 },
    /// A checkpoint (folder or file) that cannot be read or written.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        path: std::path::PathBuf,
        message: String,
    },
    /// libtorch's backward through a unit failed.
    #[error("backward through a unit failed: {message}")]
    Backward { message: String },
}

/// The model's logits for `batch` (the whole model at once), under bf16
/// autocast when `amp`.
fn logits(model: &Flamingo, amp: bool, batch: &TrainBatch) -> Result<Tensor, TrainError> {
    let device = batch.input_ids.device();
    Ok(crate::autocast::bf16(amp, device, || {
        model.forward_masked(
            &batch.vision_x,
            &batch.input_ids,
            Some(&batch.attention_mask),
        )
    })?)
}

/// One dataset's micro-batch: its loss (the global batch's mean token
/// loss) and whether it was finite.
pub(crate) struct MicroLoss {
    pub(crate) mean: f64,
    pub(crate) finite: bool,
}

pub struct Trainer<'g> {
    model: Flamingo,
    /// Every rank (`None` alone): the global loss and the skip decision.
    group: Option<&'g ProcessGroup>,
    config: TrainConfig,
    optimizer: AdamW,
    state: Box<dyn ParameterState + 'g>,
    /// How each unit keeps what its backward needs.
    policies: recompute::Policies,
    /// Seconds per phase of the step, when timing is on (see
    /// [`Trainer::time_phases`]).
    phases: Option<PhaseTimer>,
    /// Optimizer steps taken.
    step: u64,
    micro_steps: u64,
    skipped_steps: u64,
    /// Losses of the micro-steps of the current step.
    pending_laion: Vec<f64>,
    pending_mmc4: Vec<f64>,
    pending_non_finite: bool,
    /// `--cuda_graphs`: the captured shapes.
    graphs: Option<crate::cuda_graph::Graphs>,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Trainer")
            .field("step", &self.step)
            .field("parameters", &self.state.total())
            .finish()
    }
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
        Self::with_groups(model, tokenizer, (group, group, None), config)
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
            (Some(group), Some(node), Some(replicas)),
            config,
        )
    }

    /// `groups`: every rank, the ranks units are sharded over, and the
    /// ranks holding the same shards elsewhere.
    #[allow(clippy::type_complexity)]
    fn with_groups(
        mut model: Flamingo,
        tokenizer: &FlamingoTokenizer,
        groups: (
            Option<&'g ProcessGroup>,
            Option<&'g ProcessGroup>,
            Option<&'g ProcessGroup>,
        ),
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        let (group, shard_group, replicate_group) = groups;
        if config.gradient_accumulation_steps == 0 {
            return Err(TrainError::Setting {
                field: "gradient_accumulation_steps",
                message: "must be at least 1".into(),
            });
        }
        // Only sharded units read a lazily loaded model's weights by range;
        // the other strategies keep them whole.
        if !config.strategy.shards_units() && model.has_unread() {
            model.materialize()?;
        }
        let (slots, total, decayed) = state::slots(&model, !config.freeze_lm_embeddings);
        let device = slots
            .first()
            .map_or(tch::Device::Cpu, |slot| slot.tensor.device());
        let embedding = EmbeddingRows::find(&model, tokenizer, &slots);
        let units = crate::units::plan(&model, &state::layout_of(&slots), state::is_decayed)?;
        let copies = config.amp_bf16 && config.bf16_weight_copies;
        let linear = |name: &str| copies && model.is_linear_weight(name);
        let state: Box<dyn ParameterState + 'g> = if config.strategy.shards_units() {
            Box::new(ShardedUnits::new(
                (group, shard_group, replicate_group),
                units,
                total,
                embedding,
                device,
                |name| model.unread(name).cloned(),
                linear,
            )?)
        } else {
            Box::new(Replicated::new(
                (group, config.strategy == Strategy::ShardGradOp),
                slots,
                (total, decayed),
                embedding,
                units,
                config.recompute() != RecomputePolicy::None,
                linear,
            )?)
        };
        if config.cuda_graphs {
            if !device.is_cuda() {
                return Err(TrainError::Setting {
                    field: "cuda_graphs",
                    message: format!("needs the model on a CUDA device, not {device:?}"),
                });
            }
            if state.recomputes() {
                return Err(TrainError::Setting {
                    field: "cuda_graphs",
                    message:
                        "graphs the whole-model step: no_shard or shard_grad_op without recompute"
                            .into(),
                });
            }
        }
        Ok(Self {
            graphs: config.cuda_graphs.then(crate::cuda_graph::Graphs::default),
            optimizer: AdamW::new(config.adamw),
            model,
            group,
            policies: recompute::Policies::new(&config, state.plans().len()),
            config,
            state,
            phases: None,
            step: 0,
            micro_steps: 0,
            skipped_steps: 0,
            pending_laion: Vec::new(),
            pending_mmc4: Vec::new(),
            pending_non_finite: false,
        })
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
        self.state.total()
    }

    /// What this rank holds between steps (for `bench/train-memory`).
    pub fn memory(&self) -> MemoryUse {
        self.state.memory()
    }

    /// Starts (or stops) timing the phases of each step: vision, perceiver,
    /// layers forward and backward, head, optimizer, … On a GPU every phase
    /// boundary synchronises the device, so this slows the step a little;
    /// it is for profiling.
    pub fn time_phases(&mut self, on: bool) {
        self.phases = on.then(|| PhaseTimer::new(self.state.device()));
    }

    /// The seconds spent per phase since timing started, in first-seen order.
    pub fn phase_times(&self) -> Vec<(&'static str, f64)> {
        self.phases
            .as_ref()
            .map_or_else(Vec::new, |timer| timer.totals.clone())
    }

    /// The trainable values, flat (unpadded), for checks and checkpoints.
    /// Under `full` this gathers them: every rank must call it.
    pub fn flat_parameters(&self) -> Result<Tensor, TrainError> {
        self.state.flat_parameters()
    }

    /// Where each trainable parameter sits in the flat buffer:
    /// (name, shape, offset).
    pub fn layout(&self) -> Vec<(String, Vec<i64>, i64)> {
        self.state.layout()
    }

    /// The ranges of the flat state whose values and optimizer state `rank`
    /// holds (all of it for `no_shard`), clipped to the real elements; a
    /// checkpoint file holds them one after another. Under `hybrid`, `rank`
    /// is a rank within the node (the first node's ranks write checkpoints:
    /// see [`Self::writes_checkpoints`]).
    pub fn ranges_of(&self, rank: i64) -> Vec<(i64, i64)> {
        self.state.ranges_of(rank)
    }

    /// How many ranks the state is split over (`hybrid`: a node's).
    pub fn shard_world(&self) -> i64 {
        self.state.shard_world()
    }

    /// Whether this rank writes its part of a checkpoint: every rank for
    /// `shard_grad_op` and `full`, rank 0 for `no_shard`, the first node's
    /// ranks for `hybrid` (the other nodes hold copies).
    pub fn writes_checkpoints(&self) -> bool {
        self.state.writes_checkpoints()
    }

    /// This rank's part of the state, for a checkpoint: (parameters,
    /// first moments, second moments) over [`Self::ranges_of`] this rank,
    /// concatenated.
    pub fn owned_state(&self) -> (Tensor, Tensor, Tensor) {
        self.state.owned_state()
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
        let total = self.state.total();
        if parameters.numel() as i64 != total {
            return Err(TrainError::CheckpointSize {
                checkpoint: parameters.numel() as i64,
                model: total,
            });
        }
        let device = self.state.device();
        self.state.restore(
            &parameters.to_device(device),
            &exp_avg.to_device(device),
            &exp_avg_sq.to_device(device),
        );
        self.step = step;
        self.skipped_steps = skipped_steps;
        Ok(())
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
            let loss = self.accumulate(batch, self.config.loss_multiplier_laion)?;
            self.pending_laion.push(loss);
        }
        if let Some(batch) = mmc4 {
            let loss = self.accumulate(batch, self.config.loss_multiplier_mmc4)?;
            self.pending_mmc4.push(loss);
        }
        self.micro_steps += 1;
        if !self
            .micro_steps
            .is_multiple_of(self.config.gradient_accumulation_steps)
        {
            return Ok(None);
        }
        mark(&mut self.phases, "data");
        let report = self.apply();
        mark(&mut self.phases, "optimizer");
        report.map(Some)
    }

    /// Runs the graphed step's code (static inputs, the loss scale as a
    /// device scalar, the loss read back after) with eager stand-ins for
    /// the graphs, so that the CPU can check it against the plain step.
    #[doc(hidden)]
    pub fn graph_eagerly_for_tests(&mut self) {
        self.graphs = Some(crate::cuda_graph::Graphs::eager());
    }

    /// What `--recompute_policy auto` chose for each unit, once its first
    /// micro-batch measured them.
    pub fn recompute_plan(&self) -> Option<RecomputePlan> {
        self.policies.plan()
    }

    /// The mean loss of `batch` under the current weights, forward only: no
    /// graph, no gradient, the optimizer untouched (under `full`/`hybrid`
    /// unit by unit, each gathered and released in turn).
    pub fn loss(&mut self, batch: &TrainBatch) -> Result<f64, TrainError> {
        if self.state.recomputes() {
            return recompute::Pass {
                model: &self.model,
                state: self.state.as_mut(),
                group: self.group,
                config: &self.config,
                phases: &mut self.phases,
                policies: &mut self.policies,
            }
            .loss(batch);
        }
        let logits = tch::no_grad(|| logits(&self.model, self.config.amp_bf16, batch))?;
        Ok(loss::token_loss(self.group, &logits, &batch.labels)?.mean())
    }

    /// Forward and backward of one dataset's micro-batch; returns its loss.
    fn accumulate(&mut self, batch: &TrainBatch, multiplier: f64) -> Result<f64, TrainError> {
        let micro = if self.state.recomputes() {
            recompute::Pass {
                model: &self.model,
                state: self.state.as_mut(),
                group: self.group,
                config: &self.config,
                phases: &mut self.phases,
                policies: &mut self.policies,
            }
            .run(batch, multiplier)?
        } else if self.graphs.is_some() {
            self.forward_backward_graphed(batch, multiplier)?
        } else {
            self.forward_backward(batch, multiplier)?
        };
        self.pending_non_finite |= !micro.finite;
        Ok(micro.mean)
    }

    /// The plain pass: the whole model forward with a graph, and one
    /// backward into the parameters' `.grad`.
    fn forward_backward(
        &mut self,
        batch: &TrainBatch,
        multiplier: f64,
    ) -> Result<MicroLoss, TrainError> {
        mark(&mut self.phases, "data");
        let logits = logits(&self.model, self.config.amp_bf16, batch)?;
        let loss = loss::token_loss(self.group, &logits, &batch.labels)?;
        mark(&mut self.phases, "forward and loss");
        // The global sum is the same on every rank, so all skip together.
        let finite = loss.global_sum.is_finite();
        if finite {
            let scale = loss.scale(multiplier, self.config.gradient_accumulation_steps);
            (&loss.summed * scale).backward();
            self.state.fold_gradients();
        }
        mark(&mut self.phases, "backward");
        Ok(MicroLoss {
            mean: loss.mean(),
            finite,
        })
    }

    /// [`Self::forward_backward`] through a CUDA graph of the batch's
    /// shape: eager on the graph's side stream for the first runs, then
    /// captured once and replayed. The backward runs even when the loss is
    /// not finite (the graph holds it); the step is then skipped and its
    /// gradients dropped all the same.
    fn forward_backward_graphed(
        &mut self,
        batch: &TrainBatch,
        multiplier: f64,
    ) -> Result<MicroLoss, TrainError> {
        mark(&mut self.phases, "data");
        let global_tokens =
            loss::all_reduce_sum(self.group, loss::token_count(&batch.labels))?.max(1.0);
        let scale = multiplier / (global_tokens * self.config.gradient_accumulation_steps as f64);
        let (model, amp) = (&self.model, self.config.amp_bf16);
        let graphs = self
            .graphs
            .as_mut()
            .expect("graphed only with --cuda_graphs");
        let entry = graphs.entry(batch)?;
        let _ = entry.scale.fill_(scale);
        let run = |inputs: &TrainBatch, scale: &Tensor| -> Result<Tensor, TrainError> {
            let logits = logits(model, amp, inputs)?;
            let summed = loss::summed_token_loss(&logits, &inputs.labels);
            (&summed * scale).backward();
            Ok(summed.detach())
        };
        let summed = if entry.runs < crate::cuda_graph::WARM_UP_RUNS || entry.graph.is_eager() {
            // Eager, on the side stream the capture will use, so that
            // lazily made state (cuBLAS workspaces, every `.grad`) exists
            // before it.
            entry.runs += 1;
            entry
                .graph
                .on_side_stream(|| run(&entry.inputs, &entry.scale))??
        } else {
            if entry.summed.is_none() {
                let summed = entry.graph.capture(|| run(&entry.inputs, &entry.scale))??;
                entry.summed = Some(summed);
            }
            entry.graph.replay()?;
            entry.summed.as_ref().expect("captured").shallow_clone()
        };
        let global_sum = loss::all_reduce_sum(self.group, summed.double_value(&[]))?;
        self.state.fold_gradients();
        mark(&mut self.phases, "forward and backward (graph)");
        Ok(MicroLoss {
            mean: global_sum / global_tokens,
            finite: global_sum.is_finite(),
        })
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
        let any_non_finite =
            loss::all_reduce_sum(self.group, f64::from(u8::from(non_finite)))? > 0.0;
        let mut report = StepReport {
            step: self.step,
            loss_laion,
            loss_mmc4,
            lr,
            grad_norm: f64::NAN,
            skipped: any_non_finite,
        };
        if any_non_finite {
            self.state.discard_gradients();
            self.skipped_steps += 1;
            return Ok(report);
        }
        self.step += 1;
        report.step = self.step;
        report.grad_norm = self.state.update(&Update {
            optimizer: &self.optimizer,
            step: self.step,
            lr,
            weight_decay: self.config.weight_decay,
            max_grad_norm: self.config.max_grad_norm,
        })?;
        Ok(report)
    }
}
