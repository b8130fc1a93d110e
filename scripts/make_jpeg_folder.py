"""Writes an image folder of ImageNet-like JPEGs for timing the input pipeline offline:

    python scripts/make_jpeg_folder.py DIR [--train 600] [--eval 200] [--classes 10]
    python -m resnext_jax.benchmark --input --config=configs/paper.py:table3_resnext50_32x4d \\
        --config.dataset=folder:DIR --config.batch_size=128 --seconds=12

DIR/train/CLASS/*.jpg and DIR/validation/CLASS/*.jpg (the folder source's split names), 500×375
pixels (ImageNet's most common size), quality 90, about 65 KB each: smooth colour fields
with edges and texture, so that decoding and compressing cost about what photographs do (pure
noise would compress badly and decode slowly; flat colour would be too cheap).
"""
import argparse
import os

import numpy as np
from PIL import Image


def image(rng, width=500, height=375):
    """Low-frequency colour (a few blobs), random straight edges and fine texture."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.zeros((height, width, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 3) * (1, 1.3, 0.4) + (0, 0, 0.1)
        colour = rng.uniform(0, 255, 3)
        weight = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r ** 2)[..., None]
        pixels = pixels * (1 - weight) + colour * weight
    for _ in range(4):
        a, b, c = rng.normal(size=3)
        pixels[(a * x + b * y + c * 0.3) > 0] *= rng.uniform(0.6, 1.2)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('dir')
    p.add_argument('--train', type=int, default=600)
    p.add_argument('--eval', type=int, default=200)
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, count in (('train', args.train), ('validation', args.eval)):
        for i in range(count):
            folder = os.path.join(args.dir, split, f'class_{i % args.classes:02d}')
            os.makedirs(folder, exist_ok=True)
            image(rng).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


if __name__ == '__main__':
    main()
