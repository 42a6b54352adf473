//! Checkpoints of a run: each rank writes the part of the trainable values
//! and optimizer state it owns (`rank-<r>.safetensors`) with its size and
//! CRC-32 beside it; once all have, rank 0 writes `manifest.json` (step,
//! data cursors, world size, ranges, every file's size and checksum) and
//! points `latest` at it. A checkpoint without a manifest is incomplete and
//! never loaded; one whose files do not match their manifest fails
//! verification on load. Loading assembles the flat state from the ranges,
//! so it works at any world size.
//!
//! Durability: every file is written to a temporary name, `fsync`ed,
//! renamed into place, and its folder `fsync`ed — so after a power loss a
//! name points at complete data, and the manifest (the commit point, which
//! names the files) is on disk only after the files it names. A run whose
//! checkpoints go to an object store (`checkpoint_store`) keeps the same
//! order with the store's guarantees instead ([`object`]).

pub mod object;

use std::io::Read;
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
    /// Every rank file with its size and CRC-32, checked on load (empty in
    /// checkpoints written before checksums: those load unverified).
    #[serde(default)]
    pub files: Vec<FileSum>,
}

/// A checkpoint file's size and CRC-32 (IEEE), as its writer measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

impl FileSum {
    /// Reads `path` through once.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            bytes += read as u64;
        }
        Ok(Self {
            name: path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            crc32: hasher.finalize(),
        })
    }
}

/// `fsync`s a folder, so the renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` durably: a temporary file beside it, `fsync`,
/// rename, `fsync` of the folder.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.tmp"));
    {
        let mut file = std::fs::File::create(&temporary)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    sync_dir(dir)
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Writes this rank's part durably, and beside it (`rank-<r>.sum.json`)
/// the file's size and CRC-32 for the manifest.
pub fn write_rank(dir: &Path, rank: u64, state: (Tensor, Tensor, Tensor)) -> std::io::Result<()> {
    let name = format!("rank-{rank}.safetensors");
    let remote = object::is_url(dir);
    let staging = remote
        .then(|| object::Staging::new("checkpoint"))
        .transpose()?;
    let local_dir = staging.as_ref().map_or(dir, |staging| staging.path());
    if !remote {
        std::fs::create_dir_all(dir)?;
        // The new folders' entries (`checkpoints/`, `step-…/`) are durable too.
        for ancestor in dir.ancestors().skip(1).take(2) {
            sync_dir(ancestor)?;
        }
    }
    let (parameters, exp_avg, exp_avg_sq) = state;
    let temporary = local_dir.join(format!(".{name}.tmp"));
    Tensor::write_safetensors(
        &[
            ("parameters", parameters),
            ("exp_avg", exp_avg),
            ("exp_avg_sq", exp_avg_sq),
        ],
        &temporary,
    )
    .map_err(|error| std::io::Error::other(error.to_string()))?;
    // Summed from the page cache just after the write, before the rename
    // (or upload) makes the file visible under its name.
    let mut sum = FileSum::of(&temporary)?;
    sum.name = name.clone();
    if remote {
        object::Folder::open(dir)?.upload(&name, &temporary)?;
    } else {
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, dir.join(&name))?;
        sync_dir(dir)?;
    }
    write_file(
        dir,
        &format!("rank-{rank}.sum.json"),
        &serde_json::to_vec(&sum)?,
    )
}

/// Writes file `name` of the folder `location` durably: locally through
/// [`write_durably`], in an object store as one PUT.
fn write_file(location: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    if object::is_url(location) {
        object::Folder::open(location)?.put(name, bytes.to_vec())
    } else {
        write_durably(&location.join(name), bytes)
    }
}

/// File `name` of the folder `location`, or `None` when it is not there.
fn read_file(location: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    if object::is_url(location) {
        object::Folder::open(location)?.get(name)
    } else {
        match std::fs::read(location.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// Whether `dir` holds a committed checkpoint (has its manifest).
pub fn is_committed(dir: &Path) -> bool {
    if object::is_url(dir) {
        object::Folder::open(dir).is_ok_and(|folder| folder.exists("manifest.json"))
    } else {
        dir.join("manifest.json").exists()
    }
}

/// Rank 0, after every writer wrote: the files the manifest lists, from the
/// writers' sums, each checked against the size on disk now.
pub fn file_sums(dir: &Path, writers: &[u64]) -> std::io::Result<Vec<FileSum>> {
    let folder = object::is_url(dir)
        .then(|| object::Folder::open(dir))
        .transpose()?;
    writers
        .iter()
        .map(|rank| {
            let sum_path = dir.join(format!("rank-{rank}.sum.json"));
            let bytes = read_file(dir, &format!("rank-{rank}.sum.json"))?
                .ok_or_else(|| std::io::Error::other(format!("{}: missing", sum_path.display())))?;
            let sum: FileSum = serde_json::from_slice(&bytes).map_err(|error| {
                std::io::Error::other(format!("{}: {error}", sum_path.display()))
            })?;
            let stored = match &folder {
                Some(folder) => folder.size(&sum.name)?,
                None => std::fs::metadata(dir.join(&sum.name))?.len(),
            };
            if stored != sum.bytes {
                return Err(std::io::Error::other(format!(
                    "{}: {stored} bytes stored, its writer wrote {}",
                    dir.join(&sum.name).display(),
                    sum.bytes
                )));
            }
            Ok(sum)
        })
        .collect()
}

/// Rank 0, after every rank wrote: the manifest (durably; it is what makes
/// the checkpoint complete).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    write_file(dir, "manifest.json", &serde_json::to_vec_pretty(manifest)?)
}

/// Rank 0, after every rank wrote: the manifest, then `latest`.
pub fn commit(run_dir: &Path, dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    write_manifest(dir, manifest)?;
    write_file(run_dir, "latest", dir.display().to_string().as_bytes())
}

/// The run's checkpoints with a manifest, newest step first (where a local
/// run falls back to when its latest fails verification).
pub fn committed(run_dir: &Path) -> Vec<PathBuf> {
    let checkpoints = run_dir.join("checkpoints");
    let mut found: Vec<PathBuf> = if object::is_url(run_dir) {
        let Ok(folder) = object::Folder::open(&checkpoints) else {
            return Vec::new();
        };
        folder
            .folders()
            .unwrap_or_default()
            .into_iter()
            .filter(|name| folder.folder(name).is_ok_and(|f| f.exists("manifest.json")))
            .map(|name| checkpoints.join(name))
            .collect()
    } else {
        let Ok(entries) = std::fs::read_dir(&checkpoints) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.join("manifest.json").exists())
            .collect()
    };
    found.sort();
    found.reverse();
    found
}

/// Checks every file the manifest lists against its size and checksum.
pub fn verify(dir: &Path, manifest: &Manifest) -> Result<(), TrainError> {
    verify_in(dir, dir, manifest)
}

/// [`verify`] of the files in `files`, named in errors as `shown`'s (a
/// downloaded copy of an object-store checkpoint).
fn verify_in(files: &Path, shown: &Path, manifest: &Manifest) -> Result<(), TrainError> {
    for expected in &manifest.files {
        let path = shown.join(&expected.name);
        let found = FileSum::of(&files.join(&expected.name))
            .map_err(|error| bad(&path, error.to_string()))?;
        if found.bytes != expected.bytes {
            return Err(bad(
                &path,
                format!(
                    "{} bytes, the manifest says {}: the file was cut short or replaced",
                    found.bytes, expected.bytes
                ),
            ));
        }
        if found.crc32 != expected.crc32 {
            return Err(bad(
                &path,
                format!(
                    "CRC-32 {:08x}, the manifest says {:08x}: the file changed after it was written",
                    found.crc32, expected.crc32
                ),
            ));
        }
    }
    Ok(())
}

/// The newest committed checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    let named = read_file(run_dir, "latest").ok()??;
    let dir = PathBuf::from(String::from_utf8_lossy(&named).trim());
    is_committed(&dir).then_some(dir)
}

/// Removes committed checkpoints older than `keep` (`--delete_previous_checkpoint`).
pub fn delete_older(run_dir: &Path, keep: &Path) -> std::io::Result<()> {
    for path in committed(run_dir) {
        if path != keep {
            remove(&path)?;
        }
    }
    Ok(())
}

/// Deletes the checkpoint `dir` (an object store's manifest first).
pub fn remove(dir: &Path) -> std::io::Result<()> {
    if object::is_url(dir) {
        object::Folder::open(dir)?.delete_all("manifest.json")
    } else {
        std::fs::remove_dir_all(dir)
    }
}

fn bad(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A checkpoint's manifest (without reading or verifying its files).
pub fn read_manifest(dir: &Path) -> Result<Manifest, TrainError> {
    let text = read_file(dir, "manifest.json")
        .map_err(|error| bad(dir, error.to_string()))?
        .ok_or_else(|| {
            bad(
                dir,
                "no manifest; the checkpoint is incomplete or not a checkpoint",
            )
        })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|error| bad(&dir.join("manifest.json"), error.to_string()))?;
    if manifest.format != FORMAT {
        return Err(bad(
            dir,
            format!("format {} (expected {FORMAT})", manifest.format),
        ));
    }
    Ok(manifest)
}

/// Reads a checkpoint: the manifest and the whole flat state (an object
/// store's files are downloaded to a private folder first).
pub fn read(dir: &Path) -> Result<(Manifest, Tensor, Tensor, Tensor), TrainError> {
    let manifest = read_manifest(dir)?;
    if !object::is_url(dir) {
        return load(dir, dir, manifest);
    }
    let staging =
        object::Staging::new("checkpoint-read").map_err(|error| bad(dir, error.to_string()))?;
    let folder = object::Folder::open(dir).map_err(|error| bad(dir, error.to_string()))?;
    let mut names: Vec<String> = manifest
        .files
        .iter()
        .map(|file| file.name.clone())
        .collect();
    if names.is_empty() {
        names = manifest
            .ranges
            .iter()
            .map(|(rank, _, _)| format!("rank-{rank}.safetensors"))
            .collect();
        names.dedup();
    }
    for name in &names {
        folder
            .download(name, &staging.path().join(name))
            .map_err(|error| bad(&dir.join(name), error.to_string()))?;
    }
    load(staging.path(), dir, manifest)
}

/// Verifies and assembles the rank files in `files` (named in errors as
/// `shown`'s).
fn load(
    files: &Path,
    shown: &Path,
    manifest: Manifest,
) -> Result<(Manifest, Tensor, Tensor, Tensor), TrainError> {
    verify_in(files, shown, &manifest)?;
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
        let path = shown.join(format!("rank-{rank}.safetensors"));
        let tensors = Tensor::read_safetensors(files.join(format!("rank-{rank}.safetensors")))
            .map_err(|error| bad(&path, error.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-writer checkpoint of `step` in `run_dir`, committed as rank 0
    /// commits one.
    fn write_checkpoint(run_dir: &Path, step: u64) -> PathBuf {
        let dir = checkpoint_dir(run_dir, step);
        let part = |rank: u64| {
            let values =
                Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) + (rank * 10 + step) as f64;
            (values.copy(), values.copy() * 2.0, values * 3.0)
        };
        for rank in 0..2 {
            write_rank(&dir, rank, part(rank)).expect("rank writes");
        }
        let manifest = Manifest {
            format: FORMAT.to_string(),
            step,
            skipped_steps: 0,
            world_size: 2,
            strategy: "full".into(),
            total: 8,
            ranges: vec![(0, 0, 4), (1, 4, 8)],
            laion_cursor: None,
            mmc4_cursor: None,
            config: serde_json::json!({}),
            layout: Vec::new(),
            files: file_sums(&dir, &[0, 1]).expect("sums"),
        };
        commit(run_dir, &dir, &manifest).expect("commit");
        dir
    }

    #[test]
    fn a_changed_or_cut_file_fails_verification_and_names_itself() {
        let run = tempfile::tempdir().expect("temp dir");
        let older = write_checkpoint(run.path(), 2);
        let newer = write_checkpoint(run.path(), 4);
        assert_eq!(latest(run.path()), Some(newer.clone()));
        assert_eq!(committed(run.path()), vec![newer.clone(), older.clone()]);
        let (manifest, parameters, _, exp_avg_sq) = read(&newer).expect("reads");
        assert_eq!(manifest.files.len(), 2);
        assert_eq!(parameters.double_value(&[5]), 15.0);
        assert_eq!(exp_avg_sq.double_value(&[0]), 12.0);
        // One flipped byte in the middle of rank 1's file.
        let file = newer.join("rank-1.safetensors");
        let mut bytes = std::fs::read(&file).expect("file");
        let middle = bytes.len() - 8;
        bytes[middle] ^= 0x01;
        std::fs::write(&file, &bytes).expect("flipped");
        let error = read(&newer).expect_err("verification fails").to_string();
        assert!(error.contains("rank-1.safetensors"), "{error}");
        assert!(
            error.contains("the file changed after it was written"),
            "{error}"
        );
        // Cut short.
        std::fs::write(&file, &bytes[..100]).expect("cut");
        let error = read(&newer).expect_err("verification fails").to_string();
        assert!(error.contains("cut short"), "{error}");
        assert!(read(&older).is_ok());
        // A writer's recorded size that disagrees with the disk is caught
        // before the manifest is written.
        let error = file_sums(&newer, &[0, 1])
            .expect_err("sizes differ")
            .to_string();
        assert!(error.contains("bytes stored, its writer wrote"), "{error}");
    }

    /// The same commit, verification and retention with the checkpoints in
    /// a real S3-compatible server (moto): a flipped byte in an object is
    /// caught and named by its URL, the previous checkpoint still reads,
    /// retention deletes only the older one, and a part large enough for a
    /// multipart upload round-trips.
    #[test]
    fn checkpoints_in_an_object_store_commit_verify_and_retire_like_local_ones() {
        let s3 = flamingo_common::testing::S3Server::start("ckpt");
        // SAFETY: set before any thread of this test reads the environment
        // (nextest runs each test in its own process).
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::set_var("FLAMINGO_S3_ENDPOINT", &s3.endpoint);
        }
        let run = PathBuf::from("s3://ckpt/runs/shapes");
        assert_eq!(latest(&run), None);
        let older = write_checkpoint(&run, 2);
        let newer = write_checkpoint(&run, 4);
        assert_eq!(
            newer.display().to_string(),
            "s3://ckpt/runs/shapes/checkpoints/step-00000004"
        );
        assert_eq!(latest(&run), Some(newer.clone()));
        assert_eq!(committed(&run), vec![newer.clone(), older.clone()]);
        let (manifest, parameters, _, exp_avg_sq) = read(&newer).expect("reads");
        assert_eq!(manifest.files.len(), 2);
        assert_eq!(parameters.double_value(&[5]), 15.0);
        assert_eq!(exp_avg_sq.double_value(&[0]), 12.0);
        let folder = object::Folder::open(&newer).expect("folder");
        let mut bytes = folder
            .get("rank-1.safetensors")
            .expect("get")
            .expect("rank 1's part");
        let middle = bytes.len() - 8;
        bytes[middle] ^= 0x01;
        folder.put("rank-1.safetensors", bytes).expect("flipped");
        let error = read(&newer).expect_err("verification fails").to_string();
        assert!(
            error.contains("s3://ckpt/runs/shapes/checkpoints/step-00000004/rank-1.safetensors")
                && error.contains("the file changed after it was written"),
            "{error}"
        );
        assert!(read(&older).is_ok());
        // Without its manifest a checkpoint is not committed.
        let partial = checkpoint_dir(&run, 6);
        write_rank(&partial, 0, {
            let values = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
            (values.copy(), values.copy(), values)
        })
        .expect("a part");
        assert!(!is_committed(&partial));
        assert_eq!(committed(&run).len(), 2);
        delete_older(&run, &newer).expect("retention");
        assert_eq!(committed(&run), vec![newer.clone()]);
        let old_folder = object::Folder::open(&older).expect("folder");
        assert!(!old_folder.exists("rank-0.safetensors"));
        assert!(!old_folder.exists("manifest.json"));
        // 3 × 12 MiB of values: uploaded in parts.
        let big = checkpoint_dir(&run, 8);
        let values = Tensor::arange(3 << 20, (Kind::Float, tch::Device::Cpu));
        write_rank(
            &big,
            0,
            (values.copy(), values.copy() * 2.0, values.copy() * 3.0),
        )
        .expect("a large part");
        let files = file_sums(&big, &[0]).expect("sums");
        assert!(files[0].bytes > 36 << 20, "{files:?}");
        let manifest = Manifest {
            format: FORMAT.to_string(),
            step: 8,
            skipped_steps: 0,
            world_size: 1,
            strategy: "no_shard".into(),
            total: 3 << 20,
            ranges: vec![(0, 0, 3 << 20)],
            laion_cursor: None,
            mmc4_cursor: None,
            config: serde_json::json!({}),
            layout: Vec::new(),
            files,
        };
        commit(&run, &big, &manifest).expect("commit");
        let (_, parameters, exp_avg, _) = read(&big).expect("reads back");
        assert!(parameters.equal(&values));
        assert!(exp_avg.equal(&(values * 2.0)));
        assert_eq!(latest(&run), Some(big));
    }

    /// The crash-consistency check: the writer runs in a child process
    /// (this test binary, re-executed) under `strace`, and every rename of
    /// a checkpoint file must come after an fsync of that file and be
    /// followed by an fsync of its folder; the manifest (the commit point)
    /// is renamed only after every rank file is durable, and `latest` after
    /// the manifest.
    #[test]
    fn every_file_is_synced_before_its_rename_and_its_folder_after() {
        if let Ok(run_dir) = std::env::var("FLAMINGO_TEST_CHECKPOINT_INTO") {
            write_checkpoint(Path::new(&run_dir), 6);
            return;
        }
        let strace = std::process::Command::new("strace").arg("-V").output();
        assert!(
            strace.is_ok_and(|output| output.status.success()),
            "strace is missing: scripts/setup.sh installs it (apt-get install strace)"
        );
        let work = tempfile::tempdir().expect("temp dir");
        let run_dir = work.path().join("run");
        let log = work.path().join("strace.log");
        let status = std::process::Command::new("strace")
            .args([
                "-f",
                "-y",
                "-qq",
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2",
                "-o",
            ])
            .arg(&log)
            .arg(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "checkpoint::tests::every_file_is_synced_before_its_rename_and_its_folder_after",
                "--test-threads=1",
            ])
            .env("FLAMINGO_TEST_CHECKPOINT_INTO", &run_dir)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("strace runs");
        assert!(status.success());
        let trace = std::fs::read_to_string(&log).expect("trace");
        let root = run_dir.display().to_string();
        // (index, synced path) and (index, from, to), in call order.
        let mut syncs: Vec<(usize, String)> = Vec::new();
        let mut renames: Vec<(usize, String, String)> = Vec::new();
        for (index, line) in trace.lines().enumerate() {
            let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
            if line.contains("rename") && quoted.len() >= 2 && line.ends_with("= 0") {
                let (from, to) = (quoted[quoted.len() - 2], quoted[quoted.len() - 1]);
                if to.starts_with(&root) {
                    renames.push((index, from.to_string(), to.to_string()));
                }
            } else if line.contains("sync(") && line.ends_with("= 0") {
                if let Some(path) = line
                    .split('<')
                    .nth(1)
                    .and_then(|rest| rest.split('>').next())
                {
                    syncs.push((index, path.to_string()));
                }
            }
        }
        let expected = [
            "rank-0.safetensors",
            "rank-0.sum.json",
            "rank-1.safetensors",
            "rank-1.sum.json",
            "manifest.json",
            "latest",
        ];
        let names: Vec<&str> = renames
            .iter()
            .map(|(_, _, to)| to.rsplit('/').next().unwrap_or_default())
            .collect();
        assert_eq!(names, expected, "{trace}");
        let synced = |path: &str, after: usize, before: usize| {
            syncs
                .iter()
                .any(|(index, synced)| synced == path && *index > after && *index < before)
        };
        let mut durable_at = Vec::new();
        for (index, from, to) in &renames {
            assert!(
                synced(from, 0, *index),
                "{from} renamed before it was synced:\n{trace}"
            );
            let folder = Path::new(to)
                .parent()
                .expect("a folder")
                .display()
                .to_string();
            let synced_at = syncs
                .iter()
                .find(|(at, path)| *path == folder && at > index)
                .map(|(at, _)| *at)
                .unwrap_or_else(|| {
                    panic!("{folder} not synced after {to} was renamed into it:\n{trace}")
                });
            durable_at.push(synced_at);
        }
        // Commit order: the manifest's rename after every rank file and sum
        // is durable, `latest` after the manifest is.
        let manifest = renames[4].0;
        assert!(durable_at[..4].iter().all(|at| *at < manifest), "{trace}");
        assert!(durable_at[4] < renames[5].0, "{trace}");
    }
}
