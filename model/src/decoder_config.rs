//! Decoder configuration read from a Hugging Face `config.json`, for the three
//! families OpenFlamingo's released models use (reference §1.4): MPT
//! (`model_type = "mpt"`, and the older `"mosaic_gpt"` that
//! `mosaicml/mpt-1b-redpajama-200b` ships with), GPT-NeoX (`"gpt_neox"`,
//! RedPajama-INCITE) and LLaMA (`"llama"`). Anything the port does not
//! implement is refused by name rather than silently ignored.

use serde_json::Value;

use crate::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFamily {
    Mpt,
    GptNeox,
    Llama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// Tanh approximation (`"gelu_new"`, `"gelu_fast"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ModelError::Unsupported {
                feature: format!("hidden_act '{other}'"),
            }),
        }
    }

    pub fn apply(self, input: &tch::Tensor) -> tch::Tensor {
        match self {
            Self::Gelu => input.gelu("none"),
            Self::GeluTanh => input.gelu("tanh"),
            Self::Relu => input.relu(),
            Self::Silu => input.silu(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: DecoderFamily,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub intermediate_size: i64,
    pub norm_eps: f64,
    pub activation: Activation,
    /// Rotary dimensions per head (GPT-NeoX: `rotary_pct` of it; LLaMA: all).
    pub rotary_dims: i64,
    pub rope_theta: f64,
    /// GPT-NeoX: `x + attn(ln1(x)) + mlp(ln2(x))` instead of sequential.
    pub parallel_residual: bool,
    /// Linear biases (GPT-NeoX attention and MLP; LLaMA's optional ones).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// MPT: ALiBi slopes' maximum and the table length.
    pub alibi_bias_max: f64,
    pub max_seq_len: i64,
    /// MPT: clamp q, k, v to ±clip_qkv.
    pub clip_qkv: Option<f64>,
    pub softmax_scale: f64,
    pub tie_word_embeddings: bool,
    /// MPT written by MosaicML's older MosaicGPT code: its weight names
    /// (`ln_1`, `mlp.mlp_up`, `ln_f`, …) and its ALiBi slopes, which are not
    /// padded to a power of two of heads.
    pub mosaic_gpt: bool,
}

fn config_error(field: &str, message: impl Into<String>) -> ModelError {
    ModelError::DecoderConfig {
        field: field.to_string(),
        message: message.into(),
    }
}

fn field<'a>(config: &'a Value, name: &str) -> Result<&'a Value> {
    config
        .get(name)
        .ok_or_else(|| config_error(name, format!("missing field {name}")))
}

fn integer(config: &Value, name: &str) -> Result<i64> {
    field(config, name)?
        .as_i64()
        .ok_or_else(|| config_error(name, format!("{name} must be an integer")))
}

/// An optional field: `default` when absent or null, else it must read as `T`.
fn optional<T>(
    config: &Value,
    name: &str,
    default: T,
    read: fn(&Value) -> Option<T>,
    what: &str,
) -> Result<T> {
    match config.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => {
            read(value).ok_or_else(|| config_error(name, format!("{name} must be {what}")))
        }
    }
}

fn integer_or(config: &Value, name: &str, default: i64) -> Result<i64> {
    optional(config, name, default, Value::as_i64, "an integer")
}

fn float_or(config: &Value, name: &str, default: f64) -> Result<f64> {
    optional(config, name, default, Value::as_f64, "a number")
}

fn bool_or(config: &Value, name: &str, default: bool) -> Result<bool> {
    optional(config, name, default, Value::as_bool, "true or false")
}

/// A number that may be absent or null (MPT's `clip_qkv`).
fn optional_float(config: &Value, name: &str) -> Option<f64> {
    config.get(name).and_then(Value::as_f64)
}

/// What differs between HF MPT's and MosaicGPT's configs.
struct MptVariant {
    mlp_ratio: i64,
    norm_eps: f64,
    alibi_bias_max: f64,
    clip_qkv: Option<f64>,
    softmax_scale: f64,
    mosaic_gpt: bool,
}

impl DecoderConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let config: Value = serde_json::from_str(text)
            .map_err(|error| config_error("(file)", format!("not JSON: {error}")))?;
        let model_type = field(&config, "model_type")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        match model_type.as_str() {
            "mpt" => Self::mpt(&config),
            "mosaic_gpt" => Self::mosaic_gpt(&config),
            "gpt_neox" => Self::gpt_neox(&config),
            "llama" => Self::llama(&config),
            other => Err(ModelError::Unsupported {
                feature: format!(
                    "model_type '{other}' (supported: mpt, mosaic_gpt, gpt_neox, llama)"
                ),
            }),
        }
    }

    fn mpt(config: &Value) -> Result<Self> {
        let hidden_size = integer(config, "d_model")?;
        let heads = integer(config, "n_heads")?;
        let empty = Value::Object(Default::default());
        let attn = config.get("attn_config").unwrap_or(&empty);
        if bool_or(attn, "qk_ln", false)? {
            return Err(ModelError::Unsupported {
                feature: "MPT attn_config.qk_ln".into(),
            });
        }
        if !bool_or(attn, "alibi", true)? {
            return Err(ModelError::Unsupported {
                feature: "MPT without ALiBi".into(),
            });
        }
        if !bool_or(config, "no_bias", true)? {
            return Err(ModelError::Unsupported {
                feature: "MPT with biases (no_bias = false)".into(),
            });
        }
        let head_dim = hidden_size / heads;
        Self::alibi_mpt(
            config,
            MptVariant {
                // Hugging Face's MptMLP hard-codes 4 × d_model.
                mlp_ratio: 4,
                norm_eps: float_or(config, "layer_norm_epsilon", 1e-5)?,
                alibi_bias_max: float_or(attn, "alibi_bias_max", 8.0)?,
                clip_qkv: optional_float(attn, "clip_qkv"),
                softmax_scale: float_or(attn, "softmax_scale", (head_dim as f64).powf(-0.5))?,
                mosaic_gpt: false,
            },
        )
    }

    /// The MPT architecture (ALiBi, no biases, tied embeddings) with the
    /// fields its two config formats spell differently.
    fn alibi_mpt(config: &Value, variant: MptVariant) -> Result<Self> {
        let hidden_size = integer(config, "d_model")?;
        let heads = integer(config, "n_heads")?;
        Ok(Self {
            family: DecoderFamily::Mpt,
            vocab_size: integer(config, "vocab_size")?,
            hidden_size,
            layers: integer(config, "n_layers")?,
            heads,
            kv_heads: heads,
            head_dim: hidden_size / heads,
            intermediate_size: variant.mlp_ratio * hidden_size,
            norm_eps: variant.norm_eps,
            activation: Activation::Gelu,
            rotary_dims: 0,
            rope_theta: 0.0,
            parallel_residual: false,
            attention_bias: false,
            mlp_bias: false,
            alibi_bias_max: variant.alibi_bias_max,
            max_seq_len: integer(config, "max_seq_len")?,
            clip_qkv: variant.clip_qkv,
            softmax_scale: variant.softmax_scale,
            tie_word_embeddings: true,
            mosaic_gpt: variant.mosaic_gpt,
        })
    }

    /// MosaicGPT's flat config (`mpt-1b-redpajama-200b`): the MPT
    /// architecture with `mlp_ratio`, `attn_clip_qkv`, `attn_qk_ln` and
    /// `alibi` at the top level.
    fn mosaic_gpt(config: &Value) -> Result<Self> {
        let hidden_size = integer(config, "d_model")?;
        let heads = integer(config, "n_heads")?;
        if bool_or(config, "attn_qk_ln", false)? {
            return Err(ModelError::Unsupported {
                feature: "MosaicGPT attn_qk_ln".into(),
            });
        }
        if !bool_or(config, "alibi", false)? {
            return Err(ModelError::Unsupported {
                feature: "MosaicGPT without ALiBi (learned positions)".into(),
            });
        }
        if !bool_or(config, "no_bias", false)? {
            return Err(ModelError::Unsupported {
                feature: "MosaicGPT with biases (no_bias = false)".into(),
            });
        }
        if !matches!(config.get("logit_scale"), None | Some(Value::Null)) {
            return Err(ModelError::Unsupported {
                feature: "MosaicGPT logit_scale".into(),
            });
        }
        if bool_or(config, "prefix_lm", false)? {
            return Err(ModelError::Unsupported {
                feature: "MosaicGPT prefix_lm".into(),
            });
        }
        let head_dim = hidden_size / heads;
        Self::alibi_mpt(
            config,
            MptVariant {
                mlp_ratio: integer_or(config, "mlp_ratio", 4)?,
                // torch.nn.LayerNorm's default; MosaicGPT does not configure it.
                norm_eps: 1e-5,
                alibi_bias_max: float_or(config, "alibi_bias_max", 8.0)?,
                clip_qkv: optional_float(config, "attn_clip_qkv"),
                softmax_scale: float_or(config, "softmax_scale", (head_dim as f64).powf(-0.5))?,
                mosaic_gpt: true,
            },
        )
    }

    fn gpt_neox(config: &Value) -> Result<Self> {
        let hidden_size = integer(config, "hidden_size")?;
        let heads = integer(config, "num_attention_heads")?;
        let head_dim = hidden_size / heads;
        if config
            .get("rope_scaling")
            .is_some_and(|value| !value.is_null())
        {
            return Err(ModelError::Unsupported {
                feature: "GPT-NeoX rope_scaling".into(),
            });
        }
        let rotary_pct = float_or(
            config,
            "rotary_pct",
            float_or(config, "partial_rotary_factor", 0.25)?,
        )?;
        let rope_theta = float_or(
            config,
            "rotary_emb_base",
            float_or(config, "rope_theta", 10000.0)?,
        )?;
        Ok(Self {
            family: DecoderFamily::GptNeox,
            vocab_size: integer(config, "vocab_size")?,
            hidden_size,
            layers: integer(config, "num_hidden_layers")?,
            heads,
            kv_heads: heads,
            head_dim,
            intermediate_size: integer(config, "intermediate_size")?,
            norm_eps: float_or(config, "layer_norm_eps", 1e-5)?,
            activation: Activation::parse(
                config
                    .get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("gelu"),
            )?,
            rotary_dims: (head_dim as f64 * rotary_pct) as i64,
            rope_theta,
            parallel_residual: bool_or(config, "use_parallel_residual", true)?,
            attention_bias: bool_or(config, "attention_bias", true)?,
            mlp_bias: true,
            alibi_bias_max: 0.0,
            max_seq_len: 0,
            clip_qkv: None,
            softmax_scale: (head_dim as f64).powf(-0.5),
            tie_word_embeddings: bool_or(config, "tie_word_embeddings", false)?,
            mosaic_gpt: false,
        })
    }

    fn llama(config: &Value) -> Result<Self> {
        let hidden_size = integer(config, "hidden_size")?;
        let heads = integer(config, "num_attention_heads")?;
        let head_dim = match config.get("head_dim") {
            Some(Value::Number(number)) => number.as_i64().unwrap_or(hidden_size / heads),
            _ => hidden_size / heads,
        };
        if config
            .get("rope_scaling")
            .is_some_and(|value| !value.is_null())
        {
            return Err(ModelError::Unsupported {
                feature: "LLaMA rope_scaling".into(),
            });
        }
        let kv_heads = match config.get("num_key_value_heads") {
            Some(Value::Number(number)) => number.as_i64().unwrap_or(heads),
            _ => heads,
        };
        Ok(Self {
            family: DecoderFamily::Llama,
            vocab_size: integer(config, "vocab_size")?,
            hidden_size,
            layers: integer(config, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            intermediate_size: integer(config, "intermediate_size")?,
            norm_eps: float_or(config, "rms_norm_eps", 1e-6)?,
            activation: Activation::parse(
                config
                    .get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("silu"),
            )?,
            rotary_dims: head_dim,
            rope_theta: float_or(config, "rope_theta", 10000.0)?,
            parallel_residual: false,
            attention_bias: bool_or(config, "attention_bias", false)?,
            mlp_bias: bool_or(config, "mlp_bias", false)?,
            alibi_bias_max: 0.0,
            max_seq_len: 0,
            clip_qkv: None,
            softmax_scale: (head_dim as f64).powf(-0.5),
            tie_word_embeddings: bool_or(config, "tie_word_embeddings", false)?,
            mosaic_gpt: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unsupported_configs_are_named() {
        let error = DecoderConfig::from_hf_json(r#"{"model_type": "opt"}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unsupported: model_type 'opt' (supported: mpt, mosaic_gpt, gpt_neox, llama)"
        );
        let error = DecoderConfig::from_hf_json(r#"{"model_type": "llama", "hidden_size": 8}"#)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "model config: config.json: missing field num_attention_heads"
        );
        let error = DecoderConfig::from_hf_json(
            r#"{"model_type": "mpt", "d_model": 8, "n_heads": 2, "attn_config": {"qk_ln": true}}"#,
        )
        .unwrap_err();
        assert_eq!(error.to_string(), "unsupported: MPT attn_config.qk_ln");
    }

    #[test]
    fn mosaic_gpt_configs_read_the_flat_fields() {
        let base = r#""model_type": "mosaic_gpt", "d_model": 8, "n_heads": 2, "n_layers": 3,
            "max_seq_len": 16, "vocab_size": 10, "mlp_ratio": 2, "no_bias": true"#;
        let config = DecoderConfig::from_hf_json(&format!(
            r#"{{{base}, "alibi": true, "attn_clip_qkv": 6}}"#
        ))
        .unwrap();
        assert!(config.mosaic_gpt);
        assert_eq!(config.family, DecoderFamily::Mpt);
        assert_eq!(config.intermediate_size, 16);
        assert_eq!(config.clip_qkv, Some(6.0));
        assert_eq!(config.layers, 3);
        let error = DecoderConfig::from_hf_json(&format!("{{{base}}}")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unsupported: MosaicGPT without ALiBi (learned positions)"
        );
        let error = DecoderConfig::from_hf_json(&format!(
            r#"{{{base}, "alibi": true, "logit_scale": "inv_sqrt_d_model"}}"#
        ))
        .unwrap_err();
        assert_eq!(error.to_string(), "unsupported: MosaicGPT logit_scale");
    }
}
