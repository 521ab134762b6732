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

MeanScaleHyperpriorLatentCodec — the mean-scale hyperprior (Minnen et al., NeurIPS 2018) beside it, with
the same interface: its strings are [y's parts, z's parts], z (the hyper-latent) coded by a
FactorizedLatentCodec and y by tables of Gaussians whose means and scales the hyper-decoder computes
from ẑ; its docstring has the diagram and why its tables agree on every device. `relaxed_hyperprior` is
its differentiable stand-in for training; `join_strings` / `split_strings` make one image's strings one
payload.
"""

from __future__ import annotations

import contextlib
import copy
import math
import struct
from abc import ABC, abstractmethod

import numpy as np
import torch

from ..errors import EntropyCodingError
from .entropy import (
    LogisticMixtureDensity, decode_symbol_rows, decode_symbols, encode_symbols, ideal_bits, symbol_range, symbol_tables,
)
from .threads import one_torch_thread


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


# ---------------------------------------------------------------- the mean-scale hyperprior

# The Gaussian tables: one per scale level, log-spaced (CompressAI's range and count). A value's table is
# the level nearest its predicted scale σ/Δ, so the decoder needs σ only to the precision of the level
# spacing (±6 %, a rate cost under 0.01 bit a value), not to the last bit.
SCALE_LEVELS = np.exp(np.linspace(np.log(0.11), np.log(256.0), 64))
_LOG_LEVEL_STEP = float(np.log(SCALE_LEVELS[1] / SCALE_LEVELS[0]))


def down(c_in: int, c_out: int, kernel: int = 5) -> torch.nn.Conv2d:
    """A stride-2 convolution: the step of analysis and hyper-analysis transforms."""
    return torch.nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2)


def up(c_in: int, c_out: int, kernel: int = 5) -> torch.nn.ConvTranspose2d:
    """A stride-2 transposed convolution that exactly doubles the size: the step of synthesis transforms."""
    return torch.nn.ConvTranspose2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, output_padding=1)


def mean_and_scale(hyper_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A hyper-decoder's (B, 2C, H, W) output as the Gaussians' means and scales σ > 0, (B, C, H, W) each."""
    means, raw = hyper_output.chunk(2, dim=1)
    return means, torch.nn.functional.softplus(raw)


def relaxed_hyperprior(
    y: torch.Tensor, z: torch.Tensor, hyper_decoder: torch.nn.Module, z_density: LogisticMixtureDensity,
    step: torch.Tensor, uniform_y: torch.Tensor | None = None, uniform_z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What MeanScaleHyperpriorLatentCodec does to y and its hyper-latent z, made differentiable for training:
    (ŷ, bits of y, bits of z), bits summed per image, for steps Δ (B,). The decoders see rounded values with
    straight-through gradients (Minnen & Singh, ICIP 2020); the rates see y and z plus uniform noise in
    [−½, ½) given as `uniform_*` in [0, 1) (None: rounded, the codec's own rates)."""
    box = step.view(-1, 1, 1, 1)
    z_rated = z + uniform_z - 0.5 if uniform_z is not None else torch.round(z)
    z_bits = z_density.bits(z_rated, torch.ones_like(step)).flatten(1).sum(1)
    means, scales = mean_and_scale(hyper_decoder(z + (torch.round(z) - z).detach()))
    offsets = (y - means) / box
    rated = offsets + uniform_y - 0.5 if uniform_y is not None else torch.round(offsets)
    y_bits = gaussian_bits(rated, scales / box).flatten(1).sum(1)
    return means + box * (offsets + (torch.round(offsets) - offsets).detach()), y_bits, z_bits


def gaussian_bits(offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """−log2 P(q) of each offset q = (y − μ)/Δ (a symbol, or a symbol plus training noise) under a Gaussian
    of scale σ/Δ integrated over [q − ½, q + ½]: the rate the codec's tables charge, as training sees it.
    Scales below the lowest level count as the lowest level, as in the tables."""
    scales = scales.clamp_min(float(SCALE_LEVELS[0]))
    magnitude = offsets.abs()
    # Both bin edges on the lower tail (|q|): erfc keeps the far tails accurate where Φ would round to 1.
    upper = torch.special.erfc((magnitude - 0.5) / (scales * math.sqrt(2)))
    lower = torch.special.erfc((magnitude + 0.5) / (scales * math.sqrt(2)))
    return -torch.log2((0.5 * (upper - lower)).clamp_min(1e-9))


def scale_indexes(scales: np.ndarray) -> np.ndarray:
    """The scale level (an index into SCALE_LEVELS) of each σ/Δ: the nearest level in log scale."""
    position = (np.log(np.maximum(scales, SCALE_LEVELS[0])) - np.log(SCALE_LEVELS[0])) / _LOG_LEVEL_STEP
    return np.clip(np.rint(position), 0, len(SCALE_LEVELS) - 1).astype(np.int64)


def gaussian_tables(levels: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(len(levels), hi − lo + 1) probabilities of the symbols lo … hi under each scale level's Gaussian,
    each row summing to 1: float64 on the CPU, from constants only, the same on every device."""
    erfc = np.frompyfunc(math.erfc, 1, 1)
    magnitude = np.abs(np.arange(lo, hi + 1, dtype=np.float64))[None, :]
    width = SCALE_LEVELS[levels][:, None] * math.sqrt(2)
    probabilities = 0.5 * (erfc((magnitude - 0.5) / width) - erfc((magnitude + 0.5) / width)).astype(np.float64)
    probabilities += 1e-12  # every symbol stays codable, as in symbol_tables
    return probabilities / probabilities.sum(1, keepdims=True)


# One image's strings of MeanScaleHyperpriorLatentCodec as one payload: y's symbol range, z's symbol range,
# the length of z's words in bytes, then z's words and y's words.
STRINGS_HEADER = struct.Struct("<4s4sI")


def join_strings(strings: list[list[bytes]]) -> bytes:
    """The payload of one image's [y's ranges, y's words, z's ranges, z's words] (one bytes object each)."""
    (y_range,), (y_words,), (z_range,), (z_words,) = strings
    return STRINGS_HEADER.pack(y_range, z_range, len(z_words)) + z_words + y_words


def split_strings(payload: bytes) -> list[list[bytes]]:
    """The strings `join_strings` joined; EntropyCodingError for a payload too short for what it says."""
    if len(payload) < STRINGS_HEADER.size:
        raise EntropyCodingError(f"{len(payload)} bytes, shorter than the {STRINGS_HEADER.size}-byte ranges and length")
    y_range, z_range, z_bytes = STRINGS_HEADER.unpack_from(payload)
    rest = payload[STRINGS_HEADER.size :]
    if z_bytes > len(rest):
        raise EntropyCodingError(f"z's words said to take {z_bytes} bytes; only {len(rest)} follow")
    return [[y_range], [rest[z_bytes:]], [z_range], [rest[:z_bytes]]]


class MeanScaleHyperpriorLatentCodec(LatentCodec):
    """y coded by Gaussians whose means and scales come from a side latent z (Minnen et al., NeurIPS 2018).

        encoder:  y ──hyper_encoder──► z ──FactorizedLatentCodec(z_density, Δ = 1)──► z's range, z's words
                                                 │ ẑ
              μ, σ = mean_and_scale(hyper_decoder(ẑ))       (float64, on the CPU, both sides)
              q = round((y − μ)/Δ);  table of each value: the scale level nearest σ/Δ
              symbols grouped by level, coded level by level ──range coder──► y's range, y's words
              strings = [y's ranges, y's words, z's ranges, z's words];  ŷ = q·Δ + μ
        decoder:  z's strings ──► ẑ ──hyper_decoder──► μ, σ ──► levels ──y's words──► q ──► ŷ

    Why the hyper-decoder runs in float64 on the CPU at coding time: encoder and decoder must pick the same
    table for every value. Scale levels alone (CompressAI's answer) make that likely, not certain: a
    value whose σ/Δ lies within float32 rounding of a level boundary goes to one table on one device
    and to the other elsewhere, and with ~10⁵ values an image such a value is expected now and then.
    In float64 from the same float32 weights the devices' differences are ~10⁻¹⁶, and the hyper-decoder
    works at 1/4 of y's resolution and size, so it costs little. μ in float64 also makes ŷ the same on
    both sides. Training runs the same formulas in float32 (`gaussian_bits`, `mean_and_scale`).

    `step` Δ is an input both sides know (the stream's parameters): one trained model codes at any Δ.
    y of any (H, W): it is edge-padded to a multiple of `hyper_stride` for the hyper-encoder, and the
    hyper-decoder's output is cropped back.

    `thread_invariant`: the hyper-decoder runs on one torch thread, so μ and σ are the same bits whatever
    torch's thread count (float64 on several threads differs in the last bits; a decoder whose pixels must
    not depend on the thread count needs ŷ exact). Off by default: streams coded without it decode as
    they always did. It costs little: the hyper-decoder works at 1/16 of y's positions.
    """

    RANGE = FactorizedLatentCodec.RANGE  # lowest and highest symbol of one image's y

    def __init__(self, hyper_encoder: torch.nn.Module, hyper_decoder: torch.nn.Module, z_density: LogisticMixtureDensity,
                 hyper_stride: int, thread_invariant: bool = False):  # fmt: skip
        self.hyper_encoder, self.z_density, self.hyper_stride = hyper_encoder, z_density, hyper_stride
        self.thread_invariant = thread_invariant
        self.hyper_decoder = copy.deepcopy(hyper_decoder).to("cpu", torch.float64).eval().requires_grad_(False)
        self.device = next(hyper_encoder.parameters()).device
        self.z_codec = FactorizedLatentCodec(z_density, 1.0)

    def z_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return -(-shape[0] // self.hyper_stride), -(-shape[1] // self.hyper_stride)

    def _gaussians(self, z_hat: torch.Tensor, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(μ, σ) as float64 numpy arrays (B, C, H, W), from ẑ."""
        with torch.no_grad(), one_torch_thread() if self.thread_invariant else contextlib.nullcontext():
            means, scales = mean_and_scale(self.hyper_decoder(z_hat.to("cpu", torch.float64)))
        return means[..., : shape[0], : shape[1]].numpy(), scales[..., : shape[0], : shape[1]].numpy()

    def _z_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, 1, 1, 1, device=self.device), torch.ones(1, 1, 1, 1, device=self.device)

    def _hyper_latent(self, y: torch.Tensor) -> torch.Tensor:
        """z of y, edge-padded to whole hyper-latent positions."""
        (h, w), (z_h, z_w) = y.shape[2:], self.z_shape(tuple(y.shape[2:]))
        padded = torch.nn.functional.pad(y, (0, z_w * self.hyper_stride - w, 0, z_h * self.hyper_stride - h), mode="replicate")
        with torch.no_grad():
            return self.hyper_encoder(padded)

    def compress(self, y: torch.Tensor, step: float = 1.0) -> dict:
        shape = tuple(y.shape[2:])
        z_coded = self.z_codec.compress(self._hyper_latent(y), *self._z_inputs())
        means, scales = self._gaussians(z_coded["y_hat"], shape)
        q = np.rint((y.detach().to("cpu", torch.float64).numpy() - means) / step).astype(np.int64)
        ranges, words = [], []
        for symbols, levels in zip(q, scale_indexes(scales / step)):
            lo, hi = symbol_range(symbols)
            ranges.append(self.RANGE.pack(lo, hi))
            used = np.unique(levels)
            words.append(encode_symbols([symbols[levels == level] for level in used], gaussian_tables(used, lo, hi), lo))
        y_hat = torch.from_numpy(q * step + means).float().to(y.device)
        return {"strings": [ranges, words, *z_coded["strings"]], "shape": shape, "y_hat": y_hat}

    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int], step: float = 1.0) -> dict:
        """Raises EntropyCodingError for ranges or words that do not decode."""
        y_ranges, y_words, z_ranges, z_words = strings
        z_hat = self.z_codec.decompress([z_ranges, z_words], self.z_shape(shape), *self._z_inputs())["y_hat"]
        means, scales = self._gaussians(z_hat, shape)
        images = []
        for range_bytes, data, levels in zip(y_ranges, y_words, scale_indexes(scales / step)):
            if len(range_bytes) != self.RANGE.size:
                raise EntropyCodingError(f"a symbol range is {self.RANGE.size} bytes, got {len(range_bytes)}")
            lo, hi = self.RANGE.unpack(range_bytes)
            if lo > hi:
                raise EntropyCodingError(f"symbol range {lo} … {hi} is empty")
            used, counts = np.unique(levels, return_counts=True)
            rows = decode_symbol_rows(data, gaussian_tables(used, lo, hi), lo, counts.tolist())
            symbols = np.empty(levels.shape, dtype=np.int64)
            for level, row in zip(used, rows):
                symbols[levels == level] = row
            images.append(symbols)
        y_hat = torch.from_numpy(np.stack(images) * step + means).float().to(self.device)
        return {"y_hat": y_hat}

    def ideal_bits(self, y: torch.Tensor, step: float = 1.0) -> list[float]:
        """Per image, the ideal code length of what `compress` codes: −log2 of the probabilities that the
        tables give z's and y's symbols. The range coder's words should come within a few bytes of it."""
        shape = tuple(y.shape[2:])
        z_hat = torch.round(self._hyper_latent(y))
        means, scales = self._gaussians(z_hat, shape)
        q = np.rint((y.detach().to("cpu", torch.float64).numpy() - means) / step).astype(np.int64)
        out = []
        for z_image, symbols, levels in zip(z_hat, q, scale_indexes(scales / step)):
            z_symbols = z_image.flatten(1).to(torch.int64).cpu().numpy()
            lo, hi = symbol_range(z_symbols)
            bits = ideal_bits(symbol_tables(self.z_density, 1.0, lo, hi), z_symbols, lo)
            lo, hi = symbol_range(symbols)
            used = np.unique(levels)
            picked = gaussian_tables(used, lo, hi)[np.searchsorted(used, levels), symbols - lo]
            out.append(bits - float(np.log2(picked).sum()))
        return out
