"""The step Δ of each glc preset: the Δ whose mean bpp on Kodak is the preset's name.

Each image is encoded by taef2 once; then for any Δ the transforms and the range coder give its stream's
exact length (the whole stream: header and payload, as `diffarc bench` counts it). The mean bpp on a grid
of Δ, interpolated in log–log, gives each target's Δ, then measured; the table printed is what `GlcCodec.presets` holds and MODELS.md quotes.

    python benchmarks/glc_presets.py ../shared/data/kodak [--transforms FOLDER] [--limit N]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffarc.codecs.glc.codec import IMAGE_STRIDE
from diffarc.codecs.parts.latent_codecs import join_strings
from diffarc.codecs.parts.latents import encode_latents, images_to_tensor, padded_size
from diffarc.codecs.registry import create_codec

TARGETS = {"0.02bpp": 0.02, "0.05bpp": 0.05, "0.1bpp": 0.1, "0.2bpp": 0.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kodak")
    parser.add_argument("--transforms", default="", help="glc transforms folder (default: the shipped ones)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = create_codec("glc", {"transforms": args.transforms} if args.transforms else {})
    paths = sorted(Path(args.kodak).glob("*.png"))[: args.limit]
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    with torch.inference_mode():
        latents = [
            encode_latents(codec.autoencoder, images_to_tensor([im], padded_size(*im.shape[:2], IMAGE_STRIDE), "cpu", torch.float32))
            for im in images
        ]  # fmt: skip
        # The stream is the header and the payload; the header's length does not depend on Δ.
        header_bytes = len(codec.encode([images[0]])[0]) - len(codec.encode_payloads([images[0]])[0])

        def mean_bpp(step: float) -> float:
            rates = []
            for image, z in zip(images, latents):
                y = codec.model.analysis(z, torch.full((1,), step).log())
                payload = join_strings(codec.latent_codec.compress(y, step)["strings"])
                rates.append(8 * (len(payload) + header_bytes) / (image.shape[0] * image.shape[1]))
            return float(np.mean(rates))

        print(f"{len(images)} images; header {header_bytes} bytes")
        grid = np.geomspace(0.5, 48, 12)
        rates = np.array([mean_bpp(step) for step in grid])
        for step, rate in zip(grid, rates):
            print(f"  step {step:7.3f}  mean bpp {rate:.4f}")
        for name, target in TARGETS.items():  # bpp falls as Δ grows: interpolate on the reversed grid
            step = round(float(np.exp(np.interp(math.log(target), np.log(rates[::-1]), np.log(grid[::-1])))), 2)
            print(f"{name}: step {step}  mean bpp {mean_bpp(step):.4f}")

if __name__ == "__main__":
    main()
