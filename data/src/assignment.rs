//! One-to-one image–sentence assignment maximising total similarity (the
//! Hungarian algorithm), as MMC4's own `compute_assignments.py` pairs
//! images with sentences. OpenFlamingo's `preprocess_interleaved` instead
//! takes each image's best sentence (several images may share one); that is
//! the default (`mmc4.assignment = "best_sentence"`) for parity.

/// For each row (image) of `similarity` (`rows × columns`, rectangular),
/// the column (sentence) it is assigned, so that no column is used twice
/// and the total similarity is maximal. With more rows than columns, some
/// rows get none.
pub fn one_to_one(similarity: &[Vec<f64>]) -> Vec<Option<usize>> {
    let rows = similarity.len();
    let columns = similarity.first().map_or(0, Vec::len);
    if rows == 0 || columns == 0 {
        return vec![None; rows];
    }
    if rows > columns {
        // Assign each column a distinct row instead.
        let transposed: Vec<Vec<f64>> = (0..columns)
            .map(|column| (0..rows).map(|row| similarity[row][column]).collect())
            .collect();
        let mut out = vec![None; rows];
        for (column, row) in one_to_one(&transposed).into_iter().enumerate() {
            if let Some(row) = row {
                out[row] = Some(column);
            }
        }
        return out;
    }
    // Minimise cost = -similarity over rows ≤ columns (potentials method,
    // 1-based with a virtual row/column 0).
    let cost = |row: usize, column: usize| -similarity[row - 1][column - 1];
    let mut u = vec![0.0f64; rows + 1];
    let mut v = vec![0.0f64; columns + 1];
    let mut owner = vec![0usize; columns + 1];
    let mut way = vec![0usize; columns + 1];
    for row in 1..=rows {
        owner[0] = row;
        let mut column0 = 0usize;
        let mut min_to = vec![f64::INFINITY; columns + 1];
        let mut used = vec![false; columns + 1];
        loop {
            used[column0] = true;
            let row0 = owner[column0];
            let mut delta = f64::INFINITY;
            let mut column1 = 0usize;
            for column in 1..=columns {
                if !used[column] {
                    let reduced = cost(row0, column) - u[row0] - v[column];
                    if reduced < min_to[column] {
                        min_to[column] = reduced;
                        way[column] = column0;
                    }
                    if min_to[column] < delta {
                        delta = min_to[column];
                        column1 = column;
                    }
                }
            }
            for column in 0..=columns {
                if used[column] {
                    u[owner[column]] += delta;
                    v[column] -= delta;
                } else {
                    min_to[column] -= delta;
                }
            }
            column0 = column1;
            if owner[column0] == 0 {
                break;
            }
        }
        loop {
            let previous = way[column0];
            owner[column0] = owner[previous];
            column0 = previous;
            if column0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![None; rows];
    for column in 1..=columns {
        if owner[column] != 0 {
            out[owner[column] - 1] = Some(column - 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn total(similarity: &[Vec<f64>], assignment: &[Option<usize>]) -> f64 {
        assignment
            .iter()
            .enumerate()
            .filter_map(|(row, column)| column.map(|column| similarity[row][column]))
            .sum()
    }

    /// The best total by trying every injective assignment (the reference).
    fn brute_force(similarity: &[Vec<f64>]) -> f64 {
        fn search(similarity: &[Vec<f64>], row: usize, used: &mut Vec<bool>, must: usize) -> f64 {
            if row == similarity.len() {
                return 0.0;
            }
            let mut best = f64::NEG_INFINITY;
            let left = similarity.len() - row;
            // A row may stay unassigned only when there are more rows than columns.
            if left > must {
                best = search(similarity, row + 1, used, must);
            }
            for column in 0..used.len() {
                if !used[column] {
                    used[column] = true;
                    let value = similarity[row][column]
                        + search(similarity, row + 1, used, must.saturating_sub(1));
                    used[column] = false;
                    best = best.max(value);
                }
            }
            best
        }
        let columns = similarity[0].len();
        let assigned = similarity.len().min(columns);
        search(similarity, 0, &mut vec![false; columns], assigned)
    }

    proptest! {
        #[test]
        fn matches_brute_force(rows in 1usize..5, columns in 1usize..6, seed in 0u64..1000) {
            let mut rng = flamingo_common::rng::Rng::keyed(&[seed]);
            let similarity: Vec<Vec<f64>> = (0..rows)
                .map(|_| (0..columns).map(|_| (rng.below(100) as f64) / 100.0).collect())
                .collect();
            let assignment = one_to_one(&similarity);
            let mut seen: Vec<usize> = assignment.iter().flatten().copied().collect();
            prop_assert_eq!(seen.len(), rows.min(columns));
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), rows.min(columns), "no sentence twice");
            prop_assert!((total(&similarity, &assignment) - brute_force(&similarity)).abs() < 1e-9);
        }
    }

    #[test]
    fn two_images_wanting_one_sentence_are_split() {
        let similarity = vec![vec![0.9, 0.5], vec![0.8, 0.1]];
        // Best-sentence would give both sentence 0; one-to-one gives 0.5+0.8.
        assert_eq!(one_to_one(&similarity), [Some(1), Some(0)]);
    }
}
