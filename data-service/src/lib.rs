//! flamingo's data service (library): object storage, webdataset shards and
//! their indexes, OpenFlamingo's LAION and MMC4 preprocessing, the
//! world-size-independent sample order, and the batch stream.

pub mod brace;
pub mod error;
pub mod index;
pub mod store;
pub mod tar;

pub use error::{DataError, Result};
pub mod assignment;
pub mod batch;
pub mod client;
pub mod convert;
pub mod inspect;
pub mod labels;
pub mod order;
pub mod pack;
pub mod prepare;
pub mod reader;
pub mod rng;
pub mod sample;
pub mod service;
pub mod spec;
pub mod synthetic;
