"""Why latent-denoise collapses regions to flat colour: what its quantizer leaves of each latent channel.

For each preset, on Kodak: the fraction of the quantized latent's values that are 0 per channel (the
value decodes to its prediction: the hyperprior's local mean μ; before issue 13, the channel's shift b),
the fraction of latent positions where every channel is 0, how much the decoded latent still varies over
those positions (std of ẑ there over the channel's std, median over channels: 0 means one flat colour,
which the per-channel entropy model gave by construction), the quantizer's step s_c·Δ against the
channel's spread, and the PSNR of the plain dequantized decode (t = 0) and its colour error (the mean of
the per-channel means' error).

    python benchmarks/latent_collapse.py                         # all presets, 24 Kodak images
    python benchmarks/latent_collapse.py --presets 0.1bpp --max-images 4
    python benchmarks/latent_collapse.py --steps 2.4,1.6,1.0            # steps Δ of your choice, not presets
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from diffarc.codecs.latent_denoise.codec import LatentDenoiseCodec
from diffarc.codecs.parts.latents import VAE_DOWNSAMPLING, encode_latents, images_to_tensor
from diffarc.codecs.parts.metrics import psnr
from diffarc.pipeline.images import load_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"


@torch.inference_mode()
def quantized(codec: LatentDenoiseCodec, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, z, ẑ, s·Δ) of one image: the integers the range coder sends, the latent, its dequantized value,
    the per-channel step."""
    _, h, w = codec.latent_shape(*image.shape[:2])
    z = encode_latents(codec.model, images_to_tensor([image], (h * VAE_DOWNSAMPLING, w * VAE_DOWNSAMPLING), "cpu", torch.float32)).float()
    step = codec.config["step"]
    shift, scale = codec.predictors.transform(z, torch.tensor([step]))
    shift, scale = shift.half().float(), scale.half().float().clamp_min(1e-4)
    y = (z - shift[..., None, None]) / scale[..., None, None]
    y_hat = codec.latent_codec.compress(y, step)["y_hat"]
    hyperprior = codec.latent_codec  # the means it predicts, as its ideal_bits computes them
    means = torch.from_numpy(hyperprior._gaussians(torch.round(hyperprior._hyper_latent(y)), tuple(y.shape[2:]))[0]).float()
    z_hat = y_hat * scale[..., None, None] + shift[..., None, None]
    return torch.round((y_hat - means) / step)[0], z[0], z_hat[0], (scale[0] * step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--presets", default=",".join(LatentDenoiseCodec.presets))
    parser.add_argument("--steps", default="", help="comma-separated steps Δ to measure instead of the presets")
    parser.add_argument("--max-images", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = [load_rgb(p.read_bytes()) for p in sorted(Path(args.kodak).glob("*.png"))[: args.max_images]]
    print(f"{len(images)} Kodak images; per preset: channels sorted by their share of zeros")
    print("preset   | bpp   | zeros per channel (min / median / max) | all-zero positions | ẑ std there / channel std "
          "| step / channel std (median, max) | PSNR t=0 | colour error")
    settings = {f"Δ={v}": {"step": float(v)} for v in args.steps.split(",")} if args.steps else {
        preset: LatentDenoiseCodec.resolve_params({}, preset) for preset in args.presets.split(",")
    }
    for preset, params in settings.items():
        codec = LatentDenoiseCodec(**params)
        plain = LatentDenoiseCodec(**{**codec.config, "timestep": "off"})
        zeros, dead, alive, ratio, psnrs, colour, bpp = [], [], [], [], [], [], []
        for image in images:
            q, z, z_hat, step = quantized(codec, image)
            zeros.append((q == 0).float().flatten(1).mean(1))
            empty = (q == 0).all(0)
            dead.append(float(empty.float().mean()))
            if empty.sum() > 1:
                alive.append(float((z_hat[:, empty].std(1) / z.flatten(1).std(1)).median()))
            ratio.append(step / z.flatten(1).std(1))
            stream = plain.encode([image])[0]
            bpp.append(8 * len(stream) / (image.shape[0] * image.shape[1]))
            decoded = plain.decode([stream])[0]
            psnrs.append(psnr(image, decoded))
            colour.append(float(np.abs(decoded.reshape(-1, 3).mean(0) - image.reshape(-1, 3).mean(0)).mean()))
        share = torch.stack(zeros).mean(0).sort().values
        spread = torch.stack(ratio).median(0).values
        print(
            f"{preset:8} | {np.mean(bpp):.3f} | {share[0]:.2f} / {share.median():.2f} / {share[-1]:.2f}"
            f"{'':18}| {np.mean(dead):.2f}{'':15}| {np.mean(alive) if alive else float('nan'):.2f}{'':23}"
            f"| {spread.median():.2f}, {spread.max():.2f}{'':22}"
            f"| {np.mean(psnrs):.2f}    | {np.mean(colour):.1f} /255"
        )


if __name__ == "__main__":
    main()
