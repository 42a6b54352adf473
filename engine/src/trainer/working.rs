//! `amp_bf16`'s bf16 working copies of the trainable Linear weights
//! (`Flamingo::is_linear_weight`): made from the fp32 masters after each
//! optimizer step (and at the start and on a restore), so that autocast
//! finds those weights already in bf16 instead of casting each one at
//! every use: in every micro-batch's forward and again in every
//! recomputed forward. The products and their gradients are autocast's:
//! its cast of an fp32 weight rounds exactly as the copy does, and its
//! backward casts the bf16 gradient to fp32, which is where ours is added
//! too. The masters, the gradients the step sums, and the optimizer stay
//! fp32.
//!
//! - Replicated state ([`ReplicatedCopies`]): the Linear parameters point
//!   at one bf16 buffer instead of the flat fp32 state.
//! - Sharded units ([`ShardedCopies`]): a unit holding a Linear weight is
//!   gathered from a bf16 copy of this rank's shard, half the bytes of
//!   fp32. Its other trainable weights (norms, gates: small) are not cast
//!   by autocast, so they must stay fp32: every rank keeps all of them
//!   whole in fp32 ("exact" values), refreshed by one all-gather of the
//!   pieces each rank owns after each update.

use flamingo_collectives::ProcessGroup;
use tch::{Kind, Tensor};

use super::state::Slot;
use super::TrainError;
use crate::units::{UnitPlan, UnitShard};

/// The kind of the working copies.
pub(crate) const WORKING_KIND: Kind = Kind::BFloat16;

/// The replicated state's bf16 copies: each Linear parameter points at its
/// range of `buffer`.
pub(crate) struct ReplicatedCopies {
    buffer: Tensor,
    /// Per Linear slot: (index in the slots, offset in the flat state,
    /// offset in `buffer`, values).
    pieces: Vec<(usize, i64, i64, i64)>,
}

impl ReplicatedCopies {
    /// Points the slots `linear` names at a bf16 copy of their values in
    /// `flat` (`None` when none is). The parameters keep their autograd
    /// identity; their `.grad` is bf16 from then on (see
    /// [`Self::fold_gradients`]).
    pub(crate) fn new(
        slots: &mut [Slot],
        flat: &Tensor,
        linear: impl Fn(&str) -> bool,
    ) -> Option<Self> {
        let mut pieces = Vec::new();
        let mut len = 0;
        for (index, slot) in slots.iter().enumerate() {
            if linear(&slot.name) {
                pieces.push((index, slot.offset, len, slot.numel));
                len += slot.numel;
            }
        }
        if pieces.is_empty() {
            return None;
        }
        let copies = Self {
            buffer: Tensor::empty([len], (WORKING_KIND, flat.device())),
            pieces,
        };
        copies.refresh(flat);
        tch::no_grad(|| {
            for &(index, _, at, numel) in &copies.pieces {
                let slot = &mut slots[index];
                let shape = slot.tensor.size();
                let view = copies.buffer.narrow(0, at, numel).view(shape.as_slice());
                slot.tensor.set_data(&view);
                let _ = slot.tensor.set_requires_grad(true);
            }
        });
        Some(copies)
    }

    /// Copies the masters' current values into the working copies.
    pub(crate) fn refresh(&self, flat: &Tensor) {
        tch::no_grad(|| {
            for &(_, offset, at, numel) in &self.pieces {
                self.buffer
                    .narrow(0, at, numel)
                    .copy_(&flat.narrow(0, offset, numel));
            }
        });
    }

    /// Adds the bf16 `.grad` of each Linear parameter into `accumulated`
    /// (fp32, the flat state's layout) and zeroes it, so that the
    /// micro-steps of an optimizer step are summed in fp32 as autocast's
    /// fp32 leaves would sum them, not in bf16.
    pub(crate) fn fold_gradients(&self, slots: &mut [Slot], accumulated: &Tensor) {
        tch::no_grad(|| {
            for &(index, offset, _, numel) in &self.pieces {
                let slot = &mut slots[index];
                let grad = slot.tensor.grad();
                if grad.defined() {
                    let _ = accumulated
                        .narrow(0, offset, numel)
                        .g_add_(&grad.reshape([-1]));
                    slot.tensor.zero_grad();
                }
            }
        });
    }

    pub(crate) fn bytes(&self) -> i64 {
        self.buffer.numel() as i64 * WORKING_KIND.elt_size_in_bytes() as i64
    }
}

/// Sharded units' bf16 copies: a bf16 shard per unit holding a Linear
/// weight, and every such unit's other trainable weights whole in fp32.
pub(crate) struct ShardedCopies {
    /// Per unit: the bf16 copy of this rank's shard of its trainable range
    /// (`None`: the unit has no Linear weight and is gathered in fp32).
    shards: Vec<Option<Tensor>>,
    /// The exact (fp32) weights of the units with a copy, whole, one after
    /// another; the same on every rank.
    exact: Tensor,
    /// Per unit: (member index, offset in `exact`) of its exact weights.
    members: Vec<Vec<(usize, i64)>>,
    /// Where each unit's exact weights start in the flat state:
    /// (flat offset, offset in `exact`, values), for a restore.
    flat_pieces: Vec<(i64, i64, i64)>,
    /// This rank's exact values in `local`, in order, padded to the
    /// longest rank's count with index 0: what it sends.
    send: Tensor,
    /// Where each received value goes: positions in the all-gathered
    /// `[world × send length]` buffer, and in `exact`.
    from: Tensor,
    to: Tensor,
}

impl ShardedCopies {
    /// The copies for `units` sharded as `shards` over `world` ranks (this
    /// one `rank`), with `local` this rank's fp32 shards; `None` when no
    /// unit holds a Linear weight. Call [`Self::refresh`] before use.
    pub(crate) fn new(
        units: &[UnitPlan],
        shards: &[UnitShard],
        (rank, world): (i64, i64),
        local: &Tensor,
        linear: impl Fn(&str) -> bool,
    ) -> Option<Self> {
        let device = local.device();
        let mut copies = Self {
            shards: Vec::with_capacity(units.len()),
            exact: Tensor::empty([0], (Kind::Float, device)),
            members: Vec::with_capacity(units.len()),
            flat_pieces: Vec::new(),
            send: Tensor::empty([0], (Kind::Int64, device)),
            from: Tensor::empty([0], (Kind::Int64, device)),
            to: Tensor::empty([0], (Kind::Int64, device)),
        };
        // Per rank: (its local index, the exact index) of each exact value
        // it owns, in order.
        let mut owned: Vec<Vec<(i64, i64)>> = vec![Vec::new(); world as usize];
        let mut exact_len = 0;
        for (plan, shard) in units.iter().zip(shards) {
            let working = shard.len > 0 && plan.trainable.iter().any(|m| linear(&m.name));
            copies
                .shards
                .push(working.then(|| Tensor::empty([shard.len], (WORKING_KIND, device))));
            let mut exact_members = Vec::new();
            if working {
                for (index, member) in plan.trainable.iter().enumerate() {
                    if linear(&member.name) {
                        continue;
                    }
                    exact_members.push((index, exact_len));
                    copies
                        .flat_pieces
                        .push((plan.start + member.offset, exact_len, member.numel));
                    // The member's values in the unit's range, cut by the
                    // ranks' shards.
                    for (owner, values) in owned.iter_mut().enumerate() {
                        let first = owner as i64 * shard.len;
                        let lo = member.offset.max(first);
                        let hi = (member.offset + member.numel).min(first + shard.len);
                        for position in lo..hi {
                            values.push((
                                shard.offset + position - first,
                                exact_len + position - member.offset,
                            ));
                        }
                    }
                    exact_len += member.numel;
                }
            }
            copies.members.push(exact_members);
        }
        if copies.shards.iter().all(Option::is_none) {
            return None;
        }
        let longest = owned.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let mut send: Vec<i64> = owned[rank as usize]
            .iter()
            .map(|&(local, _)| local)
            .collect();
        send.resize(longest as usize, 0);
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for (owner, values) in owned.iter().enumerate() {
            for (position, &(_, exact)) in values.iter().enumerate() {
                from.push(owner as i64 * longest + position as i64);
                to.push(exact);
            }
        }
        copies.exact = Tensor::zeros([exact_len], (Kind::Float, device));
        copies.send = Tensor::from_slice(&send).to_device(device);
        copies.from = Tensor::from_slice(&from).to_device(device);
        copies.to = Tensor::from_slice(&to).to_device(device);
        Some(copies)
    }

    /// The bf16 shard unit `index` is gathered from, if it has one.
    pub(crate) fn shard(&self, index: usize) -> Option<Tensor> {
        self.shards[index].as_ref().map(Tensor::shallow_clone)
    }

    /// Whether member `member` of unit `index` is an exact (fp32) weight.
    pub(crate) fn is_exact(&self, index: usize, member: usize) -> bool {
        self.members[index]
            .iter()
            .any(|&(exact, _)| exact == member)
    }

    /// Points unit `index`'s exact weights at their fp32 values (its gather
    /// points the others at the bf16 buffer).
    pub(crate) fn point_exact(&self, index: usize, plan: &UnitPlan) {
        for &(member, at) in &self.members[index] {
            plan.trainable[member].point_into(&self.exact, at);
        }
    }

    /// Makes the copies from `local` (this rank's fp32 shards, just
    /// updated): each unit's bf16 shard, and every rank's exact values by
    /// one all-gather over `group`. Every rank of the group calls it.
    pub(crate) fn refresh(
        &self,
        shards: &[UnitShard],
        local: &Tensor,
        group: Option<&ProcessGroup>,
    ) -> Result<(), TrainError> {
        tch::no_grad(|| {
            for (copy, shard) in self.shards.iter().zip(shards) {
                if let Some(copy) = copy {
                    copy.shallow_clone()
                        .copy_(&local.narrow(0, shard.offset, shard.len));
                }
            }
        });
        if self.to.numel() == 0 {
            return Ok(());
        }
        let sent = local.index_select(0, &self.send);
        let received = match group.filter(|group| group.world_size() > 1) {
            Some(group) => {
                let len = sent.numel() as i64 * group.world_size();
                group.all_gather_flat(&sent, len)?
            }
            None => sent,
        };
        tch::no_grad(|| {
            let _ = self.exact.shallow_clone().index_copy_(
                0,
                &self.to,
                &received.index_select(0, &self.from),
            );
        });
        Ok(())
    }

    /// Makes the copies from the whole flat state (a restore, which every
    /// rank reads whole) and `local` (this rank's shards of it, already
    /// restored): no collective.
    pub(crate) fn restore(&self, shards: &[UnitShard], local: &Tensor, parameters: &Tensor) {
        tch::no_grad(|| {
            for (copy, shard) in self.shards.iter().zip(shards) {
                if let Some(copy) = copy {
                    copy.shallow_clone()
                        .copy_(&local.narrow(0, shard.offset, shard.len));
                }
            }
            for &(offset, at, numel) in &self.flat_pieces {
                self.exact
                    .narrow(0, at, numel)
                    .copy_(&parameters.narrow(0, offset, numel));
            }
        });
    }

    pub(crate) fn bytes(&self) -> i64 {
        let shards: i64 = self
            .shards
            .iter()
            .flatten()
            .map(|copy| copy.numel() as i64)
            .sum();
        shards * WORKING_KIND.elt_size_in_bytes() as i64 + 4 * self.exact.numel() as i64
    }
}
