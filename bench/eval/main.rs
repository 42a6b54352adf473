//! `bench-eval`: samples/s of 4-shot COCO-style captioning with RICES
//! demonstrations, `flamingo_eval` against OpenFlamingo's own evaluation
//! (`reference.py`), on the same tiny random model, the same synthetic data
//! (Karpathy's layout), the same threads, in one run. Both sides build the
//! same prompts (tests/tests/eval.rs checks that) and decode with 3 beams;
//! neither side's RICES feature precomputation nor metric is timed. Prints
//! samples/s for both, the ratio flamingo / Python, and how many captions
//! are the same on both sides.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

#[path = "../baseline.rs"]
mod baseline;
use flamingo_eval::datasets::{self, Task};
use flamingo_eval::run::{self, Selection, Settings};
use flamingo_model::{load_flamingo, ModelSpec};

#[derive(Parser)]
#[command(about = "4-shot captioning throughput vs OpenFlamingo's evaluation")]
struct Args {
    /// Test images captioned.
    #[arg(long, default_value_t = 64)]
    samples: u64,
    /// Demonstration pool (RICES ranks all of it).
    #[arg(long, default_value_t = 128)]
    train: u64,
    /// Intra-op threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Python with torch and the reference packages (default: the venv's).
    #[arg(long)]
    python: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let python = baseline::python(args.python.as_deref());
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("coco");
    flamingo_eval::synthetic::write(Task::Coco, &data, args.train, args.samples, 32, 0)?;
    eprintln!(
        "timing OpenFlamingo's evaluation ({} images, 4 shots, RICES) …",
        args.samples
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("eval/reference.py");
    let threads = args.threads.to_string();
    let baseline = baseline::run(
        &python,
        &script,
        &[dir.path().as_os_str(), data.as_os_str(), threads.as_ref()],
        args.threads,
    )?;

    eprintln!("timing flamingo …");
    let spec_path = dir.path().join("model.toml");
    let spec = ModelSpec::from_file(&spec_path)?;
    let (model, tokenizer) = load_flamingo(&spec)?;
    let model = run::Model {
        model,
        tokenizer,
        device: tch::Device::Cpu,
        kind: tch::Kind::Float,
        image_size: spec.vision.image_size as usize,
        identity: spec_path.display().to_string(),
    };
    let dataset = datasets::load(Task::Coco, &data)?;
    let mut settings = Settings {
        shots: vec![4],
        seeds: vec![42],
        selection: Selection::Rices,
        num_samples: Some(1),
        batch_size: 8,
        num_beams: 3,
        ensemble: false,
        features_dir: dir.path().join("features"),
        rank: 0,
        world: 1,
        wordnet_dir: None,
    };
    // Warm-up on one image; it also caches the training split's features.
    run::predict(&model, &dataset, &settings)?;
    settings.num_samples = None;
    let started = Instant::now();
    let outputs = run::predict(&model, &dataset, &settings)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut ours: Vec<String> = outputs
        .iter()
        .flat_map(|(_, predictions)| predictions.iter().filter_map(|p| p.output.clone()))
        .collect();
    ours.sort();
    let samples = ours.len() as f64;

    let python_seconds = baseline["seconds"].as_f64().context("seconds")?;
    let python_samples = baseline["samples"].as_f64().context("samples")?;
    let theirs: Vec<String> = baseline["captions"]
        .as_array()
        .context("captions")?
        .iter()
        .filter_map(|caption| caption.as_str().map(str::to_string))
        .collect();
    let same = {
        let mut remaining = theirs.clone();
        ours.iter()
            .filter(|caption| {
                remaining
                    .iter()
                    .position(|other| other == *caption)
                    .map(|index| remaining.swap_remove(index))
                    .is_some()
            })
            .count()
    };
    let ours_rate = samples / seconds;
    let python_rate = python_samples / python_seconds;
    println!(
        "4-shot COCO-style captioning, RICES, 3 beams, fp32 CPU, {} thread(s), {} images\n",
        args.threads, args.samples
    );
    println!(
        "{:>18} {:>18} {:>7} {:>14}",
        "flamingo samples/s", "python samples/s", "ratio", "same captions"
    );
    println!(
        "{ours_rate:>18.2} {python_rate:>18.2} {:>7.2} {:>9}/{}",
        ours_rate / python_rate,
        same,
        ours.len()
    );
    Ok(())
}
