//! Generated gRPC code for `flamingo.v1`. Services convert these types into
//! their own domain types in a `convert.rs`; logic never matches on them.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("flamingo.v1");
}

/// Version of the node protocol; agents send it when they register and the
/// coordinator refuses a mismatch.
pub const PROTOCOL_VERSION: u32 = 2;
