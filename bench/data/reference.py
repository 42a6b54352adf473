"""Baseline for bench-data: OpenFlamingo's own preprocessing pipeline.

  python reference.py make OUT_DIR [LAION_SAMPLES MMC4_SAMPLES]
      writes LAION and MMC4 shards with photo-sized JPEGs (as img2dataset and
      convert_mmc4_to_wds.py produce them) and a BPE tokenizer dir;
  python reference.py time OUT_DIR laion|mmc4
      runs open_flamingo/train/data.py's pipeline over the shards in one
      process (webdataset grouping and decoding, open_clip's transform, the
      Hugging Face fast tokenizer; LAION in batches of 32 as upstream) and
      prints {"samples": N, "seconds": S}.
"""

import base64
import io
import json
import os
import sys
import tarfile
import time

import numpy as np
from PIL import Image


def photo(rng, width, height):
    # Smooth gradients plus texture: compresses like a photo, not like noise.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 / width), (y * 255 / height), ((x + y) * 127 / (width + height))], -1)
    texture = rng.normal(0, 18, size=(height, width, 3))
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


WORDS = ("a photo of the red car parked near an old house with green trees and two "
         "people walking their dog along the river on a sunny day in summer").split()


def sentence(rng, n):
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n)) + "."


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make(out, laion_samples, mmc4_samples):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(
        os.path.join(out, "lm"))
    sizes = [(500, 375), (640, 480), (400, 400), (375, 500)]
    with tarfile.open(os.path.join(out, "laion-00000.tar"), "w") as tar:
        for index in range(laion_samples):
            w, h = sizes[index % len(sizes)]
            add(tar, f"{index:09}.jpg", photo(rng, w, h))
            add(tar, f"{index:09}.txt", sentence(rng, 12).encode())
    with tarfile.open(os.path.join(out, "mmc4-00000.tar"), "w") as tar:
        for index in range(mmc4_samples):
            images = 3
            sentences = [sentence(rng, 14) for _ in range(8)]
            info = []
            for image in range(images):
                w, h = sizes[(index + image) % len(sizes)]
                info.append({"image_name": f"{index}-{image}.jpg",
                             "image_base64": base64.b64encode(photo(rng, w, h)).decode()})
            sims = [[0.3 if s == 2 * i + 1 else 0.1 for s in range(8)] for i in range(images)]
            doc = {"text_list": sentences, "image_info": info, "similarity_matrix": sims}
            add(tar, f"{index:09}.json", json.dumps(doc).encode())


def timed(out, dataset):
    import torch
    torch.set_num_threads(1)
    import open_flamingo.train as train_package
    sys.path.insert(0, os.path.dirname(train_package.__file__))
    import data as upstream
    import data_utils
    import webdataset as wds
    from open_clip.transform import image_transform
    from transformers import AutoTokenizer
    import functools

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "lm"), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    processor = image_transform(224, is_train=False)
    upstream.random.random = lambda: 1.0  # keep single-image documents: equal work on both sides
    url = os.path.join(out, f"{dataset}-00000.tar")
    if dataset == "laion":
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(url),
            data_utils.tarfile_to_samples_nothrow,
            wds.select(upstream.filter_no_caption_or_no_image),
            wds.decode("pilrgb", handler=data_utils.log_and_continue),
            wds.to_tuple("jpg;png;jpeg", "txt", handler=data_utils.log_and_continue),
            wds.batched(32, partial=True),
            wds.map_tuple(functools.partial(upstream.preprocess_image, image_processor=processor),
                          functools.partial(upstream.preprocess_laion_text, tokenizer=tokenizer),
                          handler=data_utils.log_and_continue),
        )
        count = lambda item: item[0].shape[0]
    else:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(url),
            data_utils.tarfile_to_samples_nothrow,
            wds.to_tuple("json", handler=data_utils.log_and_continue),
            wds.map(functools.partial(upstream.preprocess_interleaved, clip_processor=processor,
                                      tokenizer=tokenizer, sim_threshold=0.24, min_num_images=1,
                                      max_num_images=6), handler=data_utils.log_and_continue),
        )
        count = lambda item: 1
    started = time.perf_counter()
    samples = sum(count(item) for item in pipeline)
    seconds = time.perf_counter() - started
    print(json.dumps({"samples": samples, "seconds": seconds}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 256,
             int(sys.argv[4]) if len(sys.argv) > 4 else 96)
    else:
        timed(sys.argv[2], sys.argv[3])
