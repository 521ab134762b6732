"""The latent-denoise predictors (γ-net, t-net, entropy density) and the objective they are trained on."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..parts.entropy import LogisticMixtureDensity
from ..parts.latent_codecs import dequantize
from ..parts.denoisers import DiffusionDenoiser

MAX_SCALE_LOG = 4.0  # γ's scale stays within e^±4 of the channel's std: fp16-safe, and no runaway


class LatentDenoisePredictors(ModelMixin, ConfigMixin):
    """The trained parts: γ-net (transform), t-net (timestep) and the entropy model's density."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 4, hidden: int = 64, mixtures: int = 4, max_timestep: int = 999):
        super().__init__()
        c = latent_channels
        self.gamma_net = torch.nn.Sequential(
            torch.nn.Linear(2 * c + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2 * c),
        )  # fmt: skip
        self.t_net = torch.nn.Sequential(
            torch.nn.Linear(3 * c + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1)
        )
        # Start from the identity correction (γ = the channel's own mean and std) and t ≈ 10 % of max.
        torch.nn.init.zeros_(self.gamma_net[-1].weight)
        torch.nn.init.zeros_(self.gamma_net[-1].bias)
        torch.nn.init.constant_(self.t_net[-1].bias, -2.2)
        self.density = LogisticMixtureDensity(c, mixtures)

    def transform(self, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (shift, scale), each (B, C), for latents z (B, C, H, W) and steps Δ (B,)."""
        mean, log_std = channel_stats(z)
        out = self.gamma_net(torch.cat([mean, log_std, torch.log(step)[:, None]], dim=1))
        c = z.shape[1]
        std = log_std.exp()
        return mean + std * out[:, :c], std * torch.exp(MAX_SCALE_LOG * torch.tanh(out[:, c:] / MAX_SCALE_LOG))

    def timestep(self, z_hat: torch.Tensor, step: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Predicted (continuous) timestep (B,) of dequantized latents quantized with step Δ·scale."""
        mean, log_std = channel_stats(z_hat)
        features = torch.cat([mean, log_std, torch.log(step[:, None] * scale), torch.log(step)[:, None]], dim=1)
        return self.config.max_timestep * torch.sigmoid(self.t_net(features)[:, 0])


def channel_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = z.flatten(2)
    return flat.mean(-1), torch.log(flat.std(-1).clamp_min(1e-3))


class LatentDenoiseObjective(torch.nn.Module):
    """What `diffarc train latent-denoise` minimises: quantize (as uniform noise), predict t, denoise in one
    step — all differentiable for the predictors.

    Gradients reach the predictors through the frozen UNet; its own weights take none (load_model froze
    them), and the optimizer only holds the predictors' parameters.
    """

    def __init__(self, predictors, model):
        super().__init__()
        self.predictors = predictors
        self.denoiser = DiffusionDenoiser.from_model(model)

    def forward(self, z: torch.Tensor, step: torch.Tensor, uniform: torch.Tensor | None):
        """(bits, squared error after denoising, squared error at t = 0, t), per image; uniform=None rounds."""
        shift, scale = self.predictors.transform(z, step)
        y = (z - shift[..., None, None]) / scale[..., None, None]
        box = step.view(-1, 1, 1, 1)
        y_q = y + box * (uniform - 0.5) if uniform is not None else torch.round(y / box) * box
        bits = self.predictors.density.bits(y_q, step).flatten(1).mean(1)
        z_hat = dequantize(y_q, shift[..., None, None], scale[..., None, None], 1.0)  # y_q is in units of y, not of Δ
        t = self.predictors.timestep(z_hat, step, scale)
        alpha_bar = self.denoiser.alpha_bar(t).view(-1, 1, 1, 1)
        x0_hat, _ = self.denoiser.predict(alpha_bar.sqrt() * z_hat, t, alpha_bar)
        error = ((x0_hat - z) ** 2).flatten(1).mean(1)
        return bits, error, ((z_hat - z) ** 2).flatten(1).mean(1), t


def lambda_for_step(step: torch.Tensor) -> torch.Tensor:
    """Rate–distortion weight that makes Δ the rate knob: the slope of a uniform quantizer of step Δ.

    At high rate, D = Δ²/12 and dD/dR = −2·ln2·D per bit, so minimising R + λ·D with λ = 6 / (ln2 · Δ²)
    is optimal exactly where the quantizer of step Δ is: the γ-net then allocates bits as Δ implies.
    """
    return 6.0 / (math.log(2) * step**2)
