//! Gradient-norm clipping as `torch.nn.utils.clip_grad_norm_` computes it:
//! the 2-norm of the per-tensor 2-norms, and a factor
//! `min(1, max_norm / (norm + 1e-6))` that every gradient is scaled by.
//! With sharded gradients the squared norms of the local shards are summed
//! across ranks first (the correct global norm; upstream's FSDP clips per
//! wrapped module).

use tch::{Kind, Tensor};

/// The total 2-norm of `gradients` (fp32, as torch stacks the norms).
pub fn total_norm(gradients: &[&Tensor]) -> f64 {
    if gradients.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = gradients
        .iter()
        .map(|gradient| gradient.norm_scalaropt_dtype(2, Kind::Float))
        .collect();
    Tensor::stack(&norms, 0)
        .norm_scalaropt_dtype(2, Kind::Float)
        .double_value(&[])
}

/// The factor the gradients are multiplied by (1 when under the limit).
pub fn clip_factor(total_norm: f64, max_norm: f64) -> f64 {
    let coefficient = (max_norm as f32) / (total_norm as f32 + 1e-6);
    f64::from(coefficient.min(1.0))
}

/// Clips in place; returns the norm before clipping.
pub fn clip_grad_norm(gradients: &mut [Tensor], max_norm: f64) -> f64 {
    let norm = total_norm(&gradients.iter().collect::<Vec<_>>());
    let factor = clip_factor(norm, max_norm);
    tch::no_grad(|| {
        for gradient in gradients.iter_mut() {
            let _ = gradient.g_mul_scalar_(factor);
        }
    });
    norm
}
