//! Selective recompute: the cheap operations whose outputs the autograd
//! graph saves, recorded so that a trainer can free those outputs after a
//! unit's forward and compute them again, into the same storage, just
//! before the unit's backward. The expensive operations (matmuls,
//! attention) are never run again: their outputs stay in the graph.
//!
//! Recorded are the operations whose inputs the graph keeps anyway, so
//! that nothing is held alive to recompute them:
//! - a LayerNorm's output (its input is saved by the norm's own backward,
//!   and the Linear after it saves the output when its weight trains);
//! - a GELU's output (its input is saved by GELU's backward; the Linear
//!   after it saves the output);
//! - a concatenation of recorded outputs (the perceiver's `[media; latents]`
//!   that its key/value projection saves);
//! - a tanh-gated residual `branch · tanh(gate) + skip` (the branch is
//!   saved by the product's backward, the skip is the block's input), which
//!   the next LayerNorm saves.
//!
//! Only the Flamingo modules that train record (perceiver layers, gated
//! cross-attention blocks, their feed-forwards); the frozen decoder's
//! LayerNorms feed frozen Linears, which save nothing of them. Recording is
//! off unless a trainer runs a unit inside [`recording`]; the forward pass
//! computes every recorded operation through [`Cheap::run`], which is also
//! what recomputes it, so the two give the same bits.

use std::cell::RefCell;

use tch::Tensor;

/// One cheap operation, holding (shallow) handles to its inputs.
#[derive(Debug)]
pub enum Cheap {
    LayerNorm {
        input: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        dim: i64,
        eps: f64,
    },
    /// The exact (erf) GELU, torch's `nn.GELU()` default.
    Gelu {
        input: Tensor,
    },
    Cat {
        parts: Vec<Tensor>,
        dim: i64,
    },
    /// `branch · tanh(gate) + skip`.
    GatedResidual {
        branch: Tensor,
        gate: Tensor,
        skip: Tensor,
    },
}

impl Cheap {
    /// The operation's output, computed from its inputs as they are now.
    pub fn run(&self) -> Tensor {
        match self {
            Self::LayerNorm {
                input,
                weight,
                bias,
                dim,
                eps,
            } => crate::layers::layer_norm_to_matmul(input, weight, bias.as_ref(), *dim, *eps),
            Self::Gelu { input } => input.gelu("none"),
            Self::Cat { parts, dim } => Tensor::cat(parts, *dim),
            Self::GatedResidual { branch, gate, skip } => gated_residual(branch, gate, skip),
        }
    }
}

/// `branch · tanh(gate) + skip` in one elementwise kernel (`addcmul`)
/// instead of a product and a sum, each a pass over the hidden state.
pub fn gated_residual(branch: &Tensor, gate: &Tensor, skip: &Tensor) -> Tensor {
    // addcmul does not promote its operands as `*` and `+` do (a bf16
    // branch under autocast meets an fp32 gate and skip): bring them to
    // the kind the unfused expression gives.
    let kind = promoted(promoted(branch.kind(), gate.kind()), skip.kind());
    let cast = |tensor: &Tensor| {
        if tensor.kind() == kind {
            tensor.shallow_clone()
        } else {
            tensor.to_kind(kind)
        }
    };
    cast(skip).addcmul(&cast(branch), &cast(&gate.tanh()))
}

/// The kind torch's type promotion gives two floating-point tensors.
fn promoted(a: tch::Kind, b: tch::Kind) -> tch::Kind {
    use tch::Kind::{BFloat16, Double, Float, Half};
    match (a, b) {
        (x, y) if x == y => x,
        (Double, _) | (_, Double) => Double,
        (Float, _) | (_, Float) => Float,
        (BFloat16, Half) | (Half, BFloat16) => Float,
        (x, _) => x,
    }
}

/// A recorded operation and the output it gave.
#[derive(Debug)]
pub struct Recorded {
    pub output: Tensor,
    pub op: Cheap,
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<Recorded>>> = const { RefCell::new(None) };
}

/// Runs `f` recording the cheap operations it computes: (its result, the
/// operations in the order they ran). Recording does not nest.
pub fn recording<T>(f: impl FnOnce() -> T) -> (T, Vec<Recorded>) {
    let before = RECORDING.with(|slot| slot.replace(Some(Vec::new())));
    debug_assert!(before.is_none(), "recording does not nest");
    let result = f();
    let recorded = RECORDING
        .with(|slot| slot.replace(before))
        .unwrap_or_default();
    (result, recorded)
}

/// Computes `op` and, while recording, records it with its output.
pub(crate) fn cheap(op: Cheap) -> Tensor {
    let output = op.run();
    RECORDING.with(|slot| {
        if let Some(recorded) = slot.borrow_mut().as_mut() {
            recorded.push(Recorded {
                output: output.shallow_clone(),
                op,
            });
        }
    });
    output
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::{cheap, recording, Cheap};

    #[test]
    fn records_only_inside_and_runs_again_to_the_same_bits() {
        let input = Tensor::randn([3, 8], (Kind::Float, tch::Device::Cpu));
        let gelu = || {
            cheap(Cheap::Gelu {
                input: input.shallow_clone(),
            })
        };
        let outside = gelu();
        let (inside, recorded) = recording(gelu);
        assert_eq!(recorded.len(), 1);
        assert!(recorded[0].output.equal(&inside));
        assert!(recorded[0].op.run().equal(&outside));
        let (_, none) = recording(|| ());
        assert!(none.is_empty());
        // Outside a recording nothing is kept.
        let (_, after) = recording(|| ());
        assert!(after.is_empty());
    }

    /// The fused gated residual against `branch · tanh(gate) + skip` as
    /// separate kernels: the same values and gradients (fp32: 1e-6), and
    /// the same kind and close values with a bf16 branch, as under
    /// autocast.
    #[test]
    fn the_fused_gated_residual_is_the_unfused_one() {
        tch::manual_seed(5);
        let options = (Kind::Float, tch::Device::Cpu);
        let leaf = |shape: &[i64]| Tensor::randn(shape, options).set_requires_grad(true);
        let (branch, gate, skip) = (leaf(&[2, 7, 16]), leaf(&[1]), leaf(&[2, 7, 16]));
        let upstream = Tensor::randn([2, 7, 16], options);
        let grads = |output: &Tensor| {
            Tensor::run_backward(
                &[output * &upstream],
                &[&branch, &gate, &skip],
                false,
                false,
            )
        };
        let fused = super::gated_residual(&branch, &gate, &skip);
        let unfused = &branch * gate.tanh() + &skip;
        assert!(fused.allclose(&unfused, 1e-6, 1e-6, false));
        for (a, b) in grads(&fused.sum(Kind::Float))
            .iter()
            .zip(grads(&unfused.sum(Kind::Float)).iter())
        {
            assert!(a.allclose(b, 1e-6, 1e-6, false), "{a} vs {b}");
        }
        let half = branch.detach().to_kind(Kind::BFloat16);
        let fused = super::gated_residual(&half, &gate, &skip);
        let unfused = &half * gate.tanh() + &skip;
        assert_eq!(fused.kind(), unfused.kind());
        assert!(fused.allclose(&unfused, 1e-6, 1e-6, false));
    }
}
