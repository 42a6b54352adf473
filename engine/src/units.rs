//! FSDP units (reference §2.5, design "Training engine"): the model's
//! weights grouped as the engine gathers, runs and frees them — the vision
//! tower's ends and each of its residual blocks, the perceiver's inputs and
//! each of its layers, the LM's text ends (input embedding, final norm,
//! head), and each decoder layer and each cross-attention block.
//!
//! Under `full` every unit keeps only this rank's 1/world of its trainable
//! values (fp32 master) and of its frozen values (their own dtype). Using a
//! unit all-gathers both into full buffers, points the model's tensors at
//! views of them, and afterwards points the tensors at empty storage again,
//! so at most the unit in use and the one being prefetched are whole.
//! Under the other strategies the units only group the weights for the
//! recomputing (checkpointed) pass, and gathering is a no-op.
//!
//! A rank's shards are cut from the model's weights as loaded, or, where
//! the loader left a weight unread (a lazy load of safetensors files,
//! `flamingo_model::LoadOptions::lazy`), read straight from its file's
//! byte range ([`shard_of`]): a rank never holds a whole unit it only keeps
//! a shard of.

use flamingo_collectives::{ProcessGroup, ReduceOp, Work};
use flamingo_model::recompute::Recorded;
use flamingo_model::{Flamingo, Unit};
use flamingo_torch_shim::autograd::{
    fl_autograd_grad, fl_cuda_allocated_bytes, fl_storage_alloc, fl_storage_free, fl_storage_refill,
};
use tch::{Kind, Tensor};

use crate::trainer::TrainError;

/// `torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)`:
/// the gradients reaching `inputs` (each `None` where it took no part),
/// without accumulating into `.grad`. The graph is freed afterwards.
pub fn gradients(
    outputs: &[&Tensor],
    grad_outputs: &[&Tensor],
    inputs: &[&Tensor],
) -> Result<Vec<Option<Tensor>>, TrainError> {
    assert_eq!(
        outputs.len(),
        grad_outputs.len(),
        "one grad_output per output"
    );
    let handle = |tensor: &&Tensor| tensor.as_ptr() as *mut std::ffi::c_void;
    let mut outputs: Vec<_> = outputs.iter().map(handle).collect();
    let mut grad_outputs: Vec<_> = grad_outputs.iter().map(handle).collect();
    let mut input_handles: Vec<_> = inputs.iter().map(handle).collect();
    let mut results = vec![std::ptr::null_mut(); inputs.len()];
    let mut error = vec![0 as std::ffi::c_char; 1024];
    // SAFETY: every handle is a live tch tensor borrowed for the call; the
    // shim writes `inputs.len()` results and a NUL-terminated message.
    let status = unsafe {
        fl_autograd_grad(
            outputs.as_mut_ptr(),
            grad_outputs.as_mut_ptr(),
            outputs.len() as std::ffi::c_int,
            input_handles.as_mut_ptr(),
            input_handles.len() as std::ffi::c_int,
            results.as_mut_ptr(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status != 0 {
        // SAFETY: the shim NUL-terminated the message within the buffer.
        let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        return Err(TrainError::Backward {
            message: message.to_string_lossy().into_owned(),
        });
    }
    Ok(results
        .into_iter()
        .map(|raw| {
            // SAFETY: a non-null result is a fresh at::Tensor* the shim
            // allocated for us; Tensor takes ownership and frees it.
            (!raw.is_null())
                .then(|| unsafe { Tensor::from_ptr(raw as *mut flamingo_torch_shim::C_tensor) })
        })
        .collect())
}

/// One weight of a unit: the model's tensor (sharing its storage and
/// autograd state) and its place in the unit's buffer.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub tensor: Tensor,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
}

impl Member {
    fn point_at(&self, buffer: &Tensor) {
        self.point_into(buffer, self.offset);
    }

    /// Points the model's tensor at `buffer[offset..offset + numel]`.
    pub fn point_into(&self, buffer: &Tensor, offset: i64) {
        let mut tensor = self.tensor.shallow_clone();
        tch::no_grad(|| {
            tensor.set_data(
                &buffer
                    .narrow(0, offset, self.numel)
                    .view(self.shape.as_slice()),
            )
        });
    }

    fn release(&self) {
        let mut tensor = self.tensor.shallow_clone();
        let empty = Tensor::empty([0], (self.tensor.kind(), self.tensor.device()));
        tch::no_grad(|| tensor.set_data(&empty));
    }
}

/// A unit's weights.
#[derive(Debug)]
pub struct UnitPlan {
    pub unit: Unit,
    /// Trainable weights, in the order of the flat trainable state; they
    /// fill `[start, start + len)` of it.
    pub trainable: Vec<Member>,
    pub start: i64,
    pub len: i64,
    /// Whether the trainable weights take weight decay (the gated
    /// cross-attention, upstream's parameter group).
    pub decay: bool,
    pub frozen: Vec<Member>,
    pub frozen_len: i64,
    pub frozen_kind: Kind,
}

/// `full`: this rank's part of a unit.
#[derive(Debug, Default)]
pub struct UnitShard {
    /// This rank's trainable shard length (the unit's `len` split over the
    /// shard group, padded) and where it sits in the rank's local flat
    /// state.
    pub len: i64,
    pub offset: i64,
    /// This rank's frozen shard.
    pub frozen: Option<Tensor>,
}

impl UnitShard {
    /// The trainable range of `plan` that `rank` owns, in flat state
    /// coordinates, clipped to real values.
    pub fn owned_by(&self, plan: &UnitPlan, rank: i64) -> (i64, i64) {
        let end = plan.start + plan.len;
        (
            (plan.start + rank * self.len).min(end),
            (plan.start + (rank + 1) * self.len).min(end),
        )
    }
}

/// Groups the model's weights into units, in the order the engine runs
/// them: vision, perceiver, text ends, layers. `trainable` are the trainable
/// weights in flat-state order with their offsets there.
pub fn plan(
    model: &Flamingo,
    trainable: &[(String, Vec<i64>, i64)],
    decayed: impl Fn(&str) -> bool,
) -> Result<Vec<UnitPlan>, TrainError> {
    let mut units: Vec<Unit> = vec![Unit::Vision];
    units.extend((0..model.vision_block_count()).map(Unit::VisionBlock));
    units.push(Unit::Perceiver);
    units.extend((0..model.perceiver_depth()).map(Unit::PerceiverLayer));
    units.push(Unit::Text);
    for layer in 0..model.layer_count() {
        if model.layer_sees_media(layer) {
            units.push(Unit::CrossAttention(layer));
        }
        units.push(Unit::Layer(layer));
    }
    let mut plans: Vec<UnitPlan> = units
        .iter()
        .map(|&unit| UnitPlan {
            unit,
            trainable: Vec::new(),
            start: 0,
            len: 0,
            decay: false,
            frozen: Vec::new(),
            frozen_len: 0,
            frozen_kind: Kind::Float,
        })
        .collect();
    let index_of = |unit: Unit| units.iter().position(|&candidate| candidate == unit);
    for (name, tensor) in model.named_parameters() {
        let unit = model.unit_of(name);
        let plan = &mut plans[index_of(unit).ok_or_else(|| TrainError::UnitLayout {
            weight: name.clone(),
            message: format!("belongs to no unit ({unit:?})"),
        })?];
        let shape = tensor.size();
        let numel = shape.iter().product::<i64>();
        let member = |offset| Member {
            name: name.clone(),
            tensor: tensor.shallow_clone(),
            shape: shape.clone(),
            offset,
            numel,
        };
        match trainable.iter().find(|(candidate, _, _)| candidate == name) {
            Some((_, _, global)) => {
                if plan.trainable.is_empty() {
                    plan.start = *global;
                    plan.decay = decayed(name);
                } else if *global != plan.start + plan.len || decayed(name) != plan.decay {
                    return Err(TrainError::UnitLayout {
                        weight: name.clone(),
                        message: format!(
                            "the trainable weights of unit {unit:?} are not one range of the flat state"
                        ),
                    });
                }
                plan.trainable.push(member(plan.len));
                plan.len += numel;
            }
            None => {
                if plan.frozen.is_empty() {
                    plan.frozen_kind = tensor.kind();
                } else if tensor.kind() != plan.frozen_kind {
                    return Err(TrainError::UnitLayout {
                        weight: name.clone(),
                        message: format!(
                            "frozen, {:?}, but the rest of unit {unit:?} is {:?}",
                            tensor.kind(),
                            plan.frozen_kind
                        ),
                    });
                }
                plan.frozen.push(member(plan.frozen_len));
                plan.frozen_len += numel;
            }
        }
    }
    // The trainable members must follow the flat state's order.
    for plan in &mut plans {
        plan.trainable.sort_by_key(|member| member.offset);
    }
    Ok(plans)
}

/// Concatenates members' current values into one flat tensor of `kind`,
/// padded with zeros to `padded`.
pub fn concatenate(members: &[Member], padded: i64, kind: Kind, device: tch::Device) -> Tensor {
    let buffer = Tensor::zeros([padded], (kind, device));
    tch::no_grad(|| {
        for member in members {
            buffer
                .narrow(0, member.offset, member.numel)
                .copy_(&member.tensor.detach().reshape([-1]).to_kind(kind));
        }
    });
    buffer
}

/// Elements `[start, start + len)` of the flat buffer [`concatenate`]
/// would make of `members` (zeros past their end), built from only those
/// elements: a member whose weight was not read (`unread` names where its
/// values lie) has just its part read from the file, so a rank that keeps a
/// shard never holds the whole unit.
pub fn shard_of(
    members: &[Member],
    (start, len): (i64, i64),
    kind: Kind,
    device: tch::Device,
    unread: impl Fn(&str) -> Option<flamingo_model::safetensors::LazyTensor>,
) -> Result<Tensor, TrainError> {
    let shard = Tensor::zeros([len], (kind, device));
    let end = start + len;
    for member in members {
        let (low, high) = (
            start.max(member.offset),
            end.min(member.offset + member.numel),
        );
        if low >= high {
            continue;
        }
        let (from, to) = (low - member.offset, high - member.offset);
        let values = match unread(&member.name) {
            Some(mut lazy) => {
                lazy.kind = kind;
                lazy.device = device;
                lazy.read_range(from, to)?
            }
            None => member
                .tensor
                .detach()
                .reshape([-1])
                .narrow(0, from, to - from)
                .to_kind(kind),
        };
        tch::no_grad(|| shard.narrow(0, low - start, high - low).copy_(&values));
    }
    Ok(shard)
}

/// A unit's weight gradients (one per trainable member, `None` where
/// unused) as one flat fp32 buffer of `len` values (the unit's trainable
/// range, then zeros). Each gradient is dropped as soon as it is copied and
/// the buffer's pages are first written by those copies, so the unit's
/// gradient is held about once, not twice, while it is flattened.
pub fn flatten_gradients(
    plan: &UnitPlan,
    grads: Vec<Option<Tensor>>,
    len: i64,
    device: tch::Device,
) -> Tensor {
    let whole = Tensor::empty([len], (Kind::Float, device));
    tch::no_grad(|| {
        let grads = grads.into_iter().chain(std::iter::repeat_with(|| None));
        for (member, grad) in plan.trainable.iter().zip(grads) {
            let mut target = whole.narrow(0, member.offset, member.numel);
            match grad {
                Some(grad) => {
                    target.copy_(&grad.reshape([-1]));
                }
                None => {
                    let _ = target.zero_();
                }
            }
        }
        if len > plan.len {
            let _ = whole.narrow(0, plan.len, len - plan.len).zero_();
        }
    });
    whole
}

/// A unit's whole buffers, being gathered or ready.
#[derive(Debug)]
pub struct Gathered {
    unit: usize,
    trainable: Option<Tensor>,
    frozen: Option<Tensor>,
    works: Vec<Work>,
    /// Bytes allocated for it (0 when the buffers are the rank's own shards).
    pub bytes: i64,
    /// The buffers' bytes are freed ([`park`]) until [`start_regather`].
    parked: bool,
}

impl Gathered {
    /// The unit's index.
    pub fn unit(&self) -> usize {
        self.unit
    }

    fn wait(&mut self) -> Result<(), TrainError> {
        for work in self.works.drain(..) {
            work.wait()?;
        }
        Ok(())
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        // A collective still writing into the buffers must finish first.
        for work in self.works.drain(..) {
            let _ = work.wait();
        }
    }
}

/// Starts gathering unit `index` (`full`) from this rank's values of it:
/// `trainable` (its shard of the unit's trainable range, fp32 masters or
/// their bf16 working copy) and `frozen`; without a group of more than
/// one rank there is nothing to gather and the buffers are the rank's own.
pub fn start_gather(
    index: usize,
    trainable: Option<Tensor>,
    frozen: Option<&Tensor>,
    group: Option<&ProcessGroup>,
) -> Result<Gathered, TrainError> {
    let world = group.map_or(1, ProcessGroup::world_size);
    let mut gathered = Gathered {
        unit: index,
        trainable: None,
        frozen: None,
        works: Vec::new(),
        bytes: 0,
        parked: false,
    };
    let frozen = frozen.filter(|frozen| frozen.numel() > 0);
    let shard = trainable.filter(|shard| shard.numel() > 0);
    match group.filter(|_| world > 1) {
        None => {
            gathered.trainable = shard;
            gathered.frozen = frozen.map(Tensor::shallow_clone);
        }
        Some(group) => {
            for (source, target) in [
                (shard.as_ref(), &mut gathered.trainable),
                (frozen, &mut gathered.frozen),
            ] {
                if let Some(source) = source {
                    let whole = Tensor::empty(
                        [source.numel() as i64 * world],
                        (source.kind(), source.device()),
                    );
                    gather_into(group, &whole, source, &mut gathered.works)?;
                    gathered.bytes +=
                        whole.numel() as i64 * whole.kind().elt_size_in_bytes() as i64;
                    *target = Some(whole);
                }
            }
        }
    }
    Ok(gathered)
}

/// Gives the heap's free pages back to the system (glibc's
/// `malloc_trim`); elsewhere a no-op.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The most values, over all ranks, that the unit in use and the next one
/// may hold whole at once for the next one to be gathered meanwhile over
/// gloo: `FLAMINGO_GLOO_GATHER_PIECE`, by default 32 Mi (128 MiB of fp32).
/// Past it the next unit is gathered only once the one in use is done
/// with, so a rank holds one whole unit less at its peak. On the 1B bench
/// shape at 4 ranks the default prefetches the vision blocks and the
/// perceiver's layers but not the decoder layers (113 MiB each): holding
/// two of them, or a cross-attention block's weights and gradient with a
/// decoder layer, was each rank's peak.
fn gloo_prefetch_limit() -> i64 {
    static LIMIT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("FLAMINGO_GLOO_GATHER_PIECE")
            .ok()
            .and_then(|value| value.parse().ok())
            .filter(|&limit: &i64| limit > 0)
            .unwrap_or(1 << 25)
    })
}

impl UnitShard {
    /// The values of the whole unit over `world` ranks (trainable and
    /// frozen, padded).
    fn whole_values(&self, world: i64) -> i64 {
        let frozen = self
            .frozen
            .as_ref()
            .map_or(0, |frozen| frozen.numel() as i64);
        (self.len + frozen) * world
    }
}

/// Whether unit `next` is gathered while unit `current` runs (its forward,
/// or its backward from a kept graph): always with NCCL; over gloo when the
/// two hold at most [`gloo_prefetch_limit`] values whole.
pub fn prefetches(current: &UnitShard, next: &UnitShard, world: i64, device: tch::Device) -> bool {
    device.is_cuda()
        || current.whole_values(world) + next.whole_values(world) <= gloo_prefetch_limit()
}

/// Starts gathering every rank's `source` into `whole` (`world` × its
/// length, rank by rank); the works join `works`. NCCL gathers in place.
/// Over gloo each rank broadcasts its shard straight into its row of
/// `whole`, one broadcast per rank: torch's gloo all-gather would receive
/// into a staging buffer of the whole unit and then copy it over, which
/// doubles the unit's memory while it is gathered and, with the pages of a
/// fresh staging buffer faulted in at every gather, made a 2-rank step on
/// the neox bench shape about a fifth slower.
fn gather_into(
    group: &ProcessGroup,
    whole: &Tensor,
    source: &Tensor,
    works: &mut Vec<Work>,
) -> Result<(), TrainError> {
    if source.device().is_cuda() {
        works.push(group.all_gather_into_tensor_async(whole, source)?);
        return Ok(());
    }
    let len = source.numel() as i64;
    let world = group.world_size();
    tch::no_grad(|| whole.narrow(0, group.rank() * len, len).copy_(source));
    for root in 0..world {
        works.push(group.broadcast_async(&whole.narrow(0, root * len, len), root)?);
    }
    Ok(())
}

/// Sums `whole` (`world` × `len` values, rank by rank) over the group and
/// returns this rank's `len`. NCCL reduce-scatters in one go. Over gloo
/// each rank's row is reduced into that rank, one reduce per rank, in
/// place: torch's gloo reduce-scatter would copy the whole input and
/// all-reduce the copy, holding the unit's gradient twice and moving more
/// bytes than a reduce per row (gloo's is a ring reduce-scatter and a
/// gather to the root). `whole` is scratch afterwards.
pub fn reduce_scatter(
    group: &ProcessGroup,
    whole: &Tensor,
    len: i64,
) -> Result<Tensor, TrainError> {
    if whole.device().is_cuda() {
        let reduced = Tensor::empty([len], (whole.kind(), whole.device()));
        group.reduce_scatter_tensor(&reduced, whole, ReduceOp::Sum)?;
        return Ok(reduced);
    }
    let world = group.world_size();
    let works = (0..world)
        .map(|root| group.reduce_async(&whole.narrow(0, root * len, len), root, ReduceOp::Sum))
        .collect::<Result<Vec<_>, _>>()?;
    for work in works {
        work.wait()?;
    }
    Ok(whole.narrow(0, group.rank() * len, len))
}

/// Waits for a gather and points the unit's tensors at the whole buffers.
pub fn install(plans: &[UnitPlan], gathered: Gathered) -> Result<Gathered, TrainError> {
    install_except(plans, gathered, |_| false)
}

/// [`install`], leaving the trainable members `elsewhere` picks (by index)
/// for the caller to point at their values. A tensor must keep its kind
/// between a forward that keeps its graph and that graph's backward:
/// pointing it at a buffer of another kind, even for a moment, would
/// detach it from the graph (torch's `set_data` drops the gradient
/// accumulator on a change of kind).
pub fn install_except(
    plans: &[UnitPlan],
    mut gathered: Gathered,
    elsewhere: impl Fn(usize) -> bool,
) -> Result<Gathered, TrainError> {
    gathered.wait()?;
    let plan = &plans[gathered.unit];
    if let Some(buffer) = &gathered.trainable {
        for (index, member) in plan.trainable.iter().enumerate() {
            if !elsewhere(index) {
                member.point_at(buffer);
            }
        }
    }
    if let Some(buffer) = &gathered.frozen {
        for member in &plan.frozen {
            member.point_at(buffer);
        }
    }
    Ok(gathered)
}

/// Frees the bytes of a gathered unit's whole buffers but keeps the
/// buffers, and so every view of them the autograd graph saved in the
/// unit's forward, as torch FSDP's `storage.resize_(0)`; the unit's tensors
/// point at empty storage meanwhile. [`start_regather`] fills the same
/// buffers again before the unit's backward. Buffers that are the rank's
/// own shards (nothing was gathered) stay as they are.
pub fn park(plan: &UnitPlan, mut gathered: Gathered) -> Result<Gathered, TrainError> {
    gathered.wait()?;
    release(plan);
    if gathered.bytes > 0 {
        for buffer in [&gathered.trainable, &gathered.frozen]
            .into_iter()
            .flatten()
        {
            free_bytes(buffer);
        }
        gathered.parked = true;
    }
    Ok(gathered)
}

/// Frees the bytes under `tensor`'s storage, keeping the storage (and so
/// every view of it) to be given bytes again by [`alloc_bytes`]. Nothing
/// may read the tensor or its views in between.
fn free_bytes(tensor: &Tensor) {
    // SAFETY: a live tensor handle; its storage object stays, only its
    // bytes go.
    unsafe { fl_storage_free(tensor.as_ptr() as *mut std::ffi::c_void) };
}

/// Gives `tensor`'s storage (emptied by [`free_bytes`]) bytes for the whole
/// tensor again; their contents are undefined until written.
fn alloc_bytes(tensor: &Tensor) -> Result<(), TrainError> {
    let bytes = tensor.numel() as i64 * tensor.kind().elt_size_in_bytes() as i64;
    shim_call("allocating a unit's buffer again", |error, len| {
        // SAFETY: a live tensor handle; the shim writes a NUL-terminated
        // message into `error` on failure.
        unsafe { fl_storage_alloc(tensor.as_ptr() as *mut std::ffi::c_void, bytes, error, len) }
    })
}

/// Runs a shim call that returns non-zero with a NUL-terminated message in
/// the buffer it is given on failure; the message, after `what`, becomes
/// the error.
fn shim_call(
    what: &str,
    call: impl FnOnce(*mut std::ffi::c_char, usize) -> std::ffi::c_int,
) -> Result<(), TrainError> {
    shim_status(call).map_err(|message| TrainError::Backward {
        message: format!("{what}: {message}"),
    })
}

/// Runs a shim call that returns non-zero with a NUL-terminated message in
/// the buffer it is given on failure; that message is the error.
pub(crate) fn shim_status(
    call: impl FnOnce(*mut std::ffi::c_char, usize) -> std::ffi::c_int,
) -> Result<(), String> {
    let mut error = vec![0 as std::ffi::c_char; 512];
    if call(error.as_mut_ptr(), error.len()) == 0 {
        return Ok(());
    }
    // SAFETY: NUL-terminated by the shim within the buffer (which starts
    // zeroed).
    let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
    Err(message.to_string_lossy().into_owned())
}

/// Gathers a [`park`]ed unit again, into the same buffers, from this
/// rank's values as [`start_gather`] takes them.
pub fn start_regather(
    mut gathered: Gathered,
    trainable: Option<Tensor>,
    frozen: Option<&Tensor>,
    group: Option<&ProcessGroup>,
) -> Result<Gathered, TrainError> {
    if !gathered.parked {
        return Ok(gathered);
    }
    let group = group.ok_or_else(|| TrainError::Backward {
        message: "a parked unit has no group to gather from".into(),
    })?;
    let frozen = frozen.filter(|frozen| frozen.numel() > 0);
    let trainable = trainable.filter(|shard| shard.numel() > 0);
    let mut works = Vec::new();
    for (source, target) in [
        (trainable.as_ref(), &gathered.trainable),
        (frozen, &gathered.frozen),
    ] {
        if let (Some(source), Some(whole)) = (source, target) {
            alloc_bytes(whole)?;
            gather_into(group, whole, source, &mut works)?;
        }
    }
    gathered.works = works;
    gathered.parked = false;
    Ok(gathered)
}

/// Selective recompute's half after a unit's forward: frees the bytes of
/// the cheap outputs `recorded` while the unit ran (their storage, which
/// the graph's saved tensors point into, stays), except any that share
/// memory with the unit's `outputs`, which the next unit reads. Returns
/// what was freed, in order, for [`restore_activations`], and its bytes.
pub fn free_activations(recorded: Vec<Recorded>, outputs: &[&Tensor]) -> (Vec<Recorded>, i64) {
    let mut freed = Vec::with_capacity(recorded.len());
    let mut bytes = 0;
    for entry in freeable(recorded, outputs) {
        // SAFETY: a live tensor handle; only its storage's bytes go.
        bytes += unsafe { fl_storage_free(entry.output.as_ptr() as *mut std::ffi::c_void) };
        freed.push(entry);
    }
    (freed, bytes)
}

/// The bytes [`free_activations`] would free of `recorded`.
pub fn freeable_bytes(recorded: Vec<Recorded>, outputs: &[&Tensor]) -> i64 {
    freeable(recorded, outputs)
        .map(|entry| span(&entry.output))
        .map(|(start, end)| (end - start) as i64)
        .sum()
}

/// The recorded outputs that hold bytes and share none with `outputs`.
fn freeable<'a>(
    recorded: Vec<Recorded>,
    outputs: &'a [&Tensor],
) -> impl Iterator<Item = Recorded> + 'a {
    let spans: Vec<(usize, usize)> = outputs.iter().map(|output| span(output)).collect();
    recorded.into_iter().filter(move |entry| {
        let (start, end) = span(&entry.output);
        start < end && !spans.iter().any(|&(a, b)| start < b && a < end)
    })
}

/// The bytes a tensor's elements span.
fn span(tensor: &Tensor) -> (usize, usize) {
    let start = tensor.data_ptr() as usize;
    (
        start,
        start + tensor.numel() * tensor.kind().elt_size_in_bytes(),
    )
}

/// Selective recompute's half before a unit's backward (its weights in
/// place again): computes each freed output again, in the order they were
/// recorded, into its own storage, without moving the version counter the
/// graph checks. `run` computes an operation (under the forward's
/// autocast).
pub fn restore_activations(
    freed: &[Recorded],
    run: impl Fn(&Recorded) -> Tensor,
) -> Result<(), TrainError> {
    for entry in freed {
        alloc_bytes(&entry.output)?;
        let fresh = tch::no_grad(|| run(entry));
        if fresh.size() != entry.output.size() || fresh.kind() != entry.output.kind() {
            return Err(TrainError::Backward {
                message: format!(
                    "a recomputed activation is {:?} {:?}, the forward's was {:?} {:?}",
                    fresh.kind(),
                    fresh.size(),
                    entry.output.kind(),
                    entry.output.size()
                ),
            });
        }
        shim_call("writing a recomputed activation back", |error, len| {
            // SAFETY: live tensor handles; the shim writes a NUL-terminated
            // message into `error` on failure.
            unsafe {
                fl_storage_refill(
                    entry.output.as_ptr() as *mut std::ffi::c_void,
                    fresh.as_ptr() as *mut std::ffi::c_void,
                    error,
                    len,
                )
            }
        })?;
    }
    Ok(())
}

/// The bytes of tensor memory in use on `device`, for measuring what a
/// unit's graph holds: the CUDA caching allocator's count on a GPU, the
/// C heap's in-use bytes (glibc's `mallinfo2`, which libtorch's CPU
/// allocator draws from) on the CPU; `None` where neither is known.
pub fn allocated_bytes(device: tch::Device) -> Option<i64> {
    match device {
        tch::Device::Cuda(index) => {
            // SAFETY: reads the allocator's counters.
            let bytes = unsafe { fl_cuda_allocated_bytes(index as std::ffi::c_int) };
            (bytes >= 0).then_some(bytes)
        }
        _ => heap_in_use(),
    }
}

/// The C heap's bytes in use over every arena: glibc's `malloc_info`
/// totals (the system's bytes, less the free ones, plus the mmapped
/// chunks). `mallinfo2` would count only the main thread's arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<i64> {
    let mut buffer: *mut std::ffi::c_char = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: open_memstream allocates `buffer`, which is freed below
    // after the stream is closed; malloc_info only writes to the stream.
    let text = unsafe {
        let stream = libc::open_memstream(&mut buffer, &mut size);
        if stream.is_null() {
            return None;
        }
        libc::malloc_info(0, stream);
        libc::fclose(stream);
        let text = std::ffi::CStr::from_ptr(buffer)
            .to_string_lossy()
            .into_owned();
        libc::free(buffer.cast());
        text
    };
    // The totals over all arenas follow the last arena's `</heap>`.
    let totals = &text[text.rfind("</heap>")?..];
    let size_of = |kind: &str| -> Option<i64> {
        let at = totals.find(&format!("type=\"{kind}\""))?;
        let rest = &totals[at..];
        let value = rest[rest.find("size=\"")? + 6..].split('"').next()?;
        value.parse().ok()
    };
    Some(size_of("current")? - size_of("fast")? - size_of("rest")? + size_of("mmap")?)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<i64> {
    None
}

/// Points the unit's tensors at empty storage, so the whole buffers are
/// freed once nothing else holds them.
pub fn release(plan: &UnitPlan) {
    for member in plan.trainable.iter().chain(&plan.frozen) {
        member.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_bytes() -> i64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: i64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|field| field.parse().ok())
            .expect("resident pages");
        // SAFETY: sysconf has no preconditions.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) }
    }

    /// A unit's flat gradient: each member's gradient at its offset, zeros
    /// for a member that took no part and for the padding past the unit.
    #[test]
    fn flattened_gradients_fill_unused_members_and_padding_with_zeros() {
        let member = |name: &str, shape: Vec<i64>, offset: i64| Member {
            name: name.to_string(),
            tensor: Tensor::zeros(shape.as_slice(), tch::kind::FLOAT_CPU),
            numel: shape.iter().product(),
            shape,
            offset,
        };
        let plan = UnitPlan {
            unit: Unit::Layer(0),
            trainable: vec![
                member("a", vec![2, 2], 0),
                member("b", vec![3], 4),
                member("c", vec![2], 7),
            ],
            start: 0,
            len: 9,
            decay: false,
            frozen: Vec::new(),
            frozen_len: 0,
            frozen_kind: Kind::Float,
        };
        // Stale bytes where the buffer will be: the flat buffer is not
        // zeroed up front, so every value must be written.
        drop(Tensor::full([12], 7.0, tch::kind::FLOAT_CPU));
        let grads = vec![
            Some(Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2])),
            None,
            Some(Tensor::from_slice(&[5.0f64, 6.0])),
        ];
        let flat = flatten_gradients(&plan, grads, 12, tch::Device::Cpu);
        let expected = Tensor::from_slice(&[
            1.0f32, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0, 0.0,
        ]);
        assert_eq!(flat.kind(), Kind::Float);
        assert!(flat.equal(&expected), "{flat}");
        // Fewer gradients than members (a skipped unit): zeros.
        let flat = flatten_gradients(&plan, Vec::new(), 9, tch::Device::Cpu);
        assert!(
            flat.equal(&Tensor::zeros([9], tch::kind::FLOAT_CPU)),
            "{flat}"
        );
    }

    /// Selective recompute: a LayerNorm output saved by a trainable
    /// matmul is freed after the forward and computed again before the
    /// backward, which gives the gradients of the untouched graph (the
    /// refill does not trip autograd's version check); an output the unit
    /// hands on is never freed.
    #[test]
    fn freed_activations_come_back_for_the_backward() {
        use flamingo_model::recompute::Cheap;
        tch::manual_seed(3);
        let input = Tensor::randn([64, 32], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let weight = Tensor::randn([32, 8], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let norm = || Cheap::LayerNorm {
            input: input.shallow_clone(),
            weight: Tensor::ones([32], tch::kind::FLOAT_CPU),
            bias: None,
            dim: 32,
            eps: 1e-5,
        };
        let grads_of = |free: bool| {
            let op = norm();
            let normed = op.run();
            let loss = normed.matmul(&weight).tanh().sum(Kind::Float);
            if free {
                let entry = Recorded {
                    output: normed.shallow_clone(),
                    op,
                };
                let (kept, _) = free_activations(
                    vec![Recorded {
                        output: normed.shallow_clone(),
                        op: norm(),
                    }],
                    &[&normed],
                );
                assert!(kept.is_empty(), "an output the unit hands on was freed");
                let (freed, bytes) = free_activations(vec![entry], &[&loss]);
                assert_eq!(bytes, 64 * 32 * 4);
                restore_activations(&freed, |entry| entry.op.run()).expect("restored");
            }
            let one = Tensor::from(1.0f32);
            gradients(&[&loss], &[&one], &[&input, &weight]).expect("grads")
        };
        let (plain, selective) = (grads_of(false), grads_of(true));
        for (a, b) in plain.iter().zip(&selective) {
            let (a, b) = (a.as_ref().expect("grad"), b.as_ref().expect("grad"));
            assert!(a.equal(b), "{a} vs {b}");
        }
    }

    /// What `park` and `start_regather` rest on: the bytes really go back
    /// to the system, and a view the autograd graph saved before sees what
    /// is written into the same storage afterwards (written as a collective
    /// writes, without bumping the version counter).
    #[test]
    fn freed_bytes_leave_and_saved_views_see_the_refilled_storage() {
        let count = 16 << 20; // 64 MiB of f32
        let buffer = Tensor::ones([count], tch::kind::FLOAT_CPU);
        let weight = buffer.narrow(0, 0, 4).view([2, 2]);
        let input = Tensor::ones([1, 2], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let output = input.matmul(&weight).sum(Kind::Float);
        let before = resident_bytes();
        free_bytes(&buffer);
        let freed = before - resident_bytes();
        assert!(freed > 48 << 20, "only {freed} bytes left");
        alloc_bytes(&buffer).expect("bytes again");
        // SAFETY: the storage holds `count` f32 again, and nothing else
        // touches it meanwhile.
        let data = unsafe {
            std::slice::from_raw_parts_mut(buffer.data_ptr().cast::<f32>(), count as usize)
        };
        data[..4].copy_from_slice(&[2.0, 3.0, 4.0, 5.0]);
        let grads = gradients(&[&output], &[&Tensor::from(1.0f32)], &[&input]).expect("grads");
        let grad = grads[0].as_ref().expect("the input's gradient");
        // d(sum(x W))/dx = the row sums of W, as refilled.
        let expected = Tensor::from_slice(&[5.0f32, 9.0]).view([1, 2]);
        assert!(grad.allclose(&expected, 0.0, 0.0, false), "{grad}");
    }
}
