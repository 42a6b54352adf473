//! `no_shard` and `shard_grad_op`: every rank holds all trainable values
//! in one flat fp32 buffer (the model's parameters are views into it).
//! `no_shard` all-reduces the gradient and every rank updates everything;
//! `shard_grad_op` reduce-scatters it, keeps and updates 1/world of the
//! optimizer state, and all-gathers the updated values.

use flamingo_collectives::{ProcessGroup, ReduceOp};
use tch::{Kind, Tensor};

use super::loss::{all_reduce_sum, clip, squared_norm};
use super::state::{EmbeddingRows, MemoryUse, ParameterState, Slot, Update};
use super::working::ReplicatedCopies;
use super::TrainError;
use crate::units::{self, Gathered, UnitPlan};

pub(crate) struct Replicated<'g> {
    /// Every rank (`None` alone).
    group: Option<&'g ProcessGroup>,
    /// `shard_grad_op`: the optimizer state and update are split over the
    /// group.
    shard_optimizer: bool,
    /// The trainable parameters; their tensors are views into `flat`.
    slots: Vec<Slot>,
    /// Every trainable value, padded to a multiple of the world size.
    flat: Tensor,
    total: i64,
    /// `[0, decayed)` of the flat state takes weight decay.
    decayed: i64,
    embedding: Option<EmbeddingRows>,
    /// AdamW's moments over `flat` (`no_shard`) or over this rank's shard
    /// of it (`shard_grad_op`).
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The model's weights grouped in units: what the recomputing pass
    /// walks, and the frozen weights' size.
    units: Vec<UnitPlan>,
    /// The gradient of the whole flat state summed over the micro-steps
    /// where it does not stay in the parameters' `.grad`: what the
    /// recomputing pass sinks, and the bf16 working copies' gradients.
    accumulated: Option<Tensor>,
    /// Whether forward and backward go unit by unit (a recompute policy).
    recomputes: bool,
    /// `amp_bf16`: bf16 working copies of the Linear weights.
    copies: Option<ReplicatedCopies>,
}

impl<'g> Replicated<'g> {
    /// Copies the model's trainable values into one flat buffer and points
    /// the parameters at it; every rank starts from rank 0's values, as DDP
    /// and FSDP do.
    /// `linear` names the parameters held as bf16 working copies (none
    /// unless `amp_bf16`).
    pub(crate) fn new(
        (group, shard_optimizer): (Option<&'g ProcessGroup>, bool),
        mut slots: Vec<Slot>,
        (total, decayed): (i64, i64),
        embedding: Option<EmbeddingRows>,
        units: Vec<UnitPlan>,
        recomputes: bool,
        linear: impl Fn(&str) -> bool,
    ) -> Result<Self, TrainError> {
        let world = group.map_or(1, ProcessGroup::world_size);
        let device = slots
            .first()
            .map_or(tch::Device::Cpu, |slot| slot.tensor.device());
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
        if let Some(group) = group.filter(|group| group.world_size() > 1) {
            group.broadcast(&flat, 0)?;
        }
        let copies = ReplicatedCopies::new(&mut slots, &flat, linear);
        let state_len = if shard_optimizer {
            flamingo_collectives::shard_len(total.max(1), world)
        } else {
            flat.numel() as i64
        };
        Ok(Self {
            group,
            shard_optimizer,
            slots,
            total,
            decayed,
            embedding,
            exp_avg: Tensor::zeros([state_len], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([state_len], (Kind::Float, device)),
            units,
            accumulated: (recomputes || copies.is_some()).then(|| flat.zeros_like()),
            recomputes,
            copies,
            flat,
        })
    }

    fn world(&self) -> i64 {
        self.group.map_or(1, ProcessGroup::world_size)
    }

    fn rank(&self) -> i64 {
        self.group.map_or(0, ProcessGroup::rank)
    }

    /// Where this rank's optimizer state starts in the flat state.
    fn state_base(&self) -> i64 {
        if self.shard_optimizer {
            self.ranges_of(self.rank())[0].0
        } else {
            0
        }
    }

    /// The whole flat gradient: what the parameters' `.grad` hold plus what
    /// was summed apart (in a buffer [`Self::zero_gradients`] clears after
    /// the update).
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

    /// The reduced gradient this rank updates with, and where it starts in
    /// the flat state.
    fn reduce(&self, gradient: Tensor) -> Result<(Tensor, i64), TrainError> {
        match self.group.filter(|_| self.world() > 1) {
            Some(group) if self.shard_optimizer => {
                let shard =
                    group.reduce_scatter_flat(&gradient.narrow(0, 0, self.total), ReduceOp::Sum)?;
                let start = self.rank() * flamingo_collectives::shard_len(self.total, self.world());
                Ok((shard, start))
            }
            Some(group) => {
                group.all_reduce(&gradient, ReduceOp::Sum)?;
                Ok((gradient, 0))
            }
            None => Ok((gradient, 0)),
        }
    }
}

impl ParameterState for Replicated<'_> {
    fn total(&self) -> i64 {
        self.total
    }

    fn device(&self) -> tch::Device {
        self.flat.device()
    }

    fn plans(&self) -> &[UnitPlan] {
        &self.units
    }

    fn layout(&self) -> Vec<(String, Vec<i64>, i64)> {
        super::state::layout_of(&self.slots)
    }

    fn ranges_of(&self, rank: i64) -> Vec<(i64, i64)> {
        if !self.shard_optimizer {
            return vec![(0, self.total)];
        }
        let length = flamingo_collectives::shard_len(self.total.max(1), self.world());
        let start = (rank * length).min(self.total);
        vec![(start, ((rank + 1) * length).min(self.total))]
    }

    fn shard_world(&self) -> i64 {
        if self.shard_optimizer {
            self.world()
        } else {
            1
        }
    }

    /// `no_shard`: rank 0 alone (every rank holds the same); `shard_grad_op`:
    /// every rank, its optimizer shard.
    fn writes_checkpoints(&self) -> bool {
        self.shard_optimizer || self.rank() == 0
    }

    fn owned_state(&self) -> (Tensor, Tensor, Tensor) {
        let base = self.state_base();
        let (start, end) = self.ranges_of(self.rank())[0];
        let length = end - start;
        (
            self.flat.narrow(0, start, length).copy(),
            self.exp_avg.narrow(0, start - base, length).copy(),
            self.exp_avg_sq.narrow(0, start - base, length).copy(),
        )
    }

    fn restore(&mut self, parameters: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor) {
        let base = self.state_base();
        let (start, end) = self.ranges_of(self.rank())[0];
        let length = end - start;
        tch::no_grad(|| {
            self.flat.narrow(0, 0, self.total).copy_(parameters);
            if let Some(copies) = &self.copies {
                copies.refresh(&self.flat);
            }
            self.exp_avg
                .narrow(0, start - base, length)
                .copy_(&exp_avg.narrow(0, start, length));
            self.exp_avg_sq
                .narrow(0, start - base, length)
                .copy_(&exp_avg_sq.narrow(0, start, length));
        });
    }

    fn flat_parameters(&self) -> Result<Tensor, TrainError> {
        Ok(self.flat.narrow(0, 0, self.total).copy())
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse {
            parameter_bytes: 4 * self.flat.numel() as i64
                + self.copies.as_ref().map_or(0, ReplicatedCopies::bytes),
            gradient_bytes: 4 * self.flat.numel() as i64,
            optimizer_bytes: 4 * 2 * self.exp_avg.numel() as i64,
            frozen_bytes: self
                .units
                .iter()
                .map(|plan| plan.frozen_len * plan.frozen_kind.elt_size_in_bytes() as i64)
                .sum(),
            gathered_peak_bytes: 0,
        }
    }

    fn recomputes(&self) -> bool {
        self.recomputes
    }

    fn fold_gradients(&mut self) {
        if let (Some(copies), Some(accumulated)) = (&self.copies, &self.accumulated) {
            copies.fold_gradients(&mut self.slots, accumulated);
        }
    }

    fn start_gather(&self, index: usize) -> Result<Gathered, TrainError> {
        // The model keeps every weight: nothing to gather.
        units::start_gather(index, None, None, None)
    }

    fn install(&mut self, gathered: Gathered, _ahead: i64) -> Result<Gathered, TrainError> {
        units::install(&self.units, gathered)
    }

    fn release(&self, _index: usize, gathered: Gathered) {
        drop(gathered);
    }

    fn sink(&mut self, index: usize, grads: Vec<Option<Tensor>>) -> Result<(), TrainError> {
        let plan = &self.units[index];
        let recomputed = self
            .accumulated
            .as_ref()
            .filter(|_| self.recomputes)
            .expect("only the recomputing pass sinks gradients");
        if plan.len == 0 {
            return Ok(());
        }
        let whole = units::flatten_gradients(plan, grads, plan.len, self.flat.device());
        let _ = recomputed.narrow(0, plan.start, plan.len).g_add_(&whole);
        Ok(())
    }

    fn discard_gradients(&mut self) {
        self.zero_gradients();
    }

    fn update(&mut self, update: &Update<'_>) -> Result<f64, TrainError> {
        let gradient = self.flat_gradient();
        for slot in &mut self.slots {
            slot.tensor.zero_grad();
        }
        if let Some(embedding) = &self.embedding {
            embedding.mask(&gradient, 0, self.total);
        }
        let (mut shard_gradient, shard_start) = self.reduce(gradient)?;
        let local_squares = squared_norm(&shard_gradient);
        let squares = if self.shard_optimizer {
            all_reduce_sum(self.group, local_squares)?
        } else {
            local_squares
        };
        let grad_norm = clip(&mut shard_gradient, squares, update.max_grad_norm);
        let length = shard_gradient.numel() as i64;
        let shard = self.flat.narrow(0, shard_start, length);
        // The shard's decayed and undecayed parts, each with its own decay.
        let split = (self.decayed - shard_start).clamp(0, length);
        for (start, len, decay) in [
            (0, split, update.weight_decay),
            (split, length - split, 0.0),
        ] {
            if len == 0 {
                continue;
            }
            update.optimizer.update_fused(
                &shard.narrow(0, start, len),
                &shard_gradient.narrow(0, start, len),
                &self.exp_avg.narrow(0, start, len),
                &self.exp_avg_sq.narrow(0, start, len),
                update.step,
                update.lr,
                decay,
            );
        }
        drop(shard_gradient);
        self.zero_gradients();
        if let Some(group) = self
            .group
            .filter(|_| self.shard_optimizer && self.world() > 1)
        {
            let gathered = group.all_gather_flat(&shard.copy(), self.total)?;
            tch::no_grad(|| self.flat.narrow(0, 0, self.total).copy_(&gathered));
        }
        if let Some(copies) = &self.copies {
            copies.refresh(&self.flat);
        }
        Ok(grad_norm)
    }
}
