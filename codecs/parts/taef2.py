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
  only their centres: memory is bounded by the tile, not the picture, and a tiled decode computes the
  whole one's function. Its bits can differ in the last place of float32 (≤ 2·10⁻⁶ measured): oneDNN
  picks how it blocks a convolution's sums from the shape it is given, and a tile is another shape.
The encoder is split the same way: its full-resolution stage (keys 0-10, a receptive field of 65 pixels)
runs in tiles with a halo of `HALO` latent pixels, its pooled blocks on the whole latent. Memory for any
size is then the tile's activations plus a few 64-channel copies of the latent (4 bytes per pixel each).

A decode gives the same bits with any number of CPU threads, which a codec's bit-identical decode needs,
for latents of at least MIN_PIECE px a side or 16 px in all (a codec runs smaller ones on one thread):
- every 3×3 convolution runs in channels_last (NHWC), where oneDNN's blocking, and so each output's order
  of summation, did not change with the thread count (1 to 16 threads, latents from 1 × 16 to 70 × 66);
  on latents of 9 px or fewer it did (3 to 6 threads). No piece of a tiled decode is thinner than
  MIN_PIECE. NHWC is also faster on a CPU (benchmarks/taef2_speed.py);
- the pool branch's 1×1 convolutions are matrix products over the channels of NHWC pixels, on one thread
  (parts/threads.py): torch sends a 1×1 convolution to oneDNN on several threads but to MKL on one, and
  MKL's order follows the thread count on small products (measured: NCHW 1×1 outputs differed between
  one and two threads; a one-pixel product between two and three). They are under 1 % of the work;
- the soft clamp's tanh runs on pieces under torch's parallel grain: torch hands the tail of each
  thread's share of an elementwise op to a scalar kernel, which may round differently from the vector one,
  and the shares depend on the thread count; a piece under the grain is one share whatever the count;
- the pool statistics are float64 sums over fixed bands, each band's sum over the dims torch reduces
  in a fixed order (it splits a reduction among threads by output, and there are POOL_GROUPS outputs).

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
from .threads import one_torch_thread

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
# Latent tile of the full-resolution stages: 96 × 96 latent px (768 × 768 pixels, + halo: 114 × 114) holds
# ~0.6 GB of fp32 activations at its widest. A Kodak image is one tile; each tile's halo is work done twice
# (at 64, a Kodak decode costs 126 GMAC instead of 107), so larger tiles are faster, smaller ones leaner.
TILE = 96
# Latent px a tile's piece spans at least, where the picture does: oneDNN orders a convolution's sums by
# the thread count on pieces of a few px (measured: up to 3 × 3 differed, 1 × 16 and 2 × 8 did not).
MIN_PIECE = 16
# Elements per piece of an elementwise op that must round the same whatever the thread count: under
# torch's parallel grain (32768), so that one thread computes each piece (module docstring).
PIECE = 16384
NHWC = torch.channels_last


# A pooled block's GroupNorm statistics over a picture: (mean, 1/std), (B, POOL_GROUPS) each.
Statistics = tuple[torch.Tensor, torch.Tensor]


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

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """c1(x) as (B, h, w, 256): a matrix product over the channels of NHWC pixels (why: module docstring)."""
        with one_torch_thread():
            return F.linear(x.permute(0, 2, 3, 1), self[0].weight.flatten(1))

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and group, the mean and 1/std of c1(x) over the whole picture, (B, groups) each.

        Summed in float64 band by band, so memory holds one band of c1(x) and the sums do not depend on
        how the caller batches or tiles."""
        batch, _, height, width = x.shape
        total = torch.zeros(batch, POOL_GROUPS, dtype=torch.float64, device=x.device)
        squares = torch.zeros_like(total)
        for top in range(0, height, BAND_ROWS):
            band = self.hidden(x[:, :, top : top + BAND_ROWS]).double()
            band = band.reshape(batch, -1, POOL_GROUPS, POOL_WIDTH // POOL_GROUPS).transpose(1, 2).reshape(batch, POOL_GROUPS, -1)
            total += band.sum(-1)
            squares += band.square().sum(-1)
        count = height * width * POOL_WIDTH // POOL_GROUPS
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0)
        return mean.to(x.dtype), (variance + self[1].eps).rsqrt().to(x.dtype)

    def branch(self, x: torch.Tensor, statistics: Statistics | None = None) -> torch.Tensor:
        """c2(ReLU(GroupNorm(c1(x)))) with whole-picture statistics (x's own unless given), band by band."""
        mean, inv_std = self.statistics(x) if statistics is None else statistics
        batch = x.shape[0]
        weight = self[1].weight.view(1, 1, 1, POOL_GROUPS, -1)
        scale = inv_std.view(batch, 1, 1, POOL_GROUPS, 1) * weight
        shift = self[1].bias.view(1, 1, 1, POOL_GROUPS, -1) - mean.view(batch, 1, 1, POOL_GROUPS, 1) * scale
        bands = []
        for top in range(0, x.shape[2], BAND_ROWS):
            hidden = self.hidden(x[:, :, top : top + BAND_ROWS])
            normed = (hidden.view(*hidden.shape[:3], POOL_GROUPS, -1) * scale + shift).flatten(3)
            with one_torch_thread():
                bands.append(F.linear(F.relu(normed), self[3].weight.flatten(1)))
        return torch.cat(bands, dim=1).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, pooled: bool = False):
        super().__init__()
        # In place: each activation is written once, not copied (a 64-channel picture is 12 bytes a pixel a pass).
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.conv = nn.Sequential(conv(WIDTH, WIDTH), relu(), conv(WIDTH, WIDTH), relu(), conv(WIDTH, WIDTH))
        if pooled:
            self.pool = Pool()

    def forward(self, x: torch.Tensor, statistics: Statistics | None = None) -> torch.Tensor:
        if hasattr(self, "pool"):
            x = x + self.pool.branch(x, statistics)
        return self.conv(x).add_(x).relu_()


class Upsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Clamp(nn.Module):
    """3·tanh(z/3), the same bits with any thread count (PIECE)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pieces = (z / 3).flatten().split(PIECE)
        return (3 * torch.cat([torch.tanh(piece) for piece in pieces])).view(z.shape).contiguous(memory_format=NHWC)


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
# encoder[:ENCODER_LOCAL] is local (down to 1/8, receptive field 65 px ≤ HALO latent px); encoder[ENCODER_LOCAL:]
# runs on the whole latent (the pooled blocks).
ENCODER_LOCAL = 11


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

    def encode(self, x: torch.Tensor, tile: int = TILE) -> EncoderOutput:
        """[-1, 1] pixels, any multiple of 8 in size → raw latents (B, 32, H/8, W/8); the full-resolution
        stage in tiles of `tile` latent px."""
        pixels = ((x + 1) / 2).contiguous(memory_format=NHWC)
        features = in_tiles(self.encoder[:ENCODER_LOCAL], pixels, tile, 8, 1 / 8, 64)
        return EncoderOutput(self.encoder[ENCODER_LOCAL:](features).contiguous())

    def decode(self, z: torch.Tensor, tile: int = TILE, statistics: list[Statistics] | None = None) -> DecoderOutput:
        """Raw latents → [-1, 1] pixels, (B, 3, 8h, 8w); the upsampling stage in `tile`-sized latent tiles.
        `statistics`: the pooled blocks' (`pool_statistics` of the picture z is a crop of), so that a crop
        decodes as it does inside its picture (its own statistics can be far off: 22.7 dB against 34.3 dB
        on a 192-px crop of kodim23, 29.3 dB with the picture's; the rest is the crop's border)."""
        return DecoderOutput(self.upsample(self.latent_stage(z, statistics)[0], tile) * 2 - 1)

    def latent_stage(self, z: torch.Tensor, statistics: list[Statistics] | None = None) -> tuple[torch.Tensor, list[Statistics]]:
        """The decoder's latent-resolution stage: (features, each pooled block's statistics as used)."""
        x, used = z.contiguous(memory_format=NHWC), []
        given = iter(statistics) if statistics is not None else None
        for layer in self.decoder[:LATENT_STAGE]:
            if isinstance(layer, Block) and hasattr(layer, "pool"):
                used.append(next(given) if given is not None else layer.pool.statistics(x))
                x = layer(x, used[-1])
            else:
                x = layer(x)
        return x, used

    def pool_statistics(self, z: torch.Tensor) -> list[Statistics]:
        """The pooled blocks' GroupNorm statistics when decoding raw latents z (for `decode(crop, statistics=…)`)."""
        return self.latent_stage(z)[1]

    def upsample(self, features: torch.Tensor, tile: int = TILE) -> torch.Tensor:
        """The local stage on tiles of `features` with a halo of HALO latent px; pixels in [0, 1]."""
        return in_tiles(lambda piece: self.decoder[LATENT_STAGE:](piece).clamp(0, 1), features, tile, 1, 8, 3).contiguous()

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
        model.to(memory_format=NHWC)
        return model if dtype == torch.float32 else model.to(dtype)


def in_tiles(stage, x: torch.Tensor, tile: int, unit: int, scale: float, channels: int) -> torch.Tensor:
    """A local `stage` applied to x in tiles of `tile` latent px with a halo of HALO latent px, keeping their
    centres: the stage on the whole of x, in the memory of one tile. `unit`: x's pixels per latent px;
    `scale`: the stage's output size over its input's; `channels`: the stage's output channels."""
    batch, _, height, width = x.shape
    rows, cols = -(-height // unit), -(-width // unit)  # in latent px
    if rows <= tile and cols <= tile:
        return stage(x)
    out = x.new_empty(batch, channels, round(height * scale), round(width * scale)).contiguous(memory_format=NHWC)
    step = unit * scale  # output px per latent px
    for top in range(0, rows, tile):
        for left in range(0, cols, tile):
            bottom, right = min(top + tile, rows), min(left + tile, cols)
            b1, r1 = min(bottom + HALO, rows), min(right + HALO, cols)
            # A ragged last tile takes more of its neighbour, so no piece is thinner than MIN_PIECE.
            t0, l0 = max(min(top - HALO, b1 - MIN_PIECE), 0), max(min(left - HALO, r1 - MIN_PIECE), 0)
            piece = stage(x[:, :, t0 * unit : b1 * unit, l0 * unit : r1 * unit])
            dt, dl = round((top - t0) * step), round((left - l0) * step)
            h, w = round((bottom - top) * step), round((right - left) * step)
            out[:, :, round(top * step) : round(top * step) + h, round(left * step) : round(left * step) + w] = piece[
                :, :, dt : dt + h, dl : dl + w
            ]
    return out
