"""Reference tensors for tests/parity_preprocess.rs: open_clip's eval
transform (torchvision Resize with Pillow bicubic, CenterCrop, ToTensor,
Normalize) on PNG images of several sizes and aspect ratios.

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
    save_file(tensors, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main()
