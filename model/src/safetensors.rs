//! Reading safetensors by byte range: the header says where each tensor's
//! bytes lie, and each wanted tensor is read straight into its own
//! storage with positioned reads. Nothing else of the file is read, and no
//! whole-file buffer is held (peak memory: the tensors kept), unlike
//! reading the file and then copying each tensor out of it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::{ModelError, Result};

/// The most header bytes accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a file: where its bytes lie, from the start of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub start: u64,
    pub end: u64,
}

fn io_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn kind(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// Every tensor a file holds, in the order of their bytes, each checked
/// against the file's size and its own shape and dtype.
pub fn entries(path: &Path) -> Result<Vec<Entry>> {
    let file = File::open(path).map_err(|error| io_error(path, error.to_string()))?;
    let size = file
        .metadata()
        .map_err(|error| io_error(path, error.to_string()))?
        .len();
    let mut length = [0u8; 8];
    file.read_exact_at(&mut length, 0)
        .map_err(|_| io_error(path, "shorter than a safetensors header"))?;
    let header_bytes = u64::from_le_bytes(length);
    if header_bytes > MAX_HEADER_BYTES || 8 + header_bytes > size {
        return Err(io_error(
            path,
            format!("header of {header_bytes} bytes in a {size}-byte file: not a safetensors file, or truncated"),
        ));
    }
    let mut header = vec![0u8; header_bytes as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|error| io_error(path, error.to_string()))?;
    let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|error| io_error(path, format!("header is not JSON: {error}")))?;
    let data_start = 8 + header_bytes;
    let mut entries = Vec::with_capacity(parsed.len());
    for (name, info) in parsed {
        if name == "__metadata__" {
            continue;
        }
        let bad = |message: String| io_error(path, format!("tensor {name}: {message}"));
        let dtype = info["dtype"].as_str().unwrap_or_default();
        let kind = kind(dtype).ok_or_else(|| bad(format!("dtype {dtype:?} is not supported")))?;
        let shape: Vec<i64> = info["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape".into()))?
            .iter()
            .map(|dim| dim.as_i64().filter(|dim| *dim >= 0))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a dimension is not a count".into()))?;
        let offsets = info["data_offsets"]
            .as_array()
            .and_then(|pair| Some((pair.first()?.as_u64()?, pair.get(1)?.as_u64()?)))
            .ok_or_else(|| bad("no data_offsets pair".into()))?;
        let elements = shape
            .iter()
            .try_fold(1u64, |product, dim| product.checked_mul(*dim as u64));
        let expected =
            elements.and_then(|count| count.checked_mul(kind.elt_size_in_bytes() as u64));
        let (start, end) = (data_start + offsets.0, data_start + offsets.1);
        if offsets.1 < offsets.0 || Some(offsets.1 - offsets.0) != expected || end > size {
            return Err(bad(format!(
                "bytes {}..{} do not hold a {dtype} {shape:?} inside the {size}-byte file",
                offsets.0, offsets.1
            )));
        }
        entries.push(Entry {
            name,
            kind,
            shape,
            start,
            end,
        });
    }
    entries.sort_by_key(|entry| entry.start);
    Ok(entries)
}

/// Reads `entry` of `file` (opened from `path`) into a new CPU tensor.
pub fn read_entry(file: &File, path: &Path, entry: &Entry) -> Result<Tensor> {
    let tensor = Tensor::empty(entry.shape.as_slice(), (entry.kind, tch::Device::Cpu));
    let bytes = (entry.end - entry.start) as usize;
    if bytes > 0 {
        // SAFETY: `tensor` is a fresh contiguous CPU tensor of exactly
        // `bytes` bytes (checked in `entries`), alive for the whole read.
        let target =
            unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), bytes) };
        file.read_exact_at(target, entry.start)
            .map_err(|error| io_error(path, format!("tensor {}: {error}", entry.name)))?;
    }
    Ok(tensor)
}

/// The tensors of `path` whose names `keep` accepts, read by range.
pub fn read(path: &Path, mut keep: impl FnMut(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let entries = entries(path)?;
    let file = File::open(path).map_err(|error| io_error(path, error.to_string()))?;
    entries
        .iter()
        .filter(|entry| keep(&entry.name))
        .map(|entry| Ok((entry.name.clone(), read_entry(&file, path, entry)?)))
        .collect()
}

/// A tensor of a file not read yet: read whole, or a range of its
/// elements (row-major), when wanted, as `kind` on `device`. What a rank
/// under `full` sharding keeps of a weight is such a range.
#[derive(Debug, Clone, PartialEq)]
pub struct LazyTensor {
    pub path: std::sync::Arc<std::path::PathBuf>,
    pub entry: Entry,
    /// The kind and device it is read into.
    pub kind: Kind,
    pub device: tch::Device,
}

impl LazyTensor {
    pub fn numel(&self) -> i64 {
        self.entry.shape.iter().product()
    }

    /// The whole tensor, shaped.
    pub fn read(&self) -> Result<Tensor> {
        Ok(self
            .read_range(0, self.numel())?
            .view(self.entry.shape.as_slice()))
    }

    /// Elements `[start, end)` of the flattened tensor, as a 1-D tensor:
    /// only their bytes are read.
    pub fn read_range(&self, start: i64, end: i64) -> Result<Tensor> {
        let path = self.path.as_path();
        if start < 0 || end < start || end > self.numel() {
            return Err(io_error(
                path,
                format!(
                    "tensor {}: elements {start}..{end} of {}",
                    self.entry.name,
                    self.numel()
                ),
            ));
        }
        let size = self.entry.kind.elt_size_in_bytes() as u64;
        let range = Entry {
            shape: vec![end - start],
            start: self.entry.start + start as u64 * size,
            end: self.entry.start + end as u64 * size,
            ..self.entry.clone()
        };
        let file = File::open(path).map_err(|error| io_error(path, error.to_string()))?;
        let tensor = read_entry(&file, path, &range)?;
        let tensor = if tensor.kind() != self.kind {
            tensor.to_kind(self.kind)
        } else {
            tensor
        };
        Ok(tensor.to_device(self.device))
    }
}

/// Every tensor of `path`, unread.
pub fn lazy(path: &Path) -> Result<Vec<(String, LazyTensor)>> {
    let shared = std::sync::Arc::new(path.to_path_buf());
    Ok(entries(path)?
        .into_iter()
        .map(|entry| {
            (
                entry.name.clone(),
                LazyTensor {
                    path: shared.clone(),
                    kind: entry.kind,
                    device: tch::Device::Cpu,
                    entry,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(dir: &Path) -> (std::path::PathBuf, Vec<(String, Tensor)>) {
        tch::manual_seed(3);
        let tensors = vec![
            (
                "a.weight".to_string(),
                Tensor::randn([3, 5], tch::kind::FLOAT_CPU),
            ),
            (
                "b.bf16".to_string(),
                Tensor::randn([4], tch::kind::FLOAT_CPU).to_kind(Kind::BFloat16),
            ),
            (
                "c.ids".to_string(),
                Tensor::arange(7, (Kind::Int64, tch::Device::Cpu)),
            ),
            (
                "d.empty".to_string(),
                Tensor::zeros([0, 2], tch::kind::FLOAT_CPU),
            ),
        ];
        let path = dir.join("w.safetensors");
        // Written by tch (the safetensors crate): an independent writer.
        Tensor::write_safetensors(&tensors, &path).expect("written");
        (path, tensors)
    }

    #[test]
    fn range_reads_equal_the_whole_file_reader() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, tensors) = written(dir.path());
        let mut read = read(&path, |_| true).expect("read");
        read.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(read.len(), tensors.len());
        for ((name, got), (expected_name, expected)) in read.iter().zip(&tensors) {
            assert_eq!(name, expected_name);
            assert_eq!(got.kind(), expected.kind(), "{name}");
            assert_eq!(got.size(), expected.size(), "{name}");
            assert!(got.equal(expected), "{name}");
        }
        let only = super::read(&path, |name| name == "c.ids").expect("read");
        assert_eq!(only.len(), 1);
        assert!(only[0].1.equal(&tensors[2].1));
    }

    #[test]
    fn ranges_read_only_their_elements_converted() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, tensors) = written(dir.path());
        let lazy: std::collections::BTreeMap<String, LazyTensor> =
            lazy(&path).expect("header").into_iter().collect();
        let weight = &lazy["a.weight"];
        let flat = tensors[0].1.reshape([-1]);
        for (start, end) in [(0, 15), (4, 11), (14, 15), (7, 7)] {
            let got = weight.read_range(start, end).expect("range");
            assert!(
                got.equal(&flat.narrow(0, start, end - start)),
                "{start}..{end}"
            );
        }
        assert!(weight.read().expect("whole").equal(&tensors[0].1));
        assert!(weight.read_range(3, 16).is_err());
        let mut bf16 = lazy["b.bf16"].clone();
        bf16.kind = Kind::Float;
        let got = bf16.read_range(1, 3).expect("range");
        assert_eq!(got.kind(), Kind::Float);
        assert!(got.equal(&tensors[1].1.to_kind(Kind::Float).narrow(0, 1, 2)));
    }

    #[test]
    fn damaged_files_name_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, _) = written(dir.path());
        let bytes = std::fs::read(&path).expect("read");
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 8]).expect("written");
        let error = entries(&cut).expect_err("truncated").to_string();
        assert!(
            error.contains("cut.safetensors") && error.contains("tensor "),
            "{error}"
        );
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, u64::MAX.to_le_bytes()).expect("written");
        let error = entries(&garbage).expect_err("garbage").to_string();
        assert!(error.contains("not a safetensors file"), "{error}");
    }
}
