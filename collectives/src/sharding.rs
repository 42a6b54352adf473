//! Even sharding of flat buffers whose length need not divide by the world
//! size: every rank holds `shard_len(total, world)` elements and the last
//! shards carry zero padding (the layout FSDP's flat parameters use).

/// Elements each rank holds for a flat buffer of `total` elements.
pub fn shard_len(total: i64, world_size: i64) -> i64 {
    assert!(world_size > 0, "world size must be positive");
    (total + world_size - 1) / world_size
}

/// The `[start, end)` range of the unpadded buffer that `rank` owns; empty
/// when the rank holds only padding.
pub fn shard_range(total: i64, world_size: i64, rank: i64) -> (i64, i64) {
    let len = shard_len(total, world_size);
    let start = (rank * len).min(total);
    let end = ((rank + 1) * len).min(total);
    (start, end)
}

/// `total` rounded up to a multiple of `world_size`.
pub fn pad_to_multiple(total: i64, world_size: i64) -> i64 {
    shard_len(total, world_size) * world_size
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shards_cover_buffer_exactly_once(total in 0i64..10_000, world in 1i64..65) {
            let mut covered = 0;
            let mut previous_end = 0;
            for rank in 0..world {
                let (start, end) = shard_range(total, world, rank);
                prop_assert_eq!(start, previous_end);
                prop_assert!(end - start <= shard_len(total, world));
                covered += end - start;
                previous_end = end;
            }
            prop_assert_eq!(covered, total);
            prop_assert!(pad_to_multiple(total, world) >= total);
            prop_assert!(pad_to_multiple(total, world) - total < world);
        }
    }
}
