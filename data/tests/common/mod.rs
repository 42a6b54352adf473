//! Fixtures shared by the data library's tests: synthetic shards of known
//! keys (some of them corrupt) and their tokenizer.

#![allow(dead_code)]

use std::path::Path;

use std::sync::Arc;

use flamingo_data::batch::Assembler;
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::synthetic;

/// See [`synthetic::write_laion_fixture`].
pub async fn laion_fixture(
    dir: &Path,
    shards: usize,
    per_shard: usize,
    corrupt_every: u64,
) -> String {
    synthetic::write_laion_fixture(dir, shards, per_shard, corrupt_every)
        .await
        .expect("fixture written")
}

/// The keys whose samples decode (not corrupted by [`laion_fixture`]).
pub fn good_keys(shards: usize, per_shard: usize, corrupt_every: u64) -> Vec<String> {
    synthetic::laion_fixture_good_keys(shards, per_shard, corrupt_every)
}

/// An assembler over `dataset` with two preprocessing threads.
pub fn assembler(dataset: Arc<Dataset>, spec: &DataSpec, seed: u64) -> Assembler {
    let preparer = Arc::new(Preparer::new(spec).expect("preparer"));
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool"),
    );
    Assembler::new(dataset, preparer, pool, seed)
}
