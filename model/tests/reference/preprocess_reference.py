"""Reference tensors for tests/parity_preprocess.rs: open_clip's eval
transform (torchvision Resize with Pillow bicubic, CenterCrop, ToTensor,
Normalize) on PNG images of several sizes and aspect ratios, and on JPEGs of
several sizes, subsamplings and encodings.

usage: python preprocess_reference.py OUT_DIR
"""

import os
import sys

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image
from safetensors.torch import save_file

SIZES = [(60, 45), (45, 60), (300, 200), (227, 331), (28, 28), (20, 13), (640, 480)]
# JPEGs decoded through a region (tests/parity_preprocess.rs): photo sizes,
# odd sizes, every chroma subsampling Pillow writes, progressive, greyscale.
JPEGS = [
    ((640, 427), dict(subsampling=2)),
    ((427, 640), dict(subsampling=1)),
    ((500, 375), dict(subsampling=0)),
    ((333, 500), dict(subsampling=2, progressive=True)),
    ((1024, 683), dict(subsampling=2)),
    ((641, 479), dict(subsampling=1, progressive=True)),
    ((257, 1001), dict(subsampling=2)),
    ((400, 300), dict(grey=True)),
    ((230, 225), dict(subsampling=2)),
    # Entropy-decoding cases (jpeg_huffman.c): restart markers, optimised
    # Huffman tables (long codes; Pillow needs the bigger buffer for them),
    # large coefficients, coarse quantisation.
    ((640, 427), dict(subsampling=2, restart_marker_blocks=7)),
    ((500, 375), dict(subsampling=0, restart_marker_rows=1)),
    ((480, 360), dict(subsampling=1, quality=100)),
    ((300, 400), dict(subsampling=2, quality=40, optimize=True, bufsize=1 << 24)),
]
# Corrupt JPEGs, decoded as Pillow decodes them (libjpeg's warnings are
# silent): a restart marker with the wrong number, and random bytes in the
# middle of the entropy-coded data.
CORRUPT = [(9, "restart"), (10, "bytes"), (4, "bytes")]


def corrupt(data, how, rng):
    data = bytearray(data)
    start = data.index(b"\xff\xda")
    start += 2 + int.from_bytes(data[start + 2:start + 4], "big")
    end = data.rindex(b"\xff\xd9")
    if how == "restart":
        at = data.index(b"\xff\xd2", start)
        data[at + 1] = 0xD5
    else:
        at = start + (end - start) * 2 // 5
        data[at:at + 24] = bytes(rng.integers(0, 255, size=24).tolist())
    return bytes(data)


def main():
    out = sys.argv[1]
    rng = np.random.default_rng(8)
    tensors = {}
    for index, (width, height) in enumerate(SIZES):
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                           (x + y) * 255 // max(width + height - 2, 1)], axis=-1)
        noise = rng.integers(0, 256, size=(height, width, 3))
        pixels = np.where(rng.random((height, width, 1)) < 0.3, noise, smooth).astype(np.uint8)
        path = os.path.join(out, f"image{index}.png")
        Image.fromarray(pixels, "RGB").save(path)
        for size in (28, 224):
            transform = image_transform(size, is_train=False)
            tensors[f"image{index}.{size}"] = transform(Image.open(path)).contiguous()
    for index, ((width, height), options) in enumerate(JPEGS):
        y, x = np.mgrid[0:height, 0:width]
        # Smooth colour ramps with blobs, so JPEG keeps structure and every
        # chroma and edge case of the upsampler is exercised.
        smooth = np.stack([(x * 7 + y * 3) % 256, (y * 5 + 40) % 256,
                           128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)], axis=-1)
        noise = rng.integers(0, 256, size=(height, width, 3))
        pixels = np.where(rng.random((height, width, 1)) < 0.05, noise, smooth).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        options = dict(options)
        if options.pop("grey", False):
            image = image.convert("L")
        path = os.path.join(out, f"photo{index}.jpg")
        image.save(path, quality=options.pop("quality", 90), **options)
        for size in (28, 224):
            transform = image_transform(size, is_train=False)
            tensors[f"photo{index}.{size}"] = transform(Image.open(path)).contiguous()
    for index, (source, how) in enumerate(CORRUPT, start=len(JPEGS)):
        with open(os.path.join(out, f"photo{source}.jpg"), "rb") as file:
            data = corrupt(file.read(), how, rng)
        path = os.path.join(out, f"photo{index}.jpg")
        with open(path, "wb") as file:
            file.write(data)
        for size in (28, 224):
            transform = image_transform(size, is_train=False)
            tensors[f"photo{index}.{size}"] = transform(Image.open(path)).contiguous()
    save_file(tensors, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main()
