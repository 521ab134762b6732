"""A grid of unconditional samples from a model's diffusion UNet, decoded by its autoencoder, as one PNG.

    python benchmarks/diffusion_samples.py --out docs/models/ldm-small-samples.png
"""

from __future__ import annotations

import argparse

import torch

from diffarc.codecs.ldm.nets import sample_grid
from diffarc.codecs.parts.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:ldm-small", help="model reference (default: %(default)s)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--rows", type=int, default=4, help="the grid is rows × rows samples")
    parser.add_argument("--side", type=int, default=256, help="sample side in pixels (multiple of 32)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    sample_grid(load_model(args.model), args.out, args.rows, args.side, args.steps, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
