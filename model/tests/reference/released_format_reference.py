"""Files in the released formats for tests/load_spec.rs, and OpenFlamingo's
logits on them.

Assembles a tiny model the way open_flamingo/src/factory.py does (tokenizer
with <|endofchunk|>, <image>, <PAD>; resize_token_embeddings; FlamingoLMMixin;
Flamingo) and writes what a user would have:
- clip.bin: a full open_clip CLIP state dict (visual.* and text-tower keys),
  torch.save'd; clip.json: its open_clip model config;
- lm/: the Hugging Face LM dir (config.json, model.safetensors,
  tokenizer files), saved before the embeddings were resized;
- lm_mosaic/: the same LM as MosaicML's older MosaicGPT code saves it
  (model_type "mosaic_gpt", flat config, ln_1/mlp.mlp_up/ln_f names,
  pytorch_model.bin), as mpt-1b-redpajama-200b ships; mosaic.toml uses it;
- checkpoint.pt: the trainable part of the Flamingo state dict, torch.save'd
  (perceiver, cross-attention layers under both of their names, embeddings);
- model.toml: the spec; reference.safetensors: inputs and logits.

usage: python released_format_reference.py OUT_DIR
"""

import os
import sys

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, MptConfig, MptForCausalLM, PreTrainedTokenizerFast
from reference_common import randomise

PROMPT = "<image>Output: a cat on a sofa.<|endofchunk|><image>Output: a"



class Clip(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


MOSAIC_NAMES = [("transformer.norm_f.", "transformer.ln_f."), (".norm_1.", ".ln_1."),
                (".norm_2.", ".ln_2."), (".ffn.up_proj.", ".mlp.mlp_up."),
                (".ffn.down_proj.", ".mlp.mlp_down.")]


def save_as_mosaic_gpt(lm, lm_dir, mosaic_dir):
    import json
    import shutil
    os.makedirs(mosaic_dir, exist_ok=True)
    state = {}
    for key, value in lm.state_dict().items():
        if key == "lm_head.weight":  # tied to transformer.wte; MosaicGPT has no lm_head
            continue
        for hf, mosaic in MOSAIC_NAMES:
            key = key.replace(hf, mosaic)
        state[key] = value.clone()
    torch.save(state, os.path.join(mosaic_dir, "pytorch_model.bin"))
    config = lm.config
    with open(os.path.join(mosaic_dir, "config.json"), "w") as file:
        json.dump({"model_type": "mosaic_gpt", "architectures": ["MosaicGPT"],
                   "d_model": config.d_model, "n_heads": config.n_heads,
                   "n_layers": config.n_layers, "mlp_ratio": 4,
                   "max_seq_len": config.max_seq_len, "vocab_size": config.vocab_size,
                   "alibi": True, "alibi_bias_max": 8, "attn_clip_qkv": None,
                   "attn_qk_ln": False, "attn_impl": "torch", "softmax_scale": None,
                   "low_precision_layernorm": True, "no_bias": True, "logit_scale": None,
                   "prefix_lm": False, "emb_pdrop": 0, "resid_pdrop": 0, "attn_pdrop": 0},
                  file)
    for name in os.listdir(lm_dir):
        if "token" in name:
            shutil.copy(os.path.join(lm_dir, name), mosaic_dir)


def build(out, max_seq_len=64):
    """Writes the released-format files; returns (model, tokenizer, generator)."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)

    # Tokenizer (byte-level BPE, no pad token) and the LM, saved as a user has them.
    lm_dir = os.path.join(out, "lm")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Output: a cat on a sofa.", "a dog in the park"] * 30,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(lm_dir)
    base_vocab = bpe.get_vocab_size()
    lm = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=base_vocab, max_seq_len=max_seq_len))
    lm.config._attn_implementation = "eager"
    randomise(lm, generator, 0.3)
    lm.save_pretrained(lm_dir, safe_serialization=True)
    save_as_mosaic_gpt(lm, lm_dir, os.path.join(out, "lm_mosaic"))

    # open_clip: the full CLIP state dict holds the text tower too.
    visual = VisionTransformer(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp_ratio=4.0,
                               output_dim=16, act_layer=QuickGELU, output_tokens=True)
    randomise(visual, generator, 0.2)
    clip_state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    clip_state["token_embedding.weight"] = torch.randn(10, 16, generator=generator)
    clip_state["logit_scale"] = torch.tensor(4.6)
    torch.save(clip_state, os.path.join(out, "clip.bin"))
    with open(os.path.join(out, "clip.json"), "w") as file:
        file.write('{"embed_dim": 16, "quick_gelu": true, "vision_cfg": '
                   '{"image_size": 28, "layers": 2, "width": 32, "patch_size": 7, "head_width": 8}}')
    visual.ln_post = torch.nn.Identity()  # tokens before ln_post, as released models were trained

    # As open_flamingo/src/factory.py assembles it.
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.blocks")
    lm.resize_token_embeddings(len(tokenizer))
    eoc = tokenizer("<|endofchunk|>", add_special_tokens=False)["input_ids"][-1]
    media = tokenizer("<image>", add_special_tokens=False)["input_ids"][-1]
    model = Flamingo(Clip(visual), lm, eoc_token_id=eoc, media_token_id=media, vis_dim=32,
                     cross_attn_every_n_layers=1)
    randomise(model.perceiver, generator, 0.2)
    for layer in model.lang_encoder.gated_cross_attn_layers:
        randomise(layer, generator, 0.2)
        with torch.no_grad():
            layer.attn_gate.fill_(0.6)
            layer.ff_gate.fill_(-0.7)
    with torch.no_grad():
        model.lang_encoder.transformer.wte.weight[base_vocab:] = torch.randn(
            len(tokenizer) - base_vocab, 32, generator=generator)
    model.eval()

    trainable = {k: v for k, v in model.state_dict().items()
                 if "perceiver" in k or "gated_cross_attn" in k or k.endswith("wte.weight")}
    torch.save(trainable, os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "model.toml"), "w") as file:
        file.write('[vision]\narch = "clip.json"\nweights = "clip.bin"\n'
                   '[language]\npath = "lm"\n'
                   '[flamingo]\ncross_attn_every_n_layers = 1\ncheckpoint = "checkpoint.pt"\n')
    with open(os.path.join(out, "mosaic.toml"), "w") as file:
        file.write('[vision]\narch = "clip.json"\nweights = "clip.bin"\n'
                   '[language]\npath = "lm_mosaic"\n'
                   '[flamingo]\ncross_attn_every_n_layers = 1\ncheckpoint = "checkpoint.pt"\n')
    return model, tokenizer, generator


def main():
    out = sys.argv[1]
    model, tokenizer, generator = build(out)
    lang_x = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    vision_x = torch.randn(1, 2, 1, 3, 28, 28, generator=generator)
    with torch.no_grad():
        logits = model(vision_x, lang_x).logits
    save_file({"lang_x": lang_x, "vision_x": vision_x, "logits": logits.contiguous()},
              os.path.join(out, "reference.safetensors"))

    # What `flamingoctl score` and `generate` must print for two PNG images.
    import json
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image
    rng = np.random.default_rng(4)
    transform = image_transform(28, is_train=False)
    images = []
    for index, (width, height) in enumerate([(40, 30), (33, 50)]):
        path = os.path.join(out, f"photo{index}.png")
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8), "RGB").save(path)
        images.append(transform(Image.open(path)))
    photos = torch.stack(images).unsqueeze(0).unsqueeze(2)
    with torch.no_grad():
        logits = model(photos, lang_x).logits
        logprobs = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        scored = logprobs.gather(1, lang_x[0, 1:].unsqueeze(1)).squeeze(1)
        generated = model.generate(photos, lang_x, max_new_tokens=5, num_beams=1,
                                   pad_token_id=tokenizer.pad_token_id)[0, lang_x.shape[1]:]
        beams = model.generate(photos, lang_x, max_new_tokens=5, num_beams=3, length_penalty=0.8,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)[0, lang_x.shape[1]:]
    with open(os.path.join(out, "cli_reference.json"), "w") as file:
        json.dump({"prompt": PROMPT,
                   "token_ids": lang_x[0].tolist(),
                   "logprobs": scored.tolist(),
                   "generated": generated.tolist(),
                   "text": tokenizer.decode(generated, skip_special_tokens=True),
                   "beam3": beams.tolist(),
                   "beam3_text": tokenizer.decode(beams, skip_special_tokens=True)}, file)


if __name__ == "__main__":
    main()
