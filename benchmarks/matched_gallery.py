"""Codecs next to AVIF and AVIF + grain at the same bytes, on crops of Kodak images: one PNG, one row per image.

Each row: the original | each --codec point in turn | avif at the quality whose stream is nearest the first
codec's in bytes | avif:grain=2 at that quality (the same bytes: the grain is a header parameter). Printed:
each panel's bpp, PSNR over the whole image and LPIPS-squeeze of the whole image, so the crops can be read
with the figures. A --codec is one point in `diffarc bench`'s grammar (a preset and/or parameters, no sweep).

    python benchmarks/matched_gallery.py ../shared/data/kodak --codec glc:0.05bpp --lpips-weights W --out glc.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffarc.codecs.parts.metrics import LPIPS, psnr
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.bench.specs import parse_codec_spec

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
    parser.add_argument("--codec", action="append", required=True, help="one point, e.g. glc:0.05bpp (repeat: one panel each)")
    parser.add_argument("--lpips-weights", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lpips = LPIPS(args.lpips_weights)
    codecs = []
    for spec in args.codec:
        points = parse_codec_spec(spec).points
        if len(points) != 1:
            parser.error(f"--codec {spec!r} is {len(points)} points; name one (a preset or parameters, no sweep)")
        codecs.append((spec, create_codec(points[0].codec, points[0].params)))
    rows = []
    for name, (top, left) in CROPS.items():
        image = np.asarray(Image.open(Path(args.kodak) / f"{name}.png").convert("RGB"))
        panels = [("original", image, None)]
        for label, codec in codecs:
            panels.append((label, *_decoded(codec, image)))
        quality = avif_at_bytes(image, len(panels[1][2]))
        for label, params in ((f"avif q{quality}", {"quality": quality}), (f"avif:grain=2 q{quality}", {"quality": quality, "grain": 2})):
            panels.append((label, *_decoded(create_codec("avif", params), image)))
        for label, decoded, coded in panels[1:]:
            print(f"{name} {label:40s} {bpp(coded, image):.4f} bpp  {psnr(image, decoded):.2f} dB  LPIPS {lpips(image, decoded):.3f}")
        row = np.concatenate([im[top : top + SIDE, left : left + SIDE] for _, im, _ in panels], axis=1)
        canvas = Image.fromarray(row)
        draw = ImageDraw.Draw(canvas)
        for i, (label, im, coded) in enumerate(panels):
            lines = [name] if coded is None else [*label.replace(",", ",\n").splitlines(), f"{bpp(coded, image):.3f} bpp"]
            draw.multiline_text((i * SIDE + 4, 2), "\n".join(lines), fill=(255, 255, 0))  # a spec per comma, then the bpp
        rows.append(np.asarray(canvas))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, optimize=True)
    print("wrote", args.out)


def _decoded(codec, image: np.ndarray) -> tuple[np.ndarray, bytes]:
    [stream] = codec.encode([image])
    return codec.decode([stream])[0], stream


if __name__ == "__main__":
    main()
