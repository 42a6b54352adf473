//! `flamingoctl model convert`: PyTorch pickles rewritten once as
//! safetensors (see `flamingo_model::convert`).

use std::path::PathBuf;
use std::process::ExitCode;

use flamingo_common::progress::Progress;
use flamingo_model::convert;

use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Rewrite a PyTorch pickle (OpenFlamingo's checkpoint.pt, an LM's
    /// pytorch_model.bin or its shard index, or an LM folder holding one)
    /// as safetensors, which every rank can read by byte range: names,
    /// dtypes and shapes kept; split as save_pretrained splits.
    Convert(ConvertArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The pickle, its `.index.json`, or a Hugging Face LM folder.
    input: PathBuf,
    /// Where to write (`*.safetensors`; default next to the input:
    /// `checkpoint.pt` → `checkpoint.safetensors`, `pytorch_model.bin` →
    /// `model.safetensors`, with `-0000k-of-0000n` shards and an
    /// `.index.json` past --max-shard-gb).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The most tensor data per file, in GB.
    #[arg(long, default_value_t = 5.0)]
    max_shard_gb: f64,
}

pub fn run(command: &ModelCommand, context: &Context) -> anyhow::Result<ExitCode> {
    let ModelCommand::Convert(args) = command;
    if !(args.max_shard_gb.is_finite() && args.max_shard_gb > 0.0) {
        anyhow::bail!(
            "--max-shard-gb {}: must be a positive number",
            args.max_shard_gb
        );
    }
    let started = std::time::Instant::now();
    // The total is known once the pickle is read.
    let mut progress: Option<Progress> = None;
    let converted = convert::convert(
        &args.input,
        args.out.as_deref(),
        (args.max_shard_gb * 1e9) as u64,
        |done, total| {
            progress
                .get_or_insert_with(|| Progress::new("written", Some(total)).counting("bytes"))
                .update(done, "", None)
        },
    )?;
    if let Some(progress) = progress.as_mut() {
        progress.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    if context.json {
        println!(
            "{}",
            serde_json::json!({
                "files": converted.files, "tensors": converted.tensors,
                "bytes": converted.bytes, "seconds": seconds,
            })
        );
    } else {
        println!(
            "{} tensors ({:.2} GB) in {:.1}s written to {}",
            converted.tensors,
            converted.bytes as f64 / 1e9,
            seconds,
            converted
                .files
                .iter()
                .map(|file| file.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "point the model spec at it; safetensors come before pytorch_model.bin in an LM folder"
        );
    }
    Ok(ExitCode::SUCCESS)
}
