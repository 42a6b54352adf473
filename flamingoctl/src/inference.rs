//! `flamingoctl score` and `generate`: run a Flamingo model from a model spec
//! on images and a prompt, on this machine: fp32 on the CPU by default,
//! `--device cuda --dtype bf16` on a GPU.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use flamingo_model::preprocess::clip_preprocess;
use flamingo_model::{load_flamingo_with, BeamSettings, Flamingo, LoadOptions, ModelSpec};
use flamingo_preprocess::{FlamingoTokenizer, RgbImage};
use serde_json::json;
use tch::{Kind, Tensor};

/// What both commands take.
#[derive(Debug, Clone, clap::Args)]
pub struct InferenceArgs {
    /// Model spec file (TOML: [vision], [language], [flamingo]).
    #[arg(long = "model")]
    pub model: PathBuf,
    /// An image (JPEG or PNG) per `<image>` in the prompt, in order.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The text, with one `<image>` per image.
    #[arg(long)]
    pub prompt: String,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = flamingo_model::device::parse_device)]
    pub device: tch::Device,
    /// Weight and activation precision: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32", value_parser = parse_dtype)]
    pub dtype: Kind,
}

pub fn parse_dtype(text: &str) -> Result<Kind, String> {
    match text {
        "fp32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "fp16" | "float16" => Ok(Kind::Half),
        other => Err(format!("'{other}' is not a dtype (fp32, bf16 or fp16)")),
    }
}

struct Prepared {
    model: Flamingo,
    tokenizer: FlamingoTokenizer,
    vision_x: Tensor,
    lang_x: Tensor,
    token_ids: Vec<u32>,
}

fn prepare(args: &InferenceArgs) -> anyhow::Result<Prepared> {
    let spec = ModelSpec::from_file(&args.model)?;
    if let tch::Device::Cuda(index) = args.device {
        flamingo_model::device::prepare(args.device)?;
        let available = tch::Cuda::device_count();
        if i64::try_from(index).unwrap_or(i64::MAX) >= available {
            bail!("--device cuda:{index}: this machine has {available} CUDA device(s) visible to libtorch");
        }
    }
    let options = LoadOptions {
        device: args.device,
        kind: args.dtype,
        ..LoadOptions::default()
    };
    let (model, tokenizer) = load_flamingo_with(&spec, options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let token_ids = tokenizer.encode(&args.prompt, true)?;
    let image_tokens = token_ids
        .iter()
        .filter(|id| **id == tokenizer.media_token_id())
        .count();
    if image_tokens != args.images.len() {
        bail!(
            "the prompt has {image_tokens} <image> token(s) but {} --image file(s) were given; give one image per <image>, in order",
            args.images.len()
        );
    }
    if args.images.is_empty() {
        bail!("give at least one --image and an <image> token in the prompt");
    }
    let size = spec.vision.image_size as usize;
    let pixels = args
        .images
        .iter()
        .map(|path| Ok(clip_preprocess(&RgbImage::open(path)?, size)?))
        .collect::<anyhow::Result<Vec<Tensor>>>()?;
    // [1 batch, T images, 1 frame, 3, h, w]
    let vision_x = Tensor::stack(&pixels, 0)
        .unsqueeze(0)
        .unsqueeze(2)
        .to_device(args.device)
        .to_kind(args.dtype);
    let ids: Vec<i64> = token_ids.iter().map(|id| i64::from(*id)).collect();
    let lang_x = Tensor::from_slice(&ids).unsqueeze(0).to_device(args.device);
    Ok(Prepared {
        model,
        tokenizer,
        vision_x,
        lang_x,
        token_ids,
    })
}

/// `logprobs[i] = log p(token_ids[i + 1] | token_ids[..=i])`.
pub fn score(args: &InferenceArgs, context: &crate::context::Context) -> anyhow::Result<ExitCode> {
    let json_output = context.json;
    let prepared = prepare(args)?;
    let logits = tch::no_grad(|| prepared.model.forward(&prepared.vision_x, &prepared.lang_x))?;
    let length = prepared.token_ids.len() as i64;
    let logprobs: Vec<f64> = if length < 2 {
        Vec::new()
    } else {
        let next = prepared
            .lang_x
            .to_device(tch::Device::Cpu)
            .narrow(1, 1, length - 1)
            .squeeze_dim(0)
            .unsqueeze(1);
        let all = logits
            .to_device(tch::Device::Cpu)
            .get(0)
            .narrow(0, 0, length - 1)
            .to_kind(Kind::Double)
            .log_softmax(-1, Kind::Double);
        Vec::<f64>::try_from(&all.gather(1, &next, false).squeeze_dim(1))?
    };
    if json_output {
        println!(
            "{}",
            json!({"token_ids": prepared.token_ids, "logprobs": logprobs})
        );
    } else {
        println!("{:>6}  {:>10}  token", "id", "logprob");
        println!(
            "{:>6}  {:>10}  {:?}",
            prepared.token_ids[0],
            "-",
            prepared.tokenizer.decode(&prepared.token_ids[..1], false)?
        );
        for (index, logprob) in logprobs.iter().enumerate() {
            let id = prepared.token_ids[index + 1];
            println!(
                "{id:>6}  {logprob:>10.4}  {:?}",
                prepared.tokenizer.decode(&[id], false)?
            );
        }
        println!("total log-probability {:.4}", logprobs.iter().sum::<f64>());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub inference: InferenceArgs,
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: i64,
    #[arg(long, default_value_t = 1)]
    pub num_beams: i64,
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    /// Print the prompt before the generated text (by default only the
    /// new text is printed).
    #[arg(long)]
    pub show_prompt: bool,
}

pub fn generate(
    args: &GenerateArgs,
    context: &crate::context::Context,
) -> anyhow::Result<ExitCode> {
    let json_output = context.json;
    if args.num_beams < 1 || args.max_new_tokens < 1 {
        bail!("--num-beams and --max-new-tokens must be at least 1");
    }
    let prepared = prepare(&args.inference)?;
    let eos = i64::from(prepared.tokenizer.end_of_chunk_token_id());
    let tokens = if args.num_beams == 1 {
        prepared.model.generate_greedy(
            &prepared.vision_x,
            &prepared.lang_x,
            None,
            args.max_new_tokens,
            eos,
        )?
    } else {
        let settings = BeamSettings {
            num_beams: args.num_beams,
            max_new_tokens: args.max_new_tokens,
            length_penalty: args.length_penalty,
            eos_token_id: eos,
            pad_token_id: i64::from(prepared.tokenizer.pad_token_id()),
        };
        prepared
            .model
            .generate_beam(&prepared.vision_x, &prepared.lang_x, None, settings)?
    };
    let token_ids: Vec<u32> = Vec::<i64>::try_from(&tokens.to_device(tch::Device::Cpu).get(0))?
        .into_iter()
        .map(|id| id as u32)
        .collect();
    let text = prepared.tokenizer.decode(&token_ids, true)?;
    if json_output {
        println!("{}", json!({"token_ids": token_ids, "text": text}));
    } else if args.show_prompt {
        println!("{}{text}", args.inference.prompt);
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}
