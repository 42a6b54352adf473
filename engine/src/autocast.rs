//! `--precision amp_bf16`: the forward pass under PyTorch's autocast in
//! bfloat16 (matmuls and convolutions in bf16, reductions and the loss in
//! fp32), on the CPU or a GPU; weights, gradients and optimizer state stay
//! fp32. tch exposes autocast only for CUDA, so a small shim sets it.

use flamingo_torch_shim::autocast::{fl_autocast_enter, fl_autocast_exit};

/// Runs `f` with bf16 autocast on `device` when `enabled`.
pub fn bf16<T>(enabled: bool, device: tch::Device, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    let device = std::ffi::c_int::from(device.is_cuda());
    // SAFETY: the shim only flips PyTorch's thread-local autocast state and
    // restores it below.
    let before = unsafe { fl_autocast_enter(device, 0) };
    let result = f();
    // SAFETY: as above; pairs with the enter.
    unsafe { fl_autocast_exit(device, before) };
    result
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    #[test]
    fn matmuls_run_in_bf16_inside_and_fp32_outside() {
        let a = Tensor::randn([4, 4], (Kind::Float, tch::Device::Cpu));
        let inside = super::bf16(true, tch::Device::Cpu, || a.matmul(&a));
        assert_eq!(inside.kind(), Kind::BFloat16);
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        let off = super::bf16(false, tch::Device::Cpu, || a.matmul(&a));
        assert_eq!(off.kind(), Kind::Float);
    }
}
