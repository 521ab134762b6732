"""glc's networks: a transform codec inside taef2's latent space, with a mean-scale hyperprior.

    z (32 × h × w, taef2's unit-variance latent) ──g_a(Δ)──► y (M × h/2 × w/2) ──h_a──► ζ (H × h/8 × w/8)
    ẑ ◄──g_s(Δ)── ŷ                                   μ, σ of each value of y ◄──h_s── ζ̂

g_a: a 3×3 convolution to N channels, residual blocks, one stride-2 convolution, residual blocks, a 3×3
convolution to M channels; g_s mirrors it with a sub-pixel upsampling (a convolution to 4N channels and a
pixel shuffle). h_a and h_s are the mean-scale hyperprior's small hyper-transforms (two stride-2 layers
each); ζ's density is a per-channel logistic mixture (parts/entropy.py). How y and ζ are coded is
`parts/latent_codecs.MeanScaleHyperpriorLatentCodec`; `GlcModel.forward` is its training-time stand-in
(`relaxed_hyperprior`).

The rate knob is the quantization step Δ of y. Both transforms also see Δ: after each residual block a
`RateModulation` scales every channel by a factor that depends on log Δ (the modulated autoencoder of
Yang et al., 2020, here with a table rather than a network), so one model can change what it keeps
with the rate instead of only how finely it quantizes.

Decoding gives the same bits with any thread count (the codec's guarantee): g_s uses only convolutions,
ReLU, additions, products and a pixel shuffle — no transcendental function, whose vector and scalar
kernels may round differently — and runs in channels_last, where oneDNN sums each output in one order
whatever the thread count (parts/taef2.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..parts.entropy import LogisticMixtureDensity
from ..parts.latent_codecs import down, relaxed_hyperprior, up

LATENT_STRIDE = 2  # g_a: one stride-2 layer, so y is at 1/16 of the image
HYPER_STRIDE = 4  # h_a: two more, so ζ is at 1/64
# The steps Δ the model trains for, and the anchors of its rate modulation, log-spaced across them.
STEP_RANGE = (0.35, 16.0)
ANCHORS = 5
# y starts this many times larger than PyTorch's initialisation makes it (and g_s's first layer as much
# smaller): a trained y spans a few quantization steps, an initialised one tenths (measured: std 0.2–0.4),
# and so does ζ, which then rounds to 0 while its density, spread over ±2, charges ~1.7 bits a value.
# Adam moves the density's parameters by about the learning rate per step: too slowly to follow.
# ζ gets its own gain: h_a's two strided layers shrink it tenfold again.
INIT_GAIN = 8.0
ZETA_GAIN = 10.0


def conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class RateModulation(nn.Module):
    """x · (1 + s(Δ)) per channel, s piecewise linear in log Δ between learnt values at ANCHORS steps
    log-spaced over STEP_RANGE (held at the ends outside it). Starts at s = 0: no modulation."""

    def __init__(self, channels: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(ANCHORS, channels))

    def forward(self, x: torch.Tensor, log_step: torch.Tensor) -> torch.Tensor:
        low, high = (math.log(s) for s in STEP_RANGE)
        position = ((log_step - low) / (high - low) * (ANCHORS - 1)).clamp(0, ANCHORS - 1)
        index = position.floor().long().clamp(max=ANCHORS - 2)
        weight = (position - index)[:, None]
        scale = 1 + self.table[index] * (1 - weight) + self.table[index + 1] * weight
        return x * scale[:, :, None, None]


class ResidualBlock(nn.Module):
    """x + conv(ReLU(conv(x))), then the rate modulation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.conv2 = conv3(channels, channels), conv3(channels, channels)
        self.modulation = RateModulation(channels)

    def forward(self, x: torch.Tensor, log_step: torch.Tensor) -> torch.Tensor:
        return self.modulation(x + self.conv2(F.relu(self.conv1(x))), log_step)


class Transform(nn.Module):
    """conv · blocks · resample · blocks · conv, each block modulated by Δ: g_a (`down`) or g_s (`up`)."""

    def __init__(self, c_in: int, channels: int, c_out: int, blocks: int, resample: nn.Module):
        super().__init__()
        self.head = conv3(c_in, channels)
        self.before = nn.ModuleList(ResidualBlock(channels) for _ in range(blocks))
        self.resample = resample
        self.after = nn.ModuleList(ResidualBlock(channels) for _ in range(blocks))
        self.tail = conv3(channels, c_out)

    def forward(self, x: torch.Tensor, log_step: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        for block in self.before:
            x = block(x, log_step)
        x = self.resample(x)
        for block in self.after:
            x = block(x, log_step)
        return self.tail(x)


class GlcModel(ModelMixin, ConfigMixin):
    """g_a, g_s, h_a, h_s and ζ's density: everything the codec and its training need."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 32, channels: int = 128, y_channels: int = 128, hyper_channels: int = 64,
                 blocks: int = 2, mixtures: int = 3):  # fmt: skip
        super().__init__()
        c, n, m, h = latent_channels, channels, y_channels, hyper_channels
        self.analysis = Transform(c, n, m, blocks, nn.Conv2d(n, n, 4, stride=2, padding=1))
        self.synthesis = Transform(m, n, c, blocks, nn.Sequential(conv3(n, 4 * n), nn.PixelShuffle(2)))
        self.hyper_analysis = nn.Sequential(conv3(m, h), nn.LeakyReLU(), down(h, h), nn.LeakyReLU(), down(h, h))
        self.hyper_synthesis = nn.Sequential(up(h, h), nn.LeakyReLU(), up(h, h), nn.LeakyReLU(), conv3(h, 2 * m))
        self.z_density = LogisticMixtureDensity(h, mixtures)
        with torch.no_grad():
            for gain, into, out_of in ((INIT_GAIN, self.analysis.tail, self.synthesis.head),
                                       (ZETA_GAIN, self.hyper_analysis[-1], self.hyper_synthesis[0])):  # fmt: skip
                into.weight.mul_(gain)
                into.bias.mul_(gain)
                out_of.weight.div_(gain)

    def forward(self, z: torch.Tensor, step: torch.Tensor, uniform_y: torch.Tensor | None, uniform_z: torch.Tensor | None):
        """(ẑ, bits of y, bits of ζ), bits summed per image, for latents z whose sides are multiples of
        LATENT_STRIDE · HYPER_STRIDE and steps Δ (B,); uniform noise in [0, 1) of y's and ζ's shapes for the
        training rates, None for the codec's rounding."""
        log_step = step.log()
        y = self.analysis(z, log_step)
        y_hat, y_bits, z_bits = relaxed_hyperprior(
            y, self.hyper_analysis(y), self.hyper_synthesis, self.z_density, step, uniform_y, uniform_z
        )
        return self.synthesis(y_hat, log_step), y_bits, z_bits

    def code_shapes(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes (C, h, w) of y and ζ for a latent of this size (multiples of LATENT_STRIDE · HYPER_STRIDE)."""
        h, w = height // LATENT_STRIDE, width // LATENT_STRIDE
        return (self.config.y_channels, h, w), (self.config.hyper_channels, h // HYPER_STRIDE, w // HYPER_STRIDE)
