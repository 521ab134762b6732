"""glc's decode time per Kodak image on the CPU: the whole decode, and its three parts.

    python benchmarks/glc_decode_time.py --threads 2 [--preset 0.1bpp] [--limit 2]

For each image: one stream at the preset, then the best of `--repeat` runs (taef2_speed.best_time: wall
and process CPU seconds) of `decode`, and of its parts alone: the range decoder with the hyper-decoder
(ŷ from the strings), the synthesis transform g_s (ẑ from ŷ) and taef2's decoder (pixels from ẑ). On a
shared machine the wall time measures the other jobs too; CPU seconds / threads is the wall time the
decode would take with the cores to itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from taef2_speed import best_time

from diffarc.codecs import container
from diffarc.codecs.glc.codec import IMAGE_STRIDE
from diffarc.codecs.parts.latent_codecs import split_strings
from diffarc.codecs.parts.latents import decode_latents, padded_size
from diffarc.codecs.registry import create_codec

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--preset", default="0.1bpp")
    parser.add_argument("--limit", type=int, default=2, help="the first N images")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codec = create_codec("glc", preset=args.preset)
    step = codec.config["step"]
    for path in sorted(Path(args.kodak).glob("*.png"))[: args.limit]:
        image = np.asarray(Image.open(path).convert("RGB"))
        (stream,) = codec.encode([image])
        header, payload = container.unpack(stream)
        height, width = padded_size(header.height, header.width, IMAGE_STRIDE)
        shape = (height // IMAGE_STRIDE, width // IMAGE_STRIDE)
        with torch.inference_mode():
            y_hat = codec.latent_codec.decompress(split_strings(payload), shape, step)["y_hat"]
            y_hat = y_hat.contiguous(memory_format=torch.channels_last)
            z_hat = codec.model.synthesis(y_hat, codec._log_step(step))
            parts = {
                "decode": lambda: codec.decode([stream]),
                "range decoder": lambda: codec.latent_codec.decompress(split_strings(payload), shape, step),
                "g_s": lambda: codec.model.synthesis(y_hat, codec._log_step(step)),
                "taef2 decoder": lambda: decode_latents(codec.autoencoder, z_hat),
            }
            times = {name: best_time(run, args.repeat) for name, run in parts.items()}
        bpp = 8 * len(stream) / (image.shape[0] * image.shape[1])
        print(f"{path.stem} {args.preset} ({bpp:.3f} bpp), {args.threads} threads: "
              + ", ".join(f"{name} {wall:.2f} s wall / {cpu:.2f} CPU-s" for name, (wall, cpu) in times.items()))  # fmt: skip


if __name__ == "__main__":
    main()
