"""Counter-based Gaussian noise: the codebooks of DDCM, the same on every device.

DDCM (seed 002) draws, at each reverse-diffusion step t, a codebook of K Gaussian vectors and
transmits which entries it picked. The decoder must regenerate exactly those vectors. The official code
calls `torch.randn` on a seeded device generator, which gives different numbers on CPU and GPU (and
across torch versions), and must draw all K entries to reach entry k. Here every number is a pure
function of (seed, step, entry, channel, y, x):

    key   = mix(mix(mix(seed) ^ step) ^ entry)            32-bit integer hash chain
    u1,u2 = mix(key ^ mix(channel) ^ site), mix(... ^ SALT) two uniforms per element, site = y·2^16 + x
    z     = sqrt(-2 ln u1) · cos(2π u2)                   Box–Muller

The integer part runs in int64 with every product < 2^63, so it is exact on any device; only the final
float64 log/cos/sqrt may differ in the last bit between CPU and GPU, which disappears in the float32
cast or stays at rounding level. Because an element depends on its (channel, y, x) coordinates and not
on the tensor's size, the entries for an image of any size are crops of one unbounded noise field per
(seed, step, entry): a batch of images of different sizes shares one codebook draw, each using its crop.
Entry k alone costs O(C·H·W); the full codebook costs O(K·C·H·W).
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
# Odd multipliers below 2^31, so that (32-bit value) × multiplier < 2^63 never overflows int64.
_M1 = 0x7FEB352D
_M2 = 0x5BD1E995
_SALT = 0x68E31DA4
_TWO_POW_32 = 4294967296.0


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    return x ^ (x >> 15)


def _scalar(value: int) -> torch.Tensor:
    return torch.tensor(value & _MASK, dtype=torch.int64)


def gaussian(
    seed: int, step: int, entries: torch.Tensor | list[int], shape: tuple[int, int, int], device="cpu",
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Noise of shape (len(entries), C, H, W) in float32: entry e of codebook (seed, step).

    `entries` may hold any indices, in any order, with repeats: the decoder asks only for those it needs.
    `origin` (y, x) is where the crop starts in the unbounded field: a tile of a large image draws its own
    part of the image's noise without drawing the rest.
    """
    channels, height, width = shape
    top, left = origin
    if top < 0 or left < 0 or top + height > 65535 or left + width > 65535:
        raise ValueError(f"noise field is limited to 65535×65535 sites, got {height}×{width} at {origin}")
    entries = torch.as_tensor(entries, dtype=torch.int64, device=device)
    step_key = _mix(_mix(_scalar(seed).to(device)) ^ (step & _MASK))
    keys = _mix(step_key ^ entries).view(-1, 1, 1, 1)
    channel = _mix(torch.arange(channels, device=device, dtype=torch.int64) + 1).view(1, -1, 1, 1)
    ys = torch.arange(top, top + height, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    xs = torch.arange(left, left + width, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    counter = keys ^ channel ^ ((ys << 16) | xs)
    first = _mix(counter)
    second = _mix(counter ^ _SALT)
    # (n + 0.5) / 2^32 keeps u1 strictly inside (0, 1), so log(u1) is finite.
    u1 = (first.to(torch.float64) + 0.5) / _TWO_POW_32
    u2 = (second.to(torch.float64) + 0.5) / _TWO_POW_32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(torch.float32)
