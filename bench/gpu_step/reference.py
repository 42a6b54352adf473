"""Baseline for bench-gpu-step mfu: the Python OpenFlamingo training step on
one GPU, on a random model of the same shapes (open_clip ViT-L/14 at 224 px,
Hugging Face MPT 24 x 2048 with 16 heads and a 50,280-token vocabulary,
cross-attention before every layer), as OpenFlamingo's train.py runs it
without FSDP on one GPU: --precision amp_bf16 (fp32 weights under bf16
autocast), --gradient_checkpointing (the non-reentrant wrapper on the
flagged modules), the perceiver, cross-attention and input embedding
training with the <image>/<|endofchunk|> row mask, AdamW with weight decay
on the cross-attention, clip_grad_norm_(1.0). Prints one JSON line.

usage: python reference.py BATCH[,BATCH...] TOKENS IMAGES STEPS LAYERS
(one JSON line per batch size)
(BENCH_DEVICE=cpu tries it without a GPU.)
"""

import json
import os
import sys
import time
from functools import partial

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, CheckpointWrapper, apply_activation_checkpointing, checkpoint_wrapper)
from transformers import MptConfig, MptForCausalLM

WORDS = 50277  # the LM's tokenizer; OpenFlamingo adds <|endofchunk|>, <image>, <PAD>


class Clip(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


def main():
    batches = [int(value) for value in sys.argv[1].split(",")]
    tokens, images, steps, layers = (int(value) for value in sys.argv[2:6])
    # 3b: MPT-1B's LM (24 x 2048, 16 heads, cross-attention in every layer);
    # 9b: MPT-7B's (32 x 4096, 32 heads, every 4th layer). `layers` is the
    # vision tower's depth; the 9b LM has 4/3 of it.
    shape = sys.argv[6] if len(sys.argv) > 6 else "3b"
    if shape == "9b":
        lm_width, lm_heads, lm_layers, every = 4096, 32, layers * 4 // 3, 4
    else:
        lm_width, lm_heads, lm_layers, every = 2048, 16, layers, 1
    torch.manual_seed(0)
    device = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
    cuda = device.type == "cuda"
    visual = VisionTransformer(image_size=224, patch_size=14, width=1024, layers=layers, heads=16,
                               mlp_ratio=4.0, output_dim=768, act_layer=QuickGELU, output_tokens=True)
    visual.ln_post = torch.nn.Identity()
    lm = MptForCausalLM(MptConfig(d_model=lm_width, n_heads=lm_heads, n_layers=lm_layers, vocab_size=WORDS + 3,
                                  max_seq_len=2048))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.blocks")
    end_of_chunk, media = WORDS, WORDS + 1
    model = Flamingo(Clip(visual), lm, eoc_token_id=end_of_chunk, media_token_id=media, vis_dim=1024,
                     cross_attn_every_n_layers=every, gradient_checkpointing=True)
    model.to(device)
    model.train()
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: getattr(m, "_use_gradient_checkpointing", False)
        and not isinstance(m, CheckpointWrapper),
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if "gated_cross_attn" in n], "weight_decay": 0.1},
         {"params": [p for n, p in named if "gated_cross_attn" not in n], "weight_decay": 0.0}], lr=1e-4)

    for batch in batches:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(2, WORDS, (batch, tokens), generator=generator)
        stride = tokens // images
        for image in range(images):
            ids[:, image * stride] = media
            if image > 0:
                ids[:, image * stride - 1] = end_of_chunk
        labels = ids.masked_fill(ids == media, -100)
        mask = torch.ones_like(ids)
        vision_x = torch.randn(batch, images, 1, 3, 224, 224, generator=generator)
        ids, labels, mask, vision_x = (t.to(device) for t in (ids, labels, mask, vision_x))
        embedding = model.lang_encoder.get_input_embeddings()
        keep = torch.zeros_like(embedding.weight)
        keep[media] = 1
        keep[end_of_chunk] = 1

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def step():
            """Returns (loss, forward+backward seconds, optimizer seconds)."""
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels)[0]
            loss.backward()
            sync()
            middle = time.perf_counter()
            embedding.weight.grad = embedding.weight.grad * keep
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            return value, middle - started, time.perf_counter() - middle

        for _ in range(2):
            step()  # warm-up
        times = [step() for _ in range(steps)]
        forward_backward = sum(t[1] for t in times) / steps
        update = sum(t[2] for t in times) / steps
        seconds = forward_backward + update
        print(json.dumps({"shape": shape, "batch": batch, "parameters": parameters, "trainable": trainable, "step_seconds": seconds,
                          "forward_backward_seconds": forward_backward, "optimizer_seconds": update,
                          "samples_per_second": batch / seconds, "last_loss": times[-1][0],
                          "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))


if __name__ == "__main__":
    main()
