"""Baseline for bench-train-step --world N: one rank of the Python
OpenFlamingo training step under torch FSDP over gloo, as OpenFlamingo's
train.py sets it up with --fsdp --fsdp_sharding_strategy full
--gradient_checkpointing --freeze_lm_embeddings (upstream's FSDP cannot train
MPT's tied embeddings): Flamingo.wrap_fsdp with train.py's wrapper kwargs,
the non-reentrant checkpoint wrapper on the flagged modules (left off when
the sixth argument is `plain`: train.py without --gradient_checkpointing),
AdamW over the parameters not excluded from the optimizer,
model.clip_grad_norm_(1.0).

Started once per rank with torchrun's variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Rank 0 writes the model files and the batch into
OUT_DIR (the other ranks build the same random model, seed 0, in their own
folders) and prints one JSON line with the global samples/s.

Sizes whose configuration says `mmc4` step on a LAION batch and an MMC4
batch (half the batch, MMC4_IMAGES images in MMC4_TOKENS tokens, each image
chunk closed by <|endofchunk|>), each with its own forward and backward, as
train.py's train_one_epoch does.

usage: python fsdp_reference.py OUT_DIR tiny|100m|neox THREADS BATCH STEPS [plain|checkpoint]
"""

import json
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, CheckpointWrapper, apply_activation_checkpointing, checkpoint_wrapper)
from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../model"))
from reference import build  # noqa: E402

TOKENS = 32
MMC4_IMAGES = 3
MMC4_TOKENS = 128


def mmc4_batch(tokenizer, vocab, batch, image, generator):
    """An MMC4-style batch: interleaved <image> tokens, a chunk of text after
    each ending in <|endofchunk|>, labels without the media tokens."""
    media = tokenizer.convert_tokens_to_ids("<image>")
    eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    ids = torch.randint(0, vocab, (batch, MMC4_TOKENS), generator=generator)
    chunk = MMC4_TOKENS // MMC4_IMAGES
    for index in range(MMC4_IMAGES):
        ids[:, index * chunk] = media
        ids[:, (index + 1) * chunk - 1] = eoc
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[labels == media] = -100
    vision_x = torch.randn(batch, MMC4_IMAGES, 1, 3, image, image, generator=generator)
    return ids, mask, labels, vision_x


def train_fsdp_kwargs():
    """train.py's FSDP arguments (fp32: no mixed-precision policy), on the CPU."""
    return dict(
        process_group=None,
        cpu_offload=CPUOffload(offload_params=False),
        device_id=torch.device("cpu"),
        # train.py broadcasts rank 0's weights (sync_module_states=True);
        # FSDP only does that from a GPU. Every rank built or loaded the
        # same weights, so nothing is lost.
        sync_module_states=False,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=False,
        mixed_precision=None,
        forward_prefetch=True,
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        limit_all_gathers=True,
    )


def main():
    out, size, threads, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    # "plain": no activation checkpointing (train.py without
    # --gradient_checkpointing); default "checkpoint".
    checkpointing = (sys.argv[6] if len(sys.argv) > 6 else "checkpoint") != "plain"
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    folder = out if rank == 0 else os.path.join(out, f"python-rank-{rank}")
    os.makedirs(folder, exist_ok=True)
    model, tokenizer, cfg, vocab = build(folder, size)
    model.train()
    count = sum(p.numel() for p in model.parameters())
    # factory.py's freezing, with --freeze_lm_embeddings.
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    # What Flamingo(gradient_checkpointing=True) flags.
    model._use_gradient_checkpointing = True
    model.perceiver._use_gradient_checkpointing = True
    for layer in model.lang_encoder._get_decoder_layers():
        layer.decoder_layer._use_gradient_checkpointing = True
        if layer.gated_cross_attn_layer is not None:
            layer.gated_cross_attn_layer._use_gradient_checkpointing = True
    model.wrap_fsdp(train_fsdp_kwargs(), torch.device("cpu"))
    if checkpointing:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: getattr(m, "_use_gradient_checkpointing", False)
            and not isinstance(m, FSDP)
            and not isinstance(m, CheckpointWrapper),
        )
    parameters = [p for p in model.parameters()
                  if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.1)

    media = tokenizer.convert_tokens_to_ids("<image>")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch, TOKENS), generator=generator)
    ids[:, 0] = media
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[labels == media] = -100
    vision_x = torch.randn(batch, 1, 1, 3, cfg["image"], cfg["image"], generator=generator)
    batches = [(ids, mask, labels, vision_x)]
    if cfg.get("mmc4"):
        batches.append(mmc4_batch(tokenizer, vocab, max(batch // 2, 1), cfg["image"], generator))
    if rank == 0:
        tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels, "vision_x": vision_x}
        if len(batches) > 1:
            for name, tensor in zip(["input_ids", "attention_mask", "labels", "vision_x"], batches[1]):
                tensors[f"mmc4.{name}"] = tensor
        save_file(tensors, os.path.join(out, "batch.safetensors"))

    def step():
        for lang_x, attention_mask, target, images in batches:
            loss = model(vision_x=images, lang_x=lang_x, attention_mask=attention_mask, labels=target)[0]
            loss.backward()
        model.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - started
    if rank == 0:
        world = dist.get_world_size()
        samples = sum(len(b[0]) for b in batches)
        print(json.dumps({"size": size, "samples_per_second": samples * world * steps / seconds,
                          "parameters": count}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
