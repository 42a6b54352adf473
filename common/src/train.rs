//! A training run's configuration, defined once: the struct every rank runs
//! ([`TrainJob`], OpenFlamingo's argument names), its validation (the same
//! rules for `flamingoctl`, the coordinator's admission and the ranks), and
//! the command-line flags, which are made from its fields ([`TrainFlags`]).
//!
//! A run is read from an optional TOML file (`--config`), then the flags
//! given override its fields, and the result is resolved once: the saved
//! `config.json` is what every rank runs. It lives here, without libtorch,
//! so that the coordinator decodes and checks a submitted run typed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CommonError;

mod flags;

pub use flags::TrainFlags;

/// How the trainable state is split over the ranks
/// (`--fsdp_sharding_strategy`, FSDP's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Every rank holds and updates everything; gradients are all-reduced.
    NoShard,
    /// Gradients are reduce-scattered and each rank keeps 1/world of the
    /// optimizer state; the updated parameters are all-gathered.
    ShardGradOp,
    /// Every unit's trainable and frozen weights are sharded, gathered just
    /// before use and freed after.
    Full,
    /// `full` inside each node, replicated across nodes (FSDP's
    /// HYBRID_SHARD): units are gathered from the node's ranks only, and
    /// gradient shards are all-reduced between the nodes.
    Hybrid,
}

impl Strategy {
    pub const NAMES: &'static str = "full, hybrid, shard_grad_op or no_shard";

    /// Whether every unit's weights are sharded (`full`, `hybrid`).
    pub fn shards_units(self) -> bool {
        matches!(self, Self::Full | Self::Hybrid)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::NoShard => "no_shard",
            Self::ShardGradOp => "shard_grad_op",
            Self::Full => "full",
            Self::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = CommonError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::from(text)).map_err(|_| {
            CommonError::invalid(
                "fsdp_sharding_strategy",
                format!("'{text}': use {}", Self::NAMES),
            )
        })
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The learning-rate schedule after warmup (`--lr_scheduler`, Hugging
/// Face's schedules as OpenFlamingo uses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Constant,
    Linear,
    Cosine,
}

/// What the backward pass recomputes instead of keeping
/// (`--recompute_policy`); `--gradient_checkpointing` is `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputePolicy {
    /// Every unit keeps its graph (torch FSDP without checkpointing).
    None,
    /// The perceiver's and cross-attention blocks' LayerNorm, GELU,
    /// concatenation and gated-residual outputs are freed after each
    /// unit's forward and computed again before its backward; matmul and
    /// attention outputs stay.
    Selective,
    /// Each unit keeps only its input and runs again before its backward.
    Full,
    /// Per unit (keep, selective or full) so that the activations kept fit
    /// `--activation_budget_gib`, from sizes and times measured on the
    /// first micro-batch, which runs `full`.
    Auto,
}

impl RecomputePolicy {
    pub const NAMES: &'static str = "none, selective, full or auto";

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Selective => "selective",
            Self::Full => "full",
            Self::Auto => "auto",
        }
    }
}

/// `--precision`, with OpenFlamingo's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// The forward pass under bf16 autocast; weights and optimizer in fp32.
    #[serde(alias = "amp_bfloat16")]
    AmpBf16,
    /// Pure bf16 (upstream's choice; not implemented here).
    Bf16,
    /// Pure fp16 (upstream's choice; not implemented here).
    Fp16,
}

impl Precision {
    pub fn autocast_bf16(self) -> bool {
        self == Self::AmpBf16
    }
}

impl TrainJob {
    /// The recompute policy in force: `full` under
    /// `gradient_checkpointing`, else `recompute_policy`.
    pub fn recompute(&self) -> RecomputePolicy {
        if self.gradient_checkpointing {
            RecomputePolicy::Full
        } else {
            self.recompute_policy
        }
    }
}

/// Defines [`TrainJob`] from one list of fields (name, type, default and
/// documentation) and records the names and documentation in
/// `TrainJob::FIELDS`, from which the flags are made.
macro_rules! train_job {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, )*) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct TrainJob {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for TrainJob {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl TrainJob {
            /// Every field's name and documentation, in order.
            pub const FIELDS: &'static [(&'static str, &'static str)] =
                &[ $( (stringify!($field), concat!($($doc, "\n",)* "")) ),* ];
        }
    };
}

train_job! {
    /// The model spec file (TOML).
    model: PathBuf = PathBuf::from("model.toml"),
    /// The run's name: its folder is `<runs_dir>/<run_name>/`.
    run_name: String = "run".into(),
    /// Where run folders go.
    runs_dir: PathBuf = PathBuf::from("runs"),
    /// LAION shards: a brace pattern of object-store URLs or paths.
    laion_shards: Option<String> = None,
    /// MMC4 shards: a brace pattern of object-store URLs or paths.
    mmc4_shards: Option<String> = None,
    /// LAION samples per rank and micro-step.
    batch_size_laion: u32 = 128,
    /// MMC4 samples per rank and micro-step.
    batch_size_mmc4: u32 = 128,
    loss_multiplier_laion: f64 = 1.0,
    loss_multiplier_mmc4: f64 = 1.0,
    learning_rate: f64 = 1e-4,
    /// constant, linear or cosine (after linear warmup).
    lr_scheduler: LrScheduler = LrScheduler::Constant,
    warmup_steps: u64 = 5000,
    /// AdamW weight decay of the gated cross-attention.
    weight_decay: f64 = 0.1,
    gradient_accumulation_steps: u64 = 1,
    /// fp32 or amp_bf16 (bf16 autocast).
    precision: Precision = Precision::Fp32,
    /// Keep only each unit's input in forward and recompute in backward
    /// (`recompute_policy = "full"`).
    gradient_checkpointing: bool = false,
    /// What backward recomputes: none, selective (LayerNorm, GELU and
    /// residual outputs of the perceiver and cross-attention, not matmuls
    /// or attention), full, or auto (per unit, to fit
    /// activation_budget_gib).
    recompute_policy: RecomputePolicy = RecomputePolicy::None,
    /// With recompute_policy = auto: the GiB of activations a rank may keep
    /// for one micro-batch's backward, besides each unit's input.
    activation_budget_gib: f64 = 0.0,
    /// With precision amp_bf16: let autocast cast the trainable Linear
    /// weights to bf16 at every use instead of keeping bf16 copies made
    /// once per optimizer step (the same arithmetic; under full and hybrid
    /// those units are then gathered in fp32, twice the bytes).
    cast_weights_per_use: bool = false,
    /// Capture each batch shape's forward and backward as a CUDA graph and
    /// replay it (GPU only; no_shard or shard_grad_op without
    /// recompute). Off by default: not yet measured.
    cuda_graphs: bool = false,
    /// full, hybrid, shard_grad_op or no_shard.
    fsdp_sharding_strategy: Strategy = Strategy::ShardGradOp,
    /// LAION samples per epoch (paces the epoch when there is no MMC4).
    train_num_samples_laion: u64 = 10000,
    /// MMC4 samples per epoch (paces the epoch).
    train_num_samples_mmc4: u64 = 10000,
    num_epochs: u64 = 1,
    seed: u64 = 42,
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    resume_from_checkpoint: Option<PathBuf> = None,
    /// Where the run's checkpoints go instead of its folder: an object-store
    /// URL (`s3://bucket/prefix`, `gs://…`, `az://…`); they are
    /// `<url>/<run_name>/checkpoints/step-…/`, each committed by its
    /// manifest, written last.
    checkpoint_store: Option<String> = None,
    /// Delete the previous checkpoint after each save (single machine).
    delete_previous_checkpoint: bool = false,
    /// Train no embedding rows (not even `<image>` and `<|endofchunk|>`).
    freeze_lm_embeddings: bool = false,
    /// Log a line every this many optimizer steps.
    logging_steps: u64 = 100,
    /// Save a checkpoint every this many optimizer steps (0: only at the end).
    checkpoint_steps: u64 = 0,
    /// Also save when this many minutes passed since the last save (0: off);
    /// rank 0's clock decides, so every rank saves at the same step.
    checkpoint_minutes: f64 = 0.0,
    /// Write the keys of every sample each rank trained on, per step, to
    /// `<run>/audit/rank-<r>.jsonl` (to prove exactly-once delivery).
    audit_samples: bool = false,
    /// Draw shards with replacement (webdataset's resampled shards).
    dataset_resampled: bool = false,
    /// MMC4: the least image-sentence similarity kept.
    mmc4_textsim_threshold: f64 = 0.24,
    /// MMC4: the most images kept per document.
    mmc4_max_num_images: u32 = 6,
    /// MMC4: documents with fewer images are skipped.
    mmc4_min_num_images: u32 = 1,
    /// Stop after this many steps of the run (0: run to the end); for tests
    /// and preemption drills.
    max_steps: u64 = 0,
    /// Data-service replicas to stream batches from (`http://host:port`,
    /// comma-separated), which split every batch between them; none: the
    /// replica on each rank's node when the agent names one (its
    /// `--data-service`), else every rank reads its shards in-process.
    data_service: Vec<String> = Vec::new(),
    /// Dense peak of one rank's device in TFLOP/s (H100/H200 SXM bf16:
    /// 989.4), for the MFU each rank reports; 0: unknown, no MFU reported.
    peak_tflops: f64 = 0.0,
}

impl TrainJob {
    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(&self.run_name)
    }

    /// Where the run's checkpoints and its `latest` pointer live: the run
    /// folder, or `<checkpoint_store>/<run_name>` (a URL held as a path).
    pub fn checkpoint_run(&self) -> PathBuf {
        match &self.checkpoint_store {
            Some(store) => PathBuf::from(store.trim_end_matches('/')).join(&self.run_name),
            None => self.run_dir(),
        }
    }

    /// The folder of the run's checkpoint at `step`: the only path a rank
    /// may commit for it, and so the only kind retention deletes.
    pub fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.checkpoint_run()
            .join("checkpoints")
            .join(format!("step-{step:08}"))
    }

    /// Reads a TOML file of these fields.
    pub fn from_toml_file(path: &Path) -> Result<Self, CommonError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            CommonError::invalid("config", format!("cannot read {}: {error}", path.display()))
        })?;
        toml::from_str(&text)
            .map_err(|error| CommonError::invalid("config", format!("{}: {error}", path.display())))
    }

    /// The datasets the run trains on: (name, shard pattern).
    pub fn datasets(&self) -> Vec<(&'static str, &str)> {
        [("laion", &self.laion_shards), ("mmc4", &self.mmc4_shards)]
            .into_iter()
            .filter_map(|(name, shards)| Some((name, shards.as_deref()?)))
            .collect()
    }

    /// Optimizer steps per epoch: as upstream, the (MMC4, else LAION)
    /// sample budget over the global batch.
    pub fn steps_per_epoch(&self, world: u64) -> u64 {
        let (samples, batch) = self.pacing();
        samples / (u64::from(batch) * world).max(1) / self.gradient_accumulation_steps.max(1)
    }

    pub fn total_steps(&self, world: u64) -> u64 {
        self.steps_per_epoch(world) * self.num_epochs
    }

    /// The dataset whose sample budget paces an epoch (OpenFlamingo's
    /// rule: MMC4's when it is trained, else LAION's): its samples per
    /// epoch and per-rank batch.
    fn pacing(&self) -> (u64, u32) {
        if self.mmc4_shards.is_some() {
            (self.train_num_samples_mmc4, self.batch_size_mmc4)
        } else {
            (self.train_num_samples_laion, self.batch_size_laion)
        }
    }

    /// Checks the fields for `world` ranks; the error names the field.
    pub fn validate(&self, world: u64) -> Result<(), CommonError> {
        let name = Path::new(&self.run_name);
        if self.run_name.is_empty()
            || name.components().count() != 1
            || !matches!(
                name.components().next(),
                Some(std::path::Component::Normal(_))
            )
        {
            return Err(CommonError::invalid(
                "run_name",
                format!(
                    "'{}' is not a plain folder name (no '/', '.' or '..'); the run's folder is <runs_dir>/<run_name>",
                    self.run_name
                ),
            ));
        }
        if let Some(store) = &self.checkpoint_store {
            let scheme = store.split_once("://").map(|(scheme, _)| scheme);
            if !matches!(
                scheme,
                Some("s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure")
            ) || store
                .split_once("://")
                .is_some_and(|(_, rest)| rest.trim_matches('/').is_empty())
            {
                return Err(CommonError::invalid(
                    "checkpoint_store",
                    format!(
                        "'{store}' is not an object-store URL: give s3://bucket/prefix (or gs://, az://); for a local disk leave it out and set runs_dir"
                    ),
                ));
            }
        }
        if self.gradient_checkpointing
            && !matches!(
                self.recompute_policy,
                RecomputePolicy::None | RecomputePolicy::Full
            )
        {
            return Err(CommonError::invalid(
                "recompute_policy",
                format!(
                    "'{}' conflicts with gradient_checkpointing (which is 'full'): give one of them",
                    self.recompute_policy.name()
                ),
            ));
        }
        if self.cuda_graphs
            && (self.fsdp_sharding_strategy.shards_units()
                || self.recompute() != RecomputePolicy::None)
        {
            return Err(CommonError::invalid(
                "cuda_graphs",
                format!(
                    "graphs the whole-model step of no_shard or shard_grad_op without recompute, not fsdp_sharding_strategy '{}' with recompute '{}'",
                    self.fsdp_sharding_strategy.name(),
                    self.recompute().name()
                ),
            ));
        }
        match (self.recompute_policy, self.activation_budget_gib) {
            (RecomputePolicy::Auto, budget) if !(budget > 0.0 && budget.is_finite()) => {
                return Err(CommonError::invalid(
                    "activation_budget_gib",
                    format!(
                        "{budget}: recompute_policy 'auto' needs the GiB of activations a rank may keep, above 0"
                    ),
                ));
            }
            (policy, budget) if policy != RecomputePolicy::Auto && budget != 0.0 => {
                return Err(CommonError::invalid(
                    "activation_budget_gib",
                    format!(
                        "{budget}: only recompute_policy 'auto' uses a budget, and it is '{}'",
                        policy.name()
                    ),
                ));
            }
            _ => {}
        }
        let datasets = self.datasets();
        if datasets.is_empty() {
            return Err(CommonError::invalid(
                "laion_shards",
                "no dataset: give laion_shards, mmc4_shards or both",
            ));
        }
        if matches!(self.precision, Precision::Bf16 | Precision::Fp16) {
            return Err(CommonError::invalid(
                "precision",
                "use fp32 or amp_bf16 (pure bf16 and fp16 are not implemented yet)",
            ));
        }
        if !(self.peak_tflops.is_finite() && self.peak_tflops >= 0.0) {
            return Err(CommonError::invalid(
                "peak_tflops",
                format!(
                    "{}: give the device's peak in TFLOP/s (or 0 for none)",
                    self.peak_tflops
                ),
            ));
        }
        for (name, _) in &datasets {
            let batch = match *name {
                "laion" => self.batch_size_laion,
                _ => self.batch_size_mmc4,
            };
            if batch == 0 {
                return Err(CommonError::invalid(
                    format!("batch_size_{name}"),
                    "must be at least 1 (samples per rank)",
                ));
            }
        }
        for (field, value) in [
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("num_epochs", self.num_epochs),
        ] {
            if value == 0 {
                return Err(CommonError::invalid(field, "must be at least 1"));
            }
        }
        if self.steps_per_epoch(world) == 0 {
            let (samples, batch) = self.pacing();
            let field = match self.mmc4_shards {
                Some(_) => "train_num_samples_mmc4",
                None => "train_num_samples_laion",
            };
            return Err(CommonError::invalid(
                field,
                format!(
                    "{samples} samples per epoch is less than one optimizer step's ({batch} per rank × {world} ranks × {} accumulated micro-steps)",
                    self.gradient_accumulation_steps
                ),
            ));
        }
        Ok(())
    }

    /// Checks that the model spec and every local shard exist (object-store
    /// URLs are left to the data service). For a process that sees the
    /// nodes' filesystem.
    pub fn check_paths(&self, max_shards: u64) -> Result<(), CommonError> {
        if !self.model.exists() {
            return Err(CommonError::invalid(
                "model",
                format!(
                    "{} does not exist; give a model spec path every node can read",
                    self.model.display()
                ),
            ));
        }
        for (name, pattern) in self.datasets() {
            let field = format!("{name}_shards");
            let urls = crate::brace::expand_at_most(pattern, max_shards)
                .map_err(|error| CommonError::invalid(&field, error.to_string()))?;
            for url in urls
                .iter()
                .filter(|url| !url.contains("://") || url.starts_with("file://"))
            {
                let path = url.strip_prefix("file://").unwrap_or(url);
                if !Path::new(path).exists() {
                    return Err(CommonError::invalid(
                        &field,
                        format!("shard {path} does not exist (pattern {pattern})"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laion(samples: u64, batch: u32) -> TrainJob {
        TrainJob {
            laion_shards: Some("a-{0..1}.tar".into()),
            train_num_samples_laion: samples,
            batch_size_laion: batch,
            ..TrainJob::default()
        }
    }

    #[test]
    fn steps_follow_the_pacing_dataset() {
        assert_eq!(laion(100, 5).steps_per_epoch(2), 10);
        let both = TrainJob {
            mmc4_shards: Some("m.tar".into()),
            train_num_samples_mmc4: 40,
            batch_size_mmc4: 2,
            gradient_accumulation_steps: 2,
            num_epochs: 3,
            ..laion(100, 5)
        };
        assert_eq!(both.steps_per_epoch(2), 5);
        assert_eq!(both.total_steps(2), 15);
    }

    #[test]
    fn validation_names_the_field() {
        let field = |job: TrainJob, world: u64| match job.validate(world) {
            Err(CommonError::InvalidField { field, message }) => format!("{field}: {message}"),
            Err(other) => other.to_string(),
            Ok(()) => "ok".into(),
        };
        assert_eq!(field(laion(8, 2), 4), "ok");
        assert_eq!(
            field(laion(7, 2), 4),
            "train_num_samples_laion: 7 samples per epoch is less than one optimizer step's (2 per rank × 4 ranks × 1 accumulated micro-steps)"
        );
        assert!(field(laion(8, 0), 1).starts_with("batch_size_laion: must be at least 1"));
        let none = TrainJob::default();
        assert!(field(none, 1).starts_with("laion_shards: no dataset"));
        let epochs = TrainJob {
            num_epochs: 0,
            ..laion(8, 2)
        };
        assert_eq!(field(epochs, 1), "num_epochs: must be at least 1");
        let fp16 = TrainJob {
            precision: Precision::Fp16,
            ..laion(8, 2)
        };
        assert!(field(fp16, 1).starts_with("precision: use fp32 or amp_bf16"));
        for store in ["/mnt/checkpoints", "file:///mnt/c", "s3://", "ftp://host/x"] {
            let job = TrainJob {
                checkpoint_store: Some(store.into()),
                ..laion(8, 2)
            };
            assert!(
                field(job, 1).starts_with("checkpoint_store: "),
                "{store} accepted"
            );
        }
        let s3 = TrainJob {
            checkpoint_store: Some("s3://bucket/runs/".into()),
            run_name: "shapes".into(),
            ..laion(8, 2)
        };
        assert_eq!(field(s3.clone(), 1), "ok");
        let auto = |budget: f64| TrainJob {
            recompute_policy: RecomputePolicy::Auto,
            activation_budget_gib: budget,
            ..laion(8, 2)
        };
        assert_eq!(field(auto(2.5), 1), "ok");
        assert!(field(auto(0.0), 1)
            .starts_with("activation_budget_gib: 0: recompute_policy 'auto' needs"));
        let stray = TrainJob {
            activation_budget_gib: 1.0,
            ..laion(8, 2)
        };
        assert!(
            field(stray, 1).starts_with("activation_budget_gib: 1: only recompute_policy 'auto'")
        );
        let graphs = |strategy, checkpointing| TrainJob {
            cuda_graphs: true,
            fsdp_sharding_strategy: strategy,
            gradient_checkpointing: checkpointing,
            ..laion(8, 2)
        };
        assert_eq!(field(graphs(Strategy::NoShard, false), 1), "ok");
        assert_eq!(field(graphs(Strategy::ShardGradOp, false), 1), "ok");
        for (strategy, checkpointing) in [(Strategy::Full, false), (Strategy::NoShard, true)] {
            let message = field(graphs(strategy, checkpointing), 1);
            assert!(
                message.starts_with("cuda_graphs: graphs the whole-model step"),
                "{message}"
            );
        }
        let both = TrainJob {
            gradient_checkpointing: true,
            recompute_policy: RecomputePolicy::Selective,
            ..laion(8, 2)
        };
        assert!(field(both.clone(), 1).starts_with("recompute_policy: 'selective' conflicts"));
        let full = TrainJob {
            recompute_policy: RecomputePolicy::Full,
            ..both
        };
        assert_eq!(full.recompute(), RecomputePolicy::Full);
        assert_eq!(field(full, 1), "ok");
        assert_eq!(
            s3.checkpoint_dir(3).display().to_string(),
            "s3://bucket/runs/shapes/checkpoints/step-00000003"
        );
    }

    #[test]
    fn enums_read_openflamingos_names() {
        let job: TrainJob = toml::from_str(
            "precision = \"amp_bfloat16\"\nfsdp_sharding_strategy = \"full\"\nlr_scheduler = \"cosine\"",
        )
        .unwrap();
        assert_eq!(job.precision, Precision::AmpBf16);
        assert_eq!(job.fsdp_sharding_strategy, Strategy::Full);
        assert_eq!(job.lr_scheduler, LrScheduler::Cosine);
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["precision"], "amp_bf16");
        assert_eq!(json["fsdp_sharding_strategy"], "full");
        assert_eq!("hybrid".parse::<Strategy>().unwrap(), Strategy::Hybrid);
        let named = "sharded".parse::<Strategy>().unwrap_err().to_string();
        assert!(
            named.contains("fsdp_sharding_strategy") && named.contains("no_shard"),
            "{named}"
        );
        let bad = toml::from_str::<TrainJob>("fsdp_sharding_strategy = \"sharded\"").unwrap_err();
        assert!(bad.to_string().contains("fsdp_sharding_strategy"), "{bad}");
        let unknown = toml::from_str::<TrainJob>("batch_size = 3").unwrap_err();
        assert!(unknown.to_string().contains("batch_size"), "{unknown}");
    }

    #[test]
    fn every_field_is_listed_with_its_documentation() {
        let json = serde_json::to_value(TrainJob::default()).unwrap();
        let names: Vec<&str> = TrainJob::FIELDS.iter().map(|(name, _)| *name).collect();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        keys.sort_unstable();
        assert_eq!(sorted, keys);
        let (_, doc) = TrainJob::FIELDS
            .iter()
            .find(|(name, _)| *name == "checkpoint_steps")
            .unwrap();
        assert!(doc.contains("every this many optimizer steps"), "{doc}");
    }
}
