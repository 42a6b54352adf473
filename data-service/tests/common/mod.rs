//! Fixtures shared by the data-service tests: synthetic shards of known
//! keys (some of them corrupt) and their tokenizer.

#![allow(dead_code)]

use std::path::Path;

use std::sync::Arc;

use flamingo_data::batch::Assembler;
use flamingo_data::pack::ShardWriter;
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;
use flamingo_data::synthetic;

/// `shards` LAION shards of `per_shard` synthetic samples under `dir`, the
/// samples whose index is a multiple of `corrupt_every` given an image that
/// does not decode; plus the tokenizer in `dir/lm`. Returns the spec TOML.
pub async fn laion_fixture(
    dir: &Path,
    shards: usize,
    per_shard: usize,
    corrupt_every: u64,
) -> String {
    synthetic::write_tokenizer(&dir.join("lm")).expect("tokenizer written");
    let storage = Storage::default();
    let pattern = format!("{}/laion-{{}}.tar", dir.display());
    let mut writer = ShardWriter::new(&storage, &pattern, per_shard);
    for index in 0..(shards * per_shard) as u64 {
        let (key, mut members) = synthetic::laion_sample(9, index, 32);
        if corrupt_every > 0 && index % corrupt_every == corrupt_every - 1 {
            members[0].1 = b"\x89PNG but not really".to_vec();
        }
        writer.add(&key, &members).await.expect("sample written");
    }
    let (written, _) = writer.finish().await.expect("shards written");
    format!(
        "dataset = \"laion\"\nshards = \"{}\"\ntokenizer = \"{}\"\nimage_size = 16\nshuffle_block = 10\n",
        ShardWriter::brace_pattern(&pattern, written.len()),
        dir.join("lm").display()
    )
}

/// The keys whose samples decode (not corrupted by [`laion_fixture`]).
pub fn good_keys(shards: usize, per_shard: usize, corrupt_every: u64) -> Vec<String> {
    (0..(shards * per_shard) as u64)
        .filter(|index| corrupt_every == 0 || index % corrupt_every != corrupt_every - 1)
        .map(|index| format!("{index:09}"))
        .collect()
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
