"""Reference outputs for tests/parity_vision.rs, from open_clip itself.

Builds tiny open_clip VisionTransformers (QuickGELU as OpenAI's weights use,
and plain GELU) with random weights, runs them on random images, and records
the tokens before ln_post (what the released OpenFlamingo checkpoints were
trained on, captured with a forward hook on ln_post), the tokens open_clip
returns (after ln_post in open_clip >= 2.23) and the pooled embedding.

usage: python vision_reference.py OUT.safetensors
"""

import sys

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import save_file
from reference_common import randomise



def run(prefix, act_layer, images, generator, tensors):
    tower = VisionTransformer(
        image_size=28,
        patch_size=7,
        width=32,
        layers=2,
        heads=4,
        mlp_ratio=4.0,
        output_dim=16,
        act_layer=act_layer,
        output_tokens=True,
    )
    randomise(tower, generator, 0.2)
    tower.eval()
    captured = {}
    tower.ln_post.register_forward_hook(lambda module, inputs, output: captured.update(pre=inputs[0]))
    with torch.no_grad():
        pooled, tokens = tower(images)
    tensors[f"output.{prefix}.pre_ln_post_tokens"] = captured["pre"][:, 1:]
    tensors[f"output.{prefix}.tokens"] = tokens
    tensors[f"output.{prefix}.pooled"] = pooled
    for name, tensor in tower.state_dict().items():
        tensors[f"{prefix}.{name}"] = tensor


def main():
    generator = torch.Generator().manual_seed(99)
    images = torch.randn(3, 3, 28, 28, generator=generator)
    tensors = {"input.images": images}
    run("visual", QuickGELU, images, generator, tensors)
    run("visual_gelu", torch.nn.GELU, images, generator, tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, sys.argv[1])


if __name__ == "__main__":
    main()
