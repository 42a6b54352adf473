"""Reference outputs for tests/parity_helpers.rs, from the Python OpenFlamingo.

Loads open_flamingo/src/helpers.py from the installed open-flamingo package by
path (its package __init__ would pull in transformers and open_clip, which
these modules do not need), builds tiny PerceiverResampler and
GatedCrossAttentionBlock modules with random non-default weights and non-zero
gates, and a MaskedCrossAttention that attends to all previous media, runs them, and writes weights (under OpenFlamingo's state-dict names),
inputs and outputs to one safetensors file.

usage: python helpers_reference.py OUT.safetensors
"""

import importlib.util
import os
import sys
import sysconfig

import torch
from safetensors.torch import save_file
from reference_common import randomise


def load_helpers():
    path = os.path.join(sysconfig.get_paths()["purelib"], "open_flamingo", "src", "helpers.py")
    if not os.path.exists(path):
        sys.exit(f"{path} not found: install open-flamingo==2.0.1 --no-deps (scripts/test.sh does)")
    spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def main():
    out = sys.argv[1]
    helpers = load_helpers()
    generator = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    tensors = {}

    perceiver = helpers.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5)
    randomise(perceiver, generator)
    timed = helpers.PerceiverResampler(
        dim=32, depth=1, dim_head=8, heads=4, num_latents=5, max_num_media=3, max_num_frames=2
    )
    randomise(timed, generator)
    block = helpers.GatedCrossAttentionBlock(dim=24, dim_visual=32, dim_head=8, heads=4)
    randomise(block, generator)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    # The mode no released model uses: each token sees every earlier image.
    all_previous = helpers.MaskedCrossAttention(
        dim=24, dim_visual=32, dim_head=8, heads=4, only_attend_immediate_media=False
    )
    randomise(all_previous, generator)

    vision = torch.randn(2, 3, 1, 7, 32, generator=generator)
    vision_frames = torch.randn(2, 3, 2, 7, 32, generator=generator)
    text = torch.randn(2, 9, 24, generator=generator)
    # Row 0: three images, tokens before the first one; row 1: two images
    # (the third media has no <image> token and is never attended).
    locations = torch.tensor(
        [[0, 1, 0, 0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0, 1, 0]], dtype=torch.bool
    )
    new_text = torch.randn(2, 4, 24, generator=generator)

    perceiver.eval()
    timed.eval()
    block.eval()
    all_previous.eval()
    with torch.no_grad():
        media = perceiver(vision)
        tensors["output.perceiver"] = media
        tensors["output.perceiver_timed"] = timed(vision_frames)
        tensors["output.xattn"] = block(text, media, media_locations=locations)
        tensors["output.xattn_cached"] = block(
            new_text, media, media_locations=locations, use_cached_media=True
        )
        tensors["output.all_previous"] = all_previous(text, media, media_locations=locations)
        tensors["output.all_previous_cached"] = all_previous(
            new_text, media, media_locations=locations, use_cached_media=True
        )

    for prefix, module in [
        ("perceiver", perceiver),
        ("perceiver_timed", timed),
        ("xattn", block),
        ("all_previous", all_previous),
    ]:
        for name, tensor in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = tensor
    tensors["input.vision"] = vision
    tensors["input.vision_frames"] = vision_frames
    tensors["input.text"] = text
    tensors["input.locations"] = locations.to(torch.uint8)
    tensors["input.new_text"] = new_text
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, out)


if __name__ == "__main__":
    main()
