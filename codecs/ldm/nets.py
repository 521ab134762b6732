"""The built-in latent diffusion model's networks: diffusers classes at sizes for a CPU or a GPU.

    image ─AutoencoderKL (8× down, 4 levels, no mid-block attention)─► latent ×scaling ─UNet2DModel (ε)─►
    noise schedule: DDIM config, Stable Diffusion's (1000 steps, scaled-linear β 0.00085 → 0.012)

Choices:
- No attention in the autoencoder's middle block: a full-size image (Kodak: 96×64 latents) would make
  it the slowest layer on a CPU, and convolutions alone run on any size.
- ε-prediction with Stable Diffusion's schedule, so the codecs drive the built-in model and an SD
  2.1-base mirror through the same code path.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

AUTOENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    # Sized for a CPU: about 1 M parameters, trainable on 2 shared cores in an hour. 16 latent channels:
    # with 8 the bottleneck held reconstructions near 22 dB on Kodak (see MODELS.md).
    "small": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16),
    # Controls of the compute ablation (benchmarks/autoencoder_compute.py, MODELS.md): small's latent at 8
    # channels, and small at twice the width (about 4× the work per step).
    "small-8ch": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=8),
    "wide": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=8, latent_channels=16),
    # For a GPU run: SD's VAE layout at a quarter of its width.
    "base": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=16, latent_channels=16),
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    "small": dict(
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    "base": dict(
        block_out_channels=(128, 256, 384), layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}  # fmt: skip
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="leading",
)  # fmt: skip


def new_autoencoder(config: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        mid_block_add_attention=False,
        **AUTOENCODER_CONFIGS[config],
    )


def new_unet(config: str, latent_channels: int):
    from diffusers import UNet2DModel

    return UNet2DModel(in_channels=latent_channels, out_channels=latent_channels, **UNET_CONFIGS[config])


def new_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


class AutoencoderPass(torch.nn.Module):
    """encode → mode → decode as one forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mode()).sample, posterior.kl().mean()


def sample_grid(model, path: str | os.PathLike, rows: int = 4, side: int = 256, steps: int = 50, seed: int = 0) -> None:
    """Unconditional DDIM samples of a LatentDiffusionModel (diffusers' own DDIM steps), as one PNG grid (rows × rows)."""
    from PIL import Image

    from ..parts.latents import decode_latents, tensor_to_images

    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    channels = model.unet.config.in_channels
    z = torch.randn((rows * rows, channels, side // 8, side // 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(model.unet(z, t).sample, t, z).prev_sample
        images = np.stack(tensor_to_images(decode_latents(model, z), [(side, side)] * (rows * rows)))
    grid = images.reshape(rows, rows, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(rows * side, rows * side, 3)
    Image.fromarray(grid).save(path)
