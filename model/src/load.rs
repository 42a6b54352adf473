//! Builds a [`Flamingo`] from a [`ModelSpec`]: the user's CLIP weights, the
//! Hugging Face LM directory and, optionally, an OpenFlamingo checkpoint.
//!
//! Checkpoint names are normalised first: a training checkpoint's
//! `model_state_dict.` and DDP's `module.` prefixes come off;
//! `lang_encoder.<layers>.{i}.gated_cross_attn_layer.*` (FlamingoLayer's
//! view) maps to `lang_encoder.gated_cross_attn_layers.{i}.*`;
//! `…decoder_layer.*` and any other `lang_encoder.*` key overrides the LM's
//! own weight of that name (e.g. the trained embedding rows);
//! `old_decoder_blocks` duplicates are dropped. Leftovers are an error that
//! lists them, as are missing keys.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::decoder::Decoder;
use crate::decoder_config::{DecoderConfig, DecoderFamily};
use crate::flamingo::Flamingo;
use crate::perceiver::PerceiverConfig;
use crate::spec::ModelSpec;
use crate::vision::VisionTransformer;
use crate::{ModelError, Result, Weights};
use flamingo_preprocess::FlamingoTokenizer;

/// The LM's weight file in a Hugging Face dir, in the order HF prefers.
fn lm_weights_file(dir: &Path) -> Result<PathBuf> {
    [
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ]
    .iter()
    .map(|name| dir.join(name))
    .find(|path| path.exists())
    .ok_or_else(|| ModelError::Io {
        path: dir.display().to_string(),
        message:
            "no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in the LM dir"
                .into(),
    })
}

fn layers_attr(family: DecoderFamily) -> &'static str {
    match family {
        DecoderFamily::Mpt => "transformer.blocks",
        DecoderFamily::GptNeox => "gpt_neox.layers",
        DecoderFamily::Llama => "model.layers",
    }
}

/// Sorts a checkpoint's keys into the LM's weights (overrides) and the
/// Flamingo weights; returns the keys it could not place.
fn apply_checkpoint(
    checkpoint: Weights,
    family: DecoderFamily,
    lm: &mut Weights,
    flamingo: &mut Weights,
) -> Vec<String> {
    let checkpoint = if checkpoint
        .keys()
        .any(|key| key.starts_with("model_state_dict."))
    {
        checkpoint.strip_prefix("model_state_dict.")
    } else {
        checkpoint
    };
    let checkpoint = checkpoint.rename_prefix("module.", "");
    let layers = format!("lang_encoder.{}.", layers_attr(family));
    let mut unplaced = Vec::new();
    for (key, tensor) in checkpoint.into_values() {
        if key.starts_with("perceiver.")
            || key.starts_with("lang_encoder.gated_cross_attn_layers.")
            || key.starts_with("vision_encoder.")
        {
            flamingo.insert_value(&key, tensor);
        } else if key.starts_with("lang_encoder.old_decoder_blocks.") {
            // Duplicates of the decoder layers.
        } else if let Some(rest) = key.strip_prefix(&layers) {
            // "{i}.gated_cross_attn_layer.X" or "{i}.decoder_layer.X"
            let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
            if let Some(block) = tail.strip_prefix("gated_cross_attn_layer.") {
                let name = format!("lang_encoder.gated_cross_attn_layers.{index}.{block}");
                if !flamingo.contains(&name) {
                    flamingo.insert_value(&name, tensor);
                }
            } else if let Some(inner) = tail.strip_prefix("decoder_layer.") {
                lm.insert_value(&format!("{}.{index}.{inner}", layers_attr(family)), tensor);
            } else {
                unplaced.push(key);
            }
        } else if let Some(lm_key) = key.strip_prefix("lang_encoder.") {
            lm.insert_value(lm_key, tensor);
        } else {
            unplaced.push(key);
        }
    }
    unplaced
}

/// Resizes an embedding (or untied head) matrix to `rows`, as
/// `resize_token_embeddings(len(tokenizer))` does: extra rows of a padded
/// vocabulary go, new rows take the mean of the existing ones (upstream draws
/// them at random; they only matter without a checkpoint carrying them).
fn resize_rows(weights: &mut Weights, key: &str, rows: i64) -> Result<()> {
    let Some(matrix) = weights.remove_read(key)? else {
        return Ok(());
    };
    let current = matrix.size()[0];
    let resized = if current < rows {
        let mean = matrix.mean_dim(0, true, matrix.kind());
        Tensor::cat(&[matrix, mean.expand([rows - current, -1], false)], 0)
    } else {
        matrix.narrow(0, 0, rows)
    };
    weights.insert(key, resized);
    Ok(())
}

/// PyTorch's default initialisation for freshly created OpenFlamingo parts:
/// Linear weights U(±1/√fan_in), LayerNorms at 1/0, latents N(0, 1), gates 0.
fn fresh_weights(vis_dim: i64, lang_dim: i64, layers: i64, every: i64) -> Weights {
    let mut weights = Weights::default();
    let perceiver = PerceiverConfig::open_flamingo(vis_dim);
    let linear = |fan_out: i64, fan_in: i64| {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Tensor::rand([fan_out, fan_in], (Kind::Float, tch::Device::Cpu)) * (2.0 * bound) - bound
    };
    let norm = |weights: &mut Weights, prefix: &str, dim: i64| {
        weights.insert(
            &format!("{prefix}.weight"),
            Tensor::ones([dim], tch::kind::FLOAT_CPU),
        );
        weights.insert(
            &format!("{prefix}.bias"),
            Tensor::zeros([dim], tch::kind::FLOAT_CPU),
        );
    };
    let inner = perceiver.dim_head * perceiver.heads;
    weights.insert(
        "perceiver.latents",
        Tensor::randn([perceiver.num_latents, vis_dim], tch::kind::FLOAT_CPU),
    );
    for index in 0..perceiver.depth {
        let prefix = format!("perceiver.layers.{index}");
        norm(&mut weights, &format!("{prefix}.0.norm_media"), vis_dim);
        norm(&mut weights, &format!("{prefix}.0.norm_latents"), vis_dim);
        weights.insert(&format!("{prefix}.0.to_q.weight"), linear(inner, vis_dim));
        weights.insert(
            &format!("{prefix}.0.to_kv.weight"),
            linear(2 * inner, vis_dim),
        );
        weights.insert(&format!("{prefix}.0.to_out.weight"), linear(vis_dim, inner));
        norm(&mut weights, &format!("{prefix}.1.0"), vis_dim);
        weights.insert(
            &format!("{prefix}.1.1.weight"),
            linear(4 * vis_dim, vis_dim),
        );
        weights.insert(
            &format!("{prefix}.1.3.weight"),
            linear(vis_dim, 4 * vis_dim),
        );
    }
    norm(&mut weights, "perceiver.norm", vis_dim);
    for index in (0..layers).filter(|index| (index + 1) % every == 0) {
        let prefix = format!("lang_encoder.gated_cross_attn_layers.{index}");
        norm(&mut weights, &format!("{prefix}.attn.norm"), lang_dim);
        weights.insert(&format!("{prefix}.attn.to_q.weight"), linear(512, lang_dim));
        weights.insert(
            &format!("{prefix}.attn.to_kv.weight"),
            linear(1024, vis_dim),
        );
        weights.insert(
            &format!("{prefix}.attn.to_out.weight"),
            linear(lang_dim, 512),
        );
        weights.insert(
            &format!("{prefix}.attn_gate"),
            Tensor::zeros([1], tch::kind::FLOAT_CPU),
        );
        norm(&mut weights, &format!("{prefix}.ff.0"), lang_dim);
        weights.insert(
            &format!("{prefix}.ff.1.weight"),
            linear(4 * lang_dim, lang_dim),
        );
        weights.insert(
            &format!("{prefix}.ff.3.weight"),
            linear(lang_dim, 4 * lang_dim),
        );
        weights.insert(
            &format!("{prefix}.ff_gate"),
            Tensor::zeros([1], tch::kind::FLOAT_CPU),
        );
    }
    weights
}

/// Loads the model and its tokenizer as the spec describes.
/// Where the model runs and in what precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    pub device: tch::Device,
    /// Floating-point kind of every weight: `Float` (fp32, the default, as
    /// `from_pretrained` loads), `BFloat16` or `Half`.
    pub kind: Kind,
    /// Seed of torch's generator for the parts that start fresh (no
    /// checkpoint), so every process and every run starts alike
    /// (OpenFlamingo's default `--seed` is 42).
    pub init_seed: i64,
    /// Leave `.safetensors` weights unread: the model's tensors are
    /// shape-only stand-ins and [`Flamingo::unread`] says where each one's
    /// values lie, for a rank under `full` sharding to read only its part
    /// (see `flamingo_engine::units`). Pickles are read whole.
    pub lazy: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: tch::Device::Cpu,
            kind: Kind::Float,
            init_seed: 42,
            lazy: false,
        }
    }
}

/// [`load_flamingo_with`] in fp32 on the CPU.
pub fn load_flamingo(spec: &ModelSpec) -> Result<(Flamingo, FlamingoTokenizer)> {
    load_flamingo_with(spec, LoadOptions::default())
}

/// Loads the model a spec names onto `options.device` in `options.kind`.
pub fn load_flamingo_with(
    spec: &ModelSpec,
    options: LoadOptions,
) -> Result<(Flamingo, FlamingoTokenizer)> {
    if !matches!(options.kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(ModelError::Unsupported {
            feature: format!(
                "weight kind {:?} (use float32, bfloat16 or float16)",
                options.kind
            ),
        });
    }
    // Vision: a full open_clip CLIP state dict (visual.*), an OpenFlamingo
    // one (vision_encoder.*), or the bare tower.
    let read = |path: &Path| {
        if options.lazy {
            Weights::read_lazy(path)
        } else {
            Weights::read(path)
        }
    };
    let vision_raw = read(&spec.vision_weights)?;
    let vision_raw = if vision_raw.keys().any(|key| key.starts_with("visual.")) {
        vision_raw.strip_prefix("visual.")
    } else if vision_raw
        .keys()
        .any(|key| key.starts_with("vision_encoder."))
    {
        vision_raw.strip_prefix("vision_encoder.")
    } else {
        vision_raw
    };
    let mut flamingo_weights = vision_raw.rename_prefix("", "vision_encoder.");

    let config_path = spec.language_dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|error| ModelError::Io {
        path: config_path.display().to_string(),
        message: error.to_string(),
    })?;
    let mut config = DecoderConfig::from_hf_json(&config_text)?;
    let tokenizer = FlamingoTokenizer::from_dir(&spec.language_dir)?;
    let mut lm_weights = read(&lm_weights_file(&spec.language_dir)?)?;

    match &spec.checkpoint {
        Some(path) => {
            let unplaced = apply_checkpoint(
                read(path)?,
                config.family,
                &mut lm_weights,
                &mut flamingo_weights,
            );
            if !unplaced.is_empty() {
                return Err(ModelError::Io {
                    path: path.display().to_string(),
                    message: format!("keys that belong to no part of the model: {unplaced:?}"),
                });
            }
        }
        None => {
            tch::manual_seed(options.init_seed);
            let fresh = fresh_weights(
                spec.vision.width,
                config.hidden_size,
                config.layers,
                spec.cross_attn_every_n_layers,
            );
            for (key, tensor) in fresh.into_entries()? {
                flamingo_weights.insert(&key, tensor);
            }
        }
    }

    // OpenFlamingo's added tokens need embedding rows (resize_token_embeddings).
    let rows = tokenizer.len() as i64;
    let (embed_key, head_key) = match config.family {
        DecoderFamily::Mpt => ("transformer.wte.weight", "lm_head.weight"),
        DecoderFamily::GptNeox => ("gpt_neox.embed_in.weight", "embed_out.weight"),
        DecoderFamily::Llama => ("model.embed_tokens.weight", "lm_head.weight"),
    };
    // (Read whole when they need new rows: their mean fills them.)
    let resize = |weights: &mut Weights, key: &str| -> Result<()> {
        if weights.contains(key) && weights.shape_of(key).map(|shape| shape[0]) != Some(rows) {
            resize_rows(weights, key, rows)?;
        }
        Ok(())
    };
    resize(&mut lm_weights, embed_key)?;
    resize(&mut lm_weights, head_key)?;
    config.vocab_size = rows;

    // One kind whatever the files store (released LMs are often bf16/fp16):
    // fp32 by default, as from_pretrained loads them.
    let mut lm_weights = lm_weights
        .convert_floats(options.kind)
        .to_device(options.device);
    let mut flamingo_weights = flamingo_weights
        .convert_floats(options.kind)
        .to_device(options.device);
    // Walk the whole model before failing, so every missing key is listed.
    lm_weights.collect_missing();
    lm_weights.record_taken();
    let decoder = Decoder::load(&mut lm_weights, config)?;
    lm_weights.expect_complete()?;
    lm_weights.expect_consumed("")?;
    flamingo_weights.collect_missing();
    flamingo_weights.record_taken();
    let vision =
        VisionTransformer::load(&mut flamingo_weights, "vision_encoder", spec.vision.clone())?;
    let mut model = Flamingo::load(
        &mut flamingo_weights,
        vision,
        decoder,
        spec.cross_attn_every_n_layers,
        i64::from(tokenizer.media_token_id()),
    )?;
    flamingo_weights.expect_complete()?;
    flamingo_weights.expect_consumed("")?;
    let mut parameters = flamingo_weights.recorded();
    parameters.extend(
        lm_weights
            .recorded()
            .into_iter()
            .map(|(name, tensor)| (format!("lang_encoder.{name}"), tensor)),
    );
    model.set_parameters(parameters);
    let mut unread = flamingo_weights.lazily_taken();
    unread.extend(
        lm_weights
            .lazily_taken()
            .into_iter()
            .map(|(name, lazy)| (format!("lang_encoder.{name}"), lazy)),
    );
    model.set_unread(unread);
    Ok((model, tokenizer))
}
