"""Reference outputs for tests/parity_flamingo.rs: OpenFlamingo's own Flamingo
model (open_flamingo.src.flamingo.Flamingo with FlamingoLMMixin, as its
factory assembles it) on tiny random parts, for each decoder family and
cross_attn_every_n_layers 1 and 2, with non-zero gates.

The released checkpoints were trained on CLIP tokens taken before ln_post
(open_clip <= 2.22); the installed open_clip applies ln_post, so the reference
replaces ln_post by the identity after its weights are saved.

Writes OUT_DIR/<case>/lm (a Hugging Face model dir) and
OUT_DIR/<case>/flamingo.safetensors (vision_encoder.*, perceiver.*,
lang_encoder.gated_cross_attn_layers.*, inputs, logits, greedy tokens).

usage: python flamingo_reference.py OUT_DIR
"""

import os
import sys

import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
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

VOCAB = 50
MEDIA_TOKEN = 48  # <image>
EOC_TOKEN = 49  # <|endofchunk|>
PAD_TOKEN = 47  # never in the prompts below

LMS = {
    "mpt": (lambda: MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=4, vocab_size=VOCAB, max_seq_len=32)),
            "transformer.blocks"),
    "gpt_neox": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=4, intermediate_size=64,
        vocab_size=VOCAB, rotary_pct=0.5, max_position_embeddings=64)), "gpt_neox.layers"),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=4, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=64)), "model.layers"),
}



class Clip(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


def main():
    out_dir = sys.argv[1]
    generator = torch.Generator().manual_seed(11)
    vision_x = torch.randn(2, 2, 1, 3, 28, 28, generator=generator)
    # Row 0: text, <image>, text, <eoc>, <image>, text; row 1: one image late.
    lang_x = torch.randint(0, 40, (2, 12), generator=generator)
    lang_x[0, 1] = MEDIA_TOKEN
    lang_x[0, 5] = EOC_TOKEN
    lang_x[0, 6] = MEDIA_TOKEN
    lang_x[1, 4] = MEDIA_TOKEN
    # Row 1 shortened to 8 real tokens, left-padded with PAD_TOKEN.
    padded_x = lang_x.clone()
    padded_x[1, :4] = PAD_TOKEN
    padded_mask = torch.ones_like(padded_x)
    padded_mask[1, :4] = 0
    for family, (build, layers_attr) in LMS.items():
        for every in (1, 2):
            case = f"{family}_every{every}"
            torch.manual_seed(0)
            visual = VisionTransformer(image_size=28, patch_size=7, width=32, layers=2, heads=4,
                                       mlp_ratio=4.0, output_dim=16, act_layer=QuickGELU,
                                       output_tokens=True)
            randomise(visual, generator, 0.2)
            lm = build()
            lm.config._attn_implementation = "eager"
            randomise(lm, generator)
            lm.save_pretrained(os.path.join(out_dir, case, "lm"), safe_serialization=True)
            tensors = {f"vision_encoder.{k}": v for k, v in visual.state_dict().items()}
            visual.ln_post = torch.nn.Identity()

            extend_instance(lm, FlamingoLMMixin)
            lm.set_decoder_layers_attr_name(layers_attr)
            model = Flamingo(Clip(visual), lm, eoc_token_id=EOC_TOKEN, media_token_id=MEDIA_TOKEN,
                             vis_dim=32, cross_attn_every_n_layers=every)
            randomise(model.perceiver, generator, 0.2)
            for layer in model.lang_encoder.gated_cross_attn_layers:
                if layer is not None:
                    randomise(layer, generator, 0.2)
                    with torch.no_grad():
                        layer.attn_gate.fill_(0.8)
                        layer.ff_gate.fill_(-0.5)
            model.eval()
            with torch.no_grad():
                logits = model(vision_x, lang_x).logits
                # Greedy generation through Hugging Face's generate (KV cache,
                # cached media), as OpenFlamingo's eval suite runs it.
                generated = model.generate(vision_x, lang_x, max_new_tokens=6, num_beams=1,
                                           pad_token_id=EOC_TOKEN)
                beam3 = model.generate(vision_x, lang_x, max_new_tokens=6, num_beams=3,
                                       pad_token_id=EOC_TOKEN)
                beam2 = model.generate(vision_x, lang_x, max_new_tokens=5, num_beams=2,
                                       length_penalty=0.5, pad_token_id=EOC_TOKEN)
                # An EOS the model actually produces, so hypotheses finish early.
                # The pad id must not occur in the prompt: HF would infer an
                # attention mask from it (OpenFlamingo's pad is <PAD>). With
                # eos != pad, HF 4.57 drops the KV cache unless asked; the
                # cached path is the one HF takes by default otherwise, and
                # the only one where OpenFlamingo's cached-media logic runs.
                frequent = int(generated[0, lang_x.shape[1] + 1])
                beam_eos = model.generate(vision_x, lang_x, max_new_tokens=6, num_beams=3,
                                          eos_token_id=frequent, pad_token_id=PAD_TOKEN,
                                          use_cache=True)
                # A left-padded batch, as OpenFlamingo's eval suite batches
                # prompts of different lengths.
                padded_logits = model(vision_x, padded_x, attention_mask=padded_mask).logits
                padded_greedy = model.generate(vision_x, padded_x, attention_mask=padded_mask,
                                               max_new_tokens=6, num_beams=1,
                                               pad_token_id=PAD_TOKEN, use_cache=True)
                padded_beam = model.generate(vision_x, padded_x, attention_mask=padded_mask,
                                             max_new_tokens=5, num_beams=3,
                                             pad_token_id=PAD_TOKEN, use_cache=True)
            tensors["input.padded_x"] = padded_x
            tensors["input.padded_mask"] = padded_mask
            tensors["output.padded_logits"] = padded_logits
            tensors["output.padded_greedy"] = padded_greedy[:, padded_x.shape[1]:]
            tensors["output.padded_beam3"] = padded_beam[:, padded_x.shape[1]:]
            tensors["output.greedy"] = generated[:, lang_x.shape[1]:]
            tensors["input.beam_eos"] = torch.tensor([frequent])
            tensors["output.beam3_eos"] = beam_eos[:, lang_x.shape[1]:]
            tensors["output.beam3"] = beam3[:, lang_x.shape[1]:]
            tensors["output.beam2_lp05"] = beam2[:, lang_x.shape[1]:]
            tensors.update({f"perceiver.{k}": v for k, v in model.perceiver.state_dict().items()})
            for index, layer in enumerate(model.lang_encoder.gated_cross_attn_layers):
                if layer is not None:
                    for k, v in layer.state_dict().items():
                        tensors[f"lang_encoder.gated_cross_attn_layers.{index}.{k}"] = v
            tensors["input.vision_x"] = vision_x
            tensors["input.lang_x"] = lang_x
            tensors["output.logits"] = logits
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      os.path.join(out_dir, case, "flamingo.safetensors"))


if __name__ == "__main__":
    main()
