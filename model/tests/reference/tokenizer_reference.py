"""Reference ids for tests/parity_tokenizer.rs, from Hugging Face's tokenizer
with OpenFlamingo's additions (open_flamingo/src/factory.py).

Trains two tiny tokenizers with the `tokenizers` library (no hub access): a
byte-level BPE like GPT-NeoX/MPT's, without a pad token, and a Metaspace BPE
with a BOS post-processor like LLaMA's, with a declared pad token. Saves each
as a Hugging Face dir, then loads it with AutoTokenizer, adds the tokens as
OpenFlamingo does and records ids and decodings as JSON.

usage: python tokenizer_reference.py OUT_DIR
"""

import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "An image of two cats sitting on a red sofa.",
    "Output: a dog runs across the park, chasing a ball.",
    "Question: what color is the bus? Short answer: yellow",
    "Ünïcödé words, numbers 12345 and punctuation!?",
] * 20

TEXTS = [
    "<image>Output: a cat on a sofa.<|endofchunk|>",
    "<image>Question: what color is the bus? Short answer:",
    "Ünïcödé 12345 <image> and <|endofchunk|><image>dogs",
    "  leading spaces and\nnew lines",
]


def byte_level(out):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(out)


def metaspace(out):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(out)


def main():
    out_dir = sys.argv[1]
    reference = {}
    for name, build in [("byte_level", byte_level), ("metaspace", metaspace)]:
        path = os.path.join(out_dir, name)
        build(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # As open_flamingo/src/factory.py does.
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<PAD>"})
        ids = [tokenizer(text)["input_ids"] for text in TEXTS]
        reference[name] = {
            "len": len(tokenizer),
            "media": tokenizer.encode("<image>")[-1],
            "eoc": tokenizer.encode("<|endofchunk|>")[-1],
            "pad": tokenizer.pad_token_id,
            "texts": TEXTS,
            "ids": ids,
            "decoded": [tokenizer.decode(i, skip_special_tokens=True) for i in ids],
        }
    with open(os.path.join(out_dir, "reference.json"), "w") as file:
        json.dump(reference, file)


if __name__ == "__main__":
    main()
