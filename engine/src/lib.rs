//! flamingo's training engine. So far: the learning-rate schedules
//! (Hugging Face's `get_*_schedule_with_warmup`), AdamW as
//! `torch.optim.AdamW` computes it, and gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_` does — each checked against PyTorch.

pub mod clip;
pub mod optim;
pub mod schedule;
