//! `flamingoctl tiny-model`: a tiny random Flamingo (open_clip and MPT
//! files and a model spec) for tests and demos.

use std::path::PathBuf;
use std::process::ExitCode;

use flamingo_engine::tiny::{write_tiny_model, TinyConfig};

#[derive(Debug, clap::Args)]
pub struct TinyModelArgs {
    /// LM tokenizer dir (tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Width of the language model (its heads are width / 8).
    #[arg(long, default_value_t = 32)]
    lm_width: i64,
    #[arg(long, default_value_t = 2)]
    lm_layers: i64,
    /// Width of the vision tower (its images are 32 px, patches 8 px).
    #[arg(long, default_value_t = 32)]
    vision_width: i64,
}

pub fn run(args: &TinyModelArgs) -> anyhow::Result<ExitCode> {
    // The tokenizer's own vocabulary: OpenFlamingo's three tokens are added
    // by the model's loader.
    let vocab = flamingo_preprocess::FlamingoTokenizer::from_dir(&args.tokenizer)?.len() as i64 - 3;
    let spec = write_tiny_model(
        &args.out,
        &args.tokenizer,
        vocab,
        TinyConfig {
            seed: args.seed,
            lm_width: args.lm_width,
            lm_heads: (args.lm_width / 8).max(1),
            lm_layers: args.lm_layers,
            vision_width: args.vision_width,
            ..Default::default()
        },
    )?;
    println!("{}", spec.display());
    Ok(ExitCode::SUCCESS)
}
