"""glc next to AVIF and AVIF + grain at the same bytes, on crops of Kodak images: one PNG, one row per image.

Each row: the original | glc at --preset | avif at the quality whose stream is nearest glc's in bytes |
avif:grain=2 at that quality (the same bytes: the grain is a header parameter). Printed: each panel's bpp,
PSNR over the whole image and LPIPS-squeeze of the whole image, so the crops can be read with the figures.

    python benchmarks/glc_gallery.py ../shared/data/kodak --preset 0.05bpp --out docs/models/glc-gallery-0.05bpp.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffarc.codecs.parts.metrics import LPIPS, psnr
from diffarc.codecs.registry import create_codec

# image → (top, left) of its crop: texture, faces, edges, flat sky (the issue's three and two more).
CROPS = {"kodim01": (200, 240), "kodim13": (120, 380), "kodim23": (60, 250), "kodim05": (180, 280), "kodim21": (40, 330)}
SIDE = 192


def bpp(stream: bytes, image: np.ndarray) -> float:
    return 8 * len(stream) / (image.shape[0] * image.shape[1])


def avif_at_bytes(image: np.ndarray, size: int) -> int:
    """The AVIF quality (0–100) whose stream is nearest `size` bytes (its length grows with quality)."""
    lengths = {}
    low, high = 0, 100
    while low < high:  # the highest quality not over `size`
        middle = (low + high + 1) // 2
        lengths[middle] = len(create_codec("avif", {"quality": middle}).encode([image])[0])
        low, high = (middle, high) if lengths[middle] <= size else (low, middle - 1)
    lengths.setdefault(low, len(create_codec("avif", {"quality": low}).encode([image])[0]))
    above = min(low + 1, 100)
    lengths.setdefault(above, len(create_codec("avif", {"quality": above}).encode([image])[0]))
    return min((low, above), key=lambda q: abs(lengths[q] - size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kodak")
    parser.add_argument("--preset", default="0.05bpp")
    parser.add_argument("--lpips-weights", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lpips = LPIPS(args.lpips_weights)
    glc = create_codec("glc", preset=args.preset)
    rows = []
    for name, (top, left) in CROPS.items():
        image = np.asarray(Image.open(Path(args.kodak) / f"{name}.png").convert("RGB"))
        stream = glc.encode([image])[0]
        quality = avif_at_bytes(image, len(stream))
        panels = [("original", image, None)]
        for label, codec in ((f"glc {args.preset}", glc), (f"avif q{quality}", create_codec("avif", {"quality": quality})),
                             (f"avif:grain=2 q{quality}", create_codec("avif", {"quality": quality, "grain": 2}))):  # fmt: skip
            coded = stream if codec is glc else codec.encode([image])[0]
            decoded = codec.decode([coded])[0]
            panels.append((label, decoded, coded))
            print(f"{name} {label:24s} {bpp(coded, image):.4f} bpp  {psnr(image, decoded):.2f} dB  "
                  f"LPIPS {lpips(image, decoded):.3f}")  # fmt: skip
        row = np.concatenate([im[top : top + SIDE, left : left + SIDE] for _, im, _ in panels], axis=1)
        canvas = Image.fromarray(row)
        draw = ImageDraw.Draw(canvas)
        for i, (label, im, coded) in enumerate(panels):
            text = f"{name} {label}" if coded is None else f"{label} {bpp(coded, image):.3f} bpp"
            draw.text((i * SIDE + 4, 2), text, fill=(255, 255, 0))
        rows.append(np.asarray(canvas))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, optimize=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
