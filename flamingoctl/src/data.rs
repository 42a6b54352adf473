//! `flamingoctl data`: index shards, inspect what training would see,
//! write shards (pack, synthetic), and measure preprocessing speed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use flamingo_common::progress::Progress;
use flamingo_data::index::ShardIndex;
use flamingo_data::inspect::for_each_sample;
use flamingo_data::pack::ShardWriter;
use flamingo_data::prepare::Preparer;
use flamingo_data::reader::Dataset;
use flamingo_data::sample::{Prepared, Skipped};
use flamingo_data::spec::DataSpec;
use flamingo_data::store::{Storage, StorageOptions};
use flamingo_data::{brace, synthetic};
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Record each shard's samples and byte offsets next to it (SHARDS.index.json).
    Index {
        /// A shard pattern (`s3://b/x-{00000..00099}.tar`) or a dataset spec file (.toml).
        spec: String,
        /// Rebuild indexes that exist.
        #[arg(long)]
        force: bool,
        #[arg(long, env = "FLAMINGO_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
    },
    /// Print each sample as training would see it, in shard order.
    Inspect {
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
    },
    /// Write a synthetic shapes benchmark in the layout OpenFlamingo's
    /// evaluation reads for --dataset (captions, questions about colours and
    /// shapes, "red means hateful", shape classes), for tests and demos.
    SynthEval {
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
    },
    /// Write the synthetic shapes dataset (LAION or MMC4 form) and its tokenizer.
    Synth {
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
    },
    /// Write shards from image–text pairs (a folder of images with same-name
    /// .txt captions, or JSONL with "image" and "caption"), or from MMC4
    /// documents (JSONL, images in --images), as OpenFlamingo's conversion
    /// scripts do.
    Pack {
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
    },
    /// Preprocessing throughput of a dataset spec on this machine.
    Bench {
        /// Dataset spec file (.toml).
        spec: PathBuf,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 500)]
        samples: usize,
    },
}

fn storage(s3_endpoint: Option<String>) -> Storage {
    Storage::new(StorageOptions { s3_endpoint })
}

pub async fn run(command: DataCommand, json_output: bool) -> anyhow::Result<()> {
    match command {
        DataCommand::Index {
            spec,
            force,
            s3_endpoint,
        } => index(&spec, force, s3_endpoint, json_output).await,
        DataCommand::Inspect {
            dataset,
            shards,
            tokenizer,
            no_augment,
            seed,
            limit,
            s3_endpoint,
        } => {
            let text = format!(
                "dataset = {dataset:?}\nshards = {shards:?}\ntokenizer = {:?}\naugment = {}\n",
                tokenizer.display().to_string(),
                !no_augment
            );
            let spec = DataSpec::from_toml(&text, Some(&std::env::current_dir()?))?;
            inspect(&spec, seed, limit, s3_endpoint, json_output).await
        }
        DataCommand::SynthEval {
            dataset,
            out,
            train,
            test,
            image_size,
            seed,
        } => {
            synth_eval(dataset, &out, train, test, image_size, seed)?;
            if json_output {
                println!("{}", json!({"out": out, "train": train, "test": test}));
            } else {
                println!(
                    "wrote a synthetic {} benchmark ({train} train, {test} test) to {}",
                    dataset.name(),
                    out.display()
                );
            }
            Ok(())
        }
        DataCommand::Synth {
            form,
            out,
            samples,
            per_shard,
            image_size,
            seed,
        } => {
            synth(
                &form,
                &out,
                samples,
                per_shard,
                image_size,
                seed,
                json_output,
            )
            .await
        }
        DataCommand::Pack {
            form,
            input,
            images,
            out,
            per_shard,
        } => {
            pack(
                &form,
                &input,
                images.as_deref(),
                &out,
                per_shard,
                json_output,
            )
            .await
        }
        DataCommand::Bench {
            spec,
            threads,
            samples,
        } => bench(&spec, threads, samples, json_output).await,
    }
}

async fn index(
    spec: &str,
    force: bool,
    s3_endpoint: Option<String>,
    json_output: bool,
) -> anyhow::Result<()> {
    let urls = if spec.ends_with(".toml") && Path::new(spec).exists() {
        DataSpec::from_file(Path::new(spec))?
            .shards()?
            .into_iter()
            .map(|shard| shard.url)
            .collect()
    } else {
        brace::expand(spec)?
    };
    let storage = storage(s3_endpoint);
    let mut progress = Progress::new("indexed", Some(urls.len() as u64)).counting("shards");
    let mut samples = 0u64;
    let mut damaged = Vec::new();
    for (number, url) in urls.iter().enumerate() {
        let location = storage.resolve(url)?;
        let index = if force {
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
        println!(
            "{}",
            json!({"shards": urls.len(), "samples": samples, "damaged": damaged, "seconds": seconds})
        );
    } else {
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
    }
    Ok(())
}

async fn inspect(
    spec: &DataSpec,
    seed: u64,
    limit: Option<usize>,
    s3_endpoint: Option<String>,
    json_output: bool,
) -> anyhow::Result<()> {
    let storage = storage(s3_endpoint);
    let dataset = Dataset::open(spec, &storage).await?;
    let preparer = Arc::new(Preparer::new(spec)?);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept = 0u64;
    let mut shown = 0usize;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for_each_sample(&dataset, &preparer, seed, |sample: Result<Prepared, Skipped>| {
        if limit.is_some_and(|limit| shown >= limit) {
            return;
        }
        shown += 1;
        let line = match &sample {
            Ok(sample) => {
                kept += 1;
                if json_output {
                    json!({
                        "key": sample.key,
                        "input_ids": sample.input_ids,
                        "attention_mask": sample.attention_mask,
                        "labels": sample.labels,
                        "num_images": sample.images.len(),
                        "image_order": sample.image_order,
                    })
                    .to_string()
                } else {
                    let tokens = sample.attention_mask.iter().filter(|m| **m == 1).count();
                    format!(
                        "{}  {tokens} tokens, {} image(s) {:?}",
                        sample.key,
                        sample.images.len(),
                        sample.image_order
                    )
                }
            }
            Err(skipped) => {
                *reasons.entry(skipped.reject.reason.to_string()).or_default() += 1;
                if json_output {
                    json!({"key": skipped.key, "rejected": skipped.reject.reason.as_str(), "detail": skipped.reject.detail}).to_string()
                } else {
                    format!(
                        "{}  rejected: {} ({}) in {}",
                        skipped.key, skipped.reject.reason, skipped.reject.detail, skipped.shard
                    )
                }
            }
        };
        let _ = writeln!(out, "{line}");
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

async fn synth(
    form: &str,
    out: &str,
    samples: u64,
    per_shard: usize,
    image_size: usize,
    seed: u64,
    json_output: bool,
) -> anyhow::Result<()> {
    let storage = Storage::default();
    let local = !out.contains("://");
    if local {
        std::fs::create_dir_all(out).with_context(|| format!("creating {out}"))?;
    }
    let pattern = format!("{}/{form}-{{}}.tar", out.trim_end_matches('/'));
    let mut writer = ShardWriter::new(&storage, &pattern, per_shard);
    let mut progress = Progress::new("samples written", Some(samples));
    for index in 0..samples {
        let (key, members) = match form {
            "laion" => synthetic::laion_sample(seed, index, image_size),
            _ => synthetic::mmc4_sample(seed, index, image_size),
        };
        writer.add(&key, &members).await?;
        if index % 50 == 0 {
            progress.update(index + 1, "", None);
        }
    }
    progress.update(samples, "", None);
    let (shards, written) = writer.finish().await?;
    let seconds = progress.finish();
    let shard_pattern = ShardWriter::brace_pattern(&pattern, shards.len());
    let mut tokenizer = None;
    if local {
        let dir = Path::new(out).join("tokenizer");
        synthetic::write_tokenizer(&dir)?;
        let spec = format!(
            "dataset = \"{form}\"\nshards = \"{form}-{}.tar\"\ntokenizer = \"tokenizer\"\n",
            ShardWriter::brace_pattern("{}", shards.len())
        );
        std::fs::write(Path::new(out).join(format!("{form}.toml")), spec)?;
        tokenizer = Some(dir.display().to_string());
    }
    if json_output {
        println!(
            "{}",
            json!({"shards": shard_pattern, "samples": written, "tokenizer": tokenizer, "seconds": seconds})
        );
    } else {
        println!(
            "{written} samples in {} shards: {shard_pattern}",
            shards.len()
        );
        if local {
            println!("spec: {}/{form}.toml", out.trim_end_matches('/'));
        }
    }
    Ok(())
}

fn read_pairs(input: &Path) -> anyhow::Result<Vec<(String, PathBuf, String)>> {
    let mut pairs = Vec::new();
    if input.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(input)?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .collect();
        entries.sort();
        for path in entries {
            let extension = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_lowercase)
                .unwrap_or_default();
            if !matches!(extension.as_str(), "jpg" | "jpeg" | "png") {
                continue;
            }
            let caption_path = path.with_extension("txt");
            let Ok(caption) = std::fs::read_to_string(&caption_path) else {
                eprintln!("skipping {}: no {}", path.display(), caption_path.display());
                continue;
            };
            let key = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .replace('.', "_");
            pairs.push((key, path, caption));
        }
    } else {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?;
        let base = input.parent().unwrap_or(Path::new("."));
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let value: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", input.display(), number + 1))?;
            let image = value["image"].as_str().with_context(|| {
                format!("{} line {}: no \"image\" path", input.display(), number + 1)
            })?;
            let caption = value["caption"]
                .as_str()
                .or(value["text"].as_str())
                .with_context(|| {
                    format!("{} line {}: no \"caption\"", input.display(), number + 1)
                })?;
            pairs.push((
                format!("{number:09}"),
                base.join(image),
                caption.to_string(),
            ));
        }
    }
    Ok(pairs)
}

async fn pack(
    form: &str,
    input: &Path,
    images: Option<&Path>,
    out: &str,
    per_shard: usize,
    json_output: bool,
) -> anyhow::Result<()> {
    if !out.contains("{}") {
        bail!("--out must hold {{}} where the shard number goes, e.g. out/shard-{{}}.tar");
    }
    if let Some(parent) = Path::new(out).parent().filter(|_| !out.contains("://")) {
        std::fs::create_dir_all(parent)?;
    }
    let storage = Storage::default();
    let mut writer = ShardWriter::new(&storage, out, per_shard);
    let mut progress = Progress::new("samples packed", None);
    let mut done = 0u64;
    if form == "laion" {
        let pairs = read_pairs(input)?;
        progress = Progress::new("samples packed", Some(pairs.len() as u64));
        for (key, image, caption) in pairs {
            let extension = image
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_lowercase)
                .unwrap_or_else(|| "jpg".into());
            let bytes =
                std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            writer
                .add(
                    &key,
                    &[(extension, bytes), ("txt".into(), caption.into_bytes())],
                )
                .await?;
            done += 1;
            progress.update(done, "", None);
        }
    } else {
        let images =
            images.context("MMC4 documents need --images DIR, the folder of their images")?;
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?;
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut doc: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", input.display(), number + 1))?;
            if let Some(infos) = doc["image_info"].as_array_mut() {
                for info in infos {
                    let Some(name) = info["image_name"].as_str() else {
                        continue;
                    };
                    // Re-encoded as JPEG, as convert_mmc4_to_wds.py does.
                    match std::fs::read(images.join(name))
                        .ok()
                        .and_then(|bytes| image::load_from_memory(&bytes).ok())
                    {
                        Some(decoded) => {
                            let mut jpeg = Vec::new();
                            decoded.to_rgb8().write_to(
                                &mut std::io::Cursor::new(&mut jpeg),
                                image::ImageFormat::Jpeg,
                            )?;
                            use base64::Engine as _;
                            info["image_base64"] =
                                json!(base64::engine::general_purpose::STANDARD.encode(jpeg));
                        }
                        None => eprintln!(
                            "document {}: image {name} missing or unreadable; left out",
                            number + 1
                        ),
                    }
                }
            }
            writer
                .add(
                    &format!("{number:09}"),
                    &[("json".into(), doc.to_string().into_bytes())],
                )
                .await?;
            done += 1;
            progress.update(done, "", None);
        }
    }
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

async fn bench(
    spec_path: &Path,
    threads: usize,
    samples: usize,
    json_output: bool,
) -> anyhow::Result<()> {
    let spec = DataSpec::from_file(spec_path)?;
    let storage = Storage::default();
    let dataset = Dataset::open(&spec, &storage).await?;
    let preparer = Arc::new(Preparer::new(&spec)?);
    let order = dataset.order(0, 0);
    let refs = order.samples(0..(samples as u64).min(order.len()));
    let raws = dataset.read(&refs).await?;
    let raws: Vec<_> = raws.into_iter().flatten().collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let started = std::time::Instant::now();
    let kept = {
        use rayon::prelude::*;
        let preparer = preparer.clone();
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
            json!({"samples": raws.len(), "kept": kept, "threads": threads, "seconds": seconds, "samples_per_second": rate, "per_core": rate / threads as f64})
        );
    } else {
        println!(
            "{} samples ({kept} kept) in {seconds:.2}s on {threads} thread(s): {rate:.1} samples/s, {:.1} per core",
            raws.len(),
            rate / threads as f64
        );
    }
    Ok(())
}

/// Writes the synthetic benchmark for `task` under `out` in its real layout.
pub fn synth_eval(
    task: flamingo_eval::datasets::Task,
    out: &Path,
    train: u64,
    test: u64,
    size: usize,
    seed: u64,
) -> anyhow::Result<()> {
    use flamingo_eval::datasets::Task;
    let write = |path: PathBuf, bytes: &[u8]| -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    let splits = [("train", 0u64, train), ("test", 1u64, test)];
    match task {
        Task::Coco | Task::Flickr30k => {
            let mut images = Vec::new();
            for (split, code, count) in splits {
                for index in 0..count {
                    let (scene, png) = synthetic::eval_scene(seed, code, index, size);
                    let id = code * 1_000_000 + index;
                    let (folder, filename) = if task == Task::Coco {
                        let folder = if split == "train" {
                            "train2014"
                        } else {
                            "val2014"
                        };
                        (folder.to_string(), format!("COCO_{folder}_{id:012}.jpg"))
                    } else {
                        ("flickr30k-images".to_string(), format!("{id}.jpg"))
                    };
                    write(out.join(&folder).join(&filename), &png)?;
                    let caption = scene.caption();
                    images.push(json!({
                        "filepath": folder, "filename": filename, "split": split,
                        "cocoid": id, "imgid": images.len(),
                        "sentences": [{"raw": format!("{caption}."), "tokens": caption.split(' ').collect::<Vec<_>>()},
                                      {"raw": caption, "tokens": []}],
                    }));
                }
            }
            let name = if task == Task::Coco {
                "dataset_coco.json"
            } else {
                "dataset_flickr30k.json"
            };
            let dataset = if task == Task::Coco {
                "coco"
            } else {
                "flickr30k"
            };
            write(
                out.join(name),
                json!({"images": images, "dataset": dataset})
                    .to_string()
                    .as_bytes(),
            )?;
        }
        Task::Vqav2 | Task::OkVqa | Task::Textvqa | Task::Vizwiz => {
            for (split, code, count) in splits {
                let split = if split == "test" { "val" } else { split };
                let mut questions = Vec::new();
                let mut annotations = Vec::new();
                for index in 0..count {
                    let (scene, png) = synthetic::eval_scene(seed, code, index, size);
                    let image_id = code * 1_000_000 + index;
                    let question_id = image_id * 10;
                    let (image_value, path, questions_name, annotations_name) = match task {
                        Task::Vqav2 => (
                            json!(image_id),
                            out.join(format!("{split}2014/COCO_{split}2014_{image_id:012}.jpg")),
                            format!("v2_OpenEnded_mscoco_{split}2014_questions.json"),
                            format!("v2_mscoco_{split}2014_annotations.json"),
                        ),
                        Task::OkVqa => (
                            json!(image_id),
                            out.join(format!("{split}2014/COCO_{split}2014_{image_id:012}.jpg")),
                            format!("OpenEnded_mscoco_{split}2014_questions.json"),
                            format!("mscoco_{split}2014_annotations.json"),
                        ),
                        Task::Textvqa => (
                            json!(format!("{image_id:016x}")),
                            out.join(format!("train_images/{image_id:016x}.jpg")),
                            format!("{split}_questions_vqa_format.json"),
                            format!("{split}_annotations_vqa_format.json"),
                        ),
                        _ => (
                            json!(format!("VizWiz_{split}_{image_id:08}.jpg")),
                            out.join(format!("{split}/VizWiz_{split}_{image_id:08}.jpg")),
                            format!("{split}_questions_vqa_format.json"),
                            format!("{split}_annotations_vqa_format.json"),
                        ),
                    };
                    write(path, &png)?;
                    let (question, answer) = scene.question(index);
                    questions.push(json!({"image_id": image_value, "question": question, "question_id": question_id}));
                    let answers: Vec<_> = (1..=10)
                        .map(|n| {
                            let mut entry = json!({"answer": answer, "answer_confidence": "yes", "answer_id": n});
                            // OK-VQA v1.1 keeps each answer raw and stemmed
                            // (shapes and colours stem to themselves).
                            if task == Task::OkVqa {
                                entry["raw_answer"] = json!(answer);
                            }
                            entry
                        })
                        .collect();
                    annotations.push(json!({"question_id": question_id, "image_id": image_value,
                        "answers": answers, "multiple_choice_answer": answer,
                        "question_type": "what", "answer_type": "other"}));
                    if index + 1 == count {
                        write(
                            out.join(&questions_name),
                            json!({"questions": questions}).to_string().as_bytes(),
                        )?;
                        write(
                            out.join(&annotations_name),
                            json!({"annotations": annotations}).to_string().as_bytes(),
                        )?;
                    }
                }
            }
        }
        Task::HatefulMemes => {
            for (split, code, count) in splits {
                let file = if split == "train" {
                    "train.json"
                } else {
                    "dev.json"
                };
                let mut lines = String::new();
                for index in 0..count {
                    let (scene, png) = synthetic::eval_scene(seed, code, index, size);
                    let id = code * 100_000 + index;
                    write(out.join(format!("img/{id:05}.png")), &png)?;
                    lines.push_str(
                        &json!({"id": id, "img": format!("img/{id:05}.png"),
                        "label": u8::from(scene.has_red()), "text": scene.caption()})
                        .to_string(),
                    );
                    lines.push('\n');
                }
                write(out.join(file), lines.as_bytes())?;
            }
        }
        Task::Imagenet => {
            for (split, code, count) in splits {
                let folder = if split == "train" { "train" } else { "val" };
                for index in 0..count {
                    let (scene, png) = synthetic::eval_scene(seed, code, index, size);
                    write(
                        out.join(format!("{folder}/{}/{index:05}.png", scene.shape_name())),
                        &png,
                    )?;
                }
            }
        }
    }
    Ok(())
}
