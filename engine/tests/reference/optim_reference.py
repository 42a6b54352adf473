"""Reference for tests/optim.rs: torch.optim.AdamW (default, and fused=True)
with OpenFlamingo's two parameter groups (weight decay on gated cross-attention only), Hugging
Face's schedules through LambdaLR, and clip_grad_norm_(1.0) before each
step, on fixed gradients.

usage: python optim_reference.py OUT_DIR
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

STEPS = 7


def main():
    out = sys.argv[1]
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,), (2, 2, 3)]
    initial = [torch.randn(*shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(*shape, generator=generator) * (0.2 + step) for shape in shapes]
             for step in range(STEPS)]
    tensors = {f"initial.{i}": t for i, t in enumerate(initial)}
    for step, step_grads in enumerate(grads):
        for i, g in enumerate(step_grads):
            tensors[f"grad.{step}.{i}"] = g
    runs = [(name, make, fused) for fused in (False, True)
            for name, make in [("constant", get_constant_schedule_with_warmup),
                               ("linear", get_linear_schedule_with_warmup),
                               ("cosine", get_cosine_schedule_with_warmup)]]
    for schedule_name, make, fused in runs:
        name = schedule_name + (".fused" if fused else "")
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                                       {"params": params[1:], "weight_decay": 0.0}], lr=1e-2,
                                      fused=fused)
        if schedule_name == "constant":
            scheduler = make(optimizer, num_warmup_steps=3)
        else:
            scheduler = make(optimizer, num_warmup_steps=3, num_training_steps=STEPS)
        for step in range(STEPS):
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            tensors[f"{name}.lr.{step}"] = torch.tensor([optimizer.param_groups[0]["lr"]], dtype=torch.float64)
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            tensors[f"{name}.norm.{step}"] = norm.reshape(1)
            optimizer.step()
            scheduler.step()
            for i, p in enumerate(params):
                tensors[f"{name}.param.{step}.{i}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main()
