"""Baseline for bench-model: builds a random OpenFlamingo model of a given
size the way open_flamingo's factory does, writes it in the released formats
(model.toml, clip.bin, lm/, checkpoint.pt) for flamingo to load, and times
the Python OpenFlamingo on it: forward over a prompt, and greedy generate.
use_cache=True is passed explicitly: with pad != eos (OpenFlamingo's <PAD>
and <|endofchunk|>) transformers 4.57 otherwise drops the KV cache and
recomputes the whole sequence per token. Prints one JSON line.

usage: python reference.py OUT_DIR tiny|100m|neox|1b|3b THREADS
"""

import json
import os
import sys
import time

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM,
                          PreTrainedTokenizerFast)

SIZES = {
    # vision width/layers/image, LM d_model/layers/heads, cross-attention interval
    "tiny": dict(vis_width=32, vis_layers=2, image=28, patch=7, d_model=64, layers=2, heads=4, every=1),
    "100m": dict(vis_width=256, vis_layers=4, image=112, patch=14, d_model=768, layers=12, heads=12, every=2),
    # A mid-size GPT-NeoX-family decoder (RedPajama's and Pythia's) under a
    # 224 px tower; bench-train-step steps it on a LAION and an MMC4 batch.
    "neox": dict(vis_width=384, vis_layers=6, image=224, patch=14, d_model=1024, layers=12, heads=16, every=2,
                 family="gpt_neox", mmc4=True),
    # OpenFlamingo shapes for bench-startup: CLIP ViT-L/14 under a decoder of
    # about 0.7B (24 x 1536, cross-attention every 4th layer), about 1.1B in
    # all; and OpenFlamingo-3B's (MPT-1B's 24 x 2048, cross-attention after
    # every layer), about 2.4B with this small vocabulary.
    "1b": dict(vis_width=1024, vis_layers=24, image=224, patch=14, d_model=1536, layers=24, heads=16, every=4),
    "3b": dict(vis_width=1024, vis_layers=24, image=224, patch=14, d_model=2048, layers=24, heads=16, every=1),
}
PROMPT_TOKENS = 64
NEW_TOKENS = 32
REPEATS = 5


class Clip(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


def build(out, size):
    """Writes the released-format files; returns (model, tokenizer, cfg, base vocab)."""
    torch.manual_seed(0)
    cfg = SIZES[size]
    lm_dir = os.path.join(out, "lm")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["an image of a cat", "a dog runs in the park"] * 50,
                            trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(lm_dir)
    neox = cfg.get("family") == "gpt_neox"
    if neox:
        lm = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=cfg["d_model"], num_attention_heads=cfg["heads"],
                                              num_hidden_layers=cfg["layers"], intermediate_size=4 * cfg["d_model"],
                                              vocab_size=bpe.get_vocab_size(), max_position_embeddings=512))
    else:
        lm = MptForCausalLM(MptConfig(d_model=cfg["d_model"], n_heads=cfg["heads"], n_layers=cfg["layers"],
                                      vocab_size=bpe.get_vocab_size(), max_seq_len=256))
    lm.save_pretrained(lm_dir, safe_serialization=True)
    visual = VisionTransformer(image_size=cfg["image"], patch_size=cfg["patch"], width=cfg["vis_width"],
                               layers=cfg["vis_layers"], heads=cfg["vis_width"] // 64 or 1, mlp_ratio=4.0,
                               output_dim=64, act_layer=QuickGELU, output_tokens=True)
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, os.path.join(out, "clip.bin"))
    with open(os.path.join(out, "clip.json"), "w") as file:
        json.dump({"embed_dim": 64, "quick_gelu": True,
                   "vision_cfg": {"image_size": cfg["image"], "layers": cfg["vis_layers"],
                                  "width": cfg["vis_width"], "patch_size": cfg["patch"],
                                  "head_width": cfg["vis_width"] // max(cfg["vis_width"] // 64, 1)}}, file)
    visual.ln_post = torch.nn.Identity()

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("gpt_neox.layers" if neox else "transformer.blocks")
    lm.resize_token_embeddings(len(tokenizer))
    model = Flamingo(Clip(visual), lm, eoc_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
                     media_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                     vis_dim=cfg["vis_width"], cross_attn_every_n_layers=cfg["every"])
    model.eval()
    trainable = {k: v for k, v in model.state_dict().items()
                 if "perceiver" in k or "gated_cross_attn" in k or k.endswith("wte.weight")
                 or k.endswith("embed_in.weight")}
    torch.save(trainable, os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "model.toml"), "w") as file:
        file.write(f'[vision]\narch = "clip.json"\nweights = "clip.bin"\n[language]\npath = "lm"\n'
                   f'[flamingo]\ncross_attn_every_n_layers = {cfg["every"]}\ncheckpoint = "checkpoint.pt"\n')
    return model, tokenizer, cfg, bpe.get_vocab_size()


def main():
    out, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    model, tokenizer, cfg, vocab = build(out, size)
    media = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = media
    vision_x = torch.randn(1, 1, 1, 3, cfg["image"], cfg["image"], generator=torch.Generator().manual_seed(2))
    torch.save({"ids": ids, "vision_x": vision_x}, os.path.join(out, "inputs.pt"))
    with torch.no_grad():
        model(vision_x, ids)  # warm-up
        started = time.perf_counter()
        for _ in range(REPEATS):
            model(vision_x, ids)
        forward_seconds = (time.perf_counter() - started) / REPEATS
        model.generate(vision_x, ids, max_new_tokens=4, num_beams=1, min_new_tokens=4, use_cache=True,
                       pad_token_id=tokenizer.pad_token_id)  # warm-up
        started = time.perf_counter()
        for _ in range(REPEATS):
            model.generate(vision_x, ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1,
                           use_cache=True,
                           pad_token_id=tokenizer.pad_token_id)
        generate_seconds = (time.perf_counter() - started) / REPEATS
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"size": size, "parameters": parameters, "prompt_tokens": PROMPT_TOKENS,
                      "new_tokens": NEW_TOKENS, "forward_seconds": forward_seconds,
                      "generate_seconds": generate_seconds}))


if __name__ == "__main__":
    main()
