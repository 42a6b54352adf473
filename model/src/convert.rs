//! `flamingoctl model convert`: PyTorch pickles (OpenFlamingo's
//! `checkpoint.pt`, a Hugging Face LM's `pytorch_model.bin` or its shards)
//! rewritten once as safetensors, which can be memory-mapped and read by
//! byte range. A pickle cannot: every rank that loads one unpickles all of
//! it, so at 8 ranks per node an MPT-7B `.bin` is read eight times and held
//! in memory eight times over.
//!
//! Tensors keep their names, dtypes (bf16 stays bf16) and shapes; nested
//! dicts of a training checkpoint become dotted names, as flamingo reads
//! them. Files past `max_shard_bytes` are split the way `save_pretrained`
//! splits them (`<stem>-00001-of-00003.safetensors` and a
//! `<stem>.safetensors.index.json` with the `weight_map`), and every file
//! carries `{"format": "pt"}` metadata, so Hugging Face loaders accept the
//! result as their own.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::{ModelError, Result, Weights};

/// `save_pretrained`'s default shard size (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A pickle at least this large, loaded by every rank of a multi-rank job,
/// draws advice to convert it.
pub const LARGE_PICKLE_BYTES: u64 = 1 << 30;

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The safetensors files, then the index when sharded.
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

fn io_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn dtype(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => return None,
    })
}

/// Where a pickle's safetensors go: `checkpoint.pt` → `checkpoint.safetensors`,
/// `pytorch_model.bin` → `model.safetensors` (the name Hugging Face looks
/// for), `pytorch_model.bin.index.json` → `model.safetensors.index.json`.
pub fn default_output(input: &Path) -> PathBuf {
    let name = input
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder = input.parent().unwrap_or_else(|| Path::new("."));
    if name == "pytorch_model.bin" || name == "pytorch_model.bin.index.json" {
        return folder.join("model.safetensors");
    }
    let stem = name
        .strip_suffix(".index.json")
        .unwrap_or(&name)
        .rsplit_once('.')
        .map_or(name.as_str(), |(stem, _)| stem)
        .to_string();
    folder.join(format!("{stem}.safetensors"))
}

/// The pickle a folder holds: a Hugging Face LM folder's
/// `pytorch_model.bin(.index.json)`.
fn pickle_in(folder: &Path) -> Result<PathBuf> {
    ["pytorch_model.bin.index.json", "pytorch_model.bin"]
        .iter()
        .map(|name| folder.join(name))
        .find(|path| path.exists())
        .ok_or_else(|| {
            io_error(
                folder,
                "no pytorch_model.bin(.index.json) here; name a .pt/.bin/.pth file or an LM folder",
            )
        })
}

/// Converts `input` (a `.pt`/`.bin`/`.pth`/`.ckpt` pickle, a
/// `pytorch_model.bin.index.json`, or a Hugging Face LM folder holding
/// either) to safetensors at `output` (default: [`default_output`]), in
/// files of at most `max_shard_bytes` of tensor data (one tensor larger
/// than that gets a file of its own). `progress` hears the bytes written.
pub fn convert(
    input: &Path,
    output: Option<&Path>,
    max_shard_bytes: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<Converted> {
    let input = if input.is_dir() {
        pickle_in(input)?
    } else {
        input.to_path_buf()
    };
    let output = output.map_or_else(|| default_output(&input), Path::to_path_buf);
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(io_error(&output, "the output must be named *.safetensors"));
    }
    let weights = Weights::read(&input)?;
    let tensors: Vec<(String, Tensor)> = weights.into_entries()?;
    for (name, tensor) in &tensors {
        if dtype(tensor.kind()).is_none() {
            return Err(io_error(
                &input,
                format!(
                    "tensor {name} has dtype {:?}, which safetensors cannot hold",
                    tensor.kind()
                ),
            ));
        }
    }
    let size = |tensor: &Tensor| (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64;
    let total: u64 = tensors.iter().map(|(_, tensor)| size(tensor)).sum();
    // Greedy in name order, as save_pretrained fills its shards.
    let mut groups: Vec<Vec<&(String, Tensor)>> = vec![Vec::new()];
    let mut filled = 0u64;
    for entry in &tensors {
        let bytes = size(&entry.1);
        if filled > 0 && filled + bytes > max_shard_bytes {
            groups.push(Vec::new());
            filled = 0;
        }
        groups.last_mut().expect("one group").push(entry);
        filled += bytes;
    }
    let folder = output.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(folder).map_err(|error| io_error(folder, error.to_string()))?;
    let mut written = 0u64;
    let mut files = Vec::new();
    if groups.len() == 1 {
        write_file(&output, &groups[0], &mut |bytes| {
            written += bytes;
            progress(written, total)
        })?;
        files.push(output.clone());
    } else {
        let name = output
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name.trim_end_matches(".safetensors");
        let count = groups.len();
        let mut weight_map = BTreeMap::new();
        for (index, group) in groups.iter().enumerate() {
            let shard = format!("{stem}-{:05}-of-{count:05}.safetensors", index + 1);
            let path = folder.join(&shard);
            write_file(&path, group, &mut |bytes| {
                written += bytes;
                progress(written, total)
            })?;
            for entry in group {
                weight_map.insert(entry.0.clone(), shard.clone());
            }
            files.push(path);
        }
        let index = folder.join(format!("{name}.index.json"));
        let text = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_atomically(&index, |file| {
            file.write_all(
                serde_json::to_string_pretty(&text)
                    .unwrap_or_default()
                    .as_bytes(),
            )
        })?;
        files.push(index);
    }
    Ok(Converted {
        files,
        tensors: tensors.len(),
        bytes: total,
    })
}

/// Writes `path` through a temporary file renamed into place, synced.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let partial = path.with_extension("partial");
    let result = (|| -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        write(&mut file)?;
        file.into_inner()
            .map_err(|error| error.into_error())?
            .sync_all()?;
        std::fs::rename(&partial, path)
    })();
    result.map_err(|error| {
        let _ = std::fs::remove_file(&partial);
        io_error(path, error.to_string())
    })
}

/// One safetensors file: the 8-byte header length, the JSON header padded
/// with spaces to 8 bytes, then each tensor's bytes in order.
fn write_file(
    path: &Path,
    tensors: &[&(String, Tensor)],
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for (name, tensor) in tensors.iter().map(|entry| (&entry.0, &entry.1)) {
        let bytes = (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype(tensor.kind()),
                "shape": tensor.size(),
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json =
        serde_json::to_string(&header).map_err(|error| io_error(path, error.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    write_atomically(path, |file| {
        file.write_all(&(json.len() as u64).to_le_bytes())?;
        file.write_all(json.as_bytes())?;
        for (_, tensor) in tensors.iter().map(|entry| (&entry.0, &entry.1)) {
            let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
            let numel = tensor.numel();
            let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
            tensor
                .f_copy_data_u8(&mut bytes, numel)
                .map_err(|error| std::io::Error::other(error.to_string()))?;
            file.write_all(&bytes)?;
            progress(bytes.len() as u64);
        }
        Ok(())
    })
}

/// The advice for a rank about to unpickle `path` (`bytes` long) in a job
/// of `world` ranks: none for small files or one rank.
pub fn pickle_advice(path: &Path, bytes: u64, world: u64) -> Option<String> {
    let pickle = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth" | "ckpt")
    );
    (pickle && world > 1 && bytes >= LARGE_PICKLE_BYTES).then(|| {
        format!(
            "{} is a {:.1} GB PyTorch pickle: each of the {world} ranks reads and holds all of it. \
             Convert it once with `flamingoctl model convert {}` (safetensors are read by byte range) \
             and point the model spec at the result",
            path.display(),
            bytes as f64 / 1e9,
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_named_as_hugging_face_looks_for_them() {
        assert_eq!(
            default_output(Path::new("/m/lm/pytorch_model.bin")),
            Path::new("/m/lm/model.safetensors")
        );
        assert_eq!(
            default_output(Path::new("/m/lm/pytorch_model.bin.index.json")),
            Path::new("/m/lm/model.safetensors")
        );
        assert_eq!(
            default_output(Path::new("/m/checkpoint.pt")),
            Path::new("/m/checkpoint.safetensors")
        );
    }

    #[test]
    fn only_large_pickles_in_multi_rank_jobs_draw_advice() {
        let big = LARGE_PICKLE_BYTES;
        assert!(pickle_advice(Path::new("a.bin"), big, 8)
            .is_some_and(|advice| advice.contains("flamingoctl model convert a.bin")));
        assert!(pickle_advice(Path::new("a.bin"), big, 1).is_none());
        assert!(pickle_advice(Path::new("a.bin"), big - 1, 8).is_none());
        assert!(pickle_advice(Path::new("a.safetensors"), big, 8).is_none());
    }
}
