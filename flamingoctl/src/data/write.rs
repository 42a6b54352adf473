//! `data synth`, `data pack` and `data synth-eval`: writing shards (with
//! their indexes) and synthetic benchmarks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flamingo_common::progress::Progress;
use flamingo_data::pack::ShardWriter;
use flamingo_data::sources;
use flamingo_data::store::Storage;
use flamingo_data::synthetic;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct SynthEvalArgs {
    #[arg(long, value_enum)]
    dataset: flamingo_eval::datasets::Task,
    #[arg(long)]
    out: PathBuf,
    /// Training (demonstration) examples.
    #[arg(long, default_value_t = 64)]
    train: u64,
    #[arg(long, default_value_t = 16)]
    test: u64,
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    #[arg(long, value_parser = ["laion", "mmc4"])]
    form: String,
    /// Output folder (or object-store URL prefix).
    #[arg(long)]
    out: String,
    #[arg(long, default_value_t = 1000)]
    samples: u64,
    #[arg(long, default_value_t = 100)]
    per_shard: usize,
    #[arg(long, default_value_t = 96)]
    image_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Flaw about this fraction of the samples as crawled data is (MMC4:
    /// documents no image of which passes the similarity filter, bad base64,
    /// truncated JSON; LAION: no caption, truncated images), to see how
    /// training, the data tools and the dashboard handle them.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    flawed: f64,
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}

#[derive(Debug, clap::Args)]
pub struct PackArgs {
    #[arg(long, value_parser = ["laion", "mmc4"])]
    form: String,
    /// A folder (pairs) or a .jsonl file.
    #[arg(long)]
    input: PathBuf,
    /// MMC4: the folder holding the documents' images (by image_name).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Output shard pattern with `{}` for the shard number, e.g. out/shard-{}.tar.
    #[arg(long)]
    out: String,
    #[arg(long, default_value_t = 1000)]
    per_shard: usize,
}

pub fn synth_eval(args: &SynthEvalArgs, json_output: bool) -> anyhow::Result<()> {
    let (train, test) = (args.train, args.test);
    flamingo_eval::synthetic::write(
        args.dataset,
        &args.out,
        train,
        test,
        args.image_size,
        args.seed,
    )?;
    if json_output {
        println!("{}", json!({"out": args.out, "train": train, "test": test}));
    } else {
        println!(
            "wrote a synthetic {} benchmark ({train} train, {test} test) to {}",
            args.dataset.name(),
            args.out.display()
        );
    }
    Ok(())
}

pub async fn synth(args: &SynthArgs, json_output: bool) -> anyhow::Result<()> {
    let (form, out) = (args.form.as_str(), args.out.as_str());
    let local = super::local(out);
    if let Some(dir) = &local {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {out}"))?;
    }
    let storage = Storage::default();
    let pattern = format!("{}/{form}-{{}}.tar", out.trim_end_matches('/'));
    let mut writer = ShardWriter::new(&storage, &pattern, args.per_shard);
    let mut progress = Progress::new("samples written", Some(args.samples));
    for index in 0..args.samples {
        let sample = match form {
            "laion" => synthetic::laion_sample(args.seed, index, args.image_size),
            _ => synthetic::mmc4_sample(args.seed, index, args.image_size),
        };
        let (key, members) = synthetic::flawed(sample, args.seed, index, args.flawed);
        writer.add(&key, &members).await?;
        if index % 50 == 0 {
            progress.update(index + 1, "", None);
        }
    }
    progress.update(args.samples, "", None);
    let (shards, written) = writer.finish().await?;
    let seconds = progress.finish();
    let shard_pattern = ShardWriter::brace_pattern(&pattern, shards.len());
    let tokenizer = match &local {
        Some(dir) => Some(write_local_spec(dir, form, shards.len())?),
        None => None,
    };
    if json_output {
        println!(
            "{}",
            json!({"shards": shard_pattern, "samples": written, "tokenizer": tokenizer, "seconds": seconds})
        );
        return Ok(());
    }
    println!(
        "{written} samples in {} shards: {shard_pattern}",
        shards.len()
    );
    if local.is_some() {
        println!("spec: {}/{form}.toml", out.trim_end_matches('/'));
    }
    Ok(())
}

/// The synthetic dataset's tokenizer and `<form>.toml` spec in `dir`;
/// returns the tokenizer's folder.
fn write_local_spec(dir: &Path, form: &str, shards: usize) -> anyhow::Result<String> {
    let tokenizer = dir.join("tokenizer");
    synthetic::write_tokenizer(&tokenizer)?;
    let spec = format!(
        "dataset = \"{form}\"\nshards = \"{form}-{}.tar\"\ntokenizer = \"tokenizer\"\n",
        ShardWriter::brace_pattern("{}", shards)
    );
    std::fs::write(dir.join(format!("{form}.toml")), spec)?;
    Ok(tokenizer.display().to_string())
}

pub async fn pack(args: &PackArgs, json_output: bool) -> anyhow::Result<()> {
    let out = args.out.as_str();
    if !out.contains("{}") {
        bail!("--out must hold {{}} where the shard number goes, e.g. out/shard-{{}}.tar");
    }
    if let Some(parent) = super::local(out).as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(parent)?;
    }
    let storage = Storage::default();
    let mut writer = ShardWriter::new(&storage, out, args.per_shard);
    let mut progress = if args.form == "laion" {
        pack_pairs(&args.input, &mut writer).await?
    } else {
        let images = args
            .images
            .as_deref()
            .context("MMC4 documents need --images DIR, the folder of their images")?;
        pack_documents(&args.input, images, &mut writer).await?
    };
    let (shards, samples) = writer.finish().await?;
    let seconds = progress.finish();
    let pattern = ShardWriter::brace_pattern(out, shards.len());
    if json_output {
        println!(
            "{}",
            json!({"shards": pattern, "samples": samples, "seconds": seconds})
        );
    } else {
        println!("{samples} samples in {} shards: {pattern}", shards.len());
    }
    Ok(())
}

/// Image–text pairs: each image with its caption as `.txt`.
async fn pack_pairs(input: &Path, writer: &mut ShardWriter<'_>) -> anyhow::Result<Progress> {
    let pairs = sources::read_pairs(input)?;
    let mut progress = Progress::new("samples packed", Some(pairs.len() as u64));
    for (done, pair) in pairs.into_iter().enumerate() {
        let extension = sources::extension(&pair.image).unwrap_or_else(|| "jpg".into());
        let bytes = std::fs::read(&pair.image)
            .with_context(|| format!("reading {}", pair.image.display()))?;
        let members = [
            (extension, bytes),
            ("txt".into(), pair.caption.into_bytes()),
        ];
        writer.add(&pair.key, &members).await?;
        progress.update(done as u64 + 1, "", None);
    }
    Ok(progress)
}

/// MMC4 documents as `.json`, their images embedded.
async fn pack_documents(
    input: &Path,
    images: &Path,
    writer: &mut ShardWriter<'_>,
) -> anyhow::Result<Progress> {
    let mut progress = Progress::new("samples packed", None);
    for (done, (line, mut document)) in sources::read_documents(input)?.into_iter().enumerate() {
        for name in sources::embed_images(&mut document, images) {
            eprintln!("document {line}: image {name} missing or unreadable; left out");
        }
        let members = [("json".into(), document.to_string().into_bytes())];
        writer.add(&format!("{:09}", line - 1), &members).await?;
        progress.update(done as u64 + 1, "", None);
    }
    Ok(progress)
}
