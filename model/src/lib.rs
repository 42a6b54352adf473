//! OpenFlamingo's model on libtorch (`tch`), with OpenFlamingo's weight names
//! so that released checkpoints load unchanged.
//!
//! So far, each checked against its upstream Python implementation on tiny
//! random weights: the CLIP vision transformer (open_clip), the Perceiver
//! resampler and gated cross-attention block (OpenFlamingo `helpers.py`),
//! and the MPT, GPT-NeoX and LLaMA decoders (Hugging Face transformers).
//! [`Flamingo`] joins them and matches OpenFlamingo's own model.
//! Around them: greedy decoding and beam search with a KV cache and left
//! padding ([`beam`]), and loading from a model spec (safetensors, torch
//! pickles, sharded indexes, open_clip and Hugging Face layouts,
//! OpenFlamingo checkpoints, presets; [`load`], [`spec`]). Image decoding
//! and the tokenizer are libtorch-free and live in `flamingo-preprocess`;
//! [`preprocess::clip_preprocess`] turns its pixels into the model's input.

pub mod beam;
pub mod convert;
pub mod cross_attention;
pub mod decoder;
pub mod decoder_config;
pub mod device;
pub mod flamingo;
pub mod layers;
pub mod load;
pub mod loss;
pub mod perceiver;
pub mod preprocess;
pub mod rank;
pub mod recompute;
pub mod safetensors;
pub mod spec;
pub mod torch_pickle;
pub mod vision;
pub mod weights;

pub use beam::BeamSettings;
pub use cross_attention::{GatedCrossAttentionBlock, MaskedCrossAttention, MediaMask};
pub use decoder::{AttentionContext, Decoder, DecoderLayer};
pub use decoder_config::{Activation, DecoderConfig, DecoderFamily};
pub use flamingo::{Flamingo, TextInputs, Unit};
pub use load::{load_flamingo, load_flamingo_with, LoadOptions};
pub use loss::causal_lm_loss;
pub use perceiver::{PerceiverConfig, PerceiverResampler};
pub use spec::ModelSpec;
pub use vision::{VisionConfig, VisionOutput, VisionTransformer};
pub use weights::Weights;

/// Errors from building a model out of weights.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing weight {key}")]
    MissingKey { key: String },
    #[error("missing weights ({} in all): {keys:?}", keys.len())]
    MissingKeys { keys: Vec<String> },
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
    /// An input that does not fit the model; `input` names the argument.
    #[error("invalid input: {message}")]
    Input {
        input: &'static str,
        message: String,
    },
    /// A model spec file that cannot be used.
    #[error("model spec {}: {message}", path.display())]
    Spec {
        path: std::path::PathBuf,
        message: String,
    },
    /// A field of a language model's `config.json` (`message` names it).
    #[error("model config: config.json: {message}")]
    DecoderConfig { field: String, message: String },
    /// A setting of the model itself (not of an input).
    #[error("{field}: {message}")]
    Setting {
        field: &'static str,
        message: String,
    },
    /// A device that cannot run the model.
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    /// A torch pickle that cannot be read.
    #[error("pickle: {message}")]
    Pickle { message: String },
    /// Something a released model could need that is not implemented here.
    #[error("unsupported: {feature}")]
    Unsupported { feature: String },
    #[error(transparent)]
    Preprocess(#[from] flamingo_preprocess::PreprocessError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
