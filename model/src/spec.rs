//! Model spec files: where a user's weights are, as a small TOML file.
//!
//! ```toml
//! [vision]
//! arch = "ViT-L-14"          # built-in preset, or a path to an open_clip model-config JSON
//! weights = "clip/open_clip_pytorch_model.bin"
//! [language]
//! path = "lm"                # Hugging Face model dir: config.json, weights, tokenizer.json
//! [flamingo]
//! preset = "OpenFlamingo-3B-vitl-mpt1b"   # optional: sets arch and the interval
//! cross_attn_every_n_layers = 1
//! checkpoint = "checkpoint.pt"   # optional; without it perceiver and cross-attention start fresh
//! ```
//!
//! Relative paths resolve against the spec file's folder. Unknown fields are
//! errors that name the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::vision::VisionConfig;
use crate::{ModelError, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    vision: RawVision,
    language: RawLanguage,
    #[serde(default)]
    flamingo: RawFlamingo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVision {
    arch: Option<String>,
    weights: PathBuf,
    /// Use tokens after `ln_post` (open_clip ≥ 2.23) instead of before.
    #[serde(default)]
    tokens_after_ln_post: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLanguage {
    path: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlamingo {
    preset: Option<String>,
    cross_attn_every_n_layers: Option<i64>,
    checkpoint: Option<PathBuf>,
}

/// A released OpenFlamingo model's fixed settings (reference §1.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub vision_arch: &'static str,
    pub cross_attn_every_n_layers: i64,
}

pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "OpenFlamingo-3B-vitl-mpt1b",
        vision_arch: "ViT-L-14",
        cross_attn_every_n_layers: 1,
    },
    Preset {
        name: "OpenFlamingo-3B-vitl-mpt1b-langinstruct",
        vision_arch: "ViT-L-14",
        cross_attn_every_n_layers: 1,
    },
    Preset {
        name: "OpenFlamingo-4B-vitl-rpj3b",
        vision_arch: "ViT-L-14",
        cross_attn_every_n_layers: 2,
    },
    Preset {
        name: "OpenFlamingo-4B-vitl-rpj3b-langinstruct",
        vision_arch: "ViT-L-14",
        cross_attn_every_n_layers: 2,
    },
    Preset {
        name: "OpenFlamingo-9B-vitl-mpt7b",
        vision_arch: "ViT-L-14",
        cross_attn_every_n_layers: 4,
    },
];

pub fn preset(name: &str) -> Option<Preset> {
    let short = name.strip_prefix("openflamingo/").unwrap_or(name);
    PRESETS.iter().copied().find(|preset| preset.name == short)
}

/// A resolved, validated spec.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub vision: VisionConfig,
    pub vision_weights: PathBuf,
    pub language_dir: PathBuf,
    pub cross_attn_every_n_layers: i64,
    pub checkpoint: Option<PathBuf>,
}

fn spec_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Spec {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// An open_clip model-config JSON (`embed_dim`, `quick_gelu`, `vision_cfg`).
pub fn vision_config_from_open_clip_json(path: &Path) -> Result<VisionConfig> {
    let text = std::fs::read_to_string(path).map_err(|error| ModelError::Io {
        path: path.display().to_string(),
        message: error.to_string(),
    })?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| spec_error(path, format!("not JSON: {error}")))?;
    let vision = config
        .get("vision_cfg")
        .ok_or_else(|| spec_error(path, "no vision_cfg (is this an open_clip model config?)"))?;
    let integer = |name: &str| {
        vision
            .get(name)
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| spec_error(path, format!("vision_cfg.{name} missing or not an integer")))
    };
    for unsupported in ["ls_init_value", "attentional_pool", "timm_model_name"] {
        if vision
            .get(unsupported)
            .is_some_and(|value| !value.is_null() && value != false)
        {
            return Err(ModelError::Unsupported {
                feature: format!("open_clip vision_cfg.{unsupported}"),
            });
        }
    }
    let width = integer("width")?;
    let head_width = vision
        .get("head_width")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(64);
    Ok(VisionConfig {
        image_size: integer("image_size")?,
        patch_size: integer("patch_size")?,
        width,
        layers: integer("layers")?,
        heads: width / head_width,
        mlp_ratio: vision
            .get("mlp_ratio")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(4.0),
        output_dim: config
            .get("embed_dim")
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| spec_error(path, "embed_dim missing"))?,
        quick_gelu: config
            .get("quick_gelu")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        tokens_after_ln_post: false,
    })
}

impl ModelSpec {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| ModelError::Io {
            path: path.display().to_string(),
            message: format!("{error} (the model spec file)"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses spec text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: RawSpec =
            toml::from_str(text).map_err(|error| spec_error(path, error.message().to_string()))?;
        let folder = path.parent().unwrap_or_else(|| Path::new("."));
        let resolve = |relative: &Path| -> PathBuf {
            if relative.is_absolute() {
                relative.to_path_buf()
            } else {
                folder.join(relative)
            }
        };
        let preset = match &raw.flamingo.preset {
            Some(name) => Some(preset(name).ok_or_else(|| {
                spec_error(
                    path,
                    format!(
                        "flamingo.preset '{name}' is not a released model (known: {})",
                        PRESETS
                            .iter()
                            .map(|preset| preset.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?),
            None => None,
        };
        let arch = raw
            .vision
            .arch
            .clone()
            .or_else(|| preset.map(|preset| preset.vision_arch.to_string()))
            .ok_or_else(|| spec_error(path, "vision.arch is missing (e.g. \"ViT-L-14\")"))?;
        let mut vision = match arch.as_str() {
            "ViT-L-14" => VisionConfig::vit_l_14(),
            other if other.ends_with(".json") => vision_config_from_open_clip_json(&resolve(Path::new(other)))?,
            other => {
                return Err(spec_error(
                    path,
                    format!("vision.arch '{other}' is neither a preset (ViT-L-14) nor an open_clip config .json"),
                ))
            }
        };
        vision.tokens_after_ln_post = raw.vision.tokens_after_ln_post;
        let every = raw
            .flamingo
            .cross_attn_every_n_layers
            .or_else(|| preset.map(|preset| preset.cross_attn_every_n_layers))
            .unwrap_or(1);
        if every < 1 {
            return Err(spec_error(
                path,
                "flamingo.cross_attn_every_n_layers must be at least 1",
            ));
        }
        if let (Some(preset), Some(given)) = (preset, raw.flamingo.cross_attn_every_n_layers) {
            if given != preset.cross_attn_every_n_layers {
                return Err(spec_error(
                    path,
                    format!(
                        "flamingo.cross_attn_every_n_layers = {given} contradicts preset {} ({})",
                        preset.name, preset.cross_attn_every_n_layers
                    ),
                ));
            }
        }
        let spec = Self {
            vision,
            vision_weights: resolve(&raw.vision.weights),
            language_dir: resolve(&raw.language.path),
            cross_attn_every_n_layers: every,
            checkpoint: raw.flamingo.checkpoint.as_deref().map(resolve),
        };
        for (field, file) in [
            ("vision.weights", Some(&spec.vision_weights)),
            ("language.path", Some(&spec.language_dir)),
            ("flamingo.checkpoint", spec.checkpoint.as_ref()),
        ] {
            if let Some(file) = file {
                if !file.exists() {
                    return Err(spec_error(
                        path,
                        format!("{field}: {} does not exist", file.display()),
                    ));
                }
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn presets_and_relative_paths_resolve() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lm")).unwrap();
        write(dir.path(), "clip.bin", "");
        write(dir.path(), "checkpoint.pt", "");
        let spec_path = write(
            dir.path(),
            "model.toml",
            "[vision]\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n[flamingo]\npreset = \"openflamingo/OpenFlamingo-4B-vitl-rpj3b\"\ncheckpoint = \"checkpoint.pt\"\n",
        );
        let spec = ModelSpec::from_file(&spec_path).unwrap();
        assert_eq!(spec.vision, VisionConfig::vit_l_14());
        assert_eq!(spec.cross_attn_every_n_layers, 2);
        assert_eq!(spec.language_dir, dir.path().join("lm"));
        assert_eq!(spec.checkpoint, Some(dir.path().join("checkpoint.pt")));
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lm")).unwrap();
        write(dir.path(), "clip.bin", "");
        let check = |text: &str, expected: &str| {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, text).unwrap();
            let message = ModelSpec::from_file(&path).unwrap_err().to_string();
            assert!(
                message.contains(expected),
                "{message}\nexpected to contain: {expected}"
            );
        };
        check(
            "[vision]\narch = \"ViT-L-14\"\nweights = \"missing.bin\"\n[language]\npath = \"lm\"\n",
            "vision.weights: ",
        );
        check(
            "[vision]\narch = \"ViT-L-14\"\nweights = \"clip.bin\"\nwieghts = 1\n[language]\npath = \"lm\"\n",
            "unknown field `wieghts`",
        );
        check(
            "[vision]\narch = \"ViT-B-99\"\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n",
            "vision.arch 'ViT-B-99' is neither a preset",
        );
        check(
            "[vision]\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n[flamingo]\npreset = \"OpenFlamingo-1B\"\n",
            "flamingo.preset 'OpenFlamingo-1B' is not a released model",
        );
        check(
            "[vision]\nweights = \"clip.bin\"\n[language]\npath = \"lm\"\n[flamingo]\npreset = \"OpenFlamingo-9B-vitl-mpt7b\"\ncross_attn_every_n_layers = 1\n",
            "contradicts preset OpenFlamingo-9B-vitl-mpt7b (4)",
        );
        let missing = ModelSpec::from_file(&dir.path().join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("nope.toml") && missing.contains("the model spec file"),
            "{missing}"
        );
    }
}
