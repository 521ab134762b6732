"""The HFD detail decoder's network and the two processes it is trained for (flow and diffusion).

    base b (the decoded base picture, full resolution, [-1, 1]) and its quality and scale
    state s (the residual being sampled: noise at the start, r = x − b at the end)
    [s, b] ─space-to-depth ×4─► ⊕ quality, scale channels ─► UNet2DModel(t) ─depth-to-space─► r̂ (residual estimate)

Both processes run on the residual r = x − b, not on the image, and the network always predicts r̂
(x-prediction of the residual) through a zero-initialised output layer: an untrained decoder returns
the base, and training can only move the output away from the base where that lowers the error.

- **flow** (rectified flow from "base plus a little noise" to the image): s_τ = (1 − τ)·r + τ·σ·ε,
  τ = 1 at the start. One step from τ = 1 gives r̂ ≈ E[r | b] (the restoration); more Euler steps
  follow the flow and draw a sample with texture.
- **diffusion** (variance preserving, x0-prediction): s_t = √ᾱ_t·r + √(1 − ᾱ_t)·ε with a cosine schedule
  whose log-SNR is shifted up by 2·log(shift). The residual is small (its std is about 0.05 in [−1, 1]
  units), so on the plain cosine schedule most of the noise levels would hide it completely; the shift
  moves them toward low noise, where the residual's detail is decided.

Why space-to-depth: at ×4 the UNet runs on a 1/16 as many positions with 96 channels in, so a Kodak
image costs about 22 GFLOP per step — CPU decoding in well under a second per step on two cores.
The condition channels are constants per image: quality / 50 and log2(scale) / 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..parts.samplers import ddim, euler, linspace_schedule

OBJECTIVES = ("flow", "diffusion")
TIMESTEP_SCALE = 1000.0  # the UNet's sinusoidal embedding sees t·1000, the range it was built for
TIMESTEPS = 1000  # diffusion: the sampler's integer timesteps i stand for t = i / 999
LOGSNR_LIMIT = 15.0  # the cosine schedule's log-SNR is clipped to ±15 before the shift (finite at t = 0 and 1)


class DetailDecoder(ModelMixin, ConfigMixin):
    """r̂ = network(state, base, quality, scale, t); see the module docstring."""

    @register_to_config
    def __init__(
        self,
        widths: tuple[int, ...] = (48, 64, 96),
        layers_per_block: int = 1,
        space_to_depth: int = 4,
        objective: str = "flow",
        sigma: float = 0.1,  # flow: the start noise's std in [−1, 1] units
        shift: float = 8.0,  # diffusion: the log-SNR shift factor (1 = the plain cosine schedule)
        channels: int = 3,  # of the picture it refines: 3 for pixels, the autoencoder's 32 for a latent
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        cells = channels * space_to_depth**2
        self.unet = UNet2DModel(
            in_channels=2 * cells + 2, out_channels=cells,
            down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
            block_out_channels=tuple(widths), layers_per_block=layers_per_block, add_attention=False,
            norm_num_groups=16, time_embedding_dim=128,
        )  # fmt: skip
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)

    @property
    def multiple(self) -> int:
        """Inputs' height and width must be multiples of this (space-to-depth times the UNet's downsamplings)."""
        return self.config.space_to_depth * 2 ** (len(self.config.widths) - 1)

    def forward(self, state, base, quality, scale, t) -> torch.Tensor:
        """r̂ for states and bases (B, channels, H, W), qualities, scales and times t ∈ [0, 1], each (B,)."""
        b, _, h, w = state.shape
        factor = self.config.space_to_depth
        conditions = torch.stack([quality / 50.0, torch.log2(scale) / 2.0], 1).to(state.dtype)
        grid = conditions.view(b, 2, 1, 1).expand(b, 2, h // factor, w // factor)
        x = torch.cat([F.pixel_unshuffle(state, factor), F.pixel_unshuffle(base, factor), grid], 1)
        out = self.unet(x, t * TIMESTEP_SCALE, return_dict=False)[0]
        return F.pixel_shuffle(out, factor)


def diffusion_alpha_bar(t: torch.Tensor, shift: float) -> torch.Tensor:
    """ᾱ(t) of the shifted cosine schedule: log-SNR = clip(−2·log tan(πt/2)) + 2·log(shift)."""
    logsnr = -2 * torch.log(torch.tan(math.pi * t.double().clamp(1e-6, 1 - 1e-6) / 2))
    logsnr = logsnr.clamp(-LOGSNR_LIMIT, LOGSNR_LIMIT) + 2 * math.log(shift)
    return torch.sigmoid(logsnr).to(t.dtype)


def noisy_state(decoder: DetailDecoder, residual: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The training state at times t (B,): what the sampler would hold at t if it had reached r exactly."""
    t = t.view(-1, 1, 1, 1)
    if decoder.config.objective == "flow":
        return (1 - t) * residual + t * decoder.config.sigma * noise
    alpha_bar = diffusion_alpha_bar(t, decoder.config.shift)
    return alpha_bar.sqrt() * residual + (1 - alpha_bar).sqrt() * noise


@torch.inference_mode()
def sample_residual(
    decoder: DetailDecoder, base, quality, scale, noise, steps: int, detail: float
) -> torch.Tensor:  # fmt: skip
    """r̂ after `steps` network calls from the start noise, blended toward the first call's estimate.

    The first call's r̂ is the posterior-mean estimate (the restoration); the last is a sample. The
    result is first + detail·(last − first): detail 0 is the restoration, 1 the sample. The loops are
    the shared samplers': Euler over τ = 1 … 0 for the flow (v = (s − r̂)/τ), DDIM (η = 0) over `steps`
    evenly spaced timesteps of the shifted schedule for diffusion. Both are deterministic given the noise.
    """
    batch, estimates = base.shape[0], []

    def estimate(state, t: float) -> torch.Tensor:
        estimates.append(decoder(state, base, quality, scale, torch.full((batch,), t, device=base.device)).float())
        return estimates[-1]

    if decoder.config.objective == "flow":
        velocity = lambda state, t, cond: (state - estimate(state, t)) / t  # noqa: E731
        euler(velocity, decoder.config.sigma * noise, torch.linspace(1.0, 0.0, steps + 1).tolist())
    else:
        table = diffusion_alpha_bar(torch.linspace(0, 1, TIMESTEPS, dtype=torch.float64), decoder.config.shift)

        def denoise(state, t: int, cond):  # (x̂0, ε̂) at integer timestep t, as samplers.ddim asks
            alpha_bar = float(table[t])
            r = estimate(state, t / (TIMESTEPS - 1))
            return r, (state - alpha_bar**0.5 * r) / (1 - alpha_bar) ** 0.5

        ddim(denoise, noise, linspace_schedule(table, steps + 1))
    first, last = estimates[0], estimates[-1]
    return first + detail * (last - first)
