"""Reference for tests/gradients.rs: one training step's gradients of the
Python OpenFlamingo on the released-format tiny model of
model/tests/reference/released_format_reference.py.

OpenFlamingo's factory.py freezes everything but the perceiver, the gated
cross-attention layers and the LM's input embeddings (tied to the output in
MPT). The batch is two MMC4-style sequences of two images, right-padded,
labelled as train_utils.py labels them; the loss is what Flamingo.forward
returns for those labels.

usage: python grad_reference.py OUT_DIR
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../model/tests/reference"))
from released_format_reference import build  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../data/tests/reference"))
from data_reference import interleaved_labels  # noqa: E402  (train_utils.py's masking)


def main():
    out = sys.argv[1]
    model, tokenizer, generator = build(out)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)

    media = tokenizer.additional_special_tokens_ids[tokenizer.additional_special_tokens.index("<image>")]
    eoc = tokenizer.additional_special_tokens_ids[tokenizer.additional_special_tokens.index("<|endofchunk|>")]
    texts = ["intro <image>Output: a cat on a sofa.<|endofchunk|><image>a dog in the park<|endofchunk|>" + tokenizer.eos_token,
             "<image>a dog<|endofchunk|>then <image>Output: a cat.<|endofchunk|>" + tokenizer.eos_token]
    tokenizer.padding_side = "right"
    encoded = tokenizer(texts, padding="longest", return_tensors="pt")
    lang_x, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    labels = interleaved_labels(lang_x, tokenizer, media, eoc)
    vision_x = torch.randn(2, 2, 1, 3, 28, 28, generator=generator)

    loss = model(vision_x=vision_x, lang_x=lang_x, attention_mask=attention_mask, labels=labels)[0]
    loss.backward()
    tensors = {"lang_x": lang_x, "attention_mask": attention_mask, "labels": labels,
               "vision_x": vision_x, "loss": loss.detach().reshape(1)}
    named = list(model.perceiver.named_parameters(prefix="perceiver"))
    named += list(model.lang_encoder.gated_cross_attn_layers.named_parameters(
        prefix="lang_encoder.gated_cross_attn_layers"))
    named += [("lang_encoder.transformer.wte.weight", model.lang_encoder.get_input_embeddings().weight)]
    for name, parameter in named:
        tensors[f"grad.{name}"] = parameter.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "gradients.safetensors"))


if __name__ == "__main__":
    main()
