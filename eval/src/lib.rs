//! The evaluation suite of OpenFlamingo (reference §4): datasets in their
//! published layouts, prompts, demonstration selection, decoding and the
//! metrics, each equal to the implementation the published numbers came
//! from.

pub mod datasets;
pub mod distributed;
pub mod error;
pub mod metrics;
pub mod model;
pub mod output;
pub mod prompts;
pub mod run;
pub mod score;
pub mod select;
pub mod synthetic;
pub mod testdev;

pub use error::{EvalError, Result};
