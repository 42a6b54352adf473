//! AdamW as `torch.optim.AdamW` computes it on the CPU (the single-tensor
//! path): decoupled weight decay, then the moments, then the bias-corrected
//! step, with the same tensor operations in the same order, so the fp32
//! results are PyTorch's bit for bit.

use flamingo_torch_shim::optim::fl_fused_adamw;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults (what OpenFlamingo uses).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The optimizer state of one parameter (or one flat shard).
#[derive(Debug)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: u64,
}

impl Moments {
    pub fn zeros_like(parameter: &Tensor) -> Self {
        Self {
            exp_avg: parameter.zeros_like(),
            exp_avg_sq: parameter.zeros_like(),
            step: 0,
        }
    }
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config }
    }

    /// One step for one parameter, in place (no autograd).
    pub fn update(
        &self,
        parameter: &mut Tensor,
        gradient: &Tensor,
        moments: &mut Moments,
        lr: f64,
        weight_decay: f64,
    ) {
        moments.step += 1;
        self.update_parts(
            parameter,
            gradient,
            &mut moments.exp_avg,
            &mut moments.exp_avg_sq,
            moments.step,
            lr,
            weight_decay,
        );
    }

    /// The step on tensors that may be views into flat buffers (a shard's
    /// part of one parameter group); `step` is already incremented.
    #[allow(clippy::too_many_arguments)]
    pub fn update_parts(
        &self,
        parameter: &mut Tensor,
        gradient: &Tensor,
        exp_avg: &mut Tensor,
        exp_avg_sq: &mut Tensor,
        step: u64,
        lr: f64,
        weight_decay: f64,
    ) {
        let AdamWConfig { beta1, beta2, eps } = self.config;
        tch::no_grad(|| {
            if weight_decay != 0.0 {
                let _ = parameter.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let _ = exp_avg.lerp_(gradient, 1.0 - beta1);
            // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1-beta2); ATen's
            // kernel computes self + (value * t1) * t2.
            // (One temporary per line, updated in place: the same roundings.)
            let _ = exp_avg_sq.g_mul_scalar_(beta2);
            let mut square = gradient * (1.0 - beta2);
            let _ = square.g_mul_(gradient);
            let _ = exp_avg_sq.g_add_(&square);
            let step = step as f64;
            let bias_correction1 = 1.0 - beta1.powf(step);
            let bias_correction2 = 1.0 - beta2.powf(step);
            let step_size = lr / bias_correction1;
            let mut denom = exp_avg_sq.sqrt();
            let _ = denom.g_div_scalar_(bias_correction2.sqrt());
            let _ = denom.g_add_scalar_(eps);
            // param.addcdiv_(exp_avg, denom, value=-step_size): self + (value * t1) / t2.
            let mut update = &*exp_avg * (-step_size);
            let _ = update.g_div_(&denom);
            let _ = parameter.g_add_(&update);
        });
    }

    /// [`AdamW::update_parts`] through PyTorch's fused kernel (what
    /// `torch.optim.AdamW(fused=True)` runs): one pass, on any device.
    /// `step` counts this update.
    #[allow(clippy::too_many_arguments)]
    pub fn update_fused(
        &self,
        parameter: &Tensor,
        gradient: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: u64,
        lr: f64,
        weight_decay: f64,
    ) {
        let AdamWConfig { beta1, beta2, eps } = self.config;
        let mut error = vec![0 as std::ffi::c_char; 1024];
        let handle = |tensor: &Tensor| tensor.as_ptr() as *mut std::ffi::c_void;
        // SAFETY: the handles are live tch tensors borrowed for the call; the
        // shim writes a NUL-terminated message into `error` on failure.
        let status = unsafe {
            fl_fused_adamw(
                handle(parameter),
                handle(gradient),
                handle(exp_avg),
                handle(exp_avg_sq),
                lr,
                beta1,
                beta2,
                weight_decay,
                eps,
                step as std::ffi::c_long,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        // Shapes, dtypes and devices are the caller's to keep consistent; a
        // mismatch is a bug in flamingo, not in the input.
        assert_eq!(status, 0, "fused AdamW failed: {}", {
            // SAFETY: NUL-terminated by the shim.
            unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) }.to_string_lossy()
        });
    }
}
