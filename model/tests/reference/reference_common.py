"""Shared by the reference scripts (imported from their own folder)."""

import torch


def randomise(module, generator, scale=0.3):
    """Gives every parameter random values: LayerNorm-style weights near 1,
    everything else N(0, scale²), so that no path of the model is trivial."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1 and name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(scale * noise)
