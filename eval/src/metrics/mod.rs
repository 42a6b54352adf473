//! Metrics, each checked against its reference implementation in
//! `eval/tests/metric_parity.rs` (OK-VQA's stemming in
//! `eval/tests/okvqa_parity.rs`).

pub mod cider;
pub mod okvqa;
pub mod roc;
pub mod vqa;

/// `value` rounded to `digits` decimals as Python's `round` does (the
/// exact binary value, ties to even); the reference reports round so.
pub fn round_like_python(value: f64, digits: usize) -> f64 {
    format!("{value:.digits$}").parse().unwrap_or(value)
}
