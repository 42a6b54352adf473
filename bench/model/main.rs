//! `bench-model`: forward and greedy-generate throughput of flamingo's model
//! against the Python OpenFlamingo on the same random weights, same inputs,
//! same thread count, in one run. The Python side (`reference.py`) builds
//! each model, writes it in the released formats, and times itself; this
//! side loads those files through a model spec and times the same work.
//! Prints tokens/s for both and the ratio flamingo / Python (>1: faster).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

#[path = "../baseline.rs"]
mod baseline;
use flamingo_model::{load_flamingo, ModelSpec, Weights};

#[derive(Parser)]
#[command(about = "Flamingo forward/generate throughput vs the Python OpenFlamingo")]
struct Args {
    /// Model sizes to run (tiny, 100m).
    #[arg(long, value_delimiter = ',', default_value = "tiny,100m")]
    sizes: Vec<String>,
    /// Intra-op threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Python with torch and the reference packages (default: the venv's).
    #[arg(long)]
    python: Option<PathBuf>,
}

const REPEATS: u32 = 5;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let python = baseline::python(args.python.as_deref());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model/reference.py");
    println!(
        "Flamingo, fp32 CPU, {} thread(s); throughput in tokens/s; ratio = flamingo / Python OpenFlamingo\n",
        args.threads
    );
    println!(
        "{:<6} {:>11} {:>16} {:>16} {:>7} {:>16} {:>16} {:>7}",
        "size",
        "parameters",
        "forward flamingo",
        "forward python",
        "ratio",
        "generate flamingo",
        "generate python",
        "ratio"
    );
    for size in &args.sizes {
        let dir = tempfile::tempdir()?;
        eprintln!("{size}: building the model and timing Python …");
        let threads = args.threads.to_string();
        let baseline = baseline::run(
            &python,
            &script,
            &[dir.path().as_os_str(), size.as_ref(), threads.as_ref()],
            args.threads,
        )?;
        eprintln!("{size}: timing flamingo …");
        let spec = ModelSpec::from_file(&dir.path().join("model.toml"))?;
        let (model, _tokenizer) = load_flamingo(&spec)?;
        let mut inputs = Weights::read(&dir.path().join("inputs.pt"))?;
        let ids = inputs.remove("ids").context("inputs.pt: ids")?;
        let vision_x = inputs.remove("vision_x").context("inputs.pt: vision_x")?;
        let prompt_tokens = baseline["prompt_tokens"].as_f64().unwrap_or(64.0);
        let new_tokens = baseline["new_tokens"].as_i64().unwrap_or(32);

        let _warm_up = tch::no_grad(|| model.forward(&vision_x, &ids))?;
        let started = Instant::now();
        for _ in 0..REPEATS {
            let _logits = tch::no_grad(|| model.forward(&vision_x, &ids))?;
        }
        let forward_seconds = started.elapsed().as_secs_f64() / f64::from(REPEATS);
        // An EOS that never occurs: always exactly `new_tokens`, as the
        // baseline's min_new_tokens forces.
        let _warm_up = model.generate_greedy(&vision_x, &ids, None, 4, -1)?;
        let started = Instant::now();
        for _ in 0..REPEATS {
            let _tokens = model.generate_greedy(&vision_x, &ids, None, new_tokens, -1)?;
        }
        let generate_seconds = started.elapsed().as_secs_f64() / f64::from(REPEATS);

        let python_forward = baseline["forward_seconds"]
            .as_f64()
            .context("forward_seconds")?;
        let python_generate = baseline["generate_seconds"]
            .as_f64()
            .context("generate_seconds")?;
        let ours_forward_rate = prompt_tokens / forward_seconds;
        let python_forward_rate = prompt_tokens / python_forward;
        let ours_generate_rate = new_tokens as f64 / generate_seconds;
        let python_generate_rate = new_tokens as f64 / python_generate;
        println!(
            "{:<6} {:>10.1}M {:>16.1} {:>16.1} {:>7.3} {:>16.1} {:>16.1} {:>7.3}",
            size,
            baseline["parameters"].as_f64().unwrap_or(0.0) / 1e6,
            ours_forward_rate,
            python_forward_rate,
            ours_forward_rate / python_forward_rate,
            ours_generate_rate,
            python_generate_rate,
            ours_generate_rate / python_generate_rate
        );
    }
    Ok(())
}
