"""The built-in latent diffusion models' networks: diffusers classes at sizes for a CPU or a GPU.

    builtin:ldm-small  image ─AutoencoderKL (8× down, 4 levels, no mid-block attention)─► latent ×scaling
                       ─UNet2DModel (ε)─►  DDIM config, Stable Diffusion's (1000 steps, scaled-linear β)
    builtin:taef2      image ─taef2 (frozen, pretrained; parts/taef2.py)─► 32-ch latent ×1.19
                       ─UNet2DModel (objective of the config: rectified flow or v)─►

A diffusion config (`DIFFUSION_CONFIGS`, `diffarc train diffusion --config`) names a UNet size and an
objective; an objective is what the UNet predicts and the noise schedule it is trained under:
- `epsilon`: ε under SD's scaled-linear DDIM schedule (ldm-small);
- `v`: v = √ᾱ·ε − √(1−ᾱ)·x0 under the cosine schedule (Nichol & Dhariwal), whose log-SNR spread under
  uniform t is close to the flow's below, so the ablation compares objectives rather than schedules;
- `flow`: rectified flow, v = ε − x0 on x_σ = (1 − σ)·x0 + σ·ε, σ uniform in (0, 1], a diffusers
  FlowMatchEulerDiscreteScheduler; the codecs run it as a diffusion denoiser (parts/denoisers.py).

Choices:
- No attention in the autoencoder's middle block: a full-size image (Kodak: 96×64 latents) would make
  it the slowest layer on a CPU, and convolutions alone run on any size.
- ε-prediction with Stable Diffusion's schedule for ldm-small, so the codecs drive it and an SD
  2.1-base mirror through the same code path.
- The taef2 UNet has attention only at its lowest level (1/4 of the latent: 24 × 16 positions for a Kodak
  image): the codecs call it tens of times per picture on 2 CPU cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    # For taef2's 32-channel latent on 2 CPU cores (MODELS.md: what a step and a Kodak call cost). `taef2-small`
    # is the shipped one (6.2 M parameters, 12 MB in fp16); `taef2` (11 M) ran the objective ablation.
    "taef2-small": dict(
        block_out_channels=(48, 96, 192), layers_per_block=1, norm_num_groups=16, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    "taef2": dict(
        block_out_channels=(64, 128, 256), layers_per_block=1, norm_num_groups=32, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
}  # fmt: skip
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="leading",
)  # fmt: skip
OBJECTIVE_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "epsilon": ("DDIMScheduler", SCHEDULER_CONFIG),
    "v": ("DDIMScheduler", dict(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )),
    "flow": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=1.0)),
}  # fmt: skip


@dataclass(frozen=True)
class DiffusionConfig:
    """What `diffarc train diffusion --config NAME` trains: a UNet size and an objective, and whether the
    latent scaling is learnt (a fresh autoencoder) or the autoencoder's own (taef2's, with its latent cache)."""

    unet: str
    objective: str
    own_scaling: bool = False


DIFFUSION_CONFIGS = {
    "tiny": DiffusionConfig("tiny", "epsilon"),
    "small": DiffusionConfig("small", "epsilon"),
    "base": DiffusionConfig("base", "epsilon"),
    "taef2-small-flow": DiffusionConfig("taef2-small", "flow", own_scaling=True),
    "taef2-small-v": DiffusionConfig("taef2-small", "v", own_scaling=True),
    "taef2-flow": DiffusionConfig("taef2", "flow", own_scaling=True),
    "taef2-v": DiffusionConfig("taef2", "v", own_scaling=True),
    "taef2-tiny-flow": DiffusionConfig("tiny", "flow", own_scaling=True),
    "taef2-tiny-v": DiffusionConfig("tiny", "v", own_scaling=True),
}


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


def new_scheduler(objective: str = "epsilon"):
    import diffusers

    name, config = OBJECTIVE_SCHEDULERS[objective]
    return getattr(diffusers, name)(**config)


class AutoencoderPass(torch.nn.Module):
    """encode → mode → decode as one forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mode()).sample, posterior.kl().mean()


def sample_grid(model, path: str | os.PathLike, rows: int = 4, side: int = 256, steps: int = 50, seed: int = 0) -> None:
    """Unconditional deterministic DDIM samples of a LatentDiffusionModel (for a flow model: Euler steps of
    the flow, parts/denoisers.py), as one PNG grid (rows × rows)."""
    from PIL import Image

    from ..parts.denoisers import DiffusionDenoiser
    from ..parts.latents import decode_latents, tensor_to_images
    from ..parts.samplers import ddim, linspace_schedule

    denoiser = DiffusionDenoiser.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    channels = model.unet.config.in_channels
    z = torch.randn((rows * rows, channels, side // 8, side // 8), generator=generator)
    with torch.no_grad():
        z = ddim(denoiser, z, linspace_schedule(denoiser.alphas_cumprod, steps + 1))
        images = np.stack(tensor_to_images(decode_latents(model, z), [(side, side)] * (rows * rows)))
    grid = images.reshape(rows, rows, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(rows * side, rows * side, 3)
    Image.fromarray(grid).save(path)
