"""Baseline for bench-train-step: the Python OpenFlamingo training step on
the random models of bench/model/reference.py (factory.py's freezing,
AdamW with weight decay on the gated cross-attention, clip_grad_norm_(1.0),
HF loss with OpenFlamingo's LAION labels), one process, no FSDP. Writes the
batch for flamingo to use and prints one JSON line with samples/s.

usage: python reference.py OUT_DIR tiny|100m THREADS BATCH STEPS [plain|checkpoint]

With `checkpoint`, the perceiver, every gated cross-attention block and
every decoder layer are wrapped in torch's non-reentrant checkpoint wrapper,
the modules OpenFlamingo's train.py wraps for --gradient_checkpointing.
"""

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../model"))
from reference import build  # noqa: E402

TOKENS = 32


def main():
    out, size, threads, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    model, tokenizer, cfg, vocab = build(out, size)
    if len(sys.argv) > 6 and sys.argv[6] == "checkpoint":
        from functools import partial

        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

        # What Flamingo(gradient_checkpointing=True) flags and train.py then
        # wraps under FSDP: the perceiver, each gated cross-attention block
        # and each decoder layer.
        wrapped = {id(model.perceiver)}
        for layer in model.lang_encoder._get_decoder_layers():
            wrapped.add(id(layer.decoder_layer))
            if layer.gated_cross_attn_layer is not None:
                wrapped.add(id(layer.gated_cross_attn_layer))
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda module: id(module) in wrapped)
    model.train()
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "gated_cross_attn" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "gated_cross_attn" not in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": rest, "weight_decay": 0.0}], lr=1e-4)
    media = tokenizer.convert_tokens_to_ids("<image>")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch, TOKENS), generator=generator)
    ids[:, 0] = media
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[labels == media] = -100
    vision_x = torch.randn(batch, 1, 1, 3, cfg["image"], cfg["image"], generator=generator)
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels, "vision_x": vision_x},
              os.path.join(out, "batch.safetensors"))

    def step():
        loss = model(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels)[0]
        loss.backward()
        embedding = model.lang_encoder.get_input_embeddings()
        keep = torch.zeros_like(embedding.weight.grad)
        keep[media] = 1
        keep[tokenizer.convert_tokens_to_ids("<|endofchunk|>")] = 1
        embedding.weight.grad *= keep
        torch.nn.utils.clip_grad_norm_(decay + rest, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    print(json.dumps({"size": size, "samples_per_second": batch * steps / seconds,
                      "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
