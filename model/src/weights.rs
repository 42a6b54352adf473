//! Named weights as released checkpoints store them. Modules take what they
//! need by name with a shape check; whatever is left over is reported, so a
//! wrong or partial checkpoint is a clear error, not a silent misload.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use crate::{ModelError, Result};

#[derive(Debug, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// In collecting mode, keys that were asked for but absent; `take`
    /// then hands out zeros so the whole model can be walked and every
    /// missing key reported at once.
    missing: Option<Vec<String>>,
    /// In recording mode, every weight handed out, by name (handles that
    /// share storage and autograd state with what the modules keep).
    taken: Option<Vec<(String, Tensor)>>,
}

impl Weights {
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
            missing: None,
            taken: None,
        }
    }

    /// Reads a `.safetensors` file, each tensor by its byte range straight
    /// into its storage (see [`crate::safetensors`]).
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        Ok(Self::from_tensors(crate::safetensors::read(path, |_| {
            true
        })?))
    }

    /// All weights, by name.
    pub fn into_entries(self) -> impl Iterator<Item = (String, Tensor)> {
        self.tensors.into_iter()
    }

    /// From now on, record missing keys instead of failing at the first one.
    pub fn collect_missing(&mut self) {
        self.missing.get_or_insert_with(Vec::new);
    }

    /// From now on, remember every weight handed out (see [`Weights::recorded`]).
    pub fn record_taken(&mut self) {
        self.taken.get_or_insert_with(Vec::new);
    }

    /// The weights handed out since [`Weights::record_taken`], by name: the
    /// model's parameters, for training.
    pub fn recorded(&mut self) -> Vec<(String, Tensor)> {
        self.taken.take().unwrap_or_default()
    }

    /// Errors listing every key that was asked for but absent (collecting
    /// mode), then returns to failing at the first one.
    pub fn expect_complete(&mut self) -> Result<()> {
        match self.missing.take() {
            Some(keys) if !keys.is_empty() => Err(ModelError::MissingKeys { keys }),
            _ => Ok(()),
        }
    }

    /// Converts every floating-point weight (half, bfloat16, double) to
    /// `kind`, as Hugging Face's `from_pretrained` loads into float32 by
    /// default; integer and boolean tensors stay as they are.
    pub fn convert_floats(self, kind: tch::Kind) -> Self {
        use tch::Kind::{BFloat16, Double, Float, Half};
        let missing = self.missing;
        let tensors = self
            .tensors
            .into_iter()
            .map(|(key, tensor)| {
                let converted = match tensor.kind() {
                    Half | BFloat16 | Double | Float if tensor.kind() != kind => {
                        tensor.to_kind(kind)
                    }
                    _ => tensor,
                };
                (key, converted)
            })
            .collect();
        Self {
            tensors,
            missing,
            taken: None,
        }
    }

    /// Moves every weight to `device`.
    pub fn to_device(self, device: tch::Device) -> Self {
        let missing = self.missing;
        let tensors = self
            .tensors
            .into_iter()
            .map(|(key, tensor)| (key, tensor.to_device(device)))
            .collect();
        Self {
            tensors,
            missing,
            taken: None,
        }
    }

    /// Adds or replaces a weight.
    pub fn insert(&mut self, key: &str, tensor: Tensor) {
        self.tensors.insert(key.to_string(), tensor);
    }

    /// Drops a weight the model does not use (e.g. a recomputed buffer).
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        self.tensors.remove(key)
    }

    /// Reads a PyTorch `torch.save` file (`.bin`, `.pt`, `.pth`); nested
    /// dicts become dotted names.
    pub fn read_torch(path: &Path) -> Result<Self> {
        let world = std::env::var("WORLD_SIZE")
            .ok()
            .and_then(|world| world.parse().ok())
            .unwrap_or(1);
        let bytes = std::fs::metadata(path).map_or(0, |meta| meta.len());
        if let Some(advice) = crate::convert::pickle_advice(path, bytes, world) {
            tracing::warn!("{advice}");
        }
        Ok(Self::from_tensors(crate::torch_pickle::read_torch_file(
            path,
        )?))
    }

    /// Reads weights in any supported layout: `.safetensors`, a PyTorch
    /// pickle (`.bin`, `.pt`, `.pth`), or a Hugging Face shard index
    /// (`*.index.json`, whose `weight_map` names the shard files).
    pub fn read(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".index.json") {
            return Self::read_sharded(path);
        }
        match path.extension().and_then(|extension| extension.to_str()) {
            Some("safetensors") => Self::read_safetensors(path),
            Some("bin" | "pt" | "pth" | "ckpt") => Self::read_torch(path),
            _ => Err(ModelError::Io {
                path: path.display().to_string(),
                message:
                    "unknown weight format; expected .safetensors, .bin/.pt/.pth or *.index.json"
                        .into(),
            }),
        }
    }

    fn read_sharded(index: &Path) -> Result<Self> {
        let io_error = |message: String| ModelError::Io {
            path: index.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|error| io_error(error.to_string()))?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| io_error(format!("not JSON: {error}")))?;
        let map = parsed
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| io_error("no weight_map object".into()))?;
        let mut shards: Vec<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        let folder = index.parent().unwrap_or_else(|| Path::new("."));
        let mut weights = Self::default();
        for shard in shards {
            let part = Self::read(&folder.join(shard))?;
            weights.tensors.extend(part.tensors);
        }
        let missing: Vec<&String> = map.keys().filter(|key| !weights.contains(key)).collect();
        if !missing.is_empty() {
            return Err(io_error(format!(
                "weight_map lists tensors no shard holds: {missing:?}"
            )));
        }
        Ok(weights)
    }

    /// Keeps only the weights under `prefix`, with the prefix removed
    /// (e.g. `visual.` of an open_clip CLIP state dict).
    pub fn strip_prefix(self, prefix: &str) -> Self {
        Self::from_tensors(self.tensors.into_iter().filter_map(|(key, tensor)| {
            key.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), tensor))
        }))
    }

    /// Renames every key starting with `from` to start with `to`.
    pub fn rename_prefix(self, from: &str, to: &str) -> Self {
        Self::from_tensors(self.tensors.into_iter().map(
            |(key, tensor)| match key.strip_prefix(from) {
                Some(rest) => (format!("{to}{rest}"), tensor),
                None => (key, tensor),
            },
        ))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Removes and returns `key`, checking its shape.
    pub fn take(&mut self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = match (self.tensors.remove(key), self.missing.as_mut()) {
            (Some(tensor), _) => tensor,
            (None, Some(missing)) => {
                missing.push(key.to_string());
                return Ok(Tensor::zeros(shape, tch::kind::FLOAT_CPU));
            }
            (None, None) => {
                return Err(ModelError::MissingKey {
                    key: key.to_string(),
                })
            }
        };
        if tensor.size() != shape {
            return Err(ModelError::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                actual: tensor.size(),
            });
        }
        if let Some(taken) = self.taken.as_mut() {
            taken.push((key.to_string(), tensor.shallow_clone()));
        }
        Ok(tensor)
    }

    /// Like [`Weights::take`], but `None` when the key is absent.
    pub fn take_optional(&mut self, key: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.contains(key) {
            self.take(key, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Keys under `prefix` that nothing took.
    pub fn remaining_under(&self, prefix: &str) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Errors if any key under `prefix` was left unused.
    pub fn expect_consumed(&self, prefix: &str) -> Result<()> {
        let keys = self.remaining_under(prefix);
        if keys.is_empty() {
            Ok(())
        } else {
            Err(ModelError::UnexpectedKeys { keys })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_weights_become_float() {
        let weights = Weights::from_tensors([
            (
                "a".to_string(),
                Tensor::ones([2], (tch::Kind::BFloat16, tch::Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::ones([2], (tch::Kind::Half, tch::Device::Cpu)),
            ),
            (
                "ids".to_string(),
                Tensor::ones([2], (tch::Kind::Int64, tch::Device::Cpu)),
            ),
        ])
        .convert_floats(tch::Kind::Float);
        let mut weights = weights;
        assert_eq!(weights.take("a", &[2]).unwrap().kind(), tch::Kind::Float);
        assert_eq!(weights.take("b", &[2]).unwrap().kind(), tch::Kind::Float);
        assert_eq!(weights.take("ids", &[2]).unwrap().kind(), tch::Kind::Int64);
    }

    #[test]
    fn take_checks_shapes_and_reports_leftovers() {
        let mut weights = Weights::from_tensors([
            (
                "a.weight".to_string(),
                Tensor::zeros([2, 3], tch::kind::FLOAT_CPU),
            ),
            (
                "a.extra".to_string(),
                Tensor::zeros([1], tch::kind::FLOAT_CPU),
            ),
        ]);
        let error = weights.take("a.weight", &[3, 2]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "weight a.weight has shape [2, 3], expected [3, 2]"
        );
        let error = weights.take("a.bias", &[3]).unwrap_err();
        assert_eq!(error.to_string(), "missing weight a.bias");
        assert!(weights.take_optional("a.bias", &[3]).unwrap().is_none());
        assert!(weights.take("a.extra", &[1]).is_ok());
        assert!(weights.expect_consumed("a.").is_ok());
    }
}
