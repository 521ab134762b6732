"""The hyperprior codec's networks (Ballé et al., ICLR 2018; means by Minnen et al., NeurIPS 2018).

    x ──g_a──► y (M × H/16 × W/16) ──h_a──► z (Z × H/64 × W/64)
    x̂ ◄──g_s── ŷ                    ŷ ◄── means, scales ◄──h_s── ẑ

g_a and g_s are four 5×5 stride-2 convolutions (transposed in g_s) with GDN / inverse GDN between them;
h_a and h_s are the small convolutional hyper-transforms of the mean-scale hyperprior, and z's density
is a per-channel logistic mixture (parts/entropy.py). The rate of y is a Gaussian per value, with the
mean and scale h_s predicts; how both are coded is `parts/latent_codecs.MeanScaleHyperpriorLatentCodec`,
and `HyperpriorModel.forward` is the training-time stand-in for it (uniform noise for the rates,
straight-through rounding for what the decoders see — Minnen & Singh, ICIP 2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..parts.entropy import LogisticMixtureDensity
from ..parts.latent_codecs import down, gaussian_bits, mean_and_scale, up

IMAGE_STRIDE = 16  # g_a: four stride-2 layers
HYPER_STRIDE = 4  # h_a: two more


class GDN(nn.Module):
    """Generalized divisive normalization (Ballé et al., ICLR 2016): x_i / √(β_i + Σ_j γ_ij x_j²);
    `inverse` multiplies instead (the synthesis side). β and γ are kept positive through softplus."""

    def __init__(self, channels: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.full((channels,), math.log(math.e - 1)))  # softplus → 1
        # γ starts as 0.1·I: a mild normalization by each channel's own energy.
        off = torch.full((channels, channels), -10.0)
        self.gamma = nn.Parameter(off.fill_diagonal_(math.log(math.expm1(0.1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = F.softplus(self.gamma)[:, :, None, None]
        norm = torch.sqrt(F.conv2d(x * x, gamma, F.softplus(self.beta) + 1e-6))
        return x * norm if self.inverse else x / norm


class HyperpriorModel(ModelMixin, ConfigMixin):
    """g_a, g_s, h_a, h_s and z's density: everything the codec and its training need."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: int = 64, latent_channels: int = 96, hyper_channels: int = 64, mixtures: int = 3):
        super().__init__()
        n, m, h = channels, latent_channels, hyper_channels
        self.analysis = nn.Sequential(down(3, n), GDN(n), down(n, n), GDN(n), down(n, n), GDN(n), down(n, m))
        self.synthesis = nn.Sequential(
            up(m, n), GDN(n, inverse=True), up(n, n), GDN(n, inverse=True), up(n, n), GDN(n, inverse=True), up(n, 3)
        )
        self.hyper_analysis = nn.Sequential(
            nn.Conv2d(m, h, 3, padding=1), nn.LeakyReLU(), down(h, h), nn.LeakyReLU(), down(h, h)
        )
        self.hyper_synthesis = nn.Sequential(
            up(h, h), nn.LeakyReLU(), up(h, h), nn.LeakyReLU(), nn.Conv2d(h, 2 * m, 3, padding=1)
        )
        self.z_density = LogisticMixtureDensity(h, mixtures)

    def forward(self, x: torch.Tensor, step: torch.Tensor, uniform_y: torch.Tensor | None, uniform_z: torch.Tensor | None):
        """(x̂, bits of y, bits of z), bits summed per image, for images x in [-1, 1] whose sides are multiples
        of IMAGE_STRIDE · HYPER_STRIDE and quantization steps Δ (B,). With uniform noise given (in [0, 1), the
        shapes of y and z), the rates are the noisy relaxation; without, the rounding the codec does."""
        box = step.view(-1, 1, 1, 1)
        y = self.analysis(x)
        z = self.hyper_analysis(y)
        z_hat = z + (torch.round(z) - z).detach()
        z_rated = z + uniform_z - 0.5 if uniform_z is not None else torch.round(z)
        z_bits = self.z_density.bits(z_rated, torch.ones_like(step)).flatten(1).sum(1)
        means, scales = mean_and_scale(self.hyper_synthesis(z_hat))
        offsets = (y - means) / box
        rated = offsets + uniform_y - 0.5 if uniform_y is not None else torch.round(offsets)
        y_bits = gaussian_bits(rated, scales / box).flatten(1).sum(1)
        y_hat = means + box * (offsets + (torch.round(offsets) - offsets).detach())
        return self.synthesis(y_hat), y_bits, z_bits

    def latent_shapes(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of y and z (C, h, w) for an input of this padded size."""
        h, w = height // IMAGE_STRIDE, width // IMAGE_STRIDE
        return (
            (self.config.latent_channels, h, w),
            (self.config.hyper_channels, h // HYPER_STRIDE, w // HYPER_STRIDE),
        )
