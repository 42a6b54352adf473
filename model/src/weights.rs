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
}

impl Weights {
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
        }
    }

    /// Reads a `.safetensors` file.
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        let tensors = Tensor::read_safetensors(path).map_err(|error| ModelError::Io {
            path: path.display().to_string(),
            message: error.to_string(),
        })?;
        Ok(Self::from_tensors(tensors))
    }

    /// Adds or replaces a weight.
    pub fn insert(&mut self, key: &str, tensor: Tensor) {
        self.tensors.insert(key.to_string(), tensor);
    }

    /// Drops a weight the model does not use (e.g. a recomputed buffer).
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        self.tensors.remove(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Removes and returns `key`, checking its shape.
    pub fn take(&mut self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .remove(key)
            .ok_or_else(|| ModelError::MissingKey {
                key: key.to_string(),
            })?;
        if tensor.size() != shape {
            return Err(ModelError::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                actual: tensor.size(),
            });
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
