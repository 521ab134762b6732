"""How close the hyperprior codec's range coder comes to the ideal code length, on Kodak, at several steps.

For each image and step Δ: the payload's entropy-coded bits (z's and y's words, without the 12-byte side
fields) against −log2 of the probabilities the tables give the coded symbols
(`MeanScaleHyperpriorLatentCodec.ideal_bits`); also the whole stream's bpp, PSNR and coding times.

    python benchmarks/hyperprior_code_length.py                        # the built-in model
    python benchmarks/hyperprior_code_length.py --model runs/hp --steps 1,2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffarc.codecs import container
from diffarc.codecs.hyperprior.codec import SIDE
from diffarc.codecs.parts.latents import images_to_tensor, padded_size
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.images import load_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"


def measure(codec, image: np.ndarray, step: float) -> dict:
    start = time.perf_counter()
    stream = codec.encode([image])[0]
    encoded = time.perf_counter()
    decoded = codec.decode([stream])[0]
    done = time.perf_counter()
    x = images_to_tensor([image], padded_size(*image.shape[:2], 16), codec.device, torch.float32)
    with torch.inference_mode():
        (ideal,) = codec.latent_codec.ideal_bits(codec.model.analysis(x), step)
    payload = container.unpack(stream)[1]
    return {
        "bpp": 8 * len(stream) / (image.shape[0] * image.shape[1]),
        "ideal_bits": ideal,
        "coded_bits": 8 * (len(payload) - SIDE.size),
        "psnr": psnr(image, decoded),
        "encode_s": encoded - start,
        "decode_s": done - encoded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hyperprior model reference (default: the codec's)")
    parser.add_argument("--steps", default="0.7,1.4,2.5,4", help="comma-separated quantization steps Δ")
    parser.add_argument("--images", default=str(SHARED / "data" / "kodak"), help="folder of PNGs (default: Kodak)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    files = sorted(Path(args.images).glob("*.png"))
    if not files:
        raise SystemExit(f"no PNG images in {args.images}")
    images = [load_rgb(f.read_bytes()) for f in files]
    rows = []
    for step in (float(s) for s in args.steps.split(",")):
        codec = create_codec("hyperprior", {"step": step, **({"model": args.model} if args.model else {})})
        measured = [measure(codec, image, step) for image in images]
        ideal, coded = sum(m["ideal_bits"] for m in measured), sum(m["coded_bits"] for m in measured)
        rows.append({
            "step": step, "images": len(measured), "ideal_bits": ideal, "coded_bits": coded,
            "overhead_percent": 100 * (coded / ideal - 1), "worst_overhead_percent": max(100 * (m["coded_bits"] / m["ideal_bits"] - 1) for m in measured),
            **{k: float(np.mean([m[k] for m in measured])) for k in ("bpp", "psnr", "encode_s", "decode_s")},
        })  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{'step':>5} {'bpp':>7} {'PSNR':>6} {'ideal bits':>12} {'coded bits':>12} {'overhead':>9} {'worst':>7} {'enc s':>6} {'dec s':>6}")
    for r in rows:
        print(f"{r['step']:5g} {r['bpp']:7.4f} {r['psnr']:6.2f} {r['ideal_bits']:12.0f} {r['coded_bits']:12d} "
              f"{r['overhead_percent']:8.3f}% {r['worst_overhead_percent']:6.3f}% {r['encode_s']:6.2f} {r['decode_s']:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
