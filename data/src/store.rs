//! Object storage through `object_store`: a URL (`file://`, `s3://`, `gs://`,
//! `az://`, `http(s)://`, or a plain path, which means a local file) becomes
//! a [`Location`] that can be sized, range-read, streamed and written. Stores
//! are built once per bucket and shared.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};

use crate::error::{DataError, Result};

/// Settings for S3-compatible servers (MinIO, moto, Ceph); the usual
/// `AWS_*` environment variables are read as well.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageOptions {
    /// `--s3-endpoint` / `FLAMINGO_S3_ENDPOINT`, e.g. `http://127.0.0.1:9000`.
    pub s3_endpoint: Option<String>,
}

#[derive(Debug, Default)]
pub struct Storage {
    options: StorageOptions,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

/// One object: its store, its path in the store, and the URL users see.
#[derive(Debug, Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    url: String,
}

fn storage_error(url: &str, error: object_store::Error) -> DataError {
    match error {
        object_store::Error::NotFound { .. } => DataError::MissingShard {
            url: url.to_string(),
            message: "no such object".into(),
        },
        other => DataError::Storage {
            url: url.to_string(),
            message: other.to_string(),
        },
    }
}

impl Storage {
    pub fn new(options: StorageOptions) -> Self {
        Self {
            options,
            stores: Mutex::default(),
        }
    }

    /// Resolves a URL or a local path (relative paths against the current
    /// directory).
    pub fn resolve(&self, url: &str) -> Result<Location> {
        let failed = |message: String| DataError::Storage {
            url: url.to_string(),
            message,
        };
        let common = |error: flamingo_common::CommonError| match error {
            flamingo_common::CommonError::Storage { message, .. } => failed(message),
            other => failed(other.to_string()),
        };
        let parsed = flamingo_common::objects::parse(url).map_err(common)?;
        let scheme = parsed.scheme().to_string();
        let bucket_key = format!("{scheme}://{}", parsed.host_str().unwrap_or_default());
        let store = {
            let mut stores = self
                .stores
                .lock()
                .map_err(|_| failed("store registry poisoned".into()))?;
            match stores.get(&bucket_key) {
                Some(store) => store.clone(),
                None => {
                    let store =
                        flamingo_common::objects::build(&parsed, self.options.s3_endpoint.clone())
                            .map_err(common)?;
                    stores.insert(bucket_key, store.clone());
                    store
                }
            }
        };
        let path = flamingo_common::objects::path(&parsed).map_err(common)?;
        Ok(Location {
            store,
            path,
            url: if scheme == "file" {
                parsed.to_string()
            } else {
                url.to_string()
            },
        })
    }
}

impl Location {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object next to this one with `suffix` appended to its name.
    pub fn with_suffix(&self, suffix: &str) -> Self {
        Self {
            store: self.store.clone(),
            path: StorePath::from(format!("{}{suffix}", self.path)),
            url: format!("{}{suffix}", self.url),
        }
    }

    pub async fn size(&self) -> Result<u64> {
        self.store
            .head(&self.path)
            .await
            .map(|meta| meta.size)
            .map_err(|error| storage_error(&self.url, error))
    }

    pub async fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path, range)
            .await
            .map_err(|error| storage_error(&self.url, error))
    }

    /// Several ranges at once; the store coalesces close ones.
    pub async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.store
            .get_ranges(&self.path, ranges)
            .await
            .map_err(|error| storage_error(&self.url, error))
    }

    /// The whole object as a stream of chunks, for one sequential pass.
    pub async fn stream(&self) -> Result<BoxStream<'static, Result<Bytes>>> {
        let url = self.url.clone();
        let result = self
            .store
            .get(&self.path)
            .await
            .map_err(|error| storage_error(&self.url, error))?;
        Ok(result
            .into_stream()
            .map_err(move |error| storage_error(&url, error))
            .boxed())
    }

    /// The whole object, or `None` when it does not exist.
    pub async fn read_if_exists(&self) -> Result<Option<Bytes>> {
        match self.store.get(&self.path).await {
            Ok(result) => result
                .bytes()
                .await
                .map(Some)
                .map_err(|error| storage_error(&self.url, error)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(storage_error(&self.url, error)),
        }
    }

    pub async fn write(&self, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|error| storage_error(&self.url, error))
    }
}
