"""Baseline for bench-startup: the Python OpenFlamingo's start-up under torch
FSDP, as OpenFlamingo's train.py does it, on the model files of
bench/model/reference.py.

  build OUT_DIR SIZE BATCH
      Writes the random model in the released formats (clip.bin, lm/,
      checkpoint.pt, model.toml) and a LAION batch (batch.safetensors: BATCH
      samples of 32 tokens and one image); prints one JSON line with the
      parameter count and the Python model's mean loss on that batch
      (forward only: the reference for bench-startup's forward check).

  rank OUT_DIR SIZE THREADS STEPS
      One rank, started with torchrun's variables. As train.py: the process
      group first; then every rank builds the model from the files
      (open_clip builds the vision tower and loads clip.bin into it,
      transformers' from_pretrained loads the decoder, Flamingo adds the
      perceiver and the cross-attention, the resumed checkpoint.pt is
      loaded with strict=False), freezes as factory.py does with
      --freeze_lm_embeddings, wraps it with Flamingo.wrap_fsdp and train.py's
      FSDP arguments (FULL_SHARD, fp32), makes AdamW and steps on the
      batch. Prints one JSON line: this rank's peak resident memory
      (VmHWM) once the model is wrapped and over the run, the bytes it read while loading (rchar of /proc/self/io),
      the seconds from its process's start to the end of its first step,
      and the first STEPS losses.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../model"))
sys.path.append(os.path.join(os.path.dirname(__file__), "../train_step"))
from reference import SIZES, Clip, build  # noqa: E402
from fsdp_reference import train_fsdp_kwargs  # noqa: E402

TOKENS = 32


def proc_status(key):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def read_bytes():
    with open("/proc/self/io") as file:
        for line in file:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def process_age():
    """Seconds since this process started (its start time in /proc)."""
    with open("/proc/self/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as file:
        return float(file.read().split()[0]) - started


def write(out, size, batch):
    model, tokenizer, cfg, vocab = build(out, size)
    media = tokenizer.convert_tokens_to_ids("<image>")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch, TOKENS), generator=generator)
    ids[:, 0] = media
    labels = ids.clone()
    labels[labels == media] = -100
    vision_x = torch.randn(batch, 1, 1, 3, cfg["image"], cfg["image"], generator=generator)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "vision_x": vision_x},
              os.path.join(out, "batch.safetensors"))
    with torch.no_grad():
        loss = model(vision_x=vision_x, lang_x=ids, attention_mask=torch.ones_like(ids), labels=labels)[0]
    print(json.dumps({"size": size, "parameters": sum(p.numel() for p in model.parameters()),
                      "loss": loss.item()}))


def load(out, size):
    """The model as create_model_and_transforms and train.py's resume make it."""
    from open_clip.transformer import QuickGELU, VisionTransformer
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SIZES[size]
    # open_clip.create_model: the tower built (randomly initialised), then
    # the pretrained file loaded into it.
    visual = VisionTransformer(image_size=cfg["image"], patch_size=cfg["patch"], width=cfg["vis_width"],
                               layers=cfg["vis_layers"], heads=cfg["vis_width"] // 64 or 1, mlp_ratio=4.0,
                               output_dim=64, act_layer=QuickGELU, output_tokens=True)
    clip = Clip(visual)
    clip.load_state_dict(torch.load(os.path.join(out, "clip.bin"), map_location="cpu"))
    visual.ln_post = torch.nn.Identity()
    lm_dir = os.path.join(out, "lm")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("gpt_neox.layers" if cfg.get("family") == "gpt_neox" else "transformer.blocks")
    lm.resize_token_embeddings(len(tokenizer))
    model = Flamingo(clip, lm, eoc_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
                     media_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                     vis_dim=cfg["vis_width"], cross_attn_every_n_layers=cfg["every"])
    # train.py --resume_from_checkpoint: every rank loads the file.
    model.load_state_dict(torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu"), strict=False)
    return model


def rank(out, size, threads, steps):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    before = read_bytes()
    model = load(out, size)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.wrap_fsdp(train_fsdp_kwargs(), torch.device("cpu"))
    model.train()
    parameters = [p for p in model.parameters()
                  if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.1)
    load_read = read_bytes() - before
    load_peak = proc_status("VmHWM")
    batch = load_file(os.path.join(out, "batch.safetensors"))
    losses, first_step = [], None
    for _ in range(steps):
        loss = model(vision_x=batch["vision_x"], lang_x=batch["input_ids"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"])[0]
        loss.backward()
        model.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if first_step is None:
            first_step = process_age()
    print(json.dumps({"rank": dist.get_rank(), "load_peak_rss_bytes": load_peak, "peak_rss_bytes": proc_status("VmHWM"),
                      "load_read_bytes": load_read, "first_step_seconds": first_step, "losses": losses}))
    dist.destroy_process_group()


def main():
    if sys.argv[1] == "build":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        rank(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))


if __name__ == "__main__":
    main()
