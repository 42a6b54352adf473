//! The training loss, as Hugging Face's causal LMs compute it when given
//! `labels` (what OpenFlamingo's `Flamingo.forward(..., labels=...)` returns):
//! logits shifted one step left against the labels, cross-entropy in fp32,
//! averaged over the positions whose label is not −100.

use tch::{Kind, Reduction, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// `logits` `[b, t, vocab]`, `labels` `[b, t]` → the mean loss (a scalar).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let size = logits.size();
    let (length, vocab) = (size[1], size[2]);
    let shifted_logits = logits
        .narrow(1, 0, length - 1)
        .to_kind(Kind::Float)
        .reshape([-1, vocab]);
    let shifted_labels = labels.narrow(1, 1, length - 1).reshape([-1]);
    shifted_logits.cross_entropy_loss::<Tensor>(
        &shifted_labels,
        None,
        Reduction::Mean,
        IGNORE_INDEX,
        0.0,
    )
}
