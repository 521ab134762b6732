"""How well a model's latent autoencoder reconstructs Kodak: mean PSNR and LPIPS-squeeze, and its speed.

The latent space bounds every codec built on it: no codec on this autoencoder can beat these figures,
except by what the colour transform the latent codecs send (parts/colour.py) takes back: its PSNR is the
second figure, and the largest shift of a channel's mean over the image (levels) shows the cast it undoes.
Each of the 24 images runs at full size: padded (edge-replicated) to a multiple of 8, encoded to the
posterior's mode, decoded, cropped back, rounded to 8 bits, and compared with the original.

    python benchmarks/autoencoder_kodak.py                       # the built-in model
    python benchmarks/autoencoder_kodak.py --model /path/to/sd-2-1-base-mirror
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffarc.codecs.parts.latents import VAE_DOWNSAMPLING, decode_latents, encode_latents, images_to_tensor, padded_size, tensor_to_images
from diffarc.codecs.parts.colour import apply_colour, fit_colour
from diffarc.codecs.parts.models import load_model
from diffarc.pipeline.images import load_rgb
from diffarc.codecs.parts.metrics import LPIPS, psnr

SHARED = Path(__file__).resolve().parents[2] / "shared"


def reconstruct(model, image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(reconstruction, encode seconds, decode seconds) of one H×W×3 uint8 image, through the same
    padding and latent scaling the codecs use (codecs/latents.py)."""
    height, width = image.shape[:2]
    x = images_to_tensor([image], padded_size(height, width, VAE_DOWNSAMPLING), "cpu", torch.float32)
    with torch.inference_mode():
        start = time.perf_counter()
        latent = encode_latents(model, x)
        encoded = time.perf_counter()
        y = decode_latents(model, latent)
        decoded = time.perf_counter()
    return tensor_to_images(y, [(height, width)])[0], encoded - start, decoded - encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:ldm-small", help="model reference (default: %(default)s)")
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"), help="folder of the 24 Kodak PNGs")
    parser.add_argument("--lpips-weights", default=str(SHARED / "weights" / "lpips-squeeze" / "lpips_squeeze_v0.1.safetensors"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    lpips = LPIPS(args.lpips_weights)
    files = sorted(Path(args.kodak).glob("*.png"))[: args.limit]
    if not files:
        raise SystemExit(f"no PNG images in {args.kodak}")
    rows = []
    for path in files:
        image = load_rgb(path.read_bytes())
        reconstruction, encode_s, decode_s = reconstruct(model, image)
        shift = reconstruction.reshape(-1, 3).mean(axis=0) - image.reshape(-1, 3).mean(axis=0)
        corrected = apply_colour(reconstruction, fit_colour(image, reconstruction))
        row = {"image": path.name, "psnr": psnr(image, reconstruction), "lpips": lpips(image, reconstruction),
               "psnr_colour": psnr(image, corrected), "colour_shift": float(np.abs(shift).max()),
               "encode_s": encode_s, "decode_s": decode_s}  # fmt: skip
        rows.append(row)
        if not args.json:
            print(f"{row['image']:<14} PSNR {row['psnr']:6.2f} dB  LPIPS {row['lpips']:.4f}  with the colour transform "
                  f"{row['psnr_colour']:6.2f} dB  colour shift {row['colour_shift']:4.1f}  "
                  f"encode {encode_s:5.2f} s  decode {decode_s:5.2f} s", flush=True)  # fmt: skip
    summary = {
        "model": args.model, "fingerprint": model.fingerprint.hex(), "images": len(rows),
        "threads": torch.get_num_threads(),
        **{f"mean_{k}": float(np.mean([r[k] for r in rows]))
           for k in ("psnr", "lpips", "psnr_colour", "colour_shift", "encode_s", "decode_s")},
    }  # fmt: skip
    if args.json:
        print(json.dumps({**summary, "per_image": rows}))
    else:
        print(f"{summary['model']} ({summary['fingerprint'][:16]}…), {len(rows)} Kodak images, full size, "
              f"{summary['threads']} CPU threads: mean PSNR {summary['mean_psnr']:.2f} dB, "
              f"mean LPIPS-squeeze {summary['mean_lpips']:.4f}, mean PSNR with the colour transform "
              f"{summary['mean_psnr_colour']:.2f} dB, mean colour shift {summary['mean_colour_shift']:.1f} levels, "
              f"encode {summary['mean_encode_s']:.2f} s, decode {summary['mean_decode_s']:.2f} s per image")  # fmt: skip


if __name__ == "__main__":
    main()
