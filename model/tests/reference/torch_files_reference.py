"""Checkpoints for tests/torch_files.rs, written by torch.save itself, with
the same tensors in a safetensors file as the independent reference:

- state_dict.bin: an OrderedDict with float32, float16, bfloat16, int64 and
  bool tensors, a transposed view and a slice sharing one storage, and an
  nn.Parameter;
- training.pt: OpenFlamingo's training-checkpoint shape
  ({"epoch", "model_state_dict" with "module." prefixes, "optimizer_state_dict"});
- sharded/: a Hugging Face shard index over two safetensors shards.

usage: python torch_files_reference.py OUT_DIR
"""

import collections
import json
import os
import sys

import torch
from safetensors.torch import save_file


def main():
    out = sys.argv[1]
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, generator=generator)
    state = collections.OrderedDict()
    state["layer.weight"] = base
    state["layer.weight_t"] = base.t()  # shares the storage, non-contiguous
    state["layer.row"] = base[2, 1:5]  # offset into the storage
    state["half"] = torch.randn(3, 2, generator=generator).half()
    state["bf16"] = torch.randn(5, generator=generator).bfloat16()
    state["ids"] = torch.arange(-3, 4, dtype=torch.int64)
    state["mask"] = torch.tensor([True, False, True])
    state["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=generator))
    state["scalar"] = torch.tensor(2.5)
    torch.save(state, os.path.join(out, "state_dict.bin"))
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, os.path.join(out, "state_dict.safetensors"))

    model = {"module.perceiver.latents": torch.randn(3, 4, generator=generator)}
    optimizer = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 4, generator=generator)}},
                 "param_groups": [{"lr": 1e-4, "weight_decay": 0.1, "params": [0]}]}
    torch.save({"epoch": 3, "model_state_dict": model, "optimizer_state_dict": optimizer},
               os.path.join(out, "training.pt"))
    save_file({"model_state_dict.module.perceiver.latents": model["module.perceiver.latents"],
               "optimizer_state_dict.state.0.exp_avg": optimizer["state"][0]["exp_avg"]},
              os.path.join(out, "training.safetensors"))

    os.makedirs(os.path.join(out, "sharded"))
    first = {"a.weight": torch.randn(2, 3, generator=generator)}
    second = {"b.weight": torch.randn(4, generator=generator), "c.bias": torch.randn(1, generator=generator)}
    save_file(first, os.path.join(out, "sharded", "model-00001-of-00002.safetensors"))
    save_file(second, os.path.join(out, "sharded", "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors",
                                            "c.bias": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(out, "sharded", "model.safetensors.index.json"), "w") as file:
        json.dump(index, file)


if __name__ == "__main__":
    main()
