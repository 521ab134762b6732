"""Where latent-denoise's sampler should start: PSNR and LPIPS-squeeze of decodes from f × the predicted t,
with renoise r, on the images every training run holds out (never Kodak, never trained on).

    python benchmarks/latent_denoise_timestep.py ../shared/data/train --lpips-weights W [--steps 6 5 3.8 3 2.2]

For each quantization step Δ, each image is encoded once (timestep=predict, t_scale 1, colour off: the
sent t is the t-net's t̂), and its dequantized latent is decoded
- from t = f·t̂ by latent-denoise's own sampler (8 DDIM steps, `renoise` r), for the (f, r) in SETTINGS;
- and as the UNet's one-call x̂0 at t̂: corrdiff-latent's end-to-end estimate without a restorer.
Printed: one row per Δ, mean bpp and t̂, then PSNR dB / LPIPS per setting. Photos larger than 512 px on
both sides are cut to their 512 px centre (the sun_hays80 ones are 2–4 Mpx), the others decode whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from diffarc.codecs import container
from diffarc.codecs.latent_denoise.codec import denoise, posterior_mean
from diffarc.codecs.parts.denoisers import DiffusionDenoiser
from diffarc.codecs.parts.metrics import LPIPS, psnr
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.images import load_rgb
from diffarc.pipeline.training import is_validation_key

SETTINGS = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 0.0), (0.5, 0.5), (0.5, 1.0))  # (f, r)
SIDE = 512


def held_out_images(root: Path) -> list[np.ndarray]:
    images = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_validation_key(str(p.relative_to(root)))):
        image = load_rgb(path.read_bytes())
        h, w = image.shape[:2]
        if h > SIDE and w > SIDE:
            image = image[(h - SIDE) // 2 : (h - SIDE) // 2 + SIDE, (w - SIDE) // 2 : (w - SIDE) // 2 + SIDE]
        images.append(np.ascontiguousarray(image))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("--lpips-weights", required=True)
    parser.add_argument("--steps", type=float, nargs="+", default=[6.0, 5.0, 3.8, 3.0, 2.2])
    args = parser.parse_args()
    lpips = LPIPS(args.lpips_weights)
    images = held_out_images(args.train)
    print(f"{len(images)} held-out images; columns: " + " | ".join(f"f {f:g} r {r:g}" for f, r in SETTINGS) + " | x̂0 at t̂")
    for step in args.steps:
        codec = create_codec("latent-denoise", {"step": step, "timestep": "predict", "t_scale": 1.0, "colour": "off", "steps": 8})
        denoiser = DiffusionDenoiser.from_model(codec.model)
        scores, bpps, predicted = [], [], []
        for image in images:
            [stream] = codec.encode([image])
            header, payload = container.unpack(stream)
            z_hat, t, _ = codec.dequantized(payload, header)
            with torch.inference_mode():
                latents = [denoise(denoiser, z_hat, round(f * t), 8, r) for f, r in SETTINGS]
                latents.append(posterior_mean(denoiser, z_hat, t))
            decoded = [codec.pixels(latent, codec.config, image.shape[:2]) for latent in latents]
            scores.append([(psnr(image, d), lpips(image, d)) for d in decoded])
            bpps.append(8 * len(stream) / (image.shape[0] * image.shape[1]))
            predicted.append(t)
        mean = np.mean(scores, axis=0)
        cells = " | ".join(f"{p:.2f} / {q:.4f}" for p, q in mean)
        print(f"Δ {step:g}: {np.mean(bpps):.3f} bpp, t̂ {np.mean(predicted):.0f} | {cells}", flush=True)


if __name__ == "__main__":
    main()
