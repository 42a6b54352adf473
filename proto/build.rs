//! Generates the flamingo.v1 messages and services with Debian's protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/flamingo/v1/flamingo.proto");
    println!("cargo:rerun-if-changed=proto/flamingo/v1/data.proto");
    tonic_prost_build::configure()
        // A batch's pixels are megabytes: decoded as a view of the received
        // buffer instead of a copy.
        .bytes(".flamingo.v1.Batch.images")
        .compile_protos(
            &[
                "proto/flamingo/v1/flamingo.proto",
                "proto/flamingo/v1/data.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
