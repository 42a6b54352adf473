//! `data index`, `data inspect` and `data bench`: reading shards as
//! training would.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flamingo_common::progress::Progress;
use flamingo_data::accept::{self, Verdict};
use flamingo_data::index::ShardIndex;
use flamingo_data::inspect::for_each_sample;
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::sample::{Prepared, Skipped};
use flamingo_data::spec::DataSpec;
use flamingo_data::store::Storage;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct IndexArgs {
    /// A shard pattern (`s3://b/x-{00000..00099}.tar`) or a dataset spec file (.toml).
    spec: String,
    /// Rebuild indexes that exist.
    #[arg(long)]
    force: bool,
    /// Also judge every sample (preprocess it as training would) and store
    /// which pass the spec's filters (`<shard>.accept-<fingerprint>.json`):
    /// data service replicas then split a job's preprocessing instead of
    /// each doing all of it. Needs a dataset spec file.
    #[arg(long)]
    accept: bool,
    /// Preprocessing threads for --accept (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, env = "FLAMINGO_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[arg(long, value_parser = ["laion", "mmc4"])]
    dataset: String,
    /// Shard pattern.
    #[arg(long)]
    shards: String,
    /// LM dir with tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// No flips and no random drop of single-image documents.
    #[arg(long)]
    no_augment: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many samples.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, env = "FLAMINGO_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Dataset spec file (.toml).
    spec: PathBuf,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 500)]
    samples: usize,
}

pub async fn index(args: &IndexArgs, json_output: bool) -> anyhow::Result<()> {
    let spec = &args.spec;
    if args.accept {
        return judge(args, json_output).await;
    }
    let urls = if spec.ends_with(".toml") && Path::new(spec).exists() {
        DataSpec::from_file(Path::new(spec))?
            .shards()?
            .into_iter()
            .map(|shard| shard.url)
            .collect()
    } else {
        flamingo_data::brace::expand(spec)?
    };
    let storage = super::storage(args.s3_endpoint.clone());
    let mut progress = Progress::new("indexed", Some(urls.len() as u64)).counting("shards");
    let mut samples = 0u64;
    let mut damaged = Vec::new();
    for (number, url) in urls.iter().enumerate() {
        let location = storage.resolve(url)?;
        let index = if args.force {
            let index = ShardIndex::build(&location).await?;
            index.write(&location).await?;
            index
        } else {
            ShardIndex::load_or_build(&location).await?
        };
        samples += index.samples.len() as u64;
        if let Some(error) = &index.error {
            damaged.push(json!({"shard": url, "error": error, "samples": index.samples.len()}));
        }
        progress.update(number as u64 + 1, &format!("({samples} samples)"), None);
    }
    let seconds = progress.finish();
    if json_output {
        let summary = json!({"shards": urls.len(), "samples": samples, "damaged": damaged, "seconds": seconds});
        println!("{summary}");
        return Ok(());
    }
    println!(
        "{} shards, {samples} samples indexed in {seconds:.1}s",
        urls.len()
    );
    for shard in &damaged {
        println!(
            "damaged: {} ({}); {} samples before the damage",
            shard["shard"], shard["error"], shard["samples"]
        );
    }
    Ok(())
}

/// `data index --accept`: every shard's verdicts, judged where missing.
async fn judge(args: &IndexArgs, json_output: bool) -> anyhow::Result<()> {
    if !args.spec.ends_with(".toml") {
        anyhow::bail!(
            "--accept needs a dataset spec file (.toml), not a shard pattern: the verdicts \
             depend on the spec's filters and tokenizer"
        );
    }
    let spec = DataSpec::from_file(Path::new(&args.spec))?;
    let storage = super::storage(args.s3_endpoint.clone());
    let dataset = Dataset::open(&spec, &storage).await?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let total = dataset.samples();
    let mut progress = Progress::new("judged", Some(total)).counting("samples");
    let judged = accept::judge_dataset(&spec, &dataset, threads, args.force, |done, url| {
        progress.update(done, url, None)
    })
    .await?;
    let (fingerprint, judged_shards, kept_shards) = (
        judged.fingerprint,
        judged.judged_shards,
        judged.current_shards,
    );
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    for verdict in judged.verdicts.iter().flatten() {
        let outcome = match verdict {
            Verdict::Accept => "accepted",
            Verdict::Single => "accepted unless the single-image drop falls",
            Verdict::SingleAtEnd => "image_at_end (or single_image_dropped)",
            Verdict::Reject(reject) => reject.reason.as_str(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    let seconds = progress.finish();
    if json_output {
        let summary = json!({
            "shards": dataset.shards.len(), "judged": judged_shards, "current": kept_shards,
            "samples": total, "fingerprint": fingerprint, "outcomes": outcomes, "seconds": seconds,
        });
        println!("{summary}");
        return Ok(());
    }
    println!(
        "{} shards ({judged_shards} judged, {kept_shards} already current), {total} samples in \
         {seconds:.1}s; fingerprint {fingerprint}",
        dataset.shards.len()
    );
    for (outcome, count) in &outcomes {
        let share = 100.0 * *count as f64 / total.max(1) as f64;
        println!("  {count:>9} ({share:5.1}%) {outcome}");
    }
    Ok(())
}

/// One sample as `data inspect` prints it.
fn sample_line(sample: &Result<Prepared, Skipped>, json_output: bool) -> String {
    match (sample, json_output) {
        (Ok(sample), true) => json!({
            "key": sample.key,
            "input_ids": sample.input_ids,
            "attention_mask": sample.attention_mask,
            "labels": sample.labels,
            "num_images": sample.images.len(),
            "image_order": sample.image_order,
        })
        .to_string(),
        (Ok(sample), false) => {
            let tokens = sample.attention_mask.iter().filter(|m| **m == 1).count();
            format!(
                "{}  {tokens} tokens, {} image(s) {:?}",
                sample.key,
                sample.images.len(),
                sample.image_order
            )
        }
        (Err(skipped), true) => json!({
            "key": skipped.key,
            "rejected": skipped.reject.reason.as_str(),
            "detail": skipped.reject.detail,
        })
        .to_string(),
        (Err(skipped), false) => format!(
            "{}  rejected: {} ({}) in {}",
            skipped.key, skipped.reject.reason, skipped.reject.detail, skipped.shard
        ),
    }
}

pub async fn inspect(args: &InspectArgs, json_output: bool) -> anyhow::Result<()> {
    let text = format!(
        "dataset = {:?}\nshards = {:?}\ntokenizer = {:?}\naugment = {}\n",
        args.dataset,
        args.shards,
        args.tokenizer.display().to_string(),
        !args.no_augment
    );
    let spec = DataSpec::from_toml(&text, Some(&std::env::current_dir()?))?;
    let dataset = Dataset::open(&spec, &super::storage(args.s3_endpoint.clone())).await?;
    let preparer = Arc::new(Preparer::new(&spec)?);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let (mut kept, mut shown) = (0u64, 0usize);
    let mut out = std::io::stdout().lock();
    for_each_sample(&dataset, &preparer, args.seed, |sample| {
        if args.limit.is_some_and(|limit| shown >= limit) {
            return;
        }
        shown += 1;
        match &sample {
            Ok(_) => kept += 1,
            Err(skipped) => {
                *reasons
                    .entry(skipped.reject.reason.to_string())
                    .or_default() += 1
            }
        }
        let _ = writeln!(out, "{}", sample_line(&sample, json_output));
    })
    .await?;
    let skipped: u64 = reasons.values().sum();
    let summary: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    eprintln!(
        "{kept} kept, {skipped} skipped{}",
        if summary.is_empty() {
            String::new()
        } else {
            format!(" ({})", summary.join(", "))
        }
    );
    Ok(())
}

pub async fn bench(args: &BenchArgs, json_output: bool) -> anyhow::Result<()> {
    let spec = DataSpec::from_file(&args.spec)?;
    let dataset = Dataset::open(&spec, &Storage::default()).await?;
    let preparer = Arc::new(Preparer::new(&spec)?);
    let order = dataset.order(0, 0);
    let refs = order.samples(0..(args.samples as u64).min(order.len()));
    let raws: Vec<_> = dataset.read(&refs).await?.into_iter().flatten().collect();
    let threads = args.threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let started = std::time::Instant::now();
    let kept = {
        use rayon::prelude::*;
        pool.install(|| {
            raws.par_iter()
                .filter(|raw| preparer.prepare(raw, Default::default()).is_ok())
                .count()
        })
    };
    let seconds = started.elapsed().as_secs_f64();
    let rate = raws.len() as f64 / seconds;
    if json_output {
        println!(
            "{}",
            json!({"samples": raws.len(), "kept": kept, "threads": args.threads, "seconds": seconds, "samples_per_second": rate, "per_core": rate / args.threads as f64})
        );
    } else {
        println!(
            "{} samples ({kept} kept) in {seconds:.2}s on {} thread(s): {rate:.1} samples/s, {:.1} per core",
            raws.len(),
            args.threads,
            rate / args.threads as f64
        );
    }
    Ok(())
}
