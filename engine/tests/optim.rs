//! AdamW, the schedules and clipping against PyTorch: torch.optim.AdamW
//! (default, and our fused path against `fused=True`) with two parameter
//! groups, Hugging Face's constant/linear/cosine warmup
//! schedules through LambdaLR, clip_grad_norm_(1.0), 7 steps on fixed
//! gradients; our learning rates and norms must agree, and the parameters
//! must be identical bit for bit.

use std::path::PathBuf;
use std::process::Command;

use flamingo_common::train::LrScheduler;
use flamingo_engine::clip::clip_grad_norm;
use flamingo_engine::optim::{AdamW, AdamWConfig, Moments};
use flamingo_engine::schedule::Schedule;
use flamingo_model::Weights;

const STEPS: u64 = 7;

#[test]
fn adamw_schedules_and_clipping_match_pytorch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let python = std::env::var_os("FLAMINGO_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/optim_reference.py");
    let status = Command::new(python)
        .arg(script)
        .arg(dir.path())
        .status()
        .expect("python runs");
    assert!(status.success());
    let mut reference =
        Weights::read_safetensors(&dir.path().join("reference.safetensors")).expect("reference");
    let mut take = |key: &str| reference.remove(key).unwrap_or_else(|| panic!("{key}"));
    let initial: Vec<tch::Tensor> = (0..3).map(|i| take(&format!("initial.{i}"))).collect();
    let grads: Vec<Vec<tch::Tensor>> = (0..STEPS)
        .map(|step| (0..3).map(|i| take(&format!("grad.{step}.{i}"))).collect())
        .collect();
    for (name, kind) in [
        ("constant", LrScheduler::Constant),
        ("linear", LrScheduler::Linear),
        ("cosine", LrScheduler::Cosine),
    ] {
        let schedule = Schedule {
            kind,
            base_lr: 1e-2,
            warmup_steps: 3,
            total_steps: STEPS,
        };
        let optimizer = AdamW::new(AdamWConfig::default());
        let mut params: Vec<tch::Tensor> = initial.iter().map(|t| t.copy()).collect();
        let mut moments: Vec<Moments> = params.iter().map(Moments::zeros_like).collect();
        let mut worst = 0f64;
        for step in 0..STEPS {
            let lr = schedule.lr(step);
            let expected_lr = take(&format!("{name}.lr.{step}")).double_value(&[0]);
            assert!(
                (lr - expected_lr).abs() <= 1e-15,
                "{name} step {step}: lr {lr} vs {expected_lr}"
            );
            let mut step_grads: Vec<tch::Tensor> =
                grads[step as usize].iter().map(|g| g.copy()).collect();
            let norm = clip_grad_norm(&mut step_grads, 1.0);
            let expected_norm = take(&format!("{name}.norm.{step}")).double_value(&[0]);
            assert!(
                (norm - expected_norm).abs() <= 1e-6 * expected_norm,
                "{name} step {step}: norm {norm} vs {expected_norm}"
            );
            for (index, ((param, grad), state)) in params
                .iter_mut()
                .zip(&step_grads)
                .zip(&mut moments)
                .enumerate()
            {
                let weight_decay = if index == 0 { 0.1 } else { 0.0 };
                optimizer.update(param, grad, state, lr, weight_decay);
                let expected = take(&format!("{name}.param.{step}.{index}"));
                let difference = (&*param - &expected).abs().max().double_value(&[]);
                worst = worst.max(difference);
            }
        }
        // Same ops in the same order as torch's CPU kernels: bit for bit.
        assert_eq!(worst, 0.0, "{name}: parameters differ by up to {worst}");

        // The fused kernel against torch.optim.AdamW(fused=True).
        let mut params: Vec<tch::Tensor> = initial.iter().map(|t| t.copy()).collect();
        let moments: Vec<Moments> = params.iter().map(Moments::zeros_like).collect();
        let mut worst = 0f64;
        for step in 0..STEPS {
            let lr = schedule.lr(step);
            let mut step_grads: Vec<tch::Tensor> =
                grads[step as usize].iter().map(|g| g.copy()).collect();
            clip_grad_norm(&mut step_grads, 1.0);
            for (index, ((param, grad), state)) in
                params.iter_mut().zip(&step_grads).zip(&moments).enumerate()
            {
                let weight_decay = if index == 0 { 0.1 } else { 0.0 };
                optimizer.update_fused(
                    param,
                    grad,
                    &state.exp_avg,
                    &state.exp_avg_sq,
                    step + 1,
                    lr,
                    weight_decay,
                );
                let expected = take(&format!("{name}.fused.param.{step}.{index}"));
                let difference = (&*param - &expected).abs().max().double_value(&[]);
                worst = worst.max(difference);
            }
        }
        assert_eq!(
            worst, 0.0,
            "{name} fused: parameters differ by up to {worst}"
        );
    }
}
