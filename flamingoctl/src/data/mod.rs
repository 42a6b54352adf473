//! `flamingoctl data`: index shards, inspect what training would see,
//! write shards (pack, synthetic), write synthetic benchmarks, and measure
//! preprocessing speed.

use std::path::PathBuf;
use std::process::ExitCode;

use flamingo_data::store::{Storage, StorageOptions};

use crate::context::Context;

mod shards;
mod write;

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Record each shard's samples and byte offsets next to it (SHARDS.index.json).
    Index(shards::IndexArgs),
    /// Print each sample as training would see it, in shard order.
    Inspect(shards::InspectArgs),
    /// Write a synthetic shapes benchmark in the layout OpenFlamingo's
    /// evaluation reads for --dataset (captions, questions about colours and
    /// shapes, "red means hateful", shape classes), for tests and demos.
    SynthEval(write::SynthEvalArgs),
    /// Write the synthetic shapes dataset (LAION or MMC4 form) and its tokenizer.
    Synth(write::SynthArgs),
    /// Write shards from image–text pairs (a folder of images with same-name
    /// .txt captions, or JSONL with "image" and "caption"), or from MMC4
    /// documents (JSONL, images in --images), as OpenFlamingo's conversion
    /// scripts do.
    Pack(write::PackArgs),
    /// Preprocessing throughput of a dataset spec on this machine.
    Bench(shards::BenchArgs),
}

pub async fn run(command: DataCommand, context: &Context) -> anyhow::Result<ExitCode> {
    let json = context.json;
    match command {
        DataCommand::Index(args) => shards::index(&args, json).await?,
        DataCommand::Inspect(args) => shards::inspect(&args, json).await?,
        DataCommand::Bench(args) => shards::bench(&args, json).await?,
        DataCommand::SynthEval(args) => write::synth_eval(&args, json)?,
        DataCommand::Synth(args) => write::synth(&args, json).await?,
        DataCommand::Pack(args) => write::pack(&args, json).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Object storage, with an S3-compatible endpoint when given.
fn storage(s3_endpoint: Option<String>) -> Storage {
    Storage::new(StorageOptions { s3_endpoint })
}

/// `--out`-style paths made for a local folder (not an object-store URL).
fn local(out: &str) -> Option<PathBuf> {
    (!out.contains("://")).then(|| PathBuf::from(out))
}
