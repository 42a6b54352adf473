//! The metrics archive: jobs' metric and event files copied to object
//! storage (`--metrics-store s3://bucket/prefix`, or any URL the data
//! service reads), so curves outlive the coordinator's disk.
//!
//! The local files are the working copy. Every sync uploads the complete
//! lines each file gained since the last one as a new object,
//! `<prefix>/<file>/<byte offset, 16 digits>`; segments are immutable, so a
//! sync interrupted half-way is simply redone. At start-up, before anything
//! is served, files the local folder lacks (or holds less of) are rebuilt
//! from their segments in offset order.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::ObjectStore;

use crate::error::CoordinatorError;

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

fn archive_error(place: impl std::fmt::Display, error: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Archive {
        place: place.to_string(),
        message: error.to_string(),
    }
}

pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    url: String,
    /// Bytes of each local file already in the archive.
    uploaded: Mutex<HashMap<String, u64>>,
}

/// One uploaded piece of a file.
#[derive(Debug, Clone, PartialEq)]
struct Segment {
    offset: u64,
    size: u64,
    location: StorePath,
}

fn segment_name(offset: u64) -> String {
    format!("{offset:016}")
}

fn is_metrics_file(name: &str) -> bool {
    name.ends_with(".jsonl")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Archive {
    pub fn open(url: &str) -> Result<Self> {
        let parsed =
            flamingo_common::objects::parse(url).map_err(|error| archive_error(url, error))?;
        let store = flamingo_common::objects::build(&parsed, None)
            .map_err(|error| archive_error(url, error))?;
        let prefix =
            flamingo_common::objects::path(&parsed).map_err(|error| archive_error(url, error))?;
        Ok(Self {
            store,
            prefix,
            url: url.trim_end_matches('/').to_string(),
            uploaded: Mutex::new(HashMap::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every file's segments in the archive, in offset order.
    async fn segments(&self) -> Result<BTreeMap<String, Vec<Segment>>> {
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|error| archive_error(format!("listing {}", self.url), error))?;
        let mut files: BTreeMap<String, Vec<Segment>> = BTreeMap::new();
        for meta in listed {
            let parts: Vec<String> = meta
                .location
                .prefix_match(&self.prefix)
                .map(|parts| parts.map(|part| part.as_ref().to_string()).collect())
                .unwrap_or_default();
            let [file, offset] = parts.as_slice() else {
                continue;
            };
            let Ok(offset) = offset.parse::<u64>() else {
                continue;
            };
            if !is_metrics_file(file) {
                continue;
            }
            files.entry(file.clone()).or_default().push(Segment {
                offset,
                size: meta.size,
                location: meta.location,
            });
        }
        for segments in files.values_mut() {
            segments.sort_by_key(|segment| segment.offset);
        }
        Ok(files)
    }

    /// Rebuilds what the local folder lacks from the archive and notes what
    /// the archive holds. Returns the bytes restored.
    pub async fn restore(&self, dir: &Path) -> Result<u64> {
        std::fs::create_dir_all(dir).map_err(|error| archive_error(dir.display(), error))?;
        let mut restored = 0;
        let mut uploaded = HashMap::new();
        for (file, segments) in self.segments().await? {
            let local = dir.join(&file);
            let mut length = std::fs::metadata(&local).map_or(0, |meta| meta.len());
            let mut archived = 0;
            for segment in &segments {
                let end = segment.offset + segment.size;
                archived = archived.max(end);
                if end <= length || segment.offset > length {
                    // Held locally already, or after a gap (never written
                    // by a sync); nothing to take from it.
                    continue;
                }
                let failed = |error: object_store::Error| {
                    archive_error(format!("reading {}/{}", self.url, segment.location), error)
                };
                let got = self.store.get(&segment.location).await.map_err(failed)?;
                let bytes = got.bytes().await.map_err(failed)?;
                let skip = (length - segment.offset) as usize;
                let tail = bytes.get(skip..).unwrap_or_default();
                use std::io::Write;
                let mut handle = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&local)
                    .map_err(|error| archive_error(local.display(), error))?;
                handle
                    .write_all(tail)
                    .map_err(|error| archive_error(local.display(), error))?;
                length = end;
                restored += tail.len() as u64;
            }
            uploaded.insert(file, archived.min(length));
        }
        *self.uploaded.lock().unwrap_or_else(|p| p.into_inner()) = uploaded;
        Ok(restored)
    }

    /// Uploads the complete lines every local file gained since the last
    /// sync. Returns the bytes uploaded.
    pub async fn sync(&self, dir: &Path) -> Result<u64> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(archive_error(dir.display(), error)),
        };
        let mut sent = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_metrics_file(&name) {
                continue;
            }
            let length = entry.metadata().map_or(0, |meta| meta.len());
            let done = self
                .uploaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .copied()
                .unwrap_or(0);
            if length <= done {
                continue;
            }
            let bytes = {
                use std::io::{Read, Seek};
                let mut file = std::fs::File::open(entry.path())
                    .map_err(|error| archive_error(entry.path().display(), error))?;
                file.seek(std::io::SeekFrom::Start(done))
                    .map_err(|error| archive_error(entry.path().display(), error))?;
                let mut bytes = Vec::new();
                file.take(length - done)
                    .read_to_end(&mut bytes)
                    .map_err(|error| archive_error(entry.path().display(), error))?;
                bytes
            };
            // Only whole lines: a line being written waits for the next sync.
            let Some(last_newline) = bytes.iter().rposition(|byte| *byte == b'\n') else {
                continue;
            };
            let mut bytes = bytes;
            bytes.truncate(last_newline + 1);
            let size = bytes.len() as u64;
            let location = self.prefix.child(name.as_str()).child(segment_name(done));
            self.store
                .put(&location, bytes.into())
                .await
                .map_err(|error| {
                    archive_error(format!("uploading {}/{location}", self.url), error)
                })?;
            self.uploaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, done + size);
            sent += size;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_come_back_from_their_segments() {
        let local = tempfile::tempdir().unwrap();
        let remote = tempfile::tempdir().unwrap();
        let url = format!("file://{}/metrics", remote.path().display());
        let archive = Archive::open(&url).unwrap();
        let points = local.path().join("job-a.jsonl");
        std::fs::write(&points, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        std::fs::write(local.path().join("notes.txt"), "not metrics\n").unwrap();
        assert_eq!(archive.sync(local.path()).await.unwrap(), 16);
        // Nothing new: nothing sent; the torn line waits.
        assert_eq!(archive.sync(local.path()).await.unwrap(), 0);
        std::fs::write(&points, "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n").unwrap();
        assert_eq!(archive.sync(local.path()).await.unwrap(), 8);
        std::fs::write(local.path().join("job-a.events.jsonl"), "{\"e\":1}\n").unwrap();
        archive.sync(local.path()).await.unwrap();

        // A new machine: an empty folder gets every file back.
        let fresh = tempfile::tempdir().unwrap();
        let restoring = Archive::open(&url).unwrap();
        assert_eq!(restoring.restore(fresh.path()).await.unwrap(), 32);
        assert_eq!(
            std::fs::read_to_string(fresh.path().join("job-a.jsonl")).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
        assert_eq!(
            std::fs::read_to_string(fresh.path().join("job-a.events.jsonl")).unwrap(),
            "{\"e\":1}\n"
        );
        assert!(!fresh.path().join("notes.txt").exists());
        // Restored files are not uploaded again; new lines are.
        assert_eq!(restoring.sync(fresh.path()).await.unwrap(), 0);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(fresh.path().join("job-a.jsonl"))
            .unwrap();
        std::io::Write::write_all(&mut file, b"{\"a\":4}\n").unwrap();
        assert_eq!(restoring.sync(fresh.path()).await.unwrap(), 8);
        // A folder that kept part of a file gets only the rest.
        let partial = tempfile::tempdir().unwrap();
        std::fs::write(partial.path().join("job-a.jsonl"), "{\"a\":1}\n{\"a\":2}\n").unwrap();
        let again = Archive::open(&url).unwrap();
        // The rest of the points and the whole events file.
        assert_eq!(again.restore(partial.path()).await.unwrap(), 16 + 8);
        assert_eq!(
            std::fs::read_to_string(partial.path().join("job-a.jsonl")).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n{\"a\":4}\n"
        );
    }
}
