//! The loss of a micro-batch as the global batch's mean token loss, and the
//! gradient's norm: the parts of the step that every strategy shares.

use flamingo_collectives::{ProcessGroup, ReduceOp};
use tch::{Kind, Reduction, Tensor};

use super::TrainError;
use crate::clip::clip_factor;

/// A micro-batch's loss: this rank's summed token cross-entropy (with its
/// graph) and the global sum and token count.
pub(crate) struct LossParts {
    pub(crate) summed: Tensor,
    pub(crate) global_sum: f64,
    pub(crate) global_tokens: f64,
}

impl LossParts {
    /// The global batch's mean token loss.
    pub(crate) fn mean(&self) -> f64 {
        self.global_sum / self.global_tokens
    }

    /// What the summed loss is multiplied by before backward: the loss
    /// multiplier over the global token count and the accumulated
    /// micro-steps.
    pub(crate) fn scale(&self, multiplier: f64, accumulation: u64) -> f64 {
        multiplier / (self.global_tokens * accumulation as f64)
    }
}

/// Σ over every rank of `group` (the value itself alone).
pub(crate) fn all_reduce_sum(group: Option<&ProcessGroup>, value: f64) -> Result<f64, TrainError> {
    match group {
        Some(group) if group.world_size() > 1 => Ok(group.all_reduce_scalar(value, ReduceOp::Sum)?),
        _ => Ok(value),
    }
}

/// The summed token cross-entropy of `logits` against the shifted
/// labels, and the global (sum, count) over `group`.
pub(crate) fn token_loss(
    group: Option<&ProcessGroup>,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<LossParts, TrainError> {
    let global_tokens = all_reduce_sum(group, token_count(labels))?.max(1.0);
    let summed = summed_token_loss(logits, labels);
    let global_sum = all_reduce_sum(group, summed.double_value(&[]))?;
    Ok(LossParts {
        summed,
        global_sum,
        global_tokens,
    })
}

/// The tokens of `labels` that count towards the loss (the shifted labels
/// other than -100); reads the count back to the host.
pub(crate) fn token_count(labels: &Tensor) -> f64 {
    let length = labels.size()[1];
    labels
        .narrow(1, 1, length - 1)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[]) as f64
}

/// This rank's summed token cross-entropy of `logits` against the shifted
/// labels, on the device (nothing read back: a CUDA graph can hold it).
pub(crate) fn summed_token_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let length = logits.size()[1];
    let vocab = logits.size()[2];
    let shifted_labels = labels.narrow(1, 1, length - 1).reshape([-1]);
    logits
        .narrow(1, 0, length - 1)
        .to_kind(Kind::Float)
        .reshape([-1, vocab])
        .cross_entropy_loss::<Tensor>(&shifted_labels, None, Reduction::Sum, -100, 0.0)
}

/// Σ g², accumulated in double a piece at a time: torch's norm in double
/// casts its whole input to double first, which for a rank's gradient
/// shard (200 MB on the 1B bench shape at 4 ranks) was the step's peak.
pub(crate) fn squared_norm(gradient: &Tensor) -> f64 {
    const PIECE: i64 = 1 << 22;
    let flat = gradient.reshape([-1]);
    let total = flat.numel() as i64;
    (0..total)
        .step_by(PIECE as usize)
        .map(|start| {
            let norm = flat
                .narrow(0, start, PIECE.min(total - start))
                .norm_scalaropt_dtype(2.0, Kind::Double)
                .double_value(&[]);
            norm * norm
        })
        .sum()
}

/// Scales `gradient` down to `max_norm`, given Σg² over every rank's
/// part; returns the norm.
pub(crate) fn clip(gradient: &mut Tensor, squares: f64, max_norm: f64) -> f64 {
    let grad_norm = squares.sqrt();
    let factor = clip_factor(grad_norm, max_norm);
    if factor < 1.0 {
        *gradient *= factor;
    }
    grad_norm
}
