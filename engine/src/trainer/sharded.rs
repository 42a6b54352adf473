//! `full` and `hybrid`: each rank keeps 1/world of every unit's trainable
//! fp32 values, optimizer state and frozen weights (`hybrid`: 1/node of
//! them, the same on every node). A unit is gathered just before use and
//! freed after; its gradient is reduce-scattered as soon as its backward is
//! done (see [`crate::units`]).

use flamingo_collectives::{ProcessGroup, ReduceOp};
use tch::{Kind, Tensor};

use super::loss::{clip, squared_norm};
use super::state::{EmbeddingRows, MemoryUse, ParameterState, Update};
use super::working::ShardedCopies;
use super::TrainError;
use crate::units::{self, Gathered, UnitPlan, UnitShard};

pub(crate) struct ShardedUnits<'g> {
    /// The ranks a unit is sharded over: all of them (`full`) or this
    /// node's (`hybrid`); `None` alone.
    shard_group: Option<&'g ProcessGroup>,
    /// `hybrid`: the ranks holding the same shard on the other nodes.
    replicate_group: Option<&'g ProcessGroup>,
    units: Vec<UnitPlan>,
    /// This rank's part of each unit, by unit index.
    shards: Vec<UnitShard>,
    /// This rank's trainable shards, one after another.
    local: Tensor,
    total: i64,
    embedding: Option<EmbeddingRows>,
    /// AdamW's moments over `local`: empty until first needed (the first
    /// backward, the first update or a restore), as torch's AdamW makes its
    /// state at the first step, so that loading holds only the weights.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The reduced gradient shards summed over the micro-steps, made at a
    /// step's first gradient and dropped after its update (torch's
    /// `zero_grad(set_to_none=True)`); its pages are first written as each
    /// unit's gradient arrives, so early in a step's backward, where a
    /// rank holds the most activations, it takes almost no memory.
    accumulated: Tensor,
    /// Which units' ranges of `accumulated` hold a gradient this step (the
    /// others are unwritten).
    written: Vec<bool>,
    /// The most bytes of gathered (whole) units alive at once.
    gathered_peak: i64,
    /// `amp_bf16`: bf16 working copies of the units with Linear weights,
    /// which are gathered from them.
    copies: Option<ShardedCopies>,
}

/// Gathered units at least this large give the heap's free pages back
/// when they are released or parked.
const LARGE_UNIT_BYTES: i64 = 32 << 20;

impl<'g> ShardedUnits<'g> {
    /// Keeps this rank's shard of every unit (rank 0's trainable values, as
    /// FSDP's `sync_module_states`) and frees the whole weights. Weights the
    /// loader left unread (`unread` says where their values lie) are read
    /// by range, this rank's shard only: the whole unit is never held.
    /// `groups`: every rank, the ranks units are sharded over, and the
    /// ranks holding the same shards elsewhere.
    #[allow(clippy::type_complexity)]
    pub(crate) fn new(
        (group, shard_group, replicate_group): (
            Option<&'g ProcessGroup>,
            Option<&'g ProcessGroup>,
            Option<&'g ProcessGroup>,
        ),
        units: Vec<UnitPlan>,
        total: i64,
        embedding: Option<EmbeddingRows>,
        device: tch::Device,
        unread: impl Fn(&str) -> Option<flamingo_model::safetensors::LazyTensor>,
        linear: impl Fn(&str) -> bool,
    ) -> Result<Self, TrainError> {
        let world = shard_group.map_or(1, ProcessGroup::world_size);
        let rank = shard_group.map_or(0, ProcessGroup::rank);
        let mut local_len = 0;
        let mut shards: Vec<UnitShard> = units
            .iter()
            .map(|plan| {
                let len = if plan.len == 0 {
                    0
                } else {
                    flamingo_collectives::shard_len(plan.len, world)
                };
                let shard = UnitShard {
                    len,
                    offset: local_len,
                    frozen: None,
                };
                local_len += len;
                shard
            })
            .collect();
        let local = Tensor::zeros([local_len.max(1)], (Kind::Float, device));
        let unread = |name: &str| unread(name);
        for (plan, shard) in units.iter().zip(&mut shards) {
            if shard.len > 0 {
                // Weights left unread (a lazy load) are read by range, each
                // rank its own shard from the same files; loaded ones are
                // rank 0's, broadcast whole (FSDP's sync_module_states).
                let lazy = plan
                    .trainable
                    .iter()
                    .any(|member| unread(&member.name).is_some());
                let values = if lazy {
                    units::shard_of(
                        &plan.trainable,
                        (rank * shard.len, shard.len),
                        Kind::Float,
                        device,
                        unread,
                    )?
                } else {
                    let whole =
                        units::concatenate(&plan.trainable, shard.len * world, Kind::Float, device);
                    if let Some(group) = group.filter(|_| world > 1) {
                        group.broadcast(&whole, 0)?;
                    }
                    whole.narrow(0, rank * shard.len, shard.len)
                };
                tch::no_grad(|| local.narrow(0, shard.offset, shard.len).copy_(&values));
                for member in &plan.trainable {
                    let _ = member.tensor.set_requires_grad(true);
                }
            }
            if plan.frozen_len > 0 {
                let length = flamingo_collectives::shard_len(plan.frozen_len, world);
                shard.frozen = Some(units::shard_of(
                    &plan.frozen,
                    (rank * length, length),
                    plan.frozen_kind,
                    device,
                    unread,
                )?);
            }
            units::release(plan);
            // Reading and cutting a unit leaves freed heap pages that glibc
            // keeps (its top is pinned by later small allocations); given
            // back after each unit, a rank's load peaks at its shards plus
            // one unit's reads instead of growing with every unit (the 1B
            // bench model at 4 ranks: 1.7-2.1 GiB kept, 1.2 GiB trimmed).
            units::trim_heap();
        }
        let unit_count = units.len();
        let copies = ShardedCopies::new(&units, &shards, (rank, world), &local, linear);
        if let Some(copies) = &copies {
            copies.refresh(&shards, &local, shard_group)?;
        }
        Ok(Self {
            shard_group,
            replicate_group,
            units,
            shards,
            exp_avg: Tensor::zeros([0], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([0], (Kind::Float, device)),
            accumulated: Tensor::zeros([0], (Kind::Float, device)),
            written: vec![false; unit_count],
            local,
            total,
            embedding,
            gathered_peak: 0,
            copies,
        })
    }

    /// Makes the optimizer's moments, zeroed, the first time they are
    /// needed.
    fn allocate_state(&mut self) {
        for state in [&mut self.exp_avg, &mut self.exp_avg_sq] {
            if state.numel() != self.local.numel() {
                *state = self.local.zeros_like();
            }
        }
    }

    /// The step's gradient accumulator, made (unwritten) at its first use.
    fn accumulator(&mut self) -> &Tensor {
        if self.accumulated.numel() != self.local.numel() {
            self.accumulated = Tensor::empty(
                [self.local.numel() as i64],
                (Kind::Float, self.local.device()),
            );
            self.written.fill(false);
        }
        &self.accumulated
    }

    fn rank(&self) -> i64 {
        self.shard_group.map_or(0, ProcessGroup::rank)
    }

    fn world(&self) -> i64 {
        self.shard_group.map_or(1, ProcessGroup::world_size)
    }

    /// The units with trainable values, with this rank's shard of each.
    fn trainable_units(&self) -> impl Iterator<Item = (&UnitPlan, &UnitShard)> {
        self.units
            .iter()
            .zip(&self.shards)
            .filter(|(plan, _)| plan.len > 0)
    }

    /// For each range this rank owns: (flat-state start, local start,
    /// length).
    fn owned_pieces(&self) -> Vec<(i64, i64, i64)> {
        let rank = self.rank();
        self.trainable_units()
            .map(|(plan, shard)| {
                let (start, end) = shard.owned_by(plan, rank);
                (start, shard.offset, end - start)
            })
            .filter(|(_, _, length)| *length > 0)
            .collect()
    }

    /// What this rank gathers unit `index` from: its trainable shard (the
    /// bf16 working copy where the unit has one, else the fp32 masters)
    /// and its frozen shard.
    fn sources(&self, index: usize) -> (Option<Tensor>, Option<&Tensor>) {
        let shard = &self.shards[index];
        let trainable = self
            .copies
            .as_ref()
            .and_then(|copies| copies.shard(index))
            .or_else(|| (shard.len > 0).then(|| self.local.narrow(0, shard.offset, shard.len)));
        (trainable, shard.frozen.as_ref())
    }

    fn gather_trainable(&self, shard: &UnitShard, len: i64) -> Result<Tensor, TrainError> {
        let local = self.local.narrow(0, shard.offset, shard.len);
        match self.shard_group.filter(|group| group.world_size() > 1) {
            Some(group) => Ok(group.all_gather_flat(&local.copy(), len)?),
            None => Ok(local.copy()),
        }
    }
}

impl ParameterState for ShardedUnits<'_> {
    fn total(&self) -> i64 {
        self.total
    }

    fn device(&self) -> tch::Device {
        self.local.device()
    }

    fn plans(&self) -> &[UnitPlan] {
        &self.units
    }

    fn layout(&self) -> Vec<(String, Vec<i64>, i64)> {
        let mut layout: Vec<(String, Vec<i64>, i64)> = self
            .units
            .iter()
            .flat_map(|plan| {
                plan.trainable.iter().map(|member| {
                    (
                        member.name.clone(),
                        member.shape.clone(),
                        plan.start + member.offset,
                    )
                })
            })
            .collect();
        layout.sort_by_key(|(_, _, offset)| *offset);
        layout
    }

    /// Under `hybrid`, `rank` is a rank within the node (the first node's
    /// ranks write checkpoints).
    fn ranges_of(&self, rank: i64) -> Vec<(i64, i64)> {
        self.trainable_units()
            .map(|(plan, shard)| shard.owned_by(plan, rank))
            .filter(|(start, end)| end > start)
            .collect()
    }

    fn shard_world(&self) -> i64 {
        self.world()
    }

    /// Every rank of `full`; under `hybrid` the first node's ranks (the
    /// other nodes hold copies).
    fn writes_checkpoints(&self) -> bool {
        self.replicate_group.is_none_or(|group| group.rank() == 0)
    }

    fn owned_state(&self) -> (Tensor, Tensor, Tensor) {
        let pieces = self.owned_pieces();
        let zeros = Tensor::zeros([0], (Kind::Float, self.local.device()));
        let take = |source: &Tensor| {
            // Moments not made yet (no step taken) are zeros.
            let zeros_like_local;
            let source = if source.numel() == self.local.numel() {
                source
            } else {
                zeros_like_local = self.local.zeros_like();
                &zeros_like_local
            };
            let parts: Vec<Tensor> = pieces
                .iter()
                .map(|(_, local, length)| source.narrow(0, *local, *length))
                .collect();
            if parts.is_empty() {
                zeros.shallow_clone()
            } else {
                Tensor::cat(&parts, 0)
            }
        };
        (
            take(&self.local),
            take(&self.exp_avg),
            take(&self.exp_avg_sq),
        )
    }

    fn restore(&mut self, parameters: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor) {
        self.allocate_state();
        tch::no_grad(|| {
            for (start, local, length) in self.owned_pieces() {
                for (target, source) in [
                    (&self.local, parameters),
                    (&self.exp_avg, exp_avg),
                    (&self.exp_avg_sq, exp_avg_sq),
                ] {
                    target
                        .narrow(0, local, length)
                        .copy_(&source.narrow(0, start, length));
                }
            }
        });
        if let Some(copies) = &self.copies {
            copies.restore(&self.shards, &self.local, parameters);
        }
    }

    fn flat_parameters(&self) -> Result<Tensor, TrainError> {
        let whole = Tensor::zeros([self.total], (Kind::Float, self.local.device()));
        for (plan, shard) in self.trainable_units() {
            let gathered = self.gather_trainable(shard, plan.len)?;
            tch::no_grad(|| {
                whole
                    .narrow(0, plan.start, plan.len)
                    .copy_(&gathered.narrow(0, 0, plan.len))
            });
        }
        Ok(whole)
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse {
            parameter_bytes: 4 * self.local.numel() as i64
                + self.copies.as_ref().map_or(0, ShardedCopies::bytes),
            gradient_bytes: 4 * self.local.numel() as i64,
            // The moments are made at the first step; this is what a rank
            // holds from then on.
            optimizer_bytes: 4 * 2 * self.local.numel() as i64,
            frozen_bytes: self
                .shards
                .iter()
                .filter_map(|shard| shard.frozen.as_ref())
                .map(|frozen| frozen.numel() as i64 * frozen.kind().elt_size_in_bytes() as i64)
                .sum(),
            gathered_peak_bytes: self.gathered_peak,
        }
    }

    fn recomputes(&self) -> bool {
        true
    }

    fn start_gather(&self, index: usize) -> Result<Gathered, TrainError> {
        let (trainable, frozen) = self.sources(index);
        units::start_gather(index, trainable, frozen, self.shard_group)
    }

    fn prefetches(&self, current: usize, next: usize) -> bool {
        units::prefetches(
            &self.shards[current],
            &self.shards[next],
            self.world(),
            self.local.device(),
        )
    }

    fn install(&mut self, gathered: Gathered, ahead: i64) -> Result<Gathered, TrainError> {
        self.gathered_peak = self.gathered_peak.max(gathered.bytes + ahead);
        let Some(copies) = &self.copies else {
            return units::install(&self.units, gathered);
        };
        let index = gathered.unit();
        let gathered = units::install_except(&self.units, gathered, |member| {
            copies.is_exact(index, member)
        })?;
        copies.point_exact(index, &self.units[index]);
        Ok(gathered)
    }

    /// After a large unit (64 MiB or more gathered) the heap's free pages
    /// go back to the system: what the unit's run freed would otherwise
    /// stay with the process and add to the next unit's (the 3B bench
    /// shape's forward at 4 ranks peaked at 3.25-3.40 GiB per rank without,
    /// 3.17-3.20 with).
    fn release(&self, index: usize, gathered: Gathered) {
        units::release(&self.units[index]);
        let large = gathered.bytes >= LARGE_UNIT_BYTES;
        drop(gathered);
        if large {
            units::trim_heap();
        }
    }

    fn park(&self, index: usize, gathered: Gathered) -> Result<Gathered, TrainError> {
        let large = gathered.bytes >= LARGE_UNIT_BYTES;
        let parked = units::park(&self.units[index], gathered)?;
        if large {
            units::trim_heap();
        }
        Ok(parked)
    }

    fn start_regather(&self, index: usize, gathered: Gathered) -> Result<Gathered, TrainError> {
        let (trainable, frozen) = self.sources(index);
        units::start_regather(gathered, trainable, frozen, self.shard_group)
    }

    /// The unit's whole gradient is reduce-scattered and only this rank's
    /// shard is kept (`hybrid`: summed over the nodes too). The members'
    /// gradients are dropped once placed in the flat buffer, so a unit's
    /// gradient is held once, not twice, while it is reduced.
    fn sink(&mut self, index: usize, grads: Vec<Option<Tensor>>) -> Result<(), TrainError> {
        if self.units[index].len == 0 {
            return Ok(());
        }
        self.allocate_state();
        let (plan, shard) = (&self.units[index], &self.shards[index]);
        let world = self.world();
        let device = self.local.device();
        let whole = units::flatten_gradients(plan, grads, shard.len * world, device);
        if let Some(embedding) = &self.embedding {
            embedding.mask(&whole, plan.start, plan.len);
        }
        let reduced = match self.shard_group.filter(|_| world > 1) {
            Some(group) => units::reduce_scatter(group, &whole, shard.len)?,
            None => whole,
        };
        // `hybrid`: the other nodes computed the same shard's gradient on
        // their own samples.
        if let Some(replicas) = self.replicate_group.filter(|group| group.world_size() > 1) {
            replicas.all_reduce(&reduced, ReduceOp::Sum)?;
        }
        let (offset, len, large) = (shard.offset, shard.len, 4 * plan.len >= LARGE_UNIT_BYTES);
        let mut target = self.accumulator().narrow(0, offset, len);
        if self.written[index] {
            let _ = target.g_add_(&reduced);
        } else {
            target.copy_(&reduced);
            self.written[index] = true;
        }
        drop(reduced);
        if large {
            units::trim_heap();
        }
        Ok(())
    }

    fn discard_gradients(&mut self) {
        self.accumulated = Tensor::zeros([0], (Kind::Float, self.local.device()));
        self.written.fill(false);
    }

    /// The accumulated shards are already reduced: clip by the global norm
    /// and update each unit's shard with its own decay.
    fn update(&mut self, update: &Update<'_>) -> Result<f64, TrainError> {
        self.allocate_state();
        let mut gradient = self.accumulator().shallow_clone();
        // Units no gradient reached this step (the perceiver when no block
        // saw media) count as zeros.
        for (shard, written) in self.shards.iter().zip(&self.written) {
            if !written && shard.len > 0 {
                let _ = gradient.narrow(0, shard.offset, shard.len).zero_();
            }
        }
        // A rank with no trainable values holds one unused value.
        let covered: i64 = self.shards.iter().map(|shard| shard.len).sum();
        let total = gradient.numel() as i64;
        if total > covered {
            let _ = gradient.narrow(0, covered, total - covered).zero_();
        }
        // Each node holds every shard once (`hybrid`: the same on every
        // node), so the sum over one node's ranks is the global norm.
        let local_squares = squared_norm(&gradient);
        let squares = match self.shard_group.filter(|group| group.world_size() > 1) {
            Some(group) => group.all_reduce_scalar(local_squares, ReduceOp::Sum)?,
            None => local_squares,
        };
        let grad_norm = clip(&mut gradient, squares, update.max_grad_norm);
        for (plan, shard) in self.units.iter().zip(&self.shards) {
            if shard.len == 0 {
                continue;
            }
            let (offset, len) = (shard.offset, shard.len);
            update.optimizer.update_fused(
                &self.local.narrow(0, offset, len),
                &gradient.narrow(0, offset, len),
                &self.exp_avg.narrow(0, offset, len),
                &self.exp_avg_sq.narrow(0, offset, len),
                update.step,
                update.lr,
                if plan.decay { update.weight_decay } else { 0.0 },
            );
        }
        drop(gradient);
        self.discard_gradients();
        if let Some(copies) = &self.copies {
            copies.refresh(&self.shards, &self.local, self.shard_group)?;
        }
        // What the update's pieces allocated would otherwise stay with the
        // process into the next step.
        units::trim_heap();
        Ok(grad_norm)
    }
}
