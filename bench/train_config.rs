//! The training configuration the step benchmarks run ours with: a
//! constant learning rate of 1e-4, OpenFlamingo's weight decay (0.1) and
//! clipping (1.0), one micro-batch per step, fp32 unless asked.

use flamingo_common::train::{LrScheduler, RecomputePolicy, Strategy};
use flamingo_engine::optim::AdamWConfig;
use flamingo_engine::schedule::Schedule;
use flamingo_engine::trainer::TrainConfig;

pub fn bench_config(
    strategy: Strategy,
    freeze_lm_embeddings: bool,
    amp_bf16: bool,
    recompute: RecomputePolicy,
) -> TrainConfig {
    TrainConfig {
        strategy,
        schedule: Schedule {
            kind: LrScheduler::Constant,
            base_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1000,
        },
        weight_decay: 0.1,
        adamw: AdamWConfig::default(),
        max_grad_norm: 1.0,
        loss_multiplier_laion: 1.0,
        loss_multiplier_mmc4: 1.0,
        gradient_accumulation_steps: 1,
        freeze_lm_embeddings,
        amp_bf16,
        gradient_checkpointing: false,
        recompute_policy: recompute,
        activation_budget_gib: 0.0,
        bf16_weight_copies: true,
        cuda_graphs: false,
    }
}
