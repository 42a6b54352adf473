//! `flamingoctl export RUN --out checkpoint.pt`: a run's checkpoint as
//! OpenFlamingo's trainable state dict, in `torch.save`'s format or as
//! safetensors.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A run folder (its latest checkpoint), a checkpoint folder, or a
    /// cluster job id (its latest committed checkpoint).
    run: PathBuf,
    /// Only `openflamingo` (the filtered trainable state dict).
    #[arg(long, default_value = "openflamingo")]
    format: String,
    /// A step of the run instead of the latest.
    #[arg(long)]
    step: Option<u64>,
    #[arg(long)]
    out: PathBuf,
}

pub async fn run(args: &ExportArgs, context: &Context) -> anyhow::Result<ExitCode> {
    if args.format != "openflamingo" {
        anyhow::bail!("--format {}: only openflamingo is supported", args.format);
    }
    let dir = crate::checkpoints::resolve(&context.address, &args.run, args.step).await?;
    let tensors = flamingo_engine::checkpoint::state_dict(&dir)?;
    let out = &args.out;
    match out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => tch::Tensor::write_safetensors(&tensors, out)?,
        Some("pt" | "bin" | "pth") => {
            flamingo_engine::checkpoint::write_torch_pickle(&tensors, out)?
        }
        _ => anyhow::bail!(
            "--out {}: name it .safetensors, or .pt for torch.save's format (OpenFlamingo's checkpoint.pt)",
            out.display()
        ),
    }
    if context.json {
        println!(
            "{}",
            serde_json::json!({"checkpoint": dir, "out": out, "tensors": tensors.len()})
        );
    } else {
        println!(
            "{} tensors from {} written to {}",
            tensors.len(),
            dir.display(),
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
