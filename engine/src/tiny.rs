//! Tiny random Flamingo models in the released formats (an open_clip
//! config + CLIP state dict, a Hugging Face MPT dir, a model spec), for
//! tests, benchmarks and the demo: no hub needed.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TinyConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub vision_width: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub lm_width: i64,
    pub lm_heads: i64,
    pub lm_layers: i64,
    pub cross_attn_every_n_layers: i64,
    pub seed: i64,
    /// Multiplies every random weight's standard deviation (1.0 suits the
    /// tiny widths; wide models want about 0.1 to keep activations finite).
    pub init_scale: f64,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            patch_size: 8,
            vision_width: 32,
            vision_layers: 2,
            vision_heads: 4,
            lm_width: 32,
            lm_heads: 4,
            lm_layers: 2,
            cross_attn_every_n_layers: 1,
            seed: 0,
            init_scale: 1.0,
        }
    }
}

fn normal(shape: &[i64], scale: f64) -> Tensor {
    Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * scale
}

/// Writes `dir/clip.json`, `dir/clip.safetensors`, `dir/lm/` (config,
/// weights and the tokenizer files of `tokenizer_dir`) and `dir/model.toml`;
/// returns the spec's path. The vocabulary is the tokenizer's (without
/// OpenFlamingo's added tokens, which the loader adds).
pub fn write_tiny_model(
    dir: &Path,
    tokenizer_dir: &Path,
    vocab_size: i64,
    config: TinyConfig,
) -> std::io::Result<PathBuf> {
    tch::manual_seed(config.seed);
    std::fs::create_dir_all(dir.join("lm"))?;
    // The vision tower's draws come first, then the language model's.
    write_vision(dir, &config)?;
    write_language(dir, tokenizer_dir, vocab_size, &config)?;
    let spec = dir.join("model.toml");
    std::fs::write(
        &spec,
        format!(
            "[vision]\narch = \"clip.json\"\nweights = \"clip.safetensors\"\n[language]\npath = \"lm\"\n[flamingo]\ncross_attn_every_n_layers = {}\n",
            config.cross_attn_every_n_layers
        ),
    )?;
    Ok(spec)
}

fn to_io(error: tch::TchError) -> std::io::Error {
    std::io::Error::other(error.to_string())
}

/// The vision tower, open_clip layout: `clip.safetensors` and `clip.json`.
fn write_vision(dir: &Path, config: &TinyConfig) -> std::io::Result<()> {
    let normal = |shape: &[i64], scale: f64| normal(shape, scale * config.init_scale);
    let w = config.vision_width;
    let grid = config.image_size / config.patch_size;
    let mut vision: Vec<(String, Tensor)> = vec![
        (
            "visual.conv1.weight".into(),
            normal(&[w, 3, config.patch_size, config.patch_size], 0.05),
        ),
        ("visual.class_embedding".into(), normal(&[w], 0.05)),
        (
            "visual.positional_embedding".into(),
            normal(&[grid * grid + 1, w], 0.05),
        ),
        (
            "visual.ln_pre.weight".into(),
            Tensor::ones([w], tch::kind::FLOAT_CPU),
        ),
        (
            "visual.ln_pre.bias".into(),
            Tensor::zeros([w], tch::kind::FLOAT_CPU),
        ),
        (
            "visual.ln_post.weight".into(),
            Tensor::ones([w], tch::kind::FLOAT_CPU),
        ),
        (
            "visual.ln_post.bias".into(),
            Tensor::zeros([w], tch::kind::FLOAT_CPU),
        ),
        ("visual.proj".into(), normal(&[w, 16], 0.05)),
    ];
    for layer in 0..config.vision_layers {
        let p = format!("visual.transformer.resblocks.{layer}");
        for (name, tensor) in [
            ("ln_1.weight", Tensor::ones([w], tch::kind::FLOAT_CPU)),
            ("ln_1.bias", Tensor::zeros([w], tch::kind::FLOAT_CPU)),
            ("attn.in_proj_weight", normal(&[3 * w, w], 0.1)),
            (
                "attn.in_proj_bias",
                Tensor::zeros([3 * w], tch::kind::FLOAT_CPU),
            ),
            ("attn.out_proj.weight", normal(&[w, w], 0.1)),
            (
                "attn.out_proj.bias",
                Tensor::zeros([w], tch::kind::FLOAT_CPU),
            ),
            ("ln_2.weight", Tensor::ones([w], tch::kind::FLOAT_CPU)),
            ("ln_2.bias", Tensor::zeros([w], tch::kind::FLOAT_CPU)),
            ("mlp.c_fc.weight", normal(&[4 * w, w], 0.1)),
            (
                "mlp.c_fc.bias",
                Tensor::zeros([4 * w], tch::kind::FLOAT_CPU),
            ),
            ("mlp.c_proj.weight", normal(&[w, 4 * w], 0.1)),
            ("mlp.c_proj.bias", Tensor::zeros([w], tch::kind::FLOAT_CPU)),
        ] {
            vision.push((format!("{p}.{name}"), tensor));
        }
    }
    Tensor::write_safetensors(&vision, dir.join("clip.safetensors")).map_err(to_io)?;
    std::fs::write(
        dir.join("clip.json"),
        format!(
            r#"{{"embed_dim": 16, "quick_gelu": true, "vision_cfg": {{"image_size": {}, "layers": {}, "width": {w}, "patch_size": {}, "head_width": {}}}}}"#,
            config.image_size,
            config.vision_layers,
            config.patch_size,
            w / config.vision_heads
        ),
    )
}

/// The MPT language model, Hugging Face names: `lm/` with its config,
/// weights and the tokenizer files of `tokenizer_dir`.
fn write_language(
    dir: &Path,
    tokenizer_dir: &Path,
    vocab_size: i64,
    config: &TinyConfig,
) -> std::io::Result<()> {
    let normal = |shape: &[i64], scale: f64| normal(shape, scale * config.init_scale);
    let d = config.lm_width;
    let mut lm: Vec<(String, Tensor)> = vec![
        (
            "transformer.wte.weight".into(),
            normal(&[vocab_size, d], 0.5),
        ),
        (
            "transformer.norm_f.weight".into(),
            Tensor::ones([d], tch::kind::FLOAT_CPU),
        ),
    ];
    for layer in 0..config.lm_layers {
        let p = format!("transformer.blocks.{layer}");
        for (name, tensor) in [
            ("norm_1.weight", Tensor::ones([d], tch::kind::FLOAT_CPU)),
            ("attn.Wqkv.weight", normal(&[3 * d, d], 0.2)),
            ("attn.out_proj.weight", normal(&[d, d], 0.2)),
            ("norm_2.weight", Tensor::ones([d], tch::kind::FLOAT_CPU)),
            ("ffn.up_proj.weight", normal(&[4 * d, d], 0.2)),
            ("ffn.down_proj.weight", normal(&[d, 4 * d], 0.2)),
        ] {
            lm.push((format!("{p}.{name}"), tensor));
        }
    }
    Tensor::write_safetensors(&lm, dir.join("lm/model.safetensors")).map_err(to_io)?;
    std::fs::write(
        dir.join("lm/config.json"),
        format!(
            r#"{{"model_type": "mpt", "d_model": {d}, "n_heads": {}, "n_layers": {}, "vocab_size": {vocab_size}, "max_seq_len": 512, "no_bias": true, "attn_config": {{"alibi": true, "alibi_bias_max": 8}}}}"#,
            config.lm_heads, config.lm_layers
        ),
    )?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let source = tokenizer_dir.join(file);
        if source.exists() {
            std::fs::copy(&source, dir.join("lm").join(file))?;
        }
    }
    Ok(())
}
