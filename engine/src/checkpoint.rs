//! Checkpoints of a run: each rank writes the part of the trainable values
//! and optimizer state it owns (`rank-<r>.safetensors`); once all have,
//! rank 0 writes `manifest.json` (step, data cursors, world size, ranges)
//! and points `latest` at it. A checkpoint without a manifest is incomplete
//! and never loaded. Loading assembles the flat state from the ranges, so
//! it works at any world size.

use std::path::{Path, PathBuf};

use flamingo_data::batch::Cursor;
use flamingo_torch_shim::pickle::fl_pickle_save;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::trainer::TrainError;

const FORMAT: &str = "flamingo-checkpoint/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CursorRecord {
    pub epoch: u64,
    pub consumed: u64,
}

impl From<Cursor> for CursorRecord {
    fn from(cursor: Cursor) -> Self {
        Self {
            epoch: cursor.epoch,
            consumed: cursor.consumed,
        }
    }
}

impl From<&CursorRecord> for Cursor {
    fn from(record: &CursorRecord) -> Self {
        Self {
            epoch: record.epoch,
            consumed: record.consumed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub skipped_steps: u64,
    pub world_size: u64,
    pub strategy: String,
    pub total: i64,
    /// (rank, start, end) of each range of the flat state; a rank's file
    /// holds its ranges one after another, in this order.
    pub ranges: Vec<(u64, i64, i64)>,
    pub laion_cursor: Option<CursorRecord>,
    pub mmc4_cursor: Option<CursorRecord>,
    /// The resolved run config, as JSON.
    pub config: serde_json::Value,
    /// (name, shape, offset) of each trainable parameter in the flat state.
    #[serde(default)]
    pub layout: Vec<(String, Vec<i64>, i64)>,
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Writes this rank's part.
pub fn write_rank(dir: &Path, rank: u64, state: (Tensor, Tensor, Tensor)) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (parameters, exp_avg, exp_avg_sq) = state;
    let path = dir.join(format!("rank-{rank}.safetensors"));
    let temporary = dir.join(format!(".rank-{rank}.safetensors.tmp"));
    Tensor::write_safetensors(
        &[
            ("parameters", parameters),
            ("exp_avg", exp_avg),
            ("exp_avg_sq", exp_avg_sq),
        ],
        &temporary,
    )
    .map_err(|error| std::io::Error::other(error.to_string()))?;
    std::fs::rename(temporary, path)
}

/// Rank 0, after every rank wrote: the manifest (atomically).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let temporary = dir.join(".manifest.json.tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(manifest)?)?;
    std::fs::rename(&temporary, dir.join("manifest.json"))
}

/// Rank 0, after every rank wrote: the manifest, then `latest`.
pub fn commit(run_dir: &Path, dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    write_manifest(dir, manifest)?;
    let latest = run_dir.join(".latest.tmp");
    std::fs::write(&latest, dir.display().to_string())?;
    std::fs::rename(latest, run_dir.join("latest"))
}

/// The newest committed checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    let dir = PathBuf::from(std::fs::read_to_string(run_dir.join("latest")).ok()?.trim());
    dir.join("manifest.json").exists().then_some(dir)
}

/// Removes committed checkpoints older than `keep` (`--delete_previous_checkpoint`).
pub fn delete_older(run_dir: &Path, keep: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path != keep && path.join("manifest.json").exists() {
            std::fs::remove_dir_all(path)?;
        }
    }
    Ok(())
}

fn bad(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads a checkpoint: the manifest and the whole flat state.
pub fn read(dir: &Path) -> Result<(Manifest, Tensor, Tensor, Tensor), TrainError> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).map_err(|error| {
        bad(
            dir,
            format!("no manifest ({error}); the checkpoint is incomplete or not a checkpoint"),
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|error| bad(&dir.join("manifest.json"), error.to_string()))?;
    if manifest.format != FORMAT {
        return Err(bad(
            dir,
            format!("format {} (expected {FORMAT})", manifest.format),
        ));
    }
    let full = || Tensor::zeros([manifest.total], (Kind::Float, tch::Device::Cpu));
    let (parameters, exp_avg, exp_avg_sq) = (full(), full(), full());
    // A rank's file holds its ranges one after another, in manifest order.
    let mut ranks: Vec<u64> = manifest.ranges.iter().map(|(rank, _, _)| *rank).collect();
    ranks.dedup();
    for rank in ranks {
        let pieces: Vec<(i64, i64)> = manifest
            .ranges
            .iter()
            .filter(|(owner, _, _)| *owner == rank)
            .map(|(_, start, end)| (*start, end - start))
            .collect();
        let expected: i64 = pieces.iter().map(|(_, length)| length).sum();
        let path = dir.join(format!("rank-{rank}.safetensors"));
        let tensors =
            Tensor::read_safetensors(&path).map_err(|error| bad(&path, error.to_string()))?;
        for (name, tensor) in tensors {
            let target = match name.as_str() {
                "parameters" => &parameters,
                "exp_avg" => &exp_avg,
                "exp_avg_sq" => &exp_avg_sq,
                _ => continue,
            };
            if tensor.numel() as i64 != expected {
                return Err(bad(
                    &path,
                    format!("{name} has {} values, expected {expected}", tensor.numel()),
                ));
            }
            let mut read = 0;
            for (start, length) in &pieces {
                target
                    .narrow(0, *start, *length)
                    .copy_(&tensor.narrow(0, read, *length));
                read += length;
            }
        }
    }
    Ok((manifest, parameters, exp_avg, exp_avg_sq))
}

pub fn manifest_format() -> &'static str {
    FORMAT
}

/// The trainable parameters of a checkpoint under OpenFlamingo's
/// state-dict names (`perceiver.*`, `lang_encoder.gated_cross_attn_layers.*`,
/// the input embedding): what OpenFlamingo's `checkpoint.pt` holds, and what
/// a model spec's `[flamingo] checkpoint` loads.
pub fn state_dict(dir: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    let (manifest, parameters, _, _) = read(dir)?;
    if manifest.layout.is_empty() {
        return Err(bad(dir, "the manifest has no parameter layout"));
    }
    Ok(manifest
        .layout
        .iter()
        .map(|(name, shape, offset)| {
            let numel: i64 = shape.iter().product();
            (
                name.clone(),
                parameters
                    .narrow(0, *offset, numel)
                    .view(shape.as_slice())
                    .copy(),
            )
        })
        .collect())
}

/// Writes `tensors` as a `{name: tensor}` dict in `torch.save`'s format
/// (OpenFlamingo's `checkpoint.pt`; Python's `torch.load` reads it).
pub fn write_torch_pickle(tensors: &[(String, Tensor)], path: &Path) -> Result<(), TrainError> {
    let names: Vec<std::ffi::CString> = tensors
        .iter()
        .map(|(name, _)| {
            std::ffi::CString::new(name.as_str()).map_err(|error| bad(path, error.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let name_pointers: Vec<*const std::ffi::c_char> =
        names.iter().map(|name| name.as_ptr()).collect();
    let handles: Vec<*mut std::ffi::c_void> = tensors
        .iter()
        .map(|(_, tensor)| tensor.as_ptr() as *mut std::ffi::c_void)
        .collect();
    let file = std::ffi::CString::new(path.display().to_string())
        .map_err(|error| bad(path, error.to_string()))?;
    let mut error = [0 as std::ffi::c_char; 512];
    // SAFETY: every pointer is valid for the call: the names and path are
    // NUL-terminated and alive, the handles are tch's at::Tensor pointers of
    // tensors borrowed for the duration, and the shim writes at most
    // `error.len()` bytes of message.
    let status = unsafe {
        fl_pickle_save(
            name_pointers.as_ptr(),
            handles.as_ptr(),
            tensors.len() as std::ffi::c_int,
            file.as_ptr(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status == 0 {
        Ok(())
    } else {
        // SAFETY: the shim wrote a NUL-terminated message.
        let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        Err(bad(path, message.to_string_lossy().into_owned()))
    }
}
