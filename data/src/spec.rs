//! The dataset spec: what to read and how to prepare it. Written as TOML
//! (a file, or inside a job config); relative paths resolve against the
//! spec file's folder.
//!
//! ```toml
//! dataset = "mmc4"                      # or "laion"
//! shards = "s3://bucket/mmc4/{00000..00999}.tar"
//! tokenizer = "lm"                      # LM dir with tokenizer.json
//! resampled = false                     # true: shards drawn with replacement
//! samples_per_epoch = 0                 # 0: the whole dataset (required when resampled)
//! shuffle_block = 1000                  # samples shuffled within blocks of this size (0: off)
//! [mmc4]
//! sim_threshold = 0.24
//! ```
//!
//! Several sources can be mixed: `[[sources]]` tables with `shards` and
//! `weight` (weights need `resampled = true`: a shard is drawn with
//! probability proportional to its source's weight divided by the source's
//! shard count).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::brace;
use crate::error::{DataError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Laion,
    Mmc4,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub shards: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}
fn default_block() -> u64 {
    1000
}
fn default_image_size() -> u32 {
    224
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaionOptions {
    #[serde(default = "LaionOptions::default_max_tokens")]
    pub max_tokens: u32,
}

impl LaionOptions {
    fn default_max_tokens() -> u32 {
        32
    }
}

impl Default for LaionOptions {
    fn default() -> Self {
        Self {
            max_tokens: Self::default_max_tokens(),
        }
    }
}

/// How MMC4 images are paired with sentences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Assignment {
    /// Each image goes before its most similar sentence (several images may
    /// share one): what OpenFlamingo's `preprocess_interleaved` does.
    #[default]
    BestSentence,
    /// Images and sentences paired one to one, maximising the total
    /// similarity (the Hungarian algorithm), as MMC4's
    /// `compute_assignments.py` pairs them.
    OneToOne,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mmc4Options {
    /// Images whose best sentence similarity is below this are dropped
    /// (upstream `--mmc4_textsim_threshold`; the paper's 0.24).
    pub sim_threshold: f64,
    pub min_images: u32,
    pub max_images: u32,
    pub max_tokens: u32,
    /// Images of `bytes / 1000 <= min_image_kb` are dropped (upstream: 10,
    /// i.e. under 11,000 bytes).
    pub min_image_kb: u64,
    pub assignment: Assignment,
}

impl Default for Mmc4Options {
    fn default() -> Self {
        Self {
            sim_threshold: 0.24,
            min_images: 1,
            max_images: 6,
            max_tokens: 256,
            min_image_kb: 10,
            assignment: Assignment::BestSentence,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub dataset: DatasetKind,
    /// Shorthand for one source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// The LM dir whose tokenizer.json (and tokenizer_config.json) to use.
    pub tokenizer: String,
    #[serde(default)]
    pub resampled: bool,
    #[serde(default)]
    pub samples_per_epoch: u64,
    #[serde(default = "default_block")]
    pub shuffle_block: u64,
    #[serde(default = "yes")]
    pub shuffle_shards: bool,
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    /// Random horizontal flips and MMC4's random drop of single-image
    /// documents, as upstream trains; off for inspection and evaluation.
    #[serde(default = "yes")]
    pub augment: bool,
    /// Drop an epoch's last, incomplete global batch (upstream's
    /// `partial=False`); kept by default so every sample is seen.
    #[serde(default)]
    pub drop_last: bool,
    #[serde(default)]
    pub laion: LaionOptions,
    #[serde(default)]
    pub mmc4: Mmc4Options,
}

/// A shard as the order sees it: its URL and which source it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRef {
    pub url: String,
    pub source: usize,
}

impl DataSpec {
    /// Parses and validates; `base` resolves relative local paths.
    pub fn from_toml(text: &str, base: Option<&Path>) -> Result<Self> {
        let mut spec: Self = toml::from_str(text).map_err(|error| DataError::Spec {
            field: error
                .span()
                .map(|span| format!("at {}..{}", span.start, span.end))
                .unwrap_or_else(|| "toml".into()),
            message: error.message().to_string(),
        })?;
        if let Some(shards) = spec.shards.take() {
            if !spec.sources.is_empty() {
                return Err(DataError::spec(
                    "shards",
                    "give either `shards` or [[sources]], not both",
                ));
            }
            spec.sources.push(Source {
                shards,
                weight: 1.0,
            });
        }
        if let Some(base) = base {
            for source in &mut spec.sources {
                source.shards = resolve(base, &source.shards);
            }
            spec.tokenizer = resolve(base, &spec.tokenizer);
        }
        spec.validate()?;
        Ok(spec)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            DataError::spec("spec", format!("cannot read {}: {error}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        Self::from_toml(&text, Some(&base))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<()> {
        if self.sources.is_empty() {
            return Err(DataError::spec("shards", "no shards given"));
        }
        for (index, source) in self.sources.iter().enumerate() {
            if !(source.weight.is_finite() && source.weight > 0.0) {
                return Err(DataError::spec(
                    &format!("sources[{index}].weight"),
                    "must be a positive number",
                ));
            }
        }
        let weighted = self
            .sources
            .iter()
            .any(|source| (source.weight - self.sources[0].weight).abs() > 1e-12);
        if weighted && !self.resampled {
            return Err(DataError::spec(
                "sources.weight",
                "unequal weights need `resampled = true` (without it every sample is read once per epoch)",
            ));
        }
        if self.resampled && self.samples_per_epoch == 0 {
            return Err(DataError::spec(
                "samples_per_epoch",
                "required with `resampled = true` (as upstream's --train_num_samples_*)",
            ));
        }
        if self.image_size == 0 {
            return Err(DataError::spec("image_size", "must be at least 1"));
        }
        if self.laion.max_tokens < 2 {
            return Err(DataError::spec("laion.max_tokens", "must be at least 2"));
        }
        let mmc4 = &self.mmc4;
        if mmc4.max_images == 0 {
            return Err(DataError::spec("mmc4.max_images", "must be at least 1"));
        }
        if mmc4.min_images > mmc4.max_images {
            return Err(DataError::spec(
                "mmc4.min_images",
                format!(
                    "{} is more than max_images ({})",
                    mmc4.min_images, mmc4.max_images
                ),
            ));
        }
        if mmc4.max_tokens < 2 {
            return Err(DataError::spec("mmc4.max_tokens", "must be at least 2"));
        }
        Ok(())
    }

    /// Every shard, source by source, in pattern order.
    pub fn shards(&self) -> Result<Vec<ShardRef>> {
        let mut shards = Vec::new();
        for (source, spec) in self.sources.iter().enumerate() {
            for url in brace::expand(&spec.shards)? {
                shards.push(ShardRef { url, source });
            }
        }
        Ok(shards)
    }

    /// Images per sample in a batch tensor.
    pub fn images_per_sample(&self) -> u32 {
        match self.dataset {
            DatasetKind::Laion => 1,
            DatasetKind::Mmc4 => self.mmc4.max_images,
        }
    }
}

fn resolve(base: &Path, location: &str) -> String {
    let is_url = location
        .split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && !scheme.contains('/'));
    if is_url || Path::new(location).is_absolute() {
        location.to_string()
    } else {
        base.join(location).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthand_defaults_and_relative_paths() {
        let spec = DataSpec::from_toml(
            "dataset = \"laion\"\nshards = \"laion/{0..1}.tar\"\ntokenizer = \"lm\"\n",
            Some(Path::new("/data")),
        )
        .unwrap();
        assert_eq!(spec.sources[0].shards, "/data/laion/{0..1}.tar");
        assert_eq!(spec.tokenizer, "/data/lm");
        assert_eq!(spec.laion.max_tokens, 32);
        assert_eq!(spec.mmc4, Mmc4Options::default());
        let urls: Vec<String> = spec.shards().unwrap().into_iter().map(|s| s.url).collect();
        assert_eq!(urls, ["/data/laion/0.tar", "/data/laion/1.tar"]);
        // Round trip through the wire form.
        assert_eq!(DataSpec::from_toml(&spec.to_toml(), None).unwrap(), spec);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let error = |text: &str| DataSpec::from_toml(text, None).unwrap_err().to_string();
        let base = "dataset = \"mmc4\"\ntokenizer = \"lm\"\n";
        assert!(error(base).contains("shards: no shards given"));
        let message = error(&format!("{base}shards = \"x\"\nresampled = true\n"));
        assert!(message.contains("samples_per_epoch"), "{message}");
        let message = error(&format!(
            "{base}[[sources]]\nshards = \"a\"\nweight = 1\n[[sources]]\nshards = \"b\"\nweight = 3\n"
        ));
        assert!(
            message.contains("sources.weight: unequal weights"),
            "{message}"
        );
        let message = error(&format!("{base}shards = \"x\"\n[mmc4]\nmin_images = 7\n"));
        assert!(
            message.contains("mmc4.min_images: 7 is more than max_images (6)"),
            "{message}"
        );
        let message = error(&format!("{base}shards = \"x\"\nbatch = 3\n"));
        assert!(message.contains("unknown field `batch`"), "{message}");
    }
}
