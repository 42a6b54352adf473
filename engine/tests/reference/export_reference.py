"""Loads a flamingo export (safetensors of OpenFlamingo's trainable state
dict) into the Python OpenFlamingo assembled as
model/tests/reference/released_format_reference.py assembles it, and
reports unexpected and missing trainable keys and the largest difference
from the exported values.

usage: python export_reference.py MODEL_DIR EXPORT.safetensors|EXPORT.pt
(MODEL_DIR: where released_format_reference.py wrote its files; rebuilt
here, deterministically, into a scratch folder.)
"""

import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../model/tests/reference"))
from released_format_reference import build  # noqa: E402


def main():
    path = sys.argv[2]
    # OpenFlamingo reads checkpoint.pt with torch.load; weights_only (the
    # default since torch 2.6) must accept it.
    exported = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    with tempfile.TemporaryDirectory() as scratch:
        model, _, _ = build(scratch)
    result = model.load_state_dict(exported, strict=False)
    trainable = {name for name, _ in model.perceiver.named_parameters(prefix="perceiver")}
    trainable |= {name for name, _ in model.lang_encoder.gated_cross_attn_layers.named_parameters(
        prefix="lang_encoder.gated_cross_attn_layers")}
    state = model.state_dict()
    difference = max((state[name] - tensor).abs().max().item() for name, tensor in exported.items())
    print(json.dumps({
        "unexpected": list(result.unexpected_keys),
        "missing_trainable": sorted(trainable - set(exported)),
        "max_difference": difference,
        "tensors": len(exported),
    }))


if __name__ == "__main__":
    main()
