//! Arbitrary bytes as a shard: the tar reader and webdataset grouping must
//! report damage, never panic, whether the bytes come whole or in chunks.
#![no_main]

use flamingo_data::{index, tar};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = tar::parse(data, 0, true);
    let _ = index::group(&whole.members);
    // Streamed in two pieces, as the index builder reads.
    let cut = data.len() / 2;
    let first = tar::parse(&data[..cut], 0, false);
    let rest = &data[first.consumed as usize..];
    let _ = tar::parse(rest, first.consumed, true);
});
