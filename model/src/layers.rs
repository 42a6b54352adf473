//! The small building blocks the Flamingo modules share: LayerNorm, a
//! bias-free Linear and the pre-norm GELU feed-forward
//! (`LayerNorm → Linear(d, 4d) → GELU → Linear(4d, d)`, no biases).

use tch::Tensor;

use crate::{Result, Weights};

/// torch.nn.LayerNorm's default epsilon, which OpenFlamingo keeps.
pub const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    /// `<prefix>.weight` and `<prefix>.bias`, torch's default epsilon.
    pub fn load(weights: &mut Weights, prefix: &str, dim: i64) -> Result<Self> {
        Self::load_with(weights, prefix, dim, LAYER_NORM_EPS, true)
    }

    /// A LayerNorm with a given epsilon, with or without bias (MPT has none).
    pub fn load_with(
        weights: &mut Weights,
        prefix: &str,
        dim: i64,
        eps: f64,
        with_bias: bool,
    ) -> Result<Self> {
        let bias = if with_bias {
            Some(weights.take(&format!("{prefix}.bias"), &[dim])?)
        } else {
            None
        };
        Ok(Self {
            weight: weights.take(&format!("{prefix}.weight"), &[dim])?,
            bias,
            dim,
            eps,
        })
    }

    pub fn forward(&self, input: &Tensor) -> Tensor {
        input.layer_norm(
            [self.dim],
            Some(&self.weight),
            self.bias.as_ref(),
            self.eps,
            false,
        )
    }

    /// [`Self::forward`] for an output that only enters matrix products
    /// (a pre-norm's): see [`layer_norm_to_matmul`].
    pub fn forward_to_matmul(&self, input: &Tensor) -> Tensor {
        layer_norm_to_matmul(input, &self.weight, self.bias.as_ref(), self.dim, self.eps)
    }

    /// [`Self::forward_to_matmul`] (the trainable norms', so plain),
    /// recorded for selective recompute ([`crate::recompute`]).
    pub fn forward_recorded(&self, input: &Tensor) -> Tensor {
        crate::recompute::cheap(crate::recompute::Cheap::LayerNorm {
            input: input.shallow_clone(),
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            dim: self.dim,
            eps: self.eps,
        })
    }
}

/// A LayerNorm whose output only enters matrix products. Under CUDA
/// autocast, which runs LayerNorm in fp32, a bf16 input would be cast to
/// fp32, normalised into an fp32 output, and that output cast back to bf16
/// by the product after it. Here a bf16 input on the GPU is normalised by
/// the LayerNorm kernel itself in bf16 (statistics and affine in fp32,
/// rounded once on output; the weights may stay fp32) with autocast off
/// for the call: the product gets the same bf16 values with two passes
/// over the activation fewer. Only frozen norms take this path: the input's
/// gradient is the upcast path's, but the CPU's mixed-precision kernel
/// sums the weight's and bias's gradients less exactly (about 1e-2
/// relative), and the CUDA kernel's have not been measured against the
/// upcast yet. Elsewhere (a trainable norm, fp32 input, the CPU, whose
/// autocast leaves LayerNorm alone) it is the plain LayerNorm.
pub fn layer_norm_to_matmul(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    dim: i64,
    eps: f64,
) -> Tensor {
    let norm = || input.layer_norm([dim], Some(weight), bias, eps, false);
    let frozen = !weight.requires_grad() && bias.is_none_or(|bias| !bias.requires_grad());
    if frozen && input.kind() == tch::Kind::BFloat16 && input.device().is_cuda() {
        tch::autocast(false, norm)
    } else {
        norm()
    }
}

/// LLaMA's RMSNorm: `w · x / sqrt(mean(x²) + eps)`, computed in fp32.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(weights: &mut Weights, prefix: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weights.take(&format!("{prefix}.weight"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, input: &Tensor) -> Tensor {
        let kind = input.kind();
        let wide = input.to_kind(tch::Kind::Float);
        let variance = wide
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, tch::Kind::Float);
        let normalised = wide * (variance + self.eps).rsqrt();
        &self.weight * normalised.to_kind(kind)
    }
}

/// `y = x Wᵀ (+ b)`, with `W` of shape (out, in) as torch stores it.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A bias-free Linear whose weight is `key`.
    pub fn load(weights: &mut Weights, key: &str, input_dim: i64, output_dim: i64) -> Result<Self> {
        Ok(Self {
            weight: weights.take(key, &[output_dim, input_dim])?,
            bias: None,
        })
    }

    /// A Linear with `<prefix>.weight` and `<prefix>.bias`.
    pub fn load_with_bias(
        weights: &mut Weights,
        prefix: &str,
        input_dim: i64,
        output_dim: i64,
    ) -> Result<Self> {
        Ok(Self {
            weight: weights.take(&format!("{prefix}.weight"), &[output_dim, input_dim])?,
            bias: Some(weights.take(&format!("{prefix}.bias"), &[output_dim])?),
        })
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward(&self, input: &Tensor) -> Tensor {
        input.linear(&self.weight, self.bias.as_ref())
    }
}

/// OpenFlamingo's `FeedForward(dim, mult)`: an `nn.Sequential` whose
/// weights are named `<prefix>.0` (LayerNorm), `.1` and `.3` (Linears).
#[derive(Debug)]
pub struct FeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl FeedForward {
    pub fn load(weights: &mut Weights, prefix: &str, dim: i64, mult: i64) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            norm: LayerNorm::load(weights, &format!("{prefix}.0"), dim)?,
            up: Linear::load(weights, &format!("{prefix}.1.weight"), dim, inner)?,
            down: Linear::load(weights, &format!("{prefix}.3.weight"), inner, dim)?,
        })
    }

    /// The norm and the GELU are recorded for selective recompute
    /// ([`crate::recompute`]).
    pub fn forward(&self, input: &Tensor) -> Tensor {
        // nn.GELU() default: the exact erf form, not the tanh approximation.
        let activated = crate::recompute::cheap(crate::recompute::Cheap::Gelu {
            input: self.up.forward(&self.norm.forward_recorded(input)),
        });
        self.down.forward(&activated)
    }
}

/// Splits the last dimension `(heads · head_dim)` into heads and moves them
/// in front of the sequence: `[.., n, h·d] → [.., h, n, d]` for 3-D inputs
/// `[b, n, h·d]`, and `[b, t, n, h·d] → [b, h, t, n, d]` for 4-D ones.
pub fn split_heads(input: &Tensor, heads: i64) -> Tensor {
    let mut shape = input.size();
    let last = shape
        .pop()
        .expect("attention inputs have a feature dimension");
    shape.push(heads);
    shape.push(last / heads);
    let split = input.reshape(shape.as_slice());
    match split.dim() {
        4 => split.permute([0, 2, 1, 3]),
        5 => split.permute([0, 3, 1, 2, 4]),
        rank => panic!("split_heads expects 3-D or 4-D inputs, got {}-D", rank - 1),
    }
}

/// Inverse of [`split_heads`].
pub fn merge_heads(input: &Tensor) -> Tensor {
    let merged = match input.dim() {
        4 => input.permute([0, 2, 1, 3]),
        5 => input.permute([0, 2, 3, 1, 4]),
        rank => panic!("merge_heads expects 4-D or 5-D inputs, got {rank}-D"),
    };
    let mut shape = merged.size();
    let head_dim = shape.pop().expect("head dim");
    let heads = shape.pop().expect("heads");
    shape.push(heads * head_dim);
    merged.reshape(shape.as_slice())
}

/// Softmax over the last dimension after subtracting the row maximum, as
/// OpenFlamingo does explicitly (it changes nothing mathematically but keeps
/// the same rounding).
pub fn stable_softmax(scores: &Tensor) -> Tensor {
    let shifted = scores - scores.amax([-1], true);
    shifted.softmax(-1, scores.kind())
}

/// `torch.finfo(kind).min`: what Hugging Face and OpenFlamingo fill masked
/// attention scores with, in the scores' own precision.
pub(crate) fn lowest(kind: tch::Kind) -> f64 {
    match kind {
        tch::Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        tch::Kind::Half => -65504.0,
        tch::Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    /// `(a - b)` over `b`'s scale, and the share of equal values.
    fn compare(got: &Tensor, expected: &Tensor) -> (f64, f64) {
        let (got, expected) = (got.to_kind(Kind::Float), expected.to_kind(Kind::Float));
        let scale = expected.abs().max().double_value(&[]).max(1e-30);
        let difference = (&got - &expected).abs().max().double_value(&[]) / scale;
        let equal = got
            .eq_tensor(&expected)
            .to_kind(Kind::Float)
            .mean(Kind::Float);
        (difference, equal.double_value(&[]))
    }

    #[test]
    fn a_bf16_layer_norm_is_the_upcast_one_rounded_once() {
        // What `layer_norm_to_matmul` runs on the GPU for a frozen norm (the
        // kernel on a bf16 input, fp32 weights), against autocast's upcast
        // (the input in fp32, the output rounded to bf16 by the product
        // after it), here on the CPU's kernels: the product sees the same
        // values and the input gets the same gradient.
        tch::manual_seed(7);
        let input = (Tensor::randn([4, 7, 64], (Kind::Float, tch::Device::Cpu)) * 3.0 + 1.0)
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true);
        let weight = Tensor::randn([64], (Kind::Float, tch::Device::Cpu));
        let bias = Tensor::randn([64], (Kind::Float, tch::Device::Cpu));
        let grad =
            Tensor::randn([4, 7, 64], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16);
        let direct = input.layer_norm([64], Some(&weight), Some(&bias), 1e-5, false);
        assert_eq!(direct.kind(), Kind::BFloat16);
        let upcast_input = input.detach().to_kind(Kind::Float).set_requires_grad(true);
        let upcast = upcast_input
            .layer_norm([64], Some(&weight), Some(&bias), 1e-5, false)
            .to_kind(Kind::BFloat16);
        let (difference, equal) = compare(&direct, &upcast);
        assert!(
            difference <= 1.0 / 128.0 && equal >= 0.99,
            "output: {difference}, {equal}"
        );
        for output in [&direct, &upcast] {
            (output.to_kind(Kind::Float) * grad.to_kind(Kind::Float))
                .sum(Kind::Float)
                .backward();
        }
        let upcast_grad = upcast_input.grad().to_kind(Kind::BFloat16);
        let (difference, equal) = compare(&input.grad(), &upcast_grad);
        assert!(
            difference <= 1.0 / 128.0 && equal >= 0.99,
            "input gradient: {difference}, {equal}"
        );
    }
}
