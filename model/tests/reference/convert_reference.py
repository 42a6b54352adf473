"""Reference for `flamingoctl model convert` (tests/tests/inference_cli.rs).

  python convert_reference.py make DIR
      writes DIR/checkpoint.pt (a training checkpoint: nested dicts, bf16,
      fp32 and int64 tensors, one a non-contiguous view) and DIR/lm/ with a
      two-shard pytorch_model.bin index, all with torch.save;
  python convert_reference.py check DIR
      loads what flamingoctl wrote with the safetensors library (and the
      sharded LM through its index) and exits non-zero unless every tensor
      equals the original in name, dtype, shape and value.
"""

import json
import os
import sys

import torch
from safetensors import safe_open


def originals():
    generator = torch.Generator().manual_seed(0)
    checkpoint = {
        "model_state_dict": {
            "perceiver.latents": torch.randn(4, 8, generator=generator).to(torch.bfloat16),
            "lang_encoder.gated_cross_attn_layers.0.attn_gate": torch.tensor([0.25]),
            "vision_encoder.proj": torch.randn(6, 3, generator=generator).t(),
        },
        "epoch": 3,
        "step_ids": torch.arange(6, dtype=torch.int64),
    }
    lm = {
        "transformer.wte.weight": torch.randn(10, 4, generator=generator).to(torch.float16),
        "transformer.blocks.0.ffn.up_proj.weight": torch.randn(8, 4, generator=generator),
        "transformer.blocks.0.norm_1.weight": torch.ones(4),
    }
    return checkpoint, lm


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def make(out):
    checkpoint, lm = originals()
    torch.save(checkpoint, os.path.join(out, "checkpoint.pt"))
    folder = os.path.join(out, "lm")
    os.makedirs(folder, exist_ok=True)
    names = sorted(lm)
    shards = {"pytorch_model-00001-of-00002.bin": names[:1], "pytorch_model-00002-of-00002.bin": names[1:]}
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({key: lm[key] for key in keys}, os.path.join(folder, shard))
        weight_map.update({key: shard for key in keys})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as file:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, file)


def read(path):
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"format": "pt"}, file.metadata()
        return {key: file.get_tensor(key) for key in file.keys()}


def same(expected, got, where):
    assert sorted(expected) == sorted(got), f"{where}: {sorted(expected)} != {sorted(got)}"
    for key, tensor in expected.items():
        other = got[key]
        assert other.dtype == tensor.dtype, f"{where} {key}: {other.dtype} != {tensor.dtype}"
        assert other.shape == tensor.shape, f"{where} {key}: {other.shape} != {tensor.shape}"
        assert torch.equal(other, tensor), f"{where} {key}: values differ"


def check(out):
    checkpoint, lm = originals()
    same(flatten(checkpoint), read(os.path.join(out, "checkpoint.safetensors")), "checkpoint")
    folder = os.path.join(out, "lm")
    with open(os.path.join(folder, "model.safetensors.index.json")) as file:
        index = json.load(file)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3, files
    got = {}
    for name in files:
        part = read(os.path.join(folder, name))
        assert all(index["weight_map"][key] == name for key in part), name
        got.update(part)
    same(lm, got, "lm")
    total = sum(t.numel() * t.element_size() for t in lm.values())
    assert index["metadata"]["total_size"] == total, index["metadata"]
    print("ok")


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
