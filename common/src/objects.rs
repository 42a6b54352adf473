//! Object stores by URL, shared by the data service (shards) and the
//! coordinator (metrics archive): `file://` (or a plain path), `s3://`
//! (with `FLAMINGO_S3_ENDPOINT` or an explicit endpoint for S3-compatible
//! servers such as MinIO or moto), `gs://`, `az://` and `http(s)://`. The
//! usual `AWS_*`, `GOOGLE_*` and `AZURE_*` environment variables are read.

use std::sync::Arc;

use object_store::ObjectStore;

use crate::CommonError;

fn storage_error(url: &url::Url, message: impl Into<String>) -> CommonError {
    CommonError::Storage {
        url: url.to_string(),
        message: message.into(),
    }
}

/// A parsed store URL: absolute paths become `file://` URLs.
pub fn parse(url: &str) -> Result<url::Url, CommonError> {
    let failed = |message: String| CommonError::Storage {
        url: url.to_string(),
        message,
    };
    match url::Url::parse(url) {
        Ok(parsed) if parsed.scheme().len() > 1 => Ok(parsed),
        _ => {
            let path = std::path::absolute(url).map_err(|error| failed(error.to_string()))?;
            url::Url::from_file_path(&path).map_err(|()| failed("not a valid local path".into()))
        }
    }
}

/// The store that holds `parsed` (one per bucket/host).
pub fn build(
    parsed: &url::Url,
    s3_endpoint: Option<String>,
) -> Result<Arc<dyn ObjectStore>, CommonError> {
    let failed = |error: object_store::Error| {
        storage_error(parsed, format!("cannot configure storage: {error}"))
    };
    let origin = format!("{}://{}", parsed.scheme(), parsed.authority());
    let store: Arc<dyn ObjectStore> = match parsed.scheme() {
        "file" => Arc::new(object_store::local::LocalFileSystem::new()),
        "s3" | "s3a" => {
            let mut builder =
                object_store::aws::AmazonS3Builder::from_env().with_url(origin.as_str());
            let endpoint = s3_endpoint.or_else(|| std::env::var("FLAMINGO_S3_ENDPOINT").ok());
            if let Some(endpoint) = endpoint {
                builder = builder
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            Arc::new(builder.build().map_err(failed)?)
        }
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(origin.as_str())
                .build()
                .map_err(failed)?,
        ),
        "az" | "abfs" | "abfss" | "azure" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(origin.as_str())
                .build()
                .map_err(failed)?,
        ),
        "http" | "https" => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(origin.as_str())
                .build()
                .map_err(failed)?,
        ),
        other => {
            return Err(storage_error(
                parsed,
                format!(
                    "unsupported scheme '{other}' (use file://, s3://, gs://, az:// or http(s)://)"
                ),
            ))
        }
    };
    Ok(store)
}

/// The object path of `parsed` within its store.
pub fn path(parsed: &url::Url) -> Result<object_store::path::Path, CommonError> {
    let failed = |message: String| storage_error(parsed, message);
    if parsed.scheme() == "file" {
        let local = parsed
            .to_file_path()
            .map_err(|()| failed("not a valid file URL".into()))?;
        object_store::path::Path::from_absolute_path(&local)
            .map_err(|error| failed(error.to_string()))
    } else {
        object_store::path::Path::from_url_path(parsed.path())
            .map_err(|error| failed(error.to_string()))
    }
}
