//! `--cuda_graphs`: the plain step's forward and backward captured once per
//! batch shape as a CUDA graph and replayed, so that a step launches one
//! graph instead of thousands of kernels.
//!
//! As torch's `make_graphed_callables`: the batch is copied into static
//! input tensors, a few eager warm-up runs go on the graph's side stream
//! first, the capture runs the same code with autocast's cast cache off,
//! and every trainable parameter's `.grad` exists before the capture, so
//! that the captured backward adds into it (a replay accumulates, as an
//! eager backward does). What needs the host stays outside the graph: the
//! token count and the loss scale are set before a replay (the scale is a
//! device scalar the graph reads), and the summed loss is read after it.

use std::collections::HashMap;

use flamingo_torch_shim::cuda_graph as ffi;
use tch::Tensor;

use crate::batch::TrainBatch;
use crate::trainer::TrainError;

/// Eager runs on the side stream before a shape is captured.
pub const WARM_UP_RUNS: usize = 2;

/// A CUDA graph (`at::cuda::CUDAGraph`) and its side stream; or, for
/// checking the code around graphs on the CPU, a stand-in that runs
/// everything eagerly and never captures ([`Graphs::eager`]).
pub struct CudaGraph {
    /// Null for the eager stand-in.
    raw: *mut std::ffi::c_void,
}

// SAFETY: the graph object is only used from the thread that runs the
// step; it is moved, not shared.
unsafe impl Send for CudaGraph {}

fn call(
    what: &str,
    call: impl FnOnce(*mut std::ffi::c_char, usize) -> i32,
) -> Result<(), TrainError> {
    crate::units::shim_status(call).map_err(|message| TrainError::Setting {
        field: "cuda_graphs",
        message: format!("{what}: {message}"),
    })
}

impl CudaGraph {
    pub fn new(device: tch::Device) -> Result<Self, TrainError> {
        let tch::Device::Cuda(index) = device else {
            return Err(TrainError::Setting {
                field: "cuda_graphs",
                message: format!("needs a CUDA device, not {device:?}"),
            });
        };
        let mut raw = std::ptr::null_mut();
        call("making a graph", |error, len| {
            // SAFETY: the shim writes a message into `error` on failure.
            raw = unsafe { ffi::fl_cuda_graph_new(index as i32, error, len) };
            i32::from(raw.is_null())
        })?;
        Ok(Self { raw })
    }

    /// Whether this is the eager stand-in, which is never captured.
    pub fn is_eager(&self) -> bool {
        self.raw.is_null()
    }

    /// Runs `f` on the graph's side stream.
    pub fn on_side_stream<T>(&self, f: impl FnOnce() -> T) -> Result<T, TrainError> {
        if self.is_eager() {
            return Ok(f());
        }
        // SAFETY: a live graph handle; the calls write messages on failure.
        call("entering the side stream", |error, len| unsafe {
            ffi::fl_cuda_graph_enter(self.raw, error, len)
        })?;
        let result = f();
        call("leaving the side stream", |error, len| unsafe {
            ffi::fl_cuda_graph_leave(self.raw, error, len)
        })?;
        Ok(result)
    }

    /// Captures what `f` queues (on the side stream) into the graph. The
    /// work is not run: [`Self::replay`] runs it.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> T) -> Result<T, TrainError> {
        let raw = self.raw;
        self.on_side_stream(|| {
            // SAFETY: a live graph handle on its entered side stream.
            call("starting the capture", |error, len| unsafe {
                ffi::fl_cuda_graph_capture_begin(raw, error, len)
            })?;
            let result = f();
            call("ending the capture", |error, len| unsafe {
                ffi::fl_cuda_graph_capture_end(raw, error, len)
            })?;
            Ok(result)
        })?
    }

    pub fn replay(&self) -> Result<(), TrainError> {
        // SAFETY: a live, captured graph handle.
        call("replaying", |error, len| unsafe {
            ffi::fl_cuda_graph_replay(self.raw, error, len)
        })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if !self.is_eager() {
            // SAFETY: made by fl_cuda_graph_new, freed once.
            unsafe { ffi::fl_cuda_graph_free(self.raw) };
        }
    }
}

/// One batch shape's graph: its static inputs, the loss scale it reads,
/// and (once captured) the summed loss it writes.
pub struct Graphed {
    pub inputs: TrainBatch,
    pub scale: Tensor,
    pub graph: CudaGraph,
    pub runs: usize,
    pub summed: Option<Tensor>,
}

/// The graphs of the shapes seen so far.
#[derive(Default)]
pub struct Graphs {
    by_shape: HashMap<Vec<Vec<i64>>, Graphed>,
    /// Eager stand-ins instead of graphs (on the CPU, for tests of the
    /// code around the graphs: static inputs, the scale, the loss).
    eager: bool,
}

impl Graphs {
    /// Graphs that are eager stand-ins: every run goes through the
    /// graphed step's static inputs and device-side scale, but nothing is
    /// captured.
    pub fn eager() -> Self {
        Self {
            by_shape: HashMap::new(),
            eager: true,
        }
    }

    /// The entry for `batch`'s shapes (made on first sight), with `batch`
    /// copied into its static inputs.
    pub fn entry(&mut self, batch: &TrainBatch) -> Result<&mut Graphed, TrainError> {
        let key = vec![
            batch.vision_x.size(),
            batch.input_ids.size(),
            batch.attention_mask.size(),
            batch.labels.size(),
        ];
        let entry = match self.by_shape.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let device = batch.input_ids.device();
                slot.insert(Graphed {
                    inputs: TrainBatch {
                        vision_x: batch.vision_x.empty_like(),
                        input_ids: batch.input_ids.empty_like(),
                        attention_mask: batch.attention_mask.empty_like(),
                        labels: batch.labels.empty_like(),
                        samples: batch.samples,
                    },
                    scale: Tensor::from(0f32).to_device(device),
                    graph: if self.eager {
                        CudaGraph {
                            raw: std::ptr::null_mut(),
                        }
                    } else {
                        CudaGraph::new(device)?
                    },
                    runs: 0,
                    summed: None,
                })
            }
        };
        tch::no_grad(|| {
            entry.inputs.vision_x.copy_(&batch.vision_x);
            entry.inputs.input_ids.copy_(&batch.input_ids);
            entry.inputs.attention_mask.copy_(&batch.attention_mask);
            entry.inputs.labels.copy_(&batch.labels);
        });
        entry.inputs.samples = batch.samples;
        Ok(entry)
    }
}
