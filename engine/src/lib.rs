//! flamingo's training engine: the learning-rate schedules (Hugging Face's
//! `get_*_schedule_with_warmup`), AdamW as `torch.optim.AdamW` computes it,
//! gradient-norm clipping as `torch.nn.utils.clip_grad_norm_` does, the
//! training step (`no_shard`, `shard_grad_op`, and FSDP's `full` and
//! `hybrid` over units, with gradient checkpointing), checkpoints that
//! reload at any world size, the rank's run loop, and tiny random models
//! for tests and demos. The run's configuration (OpenFlamingo's argument
//! names) is `flamingo_common::train::TrainJob`, shared with the CLI and
//! the coordinator.

pub mod autocast;
pub mod batch;
pub mod checkpoint;
pub mod clip;
pub mod cuda_graph;
pub mod flops;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod tiny;
pub mod trainer;
pub mod units;
