"""taef2: a small pretrained autoencoder for the FLUX.2 latent space, the latent space of diffarc's codecs.

    pixels [-1, 1] ──encoder (92 GMAC / Kodak image)──► latent 32 × H/8 × W/8 ──decoder (107 GMAC)──► pixels

The weights are Ollin Boer Bohan's `taef2` (madebyollin/taesd, MIT; `codecs/builtin/taef2/vae/` ships the
two safetensors files unchanged with their LICENSE, MODELS.md records their origin and sha256). This module
is written from the architecture's description; the tensor names are the files' own keys:

    encoder  0 conv 3→64 · 1 Block · [conv 64→64 /2 no bias · Block · Block · Block] × 2 (keys 2-9)
             · 10 conv 64→64 /2 no bias · 11-13 Block(p) · 14 conv 64→32
    decoder  (0: soft clamp 3·tanh(z/3)) · 1 conv 32→64 · ReLU · 3-5 Block(p)
             · [×2 nearest · conv no bias · Block × 3] × 2 (keys 6-15) · ×2 · 17 conv no bias · 18 Block · 19 conv 64→3

    Block(n): x → ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)
    Block(p): x → x + c2(ReLU(GroupNorm₄(c1(x)))) first (1×1 convs 64→256→64), then Block

The "pool" branch of Block(p) normalises over the whole picture, so a picture is not the sum of its tiles.
The decoder therefore runs in two stages:
- the latent-resolution stage (conv, the three Block(p)) runs on the whole latent; the pool branch is
  pointwise once its GroupNorm statistics are known, so those are computed first, in float64 over fixed
  row bands of the latent (the same sums whatever the batch or tile), and the branch is then applied band
  by band: the 256-channel activation is never held whole;
- the upsampling stage (76 % of the work, 64 channels at up to full resolution) is local, with a receptive
  field of 9 latent pixels, so it runs in tiles of the latent with a halo of `HALO` latent pixels and keeps
  only their centres: memory is bounded by the tile, not the picture, and a tiled decode is the whole one.

Pixels are [0, 1] inside the network; the interface takes and gives [-1, 1] like diffusers'
`AutoencoderTiny` (`encode(x).latents`, `decode(z).sample`), so `parts/latents.py` and the samplers use it
as they use any diffusers VAE. Latents are the network's raw latents; `scaling_factor` and `shift_factor`
in the config map them to the unit-variance space a diffusion model works in, as diffusers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ModelError

ENCODER_FILE = "taef2_encoder.safetensors"
DECODER_FILE = "taef2_decoder.safetensors"
LATENT_CHANNELS = 32
WIDTH = 64
POOL_WIDTH = 256
POOL_GROUPS = 4
# The upsampling stage's receptive field in latent pixels: 10 convs at 1/4 (5 latent px), 10 at 1/2 (2.5),
# 5 at full resolution (0.625), rounded up. A tile decoded with this halo has exact centres.
HALO = 9
# Latent rows per band for the pool statistics and the pointwise branch (fixed: the sums' order is too).
BAND_ROWS = 16
# Latent tile of the upsampling stage: 64 × 64 latent px (512 × 512 pixels + halo) holds ~330 MB of fp32
# activations at its widest; larger tiles are no faster on a CPU, and a GPU batch gets the batch dimension.
TILE = 64


def conv(c_in: int, c_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Pool(nn.Sequential):
    """c1 (1×1, 64→256) · GroupNorm over the whole picture · ReLU · c2 (1×1, 256→64): keys pool.0, .1, .3."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(WIDTH, POOL_WIDTH, 1, bias=False),
            nn.GroupNorm(POOL_GROUPS, POOL_WIDTH),
            nn.ReLU(),
            nn.Conv2d(POOL_WIDTH, WIDTH, 1, bias=False),
        )

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and group, the mean and 1/std of c1(x) over the whole picture, (B, groups) each.

        Summed in float64 band by band, so memory holds one band of c1(x) and the sums do not depend on
        how the caller batches or tiles."""
        batch, _, height, width = x.shape
        total = torch.zeros(batch, POOL_GROUPS, dtype=torch.float64, device=x.device)
        squares = torch.zeros_like(total)
        for top in range(0, height, BAND_ROWS):
            band = self[0](x[:, :, top : top + BAND_ROWS]).double().reshape(batch, POOL_GROUPS, -1)
            total += band.sum(-1)
            squares += band.square().sum(-1)
        count = height * width * POOL_WIDTH // POOL_GROUPS
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0)
        return mean.to(x.dtype), (variance + self[1].eps).rsqrt().to(x.dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """c2(ReLU(GroupNorm(c1(x)))) with whole-picture statistics, computed band by band."""
        mean, inv_std = self.statistics(x)
        batch = x.shape[0]
        group_shape = (batch, POOL_GROUPS, POOL_WIDTH // POOL_GROUPS, 1, 1)
        weight = self[1].weight.view(1, POOL_GROUPS, -1, 1, 1)
        bias = self[1].bias.view(1, POOL_GROUPS, -1, 1, 1)
        scale = inv_std.view(*group_shape[:2], 1, 1, 1) * weight
        shift = bias - mean.view(*group_shape[:2], 1, 1, 1) * scale
        bands = []
        for top in range(0, x.shape[2], BAND_ROWS):
            hidden = self[0](x[:, :, top : top + BAND_ROWS])
            h, w = hidden.shape[-2:]
            hidden = (hidden.view(batch, POOL_GROUPS, -1, h, w) * scale + shift).view(batch, POOL_WIDTH, h, w)
            bands.append(self[3](F.relu(hidden)))
        return torch.cat(bands, dim=2)


class Block(nn.Module):
    def __init__(self, pooled: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(WIDTH, WIDTH), nn.ReLU(), conv(WIDTH, WIDTH), nn.ReLU(), conv(WIDTH, WIDTH))
        if pooled:
            self.pool = Pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pool"):
            x = x + self.pool.branch(x)
        return F.relu(self.conv(x) + x)


class Upsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Clamp(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(z / 3)


def encoder_layers() -> nn.Sequential:
    down = lambda: conv(WIDTH, WIDTH, bias=False, stride=2)  # noqa: E731
    return nn.Sequential(
        conv(3, WIDTH), Block(),
        down(), Block(), Block(), Block(),
        down(), Block(), Block(), Block(),
        down(), Block(True), Block(True), Block(True),
        conv(WIDTH, LATENT_CHANNELS),
    )


def decoder_layers() -> nn.Sequential:
    up = lambda: (Upsample(), conv(WIDTH, WIDTH, bias=False))  # noqa: E731
    return nn.Sequential(
        Clamp(), conv(LATENT_CHANNELS, WIDTH), nn.ReLU(), Block(True), Block(True), Block(True),
        *up(), Block(), Block(), Block(),
        *up(), Block(), Block(), Block(),
        *up(), Block(),
        conv(WIDTH, 3),
    )


# decoder[:LATENT_STAGE] runs at latent resolution on the whole latent; decoder[LATENT_STAGE:] is local.
LATENT_STAGE = 6


@dataclass
class EncoderOutput:
    latents: torch.Tensor


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class Taef2Autoencoder(ModelMixin, ConfigMixin):
    """The taef2 encoder and decoder behind diffusers' autoencoder interface; see the module docstring."""

    @register_to_config
    def __init__(self, latent_channels: int = LATENT_CHANNELS, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        if latent_channels != LATENT_CHANNELS:
            raise ModelError(f"taef2 has {LATENT_CHANNELS} latent channels, the config says {latent_channels}")
        self.encoder = encoder_layers()
        self.decoder = decoder_layers()

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """[-1, 1] pixels, any multiple of 8 in size → raw latents (B, 32, H/8, W/8)."""
        return EncoderOutput(self.encoder((x + 1) / 2))

    def decode(self, z: torch.Tensor, tile: int = TILE) -> DecoderOutput:
        """Raw latents → [-1, 1] pixels, (B, 3, 8h, 8w); the upsampling stage in `tile`-sized latent tiles."""
        features = self.decoder[:LATENT_STAGE](z)
        return DecoderOutput(self.upsample(features, tile) * 2 - 1)

    def upsample(self, features: torch.Tensor, tile: int = TILE) -> torch.Tensor:
        """The local stage on tiles of `features` with a halo of HALO latent px; pixels in [0, 1]."""
        batch, _, height, width = features.shape
        stage = self.decoder[LATENT_STAGE:]
        if height <= tile and width <= tile:
            return stage(features).clamp(0, 1)
        out = features.new_empty(batch, 3, height * 8, width * 8)
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                t0, l0 = max(top - HALO, 0), max(left - HALO, 0)
                bottom, right = min(top + tile, height), min(left + tile, width)
                piece = stage(features[:, :, t0 : min(bottom + HALO, height), l0 : min(right + HALO, width)])
                dt, dl = (top - t0) * 8, (left - l0) * 8
                out[:, :, top * 8 : bottom * 8, left * 8 : right * 8] = piece[
                    :, :, dt : dt + (bottom - top) * 8, dl : dl + (right - left) * 8
                ].clamp(0, 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latents).sample

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype = torch.float32) -> "Taef2Autoencoder":
        """The autoencoder of a folder holding config.json and the two taef2 safetensors files."""
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        model = cls(**config)
        for part, name in ((model.encoder, ENCODER_FILE), (model.decoder, DECODER_FILE)):
            path = folder / name
            if not path.is_file():
                raise ModelError(f"{folder} has no {name} (a taef2 autoencoder folder holds both halves)")
            tensors = load_file(str(path))
            missing, unexpected = part.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise ModelError(
                    f"{path} does not hold taef2's {name.split('_')[1].split('.')[0]} "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        return model if dtype == torch.float32 else model.to(dtype)
