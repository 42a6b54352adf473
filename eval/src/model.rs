//! The model side of an evaluation: image and text batches, CLIP
//! embeddings for RICES (cached on disk), class-name log-likelihoods.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use flamingo_model::preprocess::clip_preprocess;
use flamingo_model::Flamingo;
use flamingo_preprocess::FlamingoTokenizer;
use flamingo_preprocess::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::datasets::{Dataset, Example};
use crate::error::{EvalError, Result};
use crate::run::Settings;
use flamingo_common::progress::Progress;

/// A model ready to evaluate.
pub struct Model {
    pub model: Flamingo,
    pub tokenizer: FlamingoTokenizer,
    pub device: Device,
    pub kind: Kind,
    pub image_size: usize,
    /// Identifies the weights in feature-cache keys (the spec's path and
    /// contents).
    pub identity: String,
}

/// Prompts are cut to this many tokens, as OpenFlamingo's evaluation cuts
/// them (from the right, as its tokenizer call does).
const MAX_PROMPT_TOKENS: usize = 2000;

/// Preprocessed images, kept while the run reuses them (demonstrations
/// recur across examples).
pub(crate) struct ImageCache {
    pub(crate) size: usize,
    pub(crate) kept: HashMap<PathBuf, Tensor>,
}

const IMAGE_CACHE_ENTRIES: usize = 4096;

impl ImageCache {
    pub(crate) fn get(&mut self, path: &Path) -> Result<Tensor> {
        if let Some(tensor) = self.kept.get(path) {
            return Ok(tensor.shallow_clone());
        }
        let image = RgbImage::open(path).map_err(|error| EvalError::Image {
            path: path.to_path_buf(),
            message: format!(
                "cannot read the image ({}); check the dataset's image folder",
                match error {
                    flamingo_preprocess::PreprocessError::File { message, .. } => message,
                    other => other.to_string(),
                }
            ),
        })?;
        let tensor = clip_preprocess(&image, self.size).map_err(|error| EvalError::Image {
            path: path.to_path_buf(),
            message: format!("cannot preprocess the image ({error})"),
        })?;
        if self.kept.len() < IMAGE_CACHE_ENTRIES {
            self.kept.insert(path.to_path_buf(), tensor.shallow_clone());
        }
        Ok(tensor)
    }
}

impl Model {
    pub(crate) fn images(&self, cache: &mut ImageCache, lists: &[Vec<&Path>]) -> Result<Tensor> {
        let longest = lists.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let size = self.image_size as i64;
        let batch = Tensor::zeros(
            [lists.len() as i64, longest, 1, 3, size, size],
            (Kind::Float, Device::Cpu),
        );
        for (row, paths) in lists.iter().enumerate() {
            for (slot, path) in paths.iter().enumerate() {
                batch
                    .get(row as i64)
                    .get(slot as i64)
                    .get(0)
                    .copy_(&cache.get(path)?);
            }
        }
        Ok(batch.to_device(self.device).to_kind(self.kind))
    }

    /// Token ids left-padded to the longest, and the attention mask.
    pub(crate) fn texts(&self, prompts: &[String]) -> Result<(Tensor, Tensor)> {
        let encoded = prompts
            .iter()
            .map(|prompt| {
                let mut tokens = self.tokenizer.encode(prompt, true)?;
                // OpenFlamingo's tokenizer call: truncation=True, max_length=2000.
                tokens.truncate(MAX_PROMPT_TOKENS);
                Ok(tokens)
            })
            .collect::<Result<Vec<_>>>()?;
        let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let pad = i64::from(self.tokenizer.pad_token_id());
        let mut ids = Vec::with_capacity(encoded.len() * longest);
        let mut mask = Vec::with_capacity(encoded.len() * longest);
        for tokens in &encoded {
            let padding = longest - tokens.len();
            ids.extend(std::iter::repeat_n(pad, padding));
            mask.extend(std::iter::repeat_n(0i64, padding));
            ids.extend(tokens.iter().map(|id| i64::from(*id)));
            mask.extend(std::iter::repeat_n(1i64, tokens.len()));
        }
        let shape = [encoded.len() as i64, longest as i64];
        Ok((
            Tensor::from_slice(&ids).view(shape).to_device(self.device),
            Tensor::from_slice(&mask).view(shape).to_device(self.device),
        ))
    }

    /// L2-normalised CLIP embeddings of `examples`' images, `[n, d]` on the
    /// CPU.
    pub(crate) fn embeddings(
        &self,
        cache: &mut ImageCache,
        examples: &[&Example],
        batch_size: usize,
    ) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in examples.chunks(batch_size.max(1)) {
            let pixels = chunk
                .iter()
                .map(|example| cache.get(&example.image))
                .collect::<Result<Vec<_>>>()?;
            let images = Tensor::stack(&pixels, 0)
                .to_device(self.device)
                .to_kind(self.kind);
            parts.push(self.model.image_embeddings(&images)?.to_device(Device::Cpu));
        }
        Ok(Tensor::cat(&parts, 0))
    }

    /// The training split's RICES features, from `dir` when cached there by
    /// an earlier run with the same model and images, else computed and
    /// cached.
    pub(crate) fn train_features(
        &self,
        cache: &mut ImageCache,
        dataset: &Dataset,
        settings: &Settings,
    ) -> Result<Tensor> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.identity.hash(&mut hasher);
        for example in &dataset.train {
            example.image.hash(&mut hasher);
        }
        let key = format!(
            "{}-{:016x}.safetensors",
            dataset.task.name(),
            hasher.finish()
        );
        let path = settings.features_dir.join(key);
        if let Ok(tensors) = Tensor::read_safetensors(&path) {
            if let Some((_, features)) = tensors.into_iter().find(|(name, _)| name == "features") {
                if features.size().first() == Some(&(dataset.train.len() as i64)) {
                    eprintln!(
                        "RICES: {} cached features from {}",
                        dataset.train.len(),
                        path.display()
                    );
                    return Ok(features);
                }
            }
        }
        let mut progress = Progress::new(
            format!("RICES features ({})", dataset.task.name()),
            Some(dataset.train.len() as u64),
        );
        let mut parts = Vec::new();
        let examples: Vec<&Example> = dataset.train.iter().collect();
        for chunk in examples.chunks(64) {
            parts.push(self.embeddings(cache, chunk, settings.batch_size)?);
            progress.advance(chunk.len() as u64);
        }
        let features = Tensor::cat(&parts, 0);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EvalError::Io { path, source }
        };
        std::fs::create_dir_all(&settings.features_dir).map_err(io(&settings.features_dir))?;
        // Ranks of a distributed run may compute the same features at once.
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        Tensor::write_safetensors(&[("features", &features)], &partial)?;
        std::fs::rename(&partial, &path).map_err(io(&path))?;
        eprintln!("RICES: features cached in {}", path.display());
        Ok(features)
    }
}

/// Class-name log-likelihoods (mean over each name's tokens), `[row][class]`.
pub(crate) fn class_rows(
    model: &Model,
    dataset: &Dataset,
    vision_x: &Tensor,
    lang_x: &Tensor,
    mask: &Tensor,
) -> Result<Vec<Vec<f64>>> {
    let classes = dataset
        .class_names
        .iter()
        .map(|name| {
            Ok(model
                .tokenizer
                .encode(name, false)?
                .into_iter()
                .map(i64::from)
                .collect::<Vec<i64>>())
        })
        .collect::<Result<Vec<_>>>()?;
    let logprobs = tch::no_grad(|| {
        model
            .model
            .class_logprobs(vision_x, lang_x, Some(mask), &classes, true)
    })?
    .to_device(Device::Cpu);
    Ok(Vec::<Vec<f64>>::try_from(&logprobs)?)
}
