//! Which test examples are scored and which demonstrations each one gets
//! (reference §4.1).
//!
//! Random selection follows OpenFlamingo's procedure with our own seeded
//! generator: the seed picks the test subset and a query set of
//! `query_set_size` training examples, and each test example samples its
//! demonstrations from the query set without replacement. Each example's
//! draw depends only on the seed and the example, never on the rank or the
//! batch, so any number of ranks gives the same prompts.
//!
//! RICES ranks the whole training split by cosine similarity of CLIP image
//! embeddings to the query image and keeps the top k, most similar last.

use flamingo_common::rng::Rng;
use tch::{Kind, Tensor};

/// The purposes of the evaluation's draws, keyed under the seed (distinct
/// from the data service's tags, though the two never share a seed's use).
mod purpose {
    pub const EVAL: u64 = 0xe7a1;
    pub const TEST_SUBSET: u64 = 1;
    pub const QUERY_SET: u64 = 2;
    pub const DEMONSTRATIONS: u64 = 3;
    pub const ENSEMBLE_SHUFFLE: u64 = 4;
}

/// Indices of the test examples to score: all of them in order, or
/// `num_samples` drawn without replacement (in ascending order).
pub fn test_subset(test_len: usize, num_samples: Option<usize>, seed: u64) -> Vec<usize> {
    match num_samples {
        Some(count) if count < test_len => {
            let mut chosen =
                Rng::keyed(&[seed, purpose::EVAL, purpose::TEST_SUBSET]).sample(test_len, count);
            chosen.sort_unstable();
            chosen
        }
        _ => (0..test_len).collect(),
    }
}

/// The training examples random demonstrations are drawn from.
pub fn query_set(train_len: usize, query_set_size: usize, seed: u64) -> Vec<usize> {
    if query_set_size >= train_len {
        return (0..train_len).collect();
    }
    Rng::keyed(&[seed, purpose::EVAL, purpose::QUERY_SET]).sample(train_len, query_set_size)
}

/// `shots` demonstrations for test example `test_index`, from `query_set`.
pub fn random_demos(query_set: &[usize], shots: usize, seed: u64, test_index: usize) -> Vec<usize> {
    let count = shots.min(query_set.len());
    Rng::keyed(&[
        seed,
        purpose::EVAL,
        purpose::DEMONSTRATIONS,
        test_index as u64,
    ])
    .sample(query_set.len(), count)
    .into_iter()
    .map(|position| query_set[position])
    .collect()
}

/// Shuffles `demos` in place for ensemble member `order` of test example
/// `test_index` (prompt ensembling; each shuffle continues from the last).
pub fn shuffle(demos: &mut [usize], seed: u64, test_index: usize, order: usize) {
    Rng::keyed(&[
        seed,
        purpose::EVAL,
        purpose::ENSEMBLE_SHUFFLE,
        test_index as u64,
        order as u64,
    ])
    .shuffle(demos);
}

/// The `shots` training examples most similar to each query, most similar
/// last. `train` `[n, d]` and `queries` `[q, d]` are L2-normalised; ties
/// go to the lower index.
pub fn rices(train: &Tensor, queries: &Tensor, shots: usize) -> Vec<Vec<usize>> {
    let similarity = queries
        .to_kind(Kind::Float)
        .matmul(&train.to_kind(Kind::Float).transpose(0, 1));
    let rows: Vec<Vec<f32>> =
        Vec::<Vec<f32>>::try_from(&similarity).expect("a similarity matrix is a 2-D float tensor");
    rows.into_iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
            order.truncate(shots);
            order.reverse();
            order
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_selection_is_seeded_and_per_example() {
        let pool = query_set(100, 10, 42);
        assert_eq!(pool.len(), 10);
        assert_eq!(pool, query_set(100, 10, 42));
        assert_ne!(pool, query_set(100, 10, 43));
        let demos = random_demos(&pool, 4, 42, 7);
        assert_eq!(demos, random_demos(&pool, 4, 42, 7));
        assert_ne!(demos, random_demos(&pool, 4, 42, 8));
        let mut unique = demos.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 4, "demos are drawn without replacement");
        assert!(demos.iter().all(|demo| pool.contains(demo)));
        assert_eq!(test_subset(5, None, 1), vec![0, 1, 2, 3, 4]);
        let subset = test_subset(50, Some(5), 1);
        assert_eq!(subset.len(), 5);
        assert!(subset.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn ensemble_shuffles_are_seeded_permutations() {
        let mut a = vec![3, 1, 4, 5, 9];
        let mut b = a.clone();
        shuffle(&mut a, 42, 7, 1);
        shuffle(&mut b, 42, 7, 1);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 3, 4, 5, 9]);
    }

    #[test]
    fn rices_puts_the_most_similar_last() {
        let train = Tensor::from_slice2(&[[1.0f32, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]]);
        let queries = Tensor::from_slice2(&[[1.0f32, 0.0], [0.0, 1.0]]);
        assert_eq!(
            rices(&train, &queries, 3),
            vec![vec![1, 3, 0], vec![3, 1, 2]]
        );
    }
}
