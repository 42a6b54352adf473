//! Learning-rate schedules with linear warmup, as Hugging Face's
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`
//! and `get_cosine_schedule_with_warmup` (half a cosine) compute the factor
//! that `torch.optim.lr_scheduler.LambdaLR` multiplies the base rate by.
//! OpenFlamingo's `--lr_scheduler constant|linear|cosine`.

use flamingo_common::train::LrScheduler;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub base_lr: f64,
    pub warmup_steps: u64,
    /// Optimizer steps of the whole run (linear and cosine decay to 0 there).
    pub total_steps: u64,
}

impl Schedule {
    /// The multiplier of the base rate after `step` optimizer steps.
    pub fn factor(&self, step: u64) -> f64 {
        let step_f = step as f64;
        if step < self.warmup_steps {
            return step_f / (self.warmup_steps.max(1) as f64);
        }
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::Linear => {
                let remaining = self.total_steps as f64 - step_f;
                let span = (self.total_steps.saturating_sub(self.warmup_steps)).max(1) as f64;
                (remaining / span).max(0.0)
            }
            LrScheduler::Cosine => {
                let span = (self.total_steps.saturating_sub(self.warmup_steps)).max(1) as f64;
                let progress = (step_f - self.warmup_steps as f64) / span;
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate used by the optimizer step after `step` steps.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_shape() {
        let schedule = |kind| Schedule {
            kind,
            base_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert_eq!(schedule(LrScheduler::Constant).factor(0), 0.0);
        assert_eq!(schedule(LrScheduler::Constant).factor(5), 0.5);
        assert_eq!(schedule(LrScheduler::Constant).factor(500), 1.0);
        assert_eq!(schedule(LrScheduler::Linear).factor(60), 0.5);
        assert_eq!(schedule(LrScheduler::Linear).factor(200), 0.0);
        assert!((schedule(LrScheduler::Cosine).factor(60) - 0.5).abs() < 1e-12);
    }
}
