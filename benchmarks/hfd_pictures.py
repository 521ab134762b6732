"""Side-by-side crops of Kodak pictures decoded by AVIF, AVIF + grain and hfd's detail decoders, at matched bpp.

    python benchmarks/hfd_pictures.py --quality 10 --out docs/models

Every codec here codes the same AVIF base at the same `--quality` (hfd's payload is that AVIF file; the
grain is a decoder-side parameter), so the streams differ only by their headers: the bpp is matched by
construction, and printed. For each image one PNG `hfd-pictures-<image>-q<quality>.png`: a crop of the
original, then each codec's decode of the whole image cut to the same crop, labelled; and per codec the
whole image's bpp, PSNR and LPIPS-squeeze (when ../shared has its weights) are printed as JSON lines.
The crops show what the issue asks about: kodim01's stone wall, kodim13's foliage and stream, kodim23's
feathers, kodim05's helmets and their lettering.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.images import load_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"
LPIPS_WEIGHTS = SHARED / "weights" / "lpips-squeeze" / "lpips_squeeze_v0.1.safetensors"
CROPS = {"kodim01": (290, 170), "kodim13": (60, 130), "kodim23": (400, 110), "kodim05": (190, 0)}  # (x, y) of the crop
CODECS = {
    "AVIF": ("avif", {}),
    "AVIF+grain": ("avif", {"grain": 2}),
    "hfd pixel (hfd-small)": ("hfd", {"model": "builtin:hfd-small"}),
    "hfd latent (taef2)": ("hfd", {"model": "builtin:taef2"}),
}
LABEL_HEIGHT = 14


def labelled(panels: list[tuple[str, np.ndarray]]) -> Image.Image:
    """The crops in a row, each with its label above it."""
    side = panels[0][1].shape[1]
    sheet = Image.new("RGB", (side * len(panels), side + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, pixels) in enumerate(panels):
        sheet.paste(Image.fromarray(pixels), (index * side, LABEL_HEIGHT))
        draw.text((index * side + 2, 1), label, fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--images", default=",".join(CROPS), help="comma-separated Kodak names")
    parser.add_argument("--quality", type=int, default=10, help="the AVIF quality of every codec's base")
    parser.add_argument("--side", type=int, default=160, help="crop side in pixels")
    parser.add_argument("--latent", default="", help="hfd latent's extra parameters, K=V,K=V (e.g. steps=2,detail=1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lpips = None
    if LPIPS_WEIGHTS.is_file():
        from diffarc.codecs.parts.metrics import LPIPS

        lpips = LPIPS(str(LPIPS_WEIGHTS))
    latent = dict(item.split("=") for item in args.latent.split(",") if item)
    codecs = {}
    for label, (name, params) in CODECS.items():
        extra = latent if "latent" in label else {}
        codecs[label] = create_codec(name, {**params, **extra, "quality": args.quality})
    for stem in args.images.split(","):
        image = load_rgb((Path(args.kodak) / f"{stem}.png").read_bytes())
        x, y = CROPS.get(stem, ((image.shape[1] - args.side) // 2, (image.shape[0] - args.side) // 2))
        cut = lambda picture: picture[y : y + args.side, x : x + args.side]  # noqa: E731
        panels = [("original", cut(image))]
        for label, codec in codecs.items():
            [stream] = codec.encode([image])
            decoded = codec.decode([stream])[0]
            bpp = len(stream) * 8 / (image.shape[0] * image.shape[1])
            row = {"image": stem, "codec": label, "bpp": round(bpp, 4), "psnr": round(psnr(image, decoded), 2)}
            if lpips is not None:
                row["lpips"] = round(lpips(image, decoded), 4)
            print(json.dumps(row), flush=True)
            panels.append((f"{label} {bpp:.3f}", cut(decoded)))
        path = Path(args.out) / f"hfd-pictures-{stem}-q{args.quality}.png"
        labelled(panels).save(path, optimize=True)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
