//! The C ABI of flamingo's C++ shims over libtorch (`csrc/`), for what
//! `tch` does not bind: c10d collectives, the autocast state of a device,
//! `torch.autograd.grad`, the fused AdamW kernel and `torch.save`'s pickle
//! writer. Raw declarations only; the safe wrappers live with their users
//! (`flamingo-collectives`, `flamingo-engine`). Every function that can fail
//! reports a C++ exception's message through an error out-parameter instead
//! of unwinding across the boundary.

pub mod c10d;

/// A tch tensor handle as the shims take it (`at::Tensor*`).
pub use torch_sys::C_tensor;

/// `csrc/autocast.cpp`: PyTorch's thread-local autocast state for a device
/// type (tch only exposes CUDA's).
pub mod autocast {
    extern "C" {
        /// device: 0 = CPU, 1 = CUDA; dtype: 0 = bfloat16, 1 = float16.
        /// Returns whether autocast was enabled before.
        pub fn fl_autocast_enter(
            device: std::ffi::c_int,
            dtype: std::ffi::c_int,
        ) -> std::ffi::c_int;
        pub fn fl_autocast_exit(device: std::ffi::c_int, enabled_before: std::ffi::c_int);
    }
}

/// `csrc/autograd.cpp`: `torch.autograd.grad(outputs, inputs, grad_outputs,
/// allow_unused=True)`; an unused input's result is null.
pub mod autograd {
    extern "C" {
        pub fn fl_autograd_grad(
            outputs: *mut *mut std::ffi::c_void,
            grad_outputs: *mut *mut std::ffi::c_void,
            n_outputs: std::ffi::c_int,
            inputs: *mut *mut std::ffi::c_void,
            n_inputs: std::ffi::c_int,
            results: *mut *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        /// Frees the bytes of a tensor's storage, keeping the storage (and
        /// every view of it); returns the bytes it held.
        pub fn fl_storage_free(tensor: *mut std::ffi::c_void) -> i64;
        /// Gives a tensor's storage `bytes` fresh bytes again.
        pub fn fl_storage_alloc(
            tensor: *mut std::ffi::c_void,
            bytes: i64,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        /// Copies `source` into `target`'s storage without moving
        /// `target`'s version counter.
        pub fn fl_storage_refill(
            target: *mut std::ffi::c_void,
            source: *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        /// `torch.cuda.memory_allocated(device)`; -1 without CUDA.
        pub fn fl_cuda_allocated_bytes(device: std::ffi::c_int) -> i64;
    }
}

/// `csrc/cuda_graph.cpp`: `at::cuda::CUDAGraph` with a side stream to
/// capture on. Each call but `free` returns non-zero with a NUL-terminated
/// message in `error` on failure (always, in a build without CUDA).
pub mod cuda_graph {
    extern "C" {
        /// A graph for `device`; null on failure.
        pub fn fl_cuda_graph_new(
            device: std::ffi::c_int,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> *mut std::ffi::c_void;
        /// Makes the graph's side stream current (after the current
        /// stream's queued work).
        pub fn fl_cuda_graph_enter(
            graph: *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        /// Restores the stream current before `enter`, which then waits
        /// for the side stream.
        pub fn fl_cuda_graph_leave(
            graph: *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        /// Starts capturing (entered), autocast's cast cache off.
        pub fn fl_cuda_graph_capture_begin(
            graph: *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        pub fn fl_cuda_graph_capture_end(
            graph: *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        /// Launches the captured work on the current stream.
        pub fn fl_cuda_graph_replay(
            graph: *mut std::ffi::c_void,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
        pub fn fl_cuda_graph_free(graph: *mut std::ffi::c_void);
    }
}

/// `csrc/optim.cpp`: one AdamW step with `torch._fused_adamw_` (what
/// `torch.optim.AdamW(fused=True)` runs).
pub mod optim {
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn fl_fused_adamw(
            param: *mut std::ffi::c_void,
            grad: *mut std::ffi::c_void,
            exp_avg: *mut std::ffi::c_void,
            exp_avg_sq: *mut std::ffi::c_void,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            step: std::ffi::c_long,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
    }
}

/// `csrc/pickle.cpp`: a `{name: tensor}` dict in `torch.save`'s zip format.
pub mod pickle {
    extern "C" {
        pub fn fl_pickle_save(
            names: *const *const std::ffi::c_char,
            tensors: *const *mut std::ffi::c_void,
            count: std::ffi::c_int,
            path: *const std::ffi::c_char,
            error: *mut std::ffi::c_char,
            error_len: usize,
        ) -> std::ffi::c_int;
    }
}
