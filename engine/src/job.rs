//! A training run's configuration, with OpenFlamingo's argument names
//! (`--batch_size_mmc4`, `--lr_scheduler`, …), read from flags and/or a
//! TOML file and resolved once: the saved `config.json` is what every rank
//! runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::schedule::{Kind as ScheduleKind, Schedule};
use crate::trainer::{AdamWConfigSerde, Strategy, TrainConfig};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainJob {
    /// Model spec file (TOML).
    pub model: PathBuf,
    pub run_name: String,
    /// Where runs go: `<runs_dir>/<run_name>/`.
    pub runs_dir: PathBuf,
    pub laion_shards: Option<String>,
    pub mmc4_shards: Option<String>,
    pub batch_size_laion: u32,
    pub batch_size_mmc4: u32,
    pub loss_multiplier_laion: f64,
    pub loss_multiplier_mmc4: f64,
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub gradient_accumulation_steps: u64,
    pub precision: String,
    pub gradient_checkpointing: bool,
    pub fsdp_sharding_strategy: String,
    pub train_num_samples_laion: u64,
    pub train_num_samples_mmc4: u64,
    pub num_epochs: u64,
    pub seed: u64,
    pub resume_from_checkpoint: Option<PathBuf>,
    pub delete_previous_checkpoint: bool,
    pub freeze_lm_embeddings: bool,
    pub logging_steps: u64,
    /// Save a checkpoint every this many optimizer steps (0: only at the end).
    pub checkpoint_steps: u64,
    /// Also save when this many minutes passed since the last save (0: off);
    /// rank 0's clock decides, so every rank saves at the same step.
    pub checkpoint_minutes: f64,
    /// Write the keys of every sample each rank trained on, per step, to
    /// `<run>/audit/rank-<r>.jsonl` (to prove exactly-once delivery).
    pub audit_samples: bool,
    pub dataset_resampled: bool,
    pub mmc4_textsim_threshold: f64,
    pub mmc4_max_num_images: u32,
    pub mmc4_min_num_images: u32,
    /// Stop after this many steps of the run (0: run to the end); for tests
    /// and preemption drills.
    pub max_steps: u64,
    /// Data-service replicas to stream batches from (`http://host:port`);
    /// empty: every rank reads its shards in-process.
    pub data_service: Vec<String>,
    /// Dense peak of one rank's device in TFLOP/s (H100/H200 SXM bf16:
    /// 989.4), for the MFU each rank reports; 0: unknown, no MFU reported.
    pub peak_tflops: f64,
}

impl Default for TrainJob {
    fn default() -> Self {
        Self {
            model: PathBuf::from("model.toml"),
            run_name: "run".into(),
            runs_dir: PathBuf::from("runs"),
            laion_shards: None,
            mmc4_shards: None,
            batch_size_laion: 128,
            batch_size_mmc4: 128,
            loss_multiplier_laion: 1.0,
            loss_multiplier_mmc4: 1.0,
            learning_rate: 1e-4,
            lr_scheduler: "constant".into(),
            warmup_steps: 5000,
            weight_decay: 0.1,
            gradient_accumulation_steps: 1,
            precision: "fp32".into(),
            gradient_checkpointing: false,
            fsdp_sharding_strategy: "shard_grad_op".into(),
            train_num_samples_laion: 10000,
            train_num_samples_mmc4: 10000,
            num_epochs: 1,
            seed: 42,
            resume_from_checkpoint: None,
            delete_previous_checkpoint: false,
            freeze_lm_embeddings: false,
            logging_steps: 100,
            checkpoint_steps: 0,
            checkpoint_minutes: 0.0,
            audit_samples: false,
            dataset_resampled: false,
            mmc4_textsim_threshold: 0.24,
            mmc4_max_num_images: 6,
            mmc4_min_num_images: 1,
            max_steps: 0,
            data_service: Vec::new(),
            peak_tflops: 0.0,
        }
    }
}

impl TrainJob {
    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(&self.run_name)
    }

    /// Checks the fields, naming the flag at fault.
    pub fn validate(&self, world: u64) -> Result<(), String> {
        if self.laion_shards.is_none() && self.mmc4_shards.is_none() {
            return Err("give --laion_shards, --mmc4_shards or both".into());
        }
        if !matches!(
            self.precision.as_str(),
            "fp32" | "amp_bf16" | "amp_bfloat16"
        ) {
            return Err(format!(
                "--precision {}: use fp32 or amp_bf16 (bf16 and fp16 are not implemented yet)",
                self.precision
            ));
        }
        if !(self.peak_tflops.is_finite() && self.peak_tflops >= 0.0) {
            return Err(format!(
                "--peak_tflops {}: give the device's peak in TFLOP/s (or 0 for none)",
                self.peak_tflops
            ));
        }
        self.fsdp_sharding_strategy.parse::<Strategy>()?;
        self.lr_scheduler.parse::<ScheduleKind>()?;
        if self.laion_shards.is_some() && self.batch_size_laion == 0 {
            return Err("--batch_size_laion must be at least 1".into());
        }
        if self.mmc4_shards.is_some() && self.batch_size_mmc4 == 0 {
            return Err("--batch_size_mmc4 must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return Err("--gradient_accumulation_steps must be at least 1".into());
        }
        if self.total_steps(world) == 0 {
            return Err(format!(
                "--train_num_samples_* / (batch size × {world} ranks) × --num_epochs is 0 steps"
            ));
        }
        Ok(())
    }

    /// Optimizer steps per epoch: as upstream, the (MMC4, else LAION)
    /// sample budget over the global batch.
    pub fn steps_per_epoch(&self, world: u64) -> u64 {
        let micro = if self.mmc4_shards.is_some() {
            self.train_num_samples_mmc4 / (u64::from(self.batch_size_mmc4) * world).max(1)
        } else {
            self.train_num_samples_laion / (u64::from(self.batch_size_laion) * world).max(1)
        };
        micro / self.gradient_accumulation_steps.max(1)
    }

    pub fn total_steps(&self, world: u64) -> u64 {
        self.steps_per_epoch(world) * self.num_epochs
    }

    pub fn train_config(&self, world: u64) -> Result<TrainConfig, String> {
        Ok(TrainConfig {
            strategy: self.fsdp_sharding_strategy.parse()?,
            schedule: Schedule {
                kind: self.lr_scheduler.parse()?,
                base_lr: self.learning_rate,
                warmup_steps: self.warmup_steps,
                total_steps: self.total_steps(world),
            },
            weight_decay: self.weight_decay,
            adamw: AdamWConfigSerde::default(),
            max_grad_norm: 1.0,
            loss_multiplier_laion: self.loss_multiplier_laion,
            loss_multiplier_mmc4: self.loss_multiplier_mmc4,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            freeze_lm_embeddings: self.freeze_lm_embeddings,
            amp_bf16: self.precision.starts_with("amp_"),
            gradient_checkpointing: self.gradient_checkpointing,
        })
    }

    /// Reads a TOML file of these fields.
    pub fn from_toml_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))
    }
}
