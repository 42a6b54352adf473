"""Reference for tests/flops.rs: the FLOPs PyTorch's FlopCounterMode counts
for one training micro-batch (forward and backward) of the Python
OpenFlamingo, with OpenFlamingo's frozen and trainable parts, on the
released-format tiny model of model/tests/reference/released_format_reference.py.

usage: python flops_reference.py OUT_DIR   (writes OUT_DIR/flops.json)
"""

import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../model/tests/reference"))
from released_format_reference import build  # noqa: E402


def main():
    out = sys.argv[1]
    model, tokenizer, generator = build(out)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)

    batch, images, tokens = 3, 2, 24
    vocab = model.lang_encoder.get_input_embeddings().weight.shape[0]
    media = tokenizer.additional_special_tokens_ids[tokenizer.additional_special_tokens.index("<image>")]
    lang_x = torch.randint(0, vocab - 3, (batch, tokens), generator=generator)
    lang_x[:, 0] = media
    lang_x[:, 9] = media
    attention_mask = torch.ones_like(lang_x)
    vision_x = torch.randn(batch, images, 1, 3, 28, 28, generator=generator)

    with FlopCounterMode(display=False) as counter:
        loss = model(vision_x=vision_x, lang_x=lang_x, attention_mask=attention_mask, labels=lang_x)[0]
        loss.backward()
    with open(os.path.join(out, "flops.json"), "w") as file:
        json.dump({"flops": counter.get_total_flops(), "batch": batch, "images": images,
                   "tokens": tokens}, file)


if __name__ == "__main__":
    main()
