//! Checkpoints in an object store (`checkpoint_store = "s3://bucket/prefix"`,
//! or `gs://`, `az://`): the same files and the same commit order as on a
//! local disk, with the store's own guarantees in place of `fsync` and
//! `rename`. An object appears whole or not at all when its upload
//! completes (a PUT, or the completion of a multipart upload), and stores
//! read their own writes, so writing the manifest only after every rank
//! file and its sum are uploaded makes the manifest the commit point here
//! too; `latest` is written after it. Deleting a retired checkpoint removes
//! its manifest first, so a half-deleted checkpoint is never taken for a
//! committed one.
//!
//! A checkpoint location here is the store URL held in a `Path` (what the
//! job record, the commit and `resume_from_checkpoint` carry), for example
//! `s3://bucket/prefix/run/checkpoints/step-00000010`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;

/// Uploads and downloads go in pieces of this size.
const PIECE: usize = 8 << 20;

/// Whether `location` names an object-store URL (`scheme://…`) rather than
/// a local path.
pub fn is_url(location: &Path) -> bool {
    location
        .to_str()
        .and_then(|text| text.split_once("://"))
        .is_some_and(|(scheme, _)| {
            scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
}

/// A folder of an object store: a prefix, and the calls made on it.
pub struct Folder {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    url: String,
    /// Always `Some` until drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Folder {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a caller inside a runtime may
        // not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn failed(url: &str, message: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{url}: {message}"))
}

impl Folder {
    /// The folder `location` names (`FLAMINGO_S3_ENDPOINT` and the usual
    /// `AWS_*` variables configure S3-compatible servers).
    pub fn open(location: &Path) -> std::io::Result<Self> {
        let url = location.display().to_string();
        let url = url.trim_end_matches('/').to_string();
        let parsed = flamingo_common::objects::parse(&url).map_err(|e| failed(&url, e))?;
        let store = flamingo_common::objects::build(&parsed, None).map_err(|e| failed(&url, e))?;
        let prefix = flamingo_common::objects::path(&parsed).map_err(|e| failed(&url, e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            store,
            prefix,
            url,
            runtime: Some(runtime),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `future` to completion on this folder's runtime (from a
    /// thread of its own when the caller is itself inside a runtime, which
    /// cannot block).
    fn block_on<T: Send>(&self, future: impl std::future::Future<Output = T> + Send) -> T {
        let runtime = self.runtime.as_ref().expect("a runtime until drop");
        if tokio::runtime::Handle::try_current().is_err() {
            return runtime.block_on(future);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(future))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn key(&self, name: &str) -> StorePath {
        self.prefix.child(name)
    }

    fn name_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// Writes `bytes` as object `name` (one PUT: whole or absent).
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> std::io::Result<()> {
        let key = self.key(name);
        self.block_on(self.store.put(&key, PutPayload::from(Bytes::from(bytes))))
            .map(|_| ())
            .map_err(|error| failed(&self.name_url(name), error))
    }

    /// Uploads the local file `from` as object `name`: in pieces through a
    /// multipart upload when it is large, which the store makes visible
    /// only when it completes (an aborted upload leaves nothing).
    pub fn upload(&self, name: &str, from: &Path) -> std::io::Result<()> {
        let key = self.key(name);
        let shown = self.name_url(name);
        self.block_on(async {
            let mut writer = object_store::buffered::BufWriter::with_capacity(
                self.store.clone(),
                key,
                2 * PIECE,
            );
            let mut file = std::fs::File::open(from)?;
            let mut buffer = vec![0u8; PIECE];
            let written: std::io::Result<()> = async {
                loop {
                    let read = file.read(&mut buffer)?;
                    if read == 0 {
                        break;
                    }
                    writer
                        .put(Bytes::copy_from_slice(&buffer[..read]))
                        .await
                        .map_err(|error| failed(&shown, error))?;
                }
                writer.shutdown().await
            }
            .await;
            if written.is_err() {
                let _ = writer.abort().await;
            }
            written
        })
    }

    /// Object `name`, or `None` when there is no such object.
    pub fn get(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        let key = self.key(name);
        self.block_on(async {
            match self.store.get(&key).await {
                Ok(result) => result
                    .bytes()
                    .await
                    .map(|bytes| Some(bytes.to_vec()))
                    .map_err(|error| failed(&self.name_url(name), error)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(error) => Err(failed(&self.name_url(name), error)),
            }
        })
    }

    /// Downloads object `name` into the local file `to`.
    pub fn download(&self, name: &str, to: &Path) -> std::io::Result<()> {
        let key = self.key(name);
        let shown = self.name_url(name);
        self.block_on(async {
            let result = match self.store.get(&key).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(failed(&shown, "no such object"));
                }
                Err(error) => return Err(failed(&shown, error)),
            };
            let mut stream = result.into_stream();
            let mut file = std::fs::File::create(to)?;
            while let Some(piece) = stream.try_next().await.map_err(|e| failed(&shown, e))? {
                file.write_all(&piece)?;
            }
            Ok(())
        })
    }

    /// The size of object `name`.
    pub fn size(&self, name: &str) -> std::io::Result<u64> {
        let key = self.key(name);
        self.block_on(self.store.head(&key))
            .map(|meta| meta.size)
            .map_err(|error| failed(&self.name_url(name), error))
    }

    /// Whether object `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        let key = self.key(name);
        self.block_on(self.store.head(&key)).is_ok()
    }

    /// The names of the folders directly inside this one.
    pub fn folders(&self) -> std::io::Result<Vec<String>> {
        let listed = self
            .block_on(self.store.list_with_delimiter(Some(&self.prefix)))
            .map_err(|error| failed(&self.url, error))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|prefix| prefix.filename().map(str::to_string))
            .collect())
    }

    /// The folder `name` inside this one.
    pub fn folder(&self, name: &str) -> std::io::Result<Self> {
        Self::open(&PathBuf::from(self.name_url(name)))
    }

    /// Deletes every object of the folder: `first` before the rest (the
    /// manifest, so what is left is never taken for a checkpoint).
    pub fn delete_all(&self, first: &str) -> std::io::Result<()> {
        self.block_on(async {
            let first_key = self.key(first);
            match self.store.delete(&first_key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(failed(&self.name_url(first), error)),
            }
            let keys: Vec<StorePath> = self
                .store
                .list(Some(&self.prefix))
                .map_ok(|meta| meta.location)
                .try_collect()
                .await
                .map_err(|error| failed(&self.url, error))?;
            for key in keys {
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(error) => return Err(failed(&self.url, error)),
                }
            }
            Ok(())
        })
    }
}

/// A private local folder for staging uploads and downloads, removed on
/// drop.
pub struct Staging(PathBuf);

impl Staging {
    pub fn new(purpose: &str) -> std::io::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "flamingo-{purpose}-{}-{serial}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert!(is_url(Path::new("s3://bucket/runs/run")));
        assert!(is_url(Path::new("gs://b/p")));
        assert!(!is_url(Path::new("/data/runs/run")));
        assert!(!is_url(Path::new("runs/a://b")));
        assert!(!is_url(Path::new("c://x")));
    }
}
