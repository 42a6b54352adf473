//! The evaluation suite of OpenFlamingo (reference §4): the metrics first,
//! each equal to the implementation the published numbers came from.

pub mod datasets;
pub mod metrics;
pub mod prompts;
pub mod run;
pub mod select;
