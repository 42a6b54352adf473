//! `csrc/c10d.cpp`: c10d process groups (Gloo; NCCL with the `cuda`
//! feature) over `TCPStore` rendezvous, and their collectives on tensors.
//! `flamingo-collectives` wraps them safely.

use std::os::raw::{c_char, c_int};
use torch_sys::C_tensor;

#[repr(C)]
pub struct FlProcessGroup {
    _private: [u8; 0],
}

#[repr(C)]
pub struct FlWork {
    _private: [u8; 0],
}

extern "C" {
    pub fn fl_string_free(text: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    pub fn fl_pg_new(
        backend: *const c_char,
        master_addr: *const c_char,
        master_port: c_int,
        rank: c_int,
        world_size: c_int,
        local_hostname: *const c_char,
        prefix: *const c_char,
        timeout_ms: i64,
        error: *mut *mut c_char,
    ) -> *mut FlProcessGroup;
    pub fn fl_pg_new_subgroup(
        parent: *mut FlProcessGroup,
        prefix: *const c_char,
        rank: c_int,
        world_size: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlProcessGroup;
    pub fn fl_pg_free(group: *mut FlProcessGroup);
    pub fn fl_all_reduce(
        group: *mut FlProcessGroup,
        tensor: *mut C_tensor,
        op: c_int,
        async_op: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlWork;
    pub fn fl_all_gather_into_tensor(
        group: *mut FlProcessGroup,
        output: *mut C_tensor,
        input: *mut C_tensor,
        async_op: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlWork;
    pub fn fl_reduce_scatter_tensor(
        group: *mut FlProcessGroup,
        output: *mut C_tensor,
        input: *mut C_tensor,
        op: c_int,
        async_op: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlWork;
    pub fn fl_broadcast(
        group: *mut FlProcessGroup,
        tensor: *mut C_tensor,
        root: c_int,
        async_op: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlWork;
    pub fn fl_reduce(
        group: *mut FlProcessGroup,
        tensor: *mut C_tensor,
        root: c_int,
        op: c_int,
        async_op: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlWork;
    pub fn fl_barrier(
        group: *mut FlProcessGroup,
        async_op: c_int,
        error: *mut *mut c_char,
    ) -> *mut FlWork;
    pub fn fl_work_wait(work: *mut FlWork, timeout_ms: i64, error: *mut *mut c_char) -> c_int;
    pub fn fl_work_is_completed(work: *mut FlWork, error: *mut *mut c_char) -> c_int;
    pub fn fl_work_free(work: *mut FlWork);
}
