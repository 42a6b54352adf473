"""Fixture shards and OpenFlamingo's own preprocessing of them, for
tests/parity.rs.

Writes, under OUT_DIR:
- lm/: a Hugging Face tokenizer dir (byte-level BPE, eos <|endoftext|>, no
  pad token), as the LM dir a user has;
- laion-000.tar, mmc4-000.tar: webdataset shards with ordinary samples and
  broken ones (missing members, corrupt images, bad base64, bad JSON, …);
- expected.jsonl: per sample, in shard order, what open_flamingo/train/data.py
  (open-flamingo 2.0.1, with webdataset 0.2.86's grouping and decoding) makes of it:
  token ids, attention mask, labels (train_utils.py's masking), the number
  of images kept — or that it was rejected;
- images.safetensors: the image tensors upstream produced (key -> [n,3,224,224]).

Augmentation is switched off (no flip, no random single-image drop), as
`flamingoctl data inspect --no-augment` does.

usage: python data_reference.py OUT_DIR
"""

import base64
import io
import json
import os
import random
import sys
import tarfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import open_flamingo.train as train_package

sys.path.insert(0, os.path.dirname(train_package.__file__))
import data as upstream  # noqa: E402  (open_flamingo/train/data.py)
import data_utils  # noqa: E402
import webdataset as wds  # noqa: E402
from open_clip.transform import image_transform  # noqa: E402

WORDS = ("a red circle left of two small blue squares on a green field near the "
         "yellow triangle with three dots and one big purple star under it").split()


def make_tokenizer(out):
    lm_dir = os.path.join(out, "lm")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 40,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    # As open_flamingo/src/factory.py extends it.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


def image_bytes(rng, width, height, fmt):
    pixels = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    # Smooth a little so JPEG has structure to keep.
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def sentence(rng, words):
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=words)) + "."


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))


def laion_samples(rng):
    png = lambda w, h: image_bytes(rng, w, h, "PNG")
    jpg = lambda w, h: image_bytes(rng, w, h, "JPEG")
    long_caption = " ".join(sentence(rng, 8) for _ in range(6))
    return [
        ("l000", [("png", png(40, 30)), ("txt", b"  a red circle left of a blue square \n")]),
        ("l001", [("jpg", jpg(64, 48)), ("txt", b"two small purple stars")]),
        ("l002", [("png", png(30, 50)), ("txt", long_caption.encode())]),
        ("l003", [("png", png(20, 20))]),
        ("l004", [("jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("txt", b"broken")]),
        ("l005", [("png", png(25, 25)), ("txt", b"\xff\xfe not utf-8")]),
        ("l006", [("jpeg", jpg(50, 50)), ("txt", b"a caption with <image> inside")]),
        ("l007", [("txt", b"no image at all")]),
        ("l008", [("png", png(224, 224)), ("txt", "unicode café ✓".encode())]),
        ("l009", [("png", png(300, 100)), ("json", b"{}"), ("txt", b"a wide one")]),
    ]


def mmc4_doc(rng, images, sentences, sims, extra=None):
    info = {
        "text_list": sentences,
        "image_info": images,
        "similarity_matrix": sims,
    }
    if extra:
        info.update(extra)
    return json.dumps(info).encode()


def mmc4_samples(rng):
    big = lambda w=80, h=60: {"image_base64": base64.b64encode(image_bytes(rng, w, h, "PNG")).decode()}
    jpeg = lambda w=110, h=90: {"image_base64": base64.b64encode(image_bytes(rng, w, h, "JPEG")).decode()}
    small = {"image_base64": base64.b64encode(image_bytes(rng, 8, 8, "PNG")).decode()}
    s = lambda n: [sentence(rng, 5) for _ in range(n)]
    samples = []
    # Images whose best sentences are not in image order (upstream mis-pairs).
    samples.append(("m000", mmc4_doc(rng, [big(), big(70, 90), big()], s(4),
                                     [[0.1, 0.2, 0.5, 0.1], [0.6, 0.1, 0.1, 0.1], [0.1, 0.4, 0.2, 0.1]])))
    # A small image (dropped), one kept: a single-image document.
    samples.append(("m001", mmc4_doc(rng, [small, big()], s(3), [[0.9, 0.1, 0.1], [0.1, 0.5, 0.3]])))
    # One image under the threshold; two images on the same sentence.
    samples.append(("m002", mmc4_doc(rng, [big(), big(), big(), {"raw_url": "no base64"}], s(3),
                                     [[0.3, 0.1, 0.1], [0.1, 0.2, 0.23], [0.5, 0.1, 0.1], [0.9, 0.9, 0.9]])))
    # Eight images: the first six are kept.
    samples.append(("m003", mmc4_doc(rng, [big(70, 70) for _ in range(8)], s(8),
                                     [[0.3 if i == (7 - j) else 0.1 for i in range(8)] for j in range(8)])))
    # Long text: the images sit after the 256th token and are truncated away.
    samples.append(("m004", mmc4_doc(rng, [big()], s(60) + ["last one."],
                                     [[0.1] * 60 + [0.9]])))
    # Bad base64 (a character that breaks the padding).
    samples.append(("m005", mmc4_doc(rng, [{"image_base64": "abc"}, big()], s(2), [[0.5, 0.1], [0.1, 0.5]])))
    samples.append(("m006", b'{"text_list": ["unterminated'))
    # Nothing passes the filters.
    samples.append(("m007", mmc4_doc(rng, [small, big()], s(2), [[0.9, 0.1], [0.1, 0.2]])))
    # A corrupt image of the right size.
    garbage = bytes(rng.integers(0, 256, size=12000).astype(np.uint8))
    samples.append(("m008", mmc4_doc(rng, [{"image_base64": base64.b64encode(garbage).decode()}, big()], s(2),
                                     [[0.5, 0.1], [0.1, 0.5]])))
    # A ChatGPT-generated sequence.
    samples.append(("m009", json.dumps({
        "is_gpt": True,
        "example": f"{sentence(rng, 4)} _!_IMAGE1_!_ {sentence(rng, 6)} _!_IMAGE2_!_ {sentence(rng, 3)}",
        "image_map": {"_!_IMAGE1_!_": {"base64_image": big()["image_base64"]},
                      "_!_IMAGE2_!_": {"base64_image": big(50, 70)["image_base64"]}},
    }).encode()))
    # Ordinary two-image document in order.
    samples.append(("m010", mmc4_doc(rng, [jpeg(), jpeg(90, 120)], s(3), [[0.5, 0.1, 0.1], [0.1, 0.1, 0.5]])))
    return [(key, [("json", doc)]) for key, doc in samples] + [("m011", [("txt", b"no json")])]


def laion_labels(input_ids, tokenizer, media):
    labels = input_ids.clone()
    labels[labels == tokenizer.pad_token_id] = -100
    labels[labels == tokenizer.eos_token] = -100
    labels[labels == media] = -100
    return labels


def interleaved_labels(input_ids, tokenizer, media, eoc):
    # train_utils.py, for one row.
    labels = input_ids.clone()
    labels[labels == tokenizer.pad_token_id] = -100
    labels[labels == tokenizer.eos_token] = -100
    for i in range(labels.shape[0]):
        label_idx = 0
        while label_idx < labels.shape[1] and labels[i][label_idx] != media:
            labels[i][label_idx] = -100
            label_idx += 1
        for endofchunk_idx in torch.where(labels[i] == eoc)[0]:
            token_idx = endofchunk_idx + 1
            while token_idx < labels.shape[1] and labels[i][token_idx] != media:
                labels[i][token_idx] = -100
                token_idx += 1
    labels[labels == media] = -100
    return labels


def raw_samples(path):
    # Upstream's grouping of tar members into samples.
    return list(data_utils.tarfile_to_samples_nothrow([{"url": path}]))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(11)
    tokenizer = make_tokenizer(out)
    media = tokenizer.additional_special_tokens_ids[tokenizer.additional_special_tokens.index("<image>")]
    eoc = tokenizer.additional_special_tokens_ids[tokenizer.additional_special_tokens.index("<|endofchunk|>")]
    processor = image_transform(224, is_train=False)
    # No augmentation: no flip, and the 50% single-image drop never fires.
    upstream.torchvision.transforms.RandomHorizontalFlip = lambda p=0.5: (lambda x: x)
    upstream.random.random = lambda: 1.0

    laion_path = os.path.join(out, "laion-000.tar")
    mmc4_path = os.path.join(out, "mmc4-000.tar")
    write_tar(laion_path, laion_samples(rng))
    write_tar(mmc4_path, mmc4_samples(rng))

    lines, images = [], {}
    for sample in raw_samples(laion_path):
        key = sample["__key__"]
        try:
            if not upstream.filter_no_caption_or_no_image(sample):
                raise ValueError("no caption or no image")
            decoded = next(iter(wds.decode("pilrgb")([sample])))
            image, caption = next(iter(wds.to_tuple("jpg;png;jpeg", "txt")([decoded])))
            pixels = upstream.preprocess_image([image], processor)
            ids, mask = upstream.preprocess_laion_text([caption], tokenizer)
        except Exception as error:  # upstream's handler logs and skips
            lines.append({"dataset": "laion", "key": key, "rejected": repr(error)})
            continue
        images[f"laion/{key}"] = pixels.contiguous()
        lines.append({"dataset": "laion", "key": key, "input_ids": ids[0].tolist(),
                      "attention_mask": mask[0].tolist(),
                      "labels": laion_labels(ids, tokenizer, media)[0].tolist(), "num_images": 1})

    for sample in raw_samples(mmc4_path):
        key = sample["__key__"]
        try:
            (doc,) = next(iter(wds.to_tuple("json")([sample])))
            pixels, (ids, mask) = upstream.preprocess_interleaved(
                (doc,), tokenizer, processor, sim_threshold=0.24, min_num_images=1, max_num_images=6)
        except Exception as error:
            lines.append({"dataset": "mmc4", "key": key, "rejected": repr(error)})
            continue
        kept = int((pixels.flatten(1).abs().sum(1) > 0).sum())
        images[f"mmc4/{key}"] = pixels[:kept].contiguous()
        lines.append({"dataset": "mmc4", "key": key, "input_ids": ids[0].tolist(),
                      "attention_mask": mask[0].tolist(),
                      "labels": interleaved_labels(ids, tokenizer, media, eoc)[0].tolist(),
                      "num_images": kept})

    with open(os.path.join(out, "expected.jsonl"), "w") as file:
        for line in lines:
            file.write(json.dumps(line) + "\n")
    save_file(images, os.path.join(out, "images.safetensors"))


if __name__ == "__main__":
    main()
