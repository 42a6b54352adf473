//! flamingo's data library: object storage, webdataset shards and their
//! indexes, OpenFlamingo's LAION and MMC4 preprocessing, the
//! world-size-independent sample order, global batches and their rank
//! slices, and the client of the data service (`flamingo-data-service`,
//! which serves these batches over gRPC). It links no libtorch: batches
//! leave it as bytes ([`convert`]), and the engine makes tensors of them.

/// Brace patterns (`shard-{00000..00099}.tar`), as webdataset expands them.
pub mod brace {
    use crate::error::{DataError, Result};

    /// Expands `pattern` into the URLs it names, in order.
    pub fn expand(pattern: &str) -> Result<Vec<String>> {
        flamingo_common::brace::expand(pattern).map_err(|error| match error {
            flamingo_common::CommonError::InvalidField { field, message } => {
                DataError::spec(&field, message)
            }
            other => DataError::spec("shards", other.to_string()),
        })
    }
}
pub mod error;
pub mod index;
pub mod store;
pub mod tar;

pub use error::{DataError, Result};
pub mod accept;
pub mod assignment;
pub mod batch;
pub mod client;
pub mod convert;
pub mod inspect;
pub mod labels;
pub mod order;
pub mod pack;
pub mod prepare;
pub mod purpose;
pub mod reader;
pub mod sample;
pub mod sources;
pub mod spec;
pub mod synthetic;
