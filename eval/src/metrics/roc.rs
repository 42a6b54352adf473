//! ROC-AUC as scikit-learn's `roc_auc_score` computes it for binary labels
//! (HatefulMemes): the ROC curve's points at each distinct score, from the
//! highest down (tied scores form one point), and the trapezoidal area
//! under them.

use crate::{EvalError, Result};

fn error(message: impl Into<String>) -> EvalError {
    EvalError::Metric {
        metric: "ROC-AUC",
        message: message.into(),
    }
}

/// The area under the ROC curve of `scores` for `labels` (true = the
/// positive class). Both classes must be present, as scikit-learn requires.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Result<f64> {
    if labels.len() != scores.len() {
        return Err(error(format!(
            "{} labels but {} scores",
            labels.len(),
            scores.len()
        )));
    }
    if let Some(index) = scores.iter().position(|score| !score.is_finite()) {
        return Err(error(format!("score {index} is {}", scores[index])));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    // Cumulative true and false positives at the end of each run of equal
    // scores.
    let (mut true_positives, mut false_positives) = (0.0f64, 0.0f64);
    let mut points = vec![(0.0f64, 0.0f64)];
    for (rank, &index) in order.iter().enumerate() {
        if labels[index] {
            true_positives += 1.0;
        } else {
            false_positives += 1.0;
        }
        let last_of_run = order
            .get(rank + 1)
            .is_none_or(|&next| scores[next] != scores[index]);
        if last_of_run {
            points.push((false_positives, true_positives));
        }
    }
    if true_positives == 0.0 || false_positives == 0.0 {
        return Err(error(
            "ROC-AUC needs both classes among the labels; only one is present",
        ));
    }
    let area = points
        .windows(2)
        .map(|pair| {
            let (x0, y0) = (pair[0].0 / false_positives, pair[0].1 / true_positives);
            let (x1, y1) = (pair[1].0 / false_positives, pair[1].1 / true_positives);
            (x1 - x0) * (y0 + y1) / 2.0
        })
        .sum();
    Ok(area)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_ranking_scores_one_and_a_reversed_one_zero() {
        let labels = [true, true, false, false];
        assert_eq!(roc_auc(&labels, &[0.9, 0.8, 0.2, 0.1]).unwrap(), 1.0);
        assert_eq!(roc_auc(&labels, &[0.1, 0.2, 0.8, 0.9]).unwrap(), 0.0);
    }

    #[test]
    fn ties_count_half() {
        assert_eq!(roc_auc(&[true, false], &[0.5, 0.5]).unwrap(), 0.5);
    }

    #[test]
    fn one_class_or_mismatched_lengths_are_errors() {
        assert!(roc_auc(&[true, true], &[0.1, 0.2]).is_err());
        assert!(roc_auc(&[true, false], &[0.1]).is_err());
        assert!(roc_auc(&[true, false], &[0.1, f64::NAN]).is_err());
    }
}
