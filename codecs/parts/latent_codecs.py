"""Latent codecs: a latent tensor ⇄ byte strings, the part of a learned codec that does the entropy coding.

The idea is CompressAI's `latent_codecs` (Bégaint et al., 2020): a model codec composes small latent
codecs, each with `compress(y, …) → {"strings", "shape", "y_hat"}` and `decompress(strings, shape, …)
→ {"y_hat"}`. `strings` holds one list per part of the code, each with one bytes object per image of the
batch; the caller stores them in its payload and hands them back in the same order. `shape` is the
latent's (H, W), which the caller knows from the image size and does not store. Keyword inputs are what
both sides already know (side information sent elsewhere, or a hyper-decoder's output).

FactorizedLatentCodec — one learned density per channel (Ballé et al., ICLR 2017, "fully factorized"),
the same for every position; here with a per-channel affine given by the caller (latent-denoise's γ):

    encoder:  y ──(y − means) / (scales·Δ)──► round ──► q (integer symbols, B × C × H × W)
                                                 │
              symbol range [lo, hi] of image b ◄─┤      tables P_c(q), q = lo … hi: the density p_c at
                                                 │      step Δ, float64 on the CPU (parts/entropy.py)
                                                 └──► range coder, channel c with table c ──► words
              strings = [[range₀ … range_B−1], [words₀ … words_B−1]]       (range: 2 × int16, 4 bytes)
    decoder:  range, words ──range decoder──► q ──q·(scales·Δ) + means──► ŷ

The density is of the continuous (y − means)/scales, so one trained density serves every step Δ; the
tables are rebuilt per stream over the symbol range it uses, from float32 parameters in float64 on the
CPU, so encoder and decoder agree on any device.

A mean-scale hyperprior (Minnen et al., NeurIPS 2018) slots in beside it with the same interface: its
strings are [y's parts, z's parts], with z (the hyper-latent) coded by a FactorizedLatentCodec and y by
tables of Gaussians whose means and scales the hyper-decoder computes from ẑ.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod

import numpy as np
import torch

from ..errors import EntropyCodingError
from .entropy import LogisticMixtureDensity, decode_symbols, encode_symbols, symbol_range, symbol_tables


def dequantize(q: torch.Tensor, means: torch.Tensor, scales: torch.Tensor, step: float) -> torch.Tensor:
    """ŷ = q·(scales·Δ) + means: the one formula the codec and its training use."""
    return q * (scales * step) + means


class LatentCodec(ABC):
    """A latent tensor ⇄ strings; see the module docstring for the contract."""

    @abstractmethod
    def compress(self, y: torch.Tensor, **inputs) -> dict:
        """{"strings": [part][image] bytes, "shape": (H, W), "y_hat": what the decoder will reconstruct}."""

    @abstractmethod
    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int], **inputs) -> dict:
        """{"y_hat": (B, C, H, W)} from the strings `compress` returned."""


class FactorizedLatentCodec(LatentCodec):
    """Per-channel learned density, uniform quantization with step Δ after a per-channel affine."""

    RANGE = struct.Struct("<hh")  # lowest and highest symbol of one image's stream

    def __init__(self, density: LogisticMixtureDensity, step: float):
        self.density, self.step = density, step

    def compress(self, y: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> dict:
        """y (B, C, H, W); means and scales broadcastable to it (latent-denoise: (B, C, 1, 1))."""
        q = torch.round((y - means) / (scales * self.step))
        ranges, words = [], []
        for image in q:
            symbols = image.flatten(1).to(torch.int64).cpu().numpy()
            lo, hi = symbol_range(symbols)
            ranges.append(self.RANGE.pack(lo, hi))
            words.append(encode_symbols(symbols, symbol_tables(self.density, self.step, lo, hi), lo))
        return {"strings": [ranges, words], "shape": tuple(y.shape[2:]), "y_hat": dequantize(q, means, scales, self.step)}

    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int], means: torch.Tensor, scales: torch.Tensor) -> dict:
        """Raises EntropyCodingError for a range or words that do not decode."""
        ranges, words = strings
        channels, count = self.density.logits.shape[0], shape[0] * shape[1]
        images = []
        for symbol_range_bytes, data in zip(ranges, words):
            if len(symbol_range_bytes) != self.RANGE.size:
                raise EntropyCodingError(f"a symbol range is {self.RANGE.size} bytes, got {len(symbol_range_bytes)}")
            lo, hi = self.RANGE.unpack(symbol_range_bytes)
            if lo > hi:
                raise EntropyCodingError(f"symbol range {lo} … {hi} is empty")
            symbols = decode_symbols(data, symbol_tables(self.density, self.step, lo, hi), lo, count)
            images.append(symbols.reshape(channels, *shape))
        q = torch.from_numpy(np.stack(images)).float().to(means.device)
        return {"y_hat": dequantize(q, means, scales, self.step)}
