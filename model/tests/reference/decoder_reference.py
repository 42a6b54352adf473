"""Reference outputs for tests/parity_decoders.rs, from Hugging Face transformers.

Builds tiny random MPT, GPT-NeoX and LLaMA causal LMs, saves each as a
Hugging Face model directory (config.json + model.safetensors, as users have
them) and records its logits for fixed input ids.

usage: python decoder_reference.py OUT_DIR
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)
from reference_common import randomise



MODELS = {
    # 6 heads: not a power of two, so ALiBi's interleaved slopes are used.
    "mpt": lambda: MptForCausalLM(
        MptConfig(d_model=48, n_heads=6, n_layers=2, vocab_size=50, max_seq_len=32,
                  attn_config={"alibi_bias_max": 8})
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                      intermediate_size=64, vocab_size=50, rotary_pct=0.5,
                      use_parallel_residual=True, max_position_embeddings=64)
    ),
    "gpt_neox_sequential": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                      intermediate_size=64, vocab_size=50, rotary_pct=1.0,
                      use_parallel_residual=False, max_position_embeddings=64)
    ),
    # Grouped key/value heads (4 query heads, 2 key/value heads).
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, intermediate_size=48, vocab_size=50,
                    max_position_embeddings=64)
    ),
}


def main():
    out_dir = sys.argv[1]
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 50, (2, 11), generator=generator)
    outputs = {"input_ids": input_ids}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build()
        model.config._attn_implementation = "eager"
        randomise(model, generator)
        model.eval()
        with torch.no_grad():
            outputs[f"logits.{name}"] = model(input_ids=input_ids).logits
        model.save_pretrained(os.path.join(out_dir, name), safe_serialization=True)
    save_file({key: value.contiguous() for key, value in outputs.items()},
              os.path.join(out_dir, "reference.safetensors"))


if __name__ == "__main__":
    main()
