//! The process group handle and its collectives.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::time::Duration;

use flamingo_torch_shim::c10d as ffi;
use tch::{Kind, Tensor};

use crate::sharding::{pad_to_multiple, shard_len};
use crate::{CollectiveError, Result};

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    fn as_c_str(self) -> &'static CStr {
        match self {
            Backend::Gloo => c"gloo",
            Backend::Nccl => c"nccl",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = CollectiveError;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(CollectiveError::InvalidArgument {
                op: "backend",
                message: format!("unknown backend '{other}' (expected gloo or nccl)"),
            }),
        }
    }
}

/// Reduction applied by all-reduce and reduce-scatter. `Avg` is computed as a
/// sum divided by the world size, since Gloo has no native average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
    Min,
    Product,
}

impl ReduceOp {
    fn code(self) -> i32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
            ReduceOp::Min => 3,
            ReduceOp::Product => 4,
        }
    }
}

/// Where and how to rendezvous; the fields torchrun passes in the environment.
#[derive(Debug, Clone)]
pub struct ProcessGroupConfig {
    pub backend: Backend,
    pub master_addr: String,
    pub master_port: u16,
    pub rank: i64,
    pub world_size: i64,
    /// Address Gloo binds its pair sockets to; `None` lets Gloo resolve the
    /// machine's hostname (falling back to loopback).
    pub local_hostname: Option<String>,
    /// Applies to the rendezvous and to every collective.
    pub timeout: Duration,
    /// Key prefix inside the store, so several groups can share one store.
    pub store_prefix: String,
}

impl ProcessGroupConfig {
    /// Reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (torchrun's
    /// names). `GLOO_SOCKET_IFNAME`-style address pinning comes from
    /// `FLAMINGO_LOCAL_ADDR` when set.
    pub fn from_env(backend: Backend, timeout: Duration) -> Result<Self> {
        fn read(var: &'static str) -> Result<String> {
            std::env::var(var).map_err(|_| CollectiveError::Environment {
                var,
                message:
                    "not set; start ranks with flamingoctl launch or set it like torchrun does"
                        .to_string(),
            })
        }
        fn parse<T: std::str::FromStr>(var: &'static str) -> Result<T> {
            let raw = read(var)?;
            raw.parse().map_err(|_| CollectiveError::Environment {
                var,
                message: format!("'{raw}' is not a valid number"),
            })
        }
        Ok(Self {
            backend,
            master_addr: read("MASTER_ADDR")?,
            master_port: parse("MASTER_PORT")?,
            rank: parse("RANK")?,
            world_size: parse("WORLD_SIZE")?,
            local_hostname: std::env::var("FLAMINGO_LOCAL_ADDR").ok(),
            timeout,
            store_prefix: "default_pg/".to_string(),
        })
    }
}

fn take_error(raw: *mut c_char) -> String {
    if raw.is_null() {
        return "unknown error (no message from c10d)".to_string();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string that we own.
    let text = unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated by the shim with malloc, freed exactly once here.
    unsafe { ffi::fl_string_free(raw) };
    text
}

fn timeout_ms(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

/// A joined c10d process group.
pub struct ProcessGroup {
    raw: *mut ffi::FlProcessGroup,
    rank: i64,
    world_size: i64,
    backend: Backend,
    timeout: Duration,
}

// SAFETY: c10d backends serialise work internally (Gloo's work queue, NCCL's
// streams); torch.distributed issues collectives from any thread too.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above; every entry point only enqueues work on the backend.
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl ProcessGroup {
    /// Rendezvous through the TCP store at `master_addr:master_port` (rank 0
    /// hosts it) and build the backend. Blocks until every rank has joined or
    /// the timeout passes.
    pub fn new(config: &ProcessGroupConfig) -> Result<Self> {
        let init_error = |message: String| CollectiveError::Init {
            rank: config.rank,
            world_size: config.world_size,
            master_addr: config.master_addr.clone(),
            master_port: config.master_port,
            message,
        };
        if config.world_size < 1 || config.rank < 0 || config.rank >= config.world_size {
            return Err(init_error(format!(
                "rank must be in [0, world size), got rank {} and world size {}",
                config.rank, config.world_size
            )));
        }
        let master_addr = CString::new(config.master_addr.as_str())
            .map_err(|_| init_error("master address contains a NUL byte".to_string()))?;
        let local = CString::new(config.local_hostname.clone().unwrap_or_default())
            .map_err(|_| init_error("local address contains a NUL byte".to_string()))?;
        let prefix = CString::new(config.store_prefix.as_str())
            .map_err(|_| init_error("store prefix contains a NUL byte".to_string()))?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let raw = unsafe {
            ffi::fl_pg_new(
                config.backend.as_c_str().as_ptr(),
                master_addr.as_ptr(),
                i32::from(config.master_port),
                config.rank as i32,
                config.world_size as i32,
                local.as_ptr(),
                prefix.as_ptr(),
                timeout_ms(config.timeout),
                &mut error,
            )
        };
        if raw.is_null() {
            return Err(init_error(take_error(error)));
        }
        Ok(Self {
            raw,
            rank: config.rank,
            world_size: config.world_size,
            backend: config.backend,
            timeout: config.timeout,
        })
    }

    /// A group of some of this group's processes, over the same store
    /// under `prefix`: `rank` and `world_size` are within the subgroup.
    /// Every member calls it with the same prefix (and no one else does);
    /// it blocks until all members have. FSDP's hybrid sharding uses two
    /// kinds: the ranks of one node, and the ranks with one local rank.
    pub fn subgroup(&self, prefix: &str, rank: i64, world_size: i64) -> Result<Self> {
        let init_error = |message: String| CollectiveError::Init {
            rank,
            world_size,
            master_addr: format!("(subgroup {prefix} of the group of rank {})", self.rank),
            master_port: 0,
            message,
        };
        if world_size < 1 || rank < 0 || rank >= world_size {
            return Err(init_error(format!(
                "rank must be in [0, world size), got rank {rank} and world size {world_size}"
            )));
        }
        let prefix_c = CString::new(prefix)
            .map_err(|_| init_error("store prefix contains a NUL byte".to_string()))?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: `self.raw` is live; the prefix is a valid NUL-terminated
        // string for the call.
        let raw = unsafe {
            ffi::fl_pg_new_subgroup(
                self.raw,
                prefix_c.as_ptr(),
                rank as i32,
                world_size as i32,
                &mut error,
            )
        };
        if raw.is_null() {
            return Err(init_error(take_error(error)));
        }
        Ok(Self {
            raw,
            rank,
            world_size,
            backend: self.backend,
            timeout: self.timeout,
        })
    }

    pub fn rank(&self) -> i64 {
        self.rank
    }

    pub fn world_size(&self) -> i64 {
        self.world_size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn finish(
        &self,
        op: &'static str,
        raw: *mut ffi::FlWork,
        error: *mut c_char,
        keep: Vec<Tensor>,
    ) -> Result<Work> {
        if raw.is_null() {
            return Err(CollectiveError::Collective {
                op,
                rank: self.rank,
                message: take_error(error),
            });
        }
        Ok(Work {
            raw,
            op,
            rank: self.rank,
            timeout: self.timeout,
            _tensors: keep,
        })
    }

    fn check_root(&self, op: &'static str, root: i64) -> Result<()> {
        if root < 0 || root >= self.world_size {
            return Err(CollectiveError::InvalidArgument {
                op,
                message: format!("root {root} is outside [0, {})", self.world_size),
            });
        }
        Ok(())
    }

    fn check_dense(op: &'static str, tensor: &Tensor, what: &str) -> Result<()> {
        if !tensor.is_contiguous() {
            return Err(CollectiveError::InvalidArgument {
                op,
                message: format!("{what} tensor must be contiguous"),
            });
        }
        Ok(())
    }

    /// Starts an in-place all-reduce of `tensor` across ranks.
    pub fn all_reduce_async(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        self.start_all_reduce(tensor, op, true)
    }

    fn start_all_reduce(&self, tensor: &Tensor, op: ReduceOp, async_op: bool) -> Result<Work> {
        Self::check_dense("all_reduce", tensor, "the")?;
        let mut target = tensor.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: raw pointers come from live objects held for the work's life.
        let raw = unsafe {
            ffi::fl_all_reduce(
                self.raw,
                target.as_mut_ptr(),
                op.code(),
                i32::from(async_op),
                &mut error,
            )
        };
        self.finish("all_reduce", raw, error, vec![target])
    }

    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.start_all_reduce(tensor, op, false)?.wait()
    }

    /// Starts gathering every rank's `input` into `output`, rank-major;
    /// `output` must hold `world_size × input.numel()` elements.
    pub fn all_gather_into_tensor_async(&self, output: &Tensor, input: &Tensor) -> Result<Work> {
        self.start_all_gather(output, input, true)
    }

    fn start_all_gather(&self, output: &Tensor, input: &Tensor, async_op: bool) -> Result<Work> {
        const OP: &str = "all_gather_into_tensor";
        Self::check_dense(OP, output, "output")?;
        Self::check_dense(OP, input, "input")?;
        let expected = input.numel() as i64 * self.world_size;
        if output.numel() as i64 != expected || output.kind() != input.kind() {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                message: format!(
                    "output must have world_size × input elements of the input's dtype: \
                     input {} × {} ranks = {expected} {:?}, output {} {:?}",
                    input.numel(),
                    self.world_size,
                    input.kind(),
                    output.numel(),
                    output.kind()
                ),
            });
        }
        let mut output_target = output.shallow_clone();
        let mut input_target = input.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: raw pointers come from live objects held for the work's life.
        let raw = unsafe {
            ffi::fl_all_gather_into_tensor(
                self.raw,
                output_target.as_mut_ptr(),
                input_target.as_mut_ptr(),
                i32::from(async_op),
                &mut error,
            )
        };
        self.finish(OP, raw, error, vec![output_target, input_target])
    }

    pub fn all_gather_into_tensor(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.start_all_gather(output, input, false)?.wait()
    }

    /// Starts reducing `input` (world_size × output elements) across ranks
    /// and leaving this rank's slice in `output`.
    pub fn reduce_scatter_tensor_async(
        &self,
        output: &Tensor,
        input: &Tensor,
        op: ReduceOp,
    ) -> Result<Work> {
        self.start_reduce_scatter(output, input, op, true)
    }

    fn start_reduce_scatter(
        &self,
        output: &Tensor,
        input: &Tensor,
        op: ReduceOp,
        async_op: bool,
    ) -> Result<Work> {
        const OP: &str = "reduce_scatter_tensor";
        Self::check_dense(OP, output, "output")?;
        Self::check_dense(OP, input, "input")?;
        let expected = output.numel() as i64 * self.world_size;
        if input.numel() as i64 != expected || output.kind() != input.kind() {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                message: format!(
                    "input must have world_size × output elements of the output's dtype: \
                     output {} × {} ranks = {expected} {:?}, input {} {:?}",
                    output.numel(),
                    self.world_size,
                    output.kind(),
                    input.numel(),
                    input.kind()
                ),
            });
        }
        let mut output_target = output.shallow_clone();
        let mut input_target = input.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: raw pointers come from live objects held for the work's life.
        let raw = unsafe {
            ffi::fl_reduce_scatter_tensor(
                self.raw,
                output_target.as_mut_ptr(),
                input_target.as_mut_ptr(),
                op.code(),
                i32::from(async_op),
                &mut error,
            )
        };
        self.finish(OP, raw, error, vec![output_target, input_target])
    }

    pub fn reduce_scatter_tensor(
        &self,
        output: &Tensor,
        input: &Tensor,
        op: ReduceOp,
    ) -> Result<()> {
        self.start_reduce_scatter(output, input, op, false)?.wait()
    }

    /// Starts broadcasting `tensor` from `root` to every rank, in place.
    pub fn broadcast_async(&self, tensor: &Tensor, root: i64) -> Result<Work> {
        self.start_broadcast(tensor, root, true)
    }

    fn start_broadcast(&self, tensor: &Tensor, root: i64, async_op: bool) -> Result<Work> {
        Self::check_dense("broadcast", tensor, "the")?;
        self.check_root("broadcast", root)?;
        let mut target = tensor.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: raw pointers come from live objects held for the work's life.
        let raw = unsafe {
            ffi::fl_broadcast(
                self.raw,
                target.as_mut_ptr(),
                root as i32,
                i32::from(async_op),
                &mut error,
            )
        };
        self.finish("broadcast", raw, error, vec![target])
    }

    pub fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<()> {
        self.start_broadcast(tensor, root, false)?.wait()
    }

    /// Starts reducing every rank's `tensor` into `root`'s, in place. On
    /// the other ranks `tensor` is scratch: its contents are undefined once
    /// the work is done.
    pub fn reduce_async(&self, tensor: &Tensor, root: i64, op: ReduceOp) -> Result<Work> {
        self.start_reduce(tensor, root, op, true)
    }

    fn start_reduce(
        &self,
        tensor: &Tensor,
        root: i64,
        op: ReduceOp,
        async_op: bool,
    ) -> Result<Work> {
        Self::check_dense("reduce", tensor, "the")?;
        self.check_root("reduce", root)?;
        let mut target = tensor.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: raw pointers come from live objects held for the work's life.
        let raw = unsafe {
            ffi::fl_reduce(
                self.raw,
                target.as_mut_ptr(),
                root as i32,
                op.code(),
                i32::from(async_op),
                &mut error,
            )
        };
        self.finish("reduce", raw, error, vec![target])
    }

    pub fn reduce(&self, tensor: &Tensor, root: i64, op: ReduceOp) -> Result<()> {
        self.start_reduce(tensor, root, op, false)?.wait()
    }

    pub fn barrier_async(&self) -> Result<Work> {
        self.start_barrier(true)
    }

    fn start_barrier(&self, async_op: bool) -> Result<Work> {
        let mut error = std::ptr::null_mut();
        // SAFETY: the group pointer is live for the call.
        let raw = unsafe { ffi::fl_barrier(self.raw, i32::from(async_op), &mut error) };
        self.finish("barrier", raw, error, Vec::new())
    }

    pub fn barrier(&self) -> Result<()> {
        self.start_barrier(false)?.wait()
    }

    /// All-gathers a 1-D shard of a flat buffer of `total` elements whose
    /// length need not divide by the world size (see [`crate::shard_len`]);
    /// returns the unpadded buffer.
    pub fn all_gather_flat(&self, shard: &Tensor, total: i64) -> Result<Tensor> {
        let expected = shard_len(total, self.world_size);
        if shard.numel() as i64 != expected {
            return Err(CollectiveError::InvalidArgument {
                op: "all_gather_flat",
                message: format!(
                    "shard of a {total}-element buffer over {} ranks must hold {expected} elements, got {}",
                    self.world_size,
                    shard.numel()
                ),
            });
        }
        let padded = Tensor::empty(
            [pad_to_multiple(total, self.world_size)],
            (shard.kind(), shard.device()),
        );
        self.all_gather_into_tensor(&padded, &shard.contiguous().view([-1]))?;
        Ok(padded.narrow(0, 0, total))
    }

    /// Reduce-scatters a flat buffer of any length: pads it with zeros to a
    /// multiple of the world size and returns this rank's padded shard.
    pub fn reduce_scatter_flat(&self, full: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let total = full.numel() as i64;
        let padded_len = pad_to_multiple(total, self.world_size);
        let flat = full.contiguous().view([-1]);
        let input = if padded_len == total {
            flat
        } else {
            let padded = Tensor::zeros([padded_len], (full.kind(), full.device()));
            padded.narrow(0, 0, total).copy_(&flat);
            padded
        };
        let output = Tensor::empty(
            [shard_len(total, self.world_size)],
            (full.kind(), full.device()),
        );
        self.reduce_scatter_tensor(&output, &input, op)?;
        Ok(output)
    }

    /// Float scalar all-reduce, for metrics and time measurements.
    pub fn all_reduce_scalar(&self, value: f64, op: ReduceOp) -> Result<f64> {
        let tensor = Tensor::from_slice(&[value]).to_kind(Kind::Double);
        self.all_reduce(&tensor, op)?;
        Ok(tensor.double_value(&[0]))
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by fl_pg_new and freed once.
        unsafe { ffi::fl_pg_free(self.raw) };
    }
}

/// A collective in flight. Its tensors stay alive until it is dropped; wait
/// for it before reading the result.
pub struct Work {
    raw: *mut ffi::FlWork,
    op: &'static str,
    rank: i64,
    timeout: Duration,
    _tensors: Vec<Tensor>,
}

// SAFETY: c10d::Work is safe to wait on from another thread.
unsafe impl Send for Work {}

impl std::fmt::Debug for Work {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Work")
            .field("op", &self.op)
            .finish()
    }
}

impl Work {
    /// Blocks until the collective finishes; errors if it failed or took
    /// longer than the group's timeout.
    pub fn wait(self) -> Result<()> {
        let mut error = std::ptr::null_mut();
        // SAFETY: raw is live until drop.
        let done = unsafe { ffi::fl_work_wait(self.raw, timeout_ms(self.timeout), &mut error) };
        if done == 1 {
            Ok(())
        } else {
            Err(CollectiveError::Collective {
                op: self.op,
                rank: self.rank,
                message: take_error(error),
            })
        }
    }

    /// Whether the collective has finished (successfully or not).
    pub fn is_completed(&self) -> Result<bool> {
        let mut error = std::ptr::null_mut();
        // SAFETY: raw is live until drop.
        let done = unsafe { ffi::fl_work_is_completed(self.raw, &mut error) };
        if !error.is_null() {
            return Err(CollectiveError::Collective {
                op: self.op,
                rank: self.rank,
                message: take_error(error),
            });
        }
        Ok(done == 1)
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: created by the shim and freed once.
        unsafe { ffi::fl_work_free(self.raw) };
    }
}
