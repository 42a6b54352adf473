//! Named weights as released checkpoints store them. Modules take what they
//! need by name with a shape check; whatever is left over is reported, so a
//! wrong or partial checkpoint is a clear error, not a silent misload.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use crate::{ModelError, Result};

/// A weight: read, or where to read it from (see [`Weights::read_lazy`]).
#[derive(Debug)]
pub enum Value {
    Loaded(Tensor),
    Lazy(crate::safetensors::LazyTensor),
}

impl Value {
    fn shape(&self) -> Vec<i64> {
        match self {
            Value::Loaded(tensor) => tensor.size(),
            Value::Lazy(lazy) => lazy.entry.shape.clone(),
        }
    }

    /// The tensor, read if it was not.
    pub fn load(self) -> Result<Tensor> {
        match self {
            Value::Loaded(tensor) => Ok(tensor),
            Value::Lazy(lazy) => lazy.read(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Value>,
    /// In collecting mode, keys that were asked for but absent; `take`
    /// then hands out zeros so the whole model can be walked and every
    /// missing key reported at once.
    missing: Option<Vec<String>>,
    /// In recording mode, every weight handed out, by name (handles that
    /// share storage and autograd state with what the modules keep).
    taken: Option<Vec<(String, Tensor)>>,
    /// Weights handed out unread, by name: the modules hold shape-only
    /// stand-ins until their values are read (see [`Weights::read_lazy`]).
    lazy_taken: Vec<(String, crate::safetensors::LazyTensor)>,
}

impl Weights {
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self::from_values(
            tensors
                .into_iter()
                .map(|(key, tensor)| (key, Value::Loaded(tensor))),
        )
    }

    fn from_values(values: impl IntoIterator<Item = (String, Value)>) -> Self {
        Self {
            tensors: values.into_iter().collect(),
            missing: None,
            taken: None,
            lazy_taken: Vec::new(),
        }
    }

    /// Like [`Weights::read`], but `.safetensors` tensors (alone or behind a
    /// shard index) are not read: [`Weights::take`] hands out shape-only
    /// stand-ins for them, and [`Weights::lazily_taken`] says where their
    /// values lie, so that a rank reads only the part it keeps. Pickles
    /// cannot be read by range and are read whole.
    pub fn read_lazy(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".safetensors.index.json") {
            let mut weights = Self::default();
            for shard in Self::index_shards(path)? {
                weights.tensors.extend(Self::read_lazy(&shard)?.tensors);
            }
            return Ok(weights);
        }
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            return Ok(Self::from_values(
                crate::safetensors::lazy(path)?
                    .into_iter()
                    .map(|(key, lazy)| (key, Value::Lazy(lazy))),
            ));
        }
        Self::read(path)
    }

    /// The weights handed out unread since [`Weights::record_taken`], by
    /// name, with where their values lie.
    pub fn lazily_taken(&mut self) -> Vec<(String, crate::safetensors::LazyTensor)> {
        std::mem::take(&mut self.lazy_taken)
    }

    /// Reads `key` now if it was left unread.
    pub fn materialize(&mut self, key: &str) -> Result<()> {
        if let Some(Value::Lazy(lazy)) = self.tensors.get(key) {
            let tensor = lazy.read()?;
            self.tensors.insert(key.to_string(), Value::Loaded(tensor));
        }
        Ok(())
    }

    /// Reads a `.safetensors` file, each tensor by its byte range straight
    /// into its storage (see [`crate::safetensors`]).
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        Ok(Self::from_tensors(crate::safetensors::read(path, |_| {
            true
        })?))
    }

    /// All weights, by name, read.
    pub fn into_entries(self) -> Result<Vec<(String, Tensor)>> {
        self.tensors
            .into_iter()
            .map(|(key, value)| Ok((key, value.load()?)))
            .collect()
    }

    /// All weights, by name, as they are (read or not).
    pub fn into_values(self) -> impl Iterator<Item = (String, Value)> {
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
        let floating = |of: tch::Kind| matches!(of, Half | BFloat16 | Double | Float);
        let tensors = self
            .tensors
            .into_iter()
            .map(|(key, value)| {
                let converted = match value {
                    Value::Loaded(tensor) if floating(tensor.kind()) && tensor.kind() != kind => {
                        Value::Loaded(tensor.to_kind(kind))
                    }
                    Value::Lazy(mut lazy) if floating(lazy.kind) => {
                        lazy.kind = kind;
                        Value::Lazy(lazy)
                    }
                    value => value,
                };
                (key, converted)
            })
            .collect();
        Self {
            tensors,
            missing,
            taken: None,
            lazy_taken: Vec::new(),
        }
    }

    /// Moves every weight to `device`.
    pub fn to_device(self, device: tch::Device) -> Self {
        let missing = self.missing;
        let tensors = self
            .tensors
            .into_iter()
            .map(|(key, value)| {
                let moved = match value {
                    Value::Loaded(tensor) => Value::Loaded(tensor.to_device(device)),
                    Value::Lazy(mut lazy) => {
                        lazy.device = device;
                        Value::Lazy(lazy)
                    }
                };
                (key, moved)
            })
            .collect();
        Self {
            tensors,
            missing,
            taken: None,
            lazy_taken: Vec::new(),
        }
    }

    /// Adds or replaces a weight.
    pub fn insert(&mut self, key: &str, tensor: Tensor) {
        self.tensors.insert(key.to_string(), Value::Loaded(tensor));
    }

    /// Adds or replaces a weight, read or not.
    pub fn insert_value(&mut self, key: &str, value: Value) {
        self.tensors.insert(key.to_string(), value);
    }

    /// Drops a read weight and returns it (an unread one stays: see
    /// [`Weights::remove_read`]).
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        match self.tensors.remove(key)? {
            Value::Loaded(tensor) => Some(tensor),
            lazy => {
                self.tensors.insert(key.to_string(), lazy);
                None
            }
        }
    }

    /// Drops a weight and returns it, read now if it was not (e.g. a
    /// matrix to resize); a weight that cannot be read is an error.
    pub fn remove_read(&mut self, key: &str) -> Result<Option<Tensor>> {
        self.tensors.remove(key).map(Value::load).transpose()
    }

    /// Drops a weight without reading it (a buffer the model recomputes).
    pub fn discard(&mut self, key: &str) -> bool {
        self.tensors.remove(key).is_some()
    }

    /// Renames a weight, read or not.
    pub fn rename(&mut self, from: &str, to: &str) {
        if let Some(value) = self.tensors.remove(from) {
            self.tensors.insert(to.to_string(), value);
        }
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

    /// The parsed `weight_map` of a shard index.
    fn weight_map(index: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
        let io_error = |message: String| ModelError::Io {
            path: index.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|error| io_error(error.to_string()))?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| io_error(format!("not JSON: {error}")))?;
        match parsed.get("weight_map") {
            Some(serde_json::Value::Object(map)) => Ok(map.clone()),
            _ => Err(io_error("no weight_map object".into())),
        }
    }

    /// The shard files a shard index names.
    fn index_shards(index: &Path) -> Result<Vec<std::path::PathBuf>> {
        let map = Self::weight_map(index)?;
        let mut shards: Vec<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        let folder = index.parent().unwrap_or_else(|| Path::new("."));
        Ok(shards.into_iter().map(|shard| folder.join(shard)).collect())
    }

    fn read_sharded(index: &Path) -> Result<Self> {
        let io_error = |message: String| ModelError::Io {
            path: index.display().to_string(),
            message,
        };
        let map = Self::weight_map(index)?;
        let mut weights = Self::default();
        for shard in Self::index_shards(index)? {
            let part = Self::read(&shard)?;
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
        Self::from_values(self.tensors.into_iter().filter_map(|(key, value)| {
            key.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), value))
        }))
    }

    /// Renames every key starting with `from` to start with `to`.
    pub fn rename_prefix(self, from: &str, to: &str) -> Self {
        Self::from_values(self.tensors.into_iter().map(
            |(key, value)| match key.strip_prefix(from) {
                Some(rest) => (format!("{to}{rest}"), value),
                None => (key, value),
            },
        ))
    }

    /// The shape of weight `key`, read or not.
    pub fn shape_of(&self, key: &str) -> Option<Vec<i64>> {
        self.tensors.get(key).map(Value::shape)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Removes and returns `key`, checking its shape.
    pub fn take(&mut self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let value = match (self.tensors.remove(key), self.missing.as_mut()) {
            (Some(value), _) => value,
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
        if value.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                actual: value.shape(),
            });
        }
        let tensor = match value {
            Value::Loaded(tensor) => tensor,
            Value::Lazy(lazy) => {
                let stand_in = stand_in(shape, lazy.kind, lazy.device);
                self.lazy_taken.push((key.to_string(), lazy));
                stand_in
            }
        };
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

/// A tensor of `shape` and `kind` that holds one element (every element
/// is that one, by zero strides): what a module keeps of a weight not read
/// yet. Nothing may compute with it before the weight's values are put in
/// place (`set_data`).
pub fn stand_in(shape: &[i64], kind: tch::Kind, device: tch::Device) -> Tensor {
    Tensor::zeros([1], (kind, device)).expand(shape, false)
}

/// Whether `tensor` is a [`stand_in`] (holds fewer elements than it shows).
pub fn is_stand_in(tensor: &Tensor) -> bool {
    tensor.numel() > 1 && tensor.stride().iter().all(|stride| *stride == 0)
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
