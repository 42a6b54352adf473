//! OpenFlamingo's model on libtorch (`tch`), with OpenFlamingo's weight names
//! so that released checkpoints load unchanged.
//!
//! So far: the Perceiver resampler and the gated cross-attention block
//! (reference §1.2–1.3, `open_flamingo/src/helpers.py`), built from named
//! weights and checked against the Python implementation in
//! `tests/parity_helpers.rs`. The vision encoder, the decoder families,
//! the tokenizer and generation are still to come.

pub mod cross_attention;
pub mod layers;
pub mod perceiver;
pub mod vision;
pub mod weights;

pub use cross_attention::{GatedCrossAttentionBlock, MaskedCrossAttention, MediaMask};
pub use perceiver::{PerceiverConfig, PerceiverResampler};
pub use vision::{VisionConfig, VisionOutput, VisionTransformer};
pub use weights::Weights;

/// Errors from building a model out of weights.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing weight {key}")]
    MissingKey { key: String },
    #[error("weight {key} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("unexpected weights (not used by the model): {keys:?}")]
    UnexpectedKeys { keys: Vec<String> },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("invalid input: {0}")]
    Input(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
