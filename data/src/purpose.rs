//! The data service's purpose tags for [`flamingo_common::rng::Rng::keyed`],
//! so that no two of its random decisions share a stream. Changing one
//! changes every job's data order.

pub const SHARD_ORDER: u64 = 1;
pub const BLOCK_SHUFFLE: u64 = 2;
pub const RESAMPLE: u64 = 3;
pub const FLIP: u64 = 4;
pub const SINGLE_IMAGE_DROP: u64 = 5;
