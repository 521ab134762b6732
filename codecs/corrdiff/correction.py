"""The CorrDiff correction: HFD's sampler with each residual estimate pulled toward the end-to-end one.

Reading of the paper (Ma, Yang, Liu, ICML 2024, "Correcting Diffusion-Based Perceptual Image Compression
with Privileged End-to-End Decoder"; seed 003; no public code), in HFD's notation: b the transmitted base,
r = x − b the residual the sampler draws, s_t its state at noise level t (t = 1 the start, 0 the end;
flow: s_t = (1 − t)·r + t·σ·ε). Whatever the process, the sampler's step uses the score, and the score
is an affine function of an estimate of r:

    ∇ log p(s_t | b)      = −(s_t − (1 − t)·E[r | s_t, b]) / (tσ)²      (the decoder's: r̂_d = the network's)
    ∇ log q(s_t | r, b)   = −(s_t − (1 − t)·r) / (tσ)²                  (the encoder's, which sees x: exact)

(for HFD's variance-preserving diffusion, √ᾱ_t and 1 − ᾱ_t take the places of 1 − t and (tσ)²).
At the encoder the original is visible, so the score that would reconstruct x is the second one; it
differs from the decoder's only by replacing r̂_d with r. The decoder cannot know r, but the end-to-end
decoder's r̂_e = E[r | b] was trained with x in view (MSE), so it carries the privileged information the
encoder would add, through the transmitted representation alone. The corrected score is the convex
combination of the two scores with weight λ(t); since both are affine in the estimate with the same
coefficients, that is exactly the sampler run on the corrected estimate

    r̃(s_t, t) = (1 − λ(t))·r̂_d(s_t, t) + λ(t)·r̂_e          (`torch.lerp`; λ = 1 returns r̂_e exactly)

so the correction is one line inside any x̂0-parameterised loop (HFD's flow Euler loop and its DDIM loop
alike). λ ≡ 0 is the plain diffusion decoder; λ ≡ 1 makes every estimate r̂_e, and the sample is r̂_e.

Choices the paper leaves open, made here:
- The correction acts on the x̂0 (residual) estimate, not on ε̂ or on the state: the same formula for
  flow and diffusion, and the end points are exact (above).
- The schedule: λ(t) = min(1, g·(1 + t)) for a strength g ∈ [0, 1]. Early estimates (t near 1) decide
  what the sampler commits to, and there HFD's own estimate is barely better than the base, while the
  end-to-end one restores; late estimates carry the texture that buys realism. So the start is corrected
  twice as much as the end: g = ½ replaces the first estimate entirely and keeps half of the last.
- The correction wraps the detail decoder (`CorrectedDetailDecoder`), so HFD's own sampler, padding,
  tiles and seeded noise run unchanged and the plain end is HFD's decode by construction.
- The end-to-end estimate is computed once per (padded) base or tile and reused at every step.
- The per-image strength is the encoder's privileged choice (`privileged_level`), and the user's knob
  maps onto it (`strength`); both are shared by the codecs that correct HFD (codec.py) and
  latent-denoise (latent.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import BitstreamError
from ..hfd.nets import DetailDecoder
from .nets import EndToEndDecoder

LEVELS = 4  # transmitted strengths g = level / (LEVELS − 1): 2 bits of the payload's first byte


def correction_weight(strength: float, t: float) -> float:
    """λ(t) = min(1, g·(1 + t)) at noise level t ∈ [0, 1] (1: the start)."""
    return min(1.0, strength * (1.0 + t))


def strength(perception: float, chosen: float) -> float:
    """g for the knob's value: piecewise linear through (0, 1), (½, the encoder's choice), (1, 0)."""
    if perception <= 0.5:
        return 1.0 - 2.0 * perception * (1.0 - chosen)
    return 2.0 * (1.0 - perception) * chosen


def privileged_level(quality: Callable[[int], float], max_psnr_loss: float) -> int:
    """The smallest level (the most realistic decode) whose PSNR, `quality(level)`, is within
    `max_psnr_loss` dB of the end-to-end decode's (the top level). Binary search, assuming PSNR grows with
    the level; only a level that was decoded and met the bound is returned, and the top level always does."""
    cache: dict[int, float] = {}

    def measured(level: int) -> float:
        if level not in cache:
            cache[level] = quality(level)
        return cache[level]

    bound = measured(LEVELS - 1) - max_psnr_loss
    low, high = 0, LEVELS - 1
    while low < high:
        middle = (low + high) // 2
        if measured(middle) >= bound:
            high = middle
        else:
            low = middle + 1
    return high


def split_level(payload: bytes) -> tuple[float, bytes]:
    """(the transmitted strength, the wrapped codec's payload); BitstreamError when there is none."""
    if len(payload) < 2 or payload[0] >= LEVELS:
        found = payload[:1].hex() or "nothing"
        raise BitstreamError(f"corrdiff payload must start with a level below {LEVELS} and hold the corrected codec's payload; got {found}")
    return payload[0] / (LEVELS - 1), payload[1:]


class EndToEndEstimates:
    """r̂_e of each (padded) base or tile, computed once while one image is coded: the sampler passes the
    same base at every step, and the encoder decodes the same bases at several strengths."""

    def __init__(self, decoder: EndToEndDecoder):
        self.decoder = decoder
        self.entries: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def clear(self) -> None:
        self.entries = {}

    def __call__(self, base, quality, scale) -> torch.Tensor:
        key = (tuple(base.shape), float(base.sum()), float(quality.sum()), float(scale.sum()))
        for cached, estimate in self.entries.get(key, []):
            if torch.equal(cached, base):
                return estimate
        estimate = self.decoder(base, quality, scale).float()
        self.entries.setdefault(key, []).append((base, estimate))
        return estimate


class CorrectedDetailDecoder(torch.nn.Module):
    """HFD's detail decoder with its estimates corrected toward the end-to-end decoder's (module docstring).

    Called as the detail decoder is, (state, base, quality, scale, t) → r̃, so HFD's sampler, tiling and
    padding run it unchanged. Where λ(t) = 1 it returns r̂_e without calling the detail decoder.
    """

    def __init__(self, detail: DetailDecoder, end_to_end: EndToEndEstimates, strength: float):
        super().__init__()
        self.detail, self.end_to_end, self.strength = detail, end_to_end, strength
        self.config = detail.config  # the sampler reads the process (objective, σ, shift) from here

    def forward(self, state, base, quality, scale, t) -> torch.Tensor:
        estimate = self.end_to_end(base, quality, scale)
        weight = correction_weight(self.strength, float(t.flatten()[0]))
        if weight == 1.0:
            return estimate
        return torch.lerp(self.detail(state, base, quality, scale, t).float(), estimate, weight)


class CorrectedDenoiser:
    """A latent diffusion denoiser whose x̂0 is pulled toward the end-to-end latent ẑ_e (latent-denoise's
    correction; the derivation above with r replaced by the latent z and r̂_e by ẑ_e).

    Called as `parts.denoisers.DiffusionDenoiser` is, (x_t, t) → (x̂0, ε̂), so latent-denoise's own DDIM
    loop runs it. ε̂ is recomputed from the corrected x̂0 and x_t, which is what makes the DDIM step the
    one of the corrected score; where λ(t) = 0 the network's own pair is returned untouched, where
    λ(t) = 1 the network is not called. τ = t / T maps the integer timestep to the schedule's [0, 1).
    """

    def __init__(self, denoiser, estimate: torch.Tensor, strength: float):
        self.denoiser, self.estimate, self.strength = denoiser, estimate, strength
        self.alphas_cumprod = denoiser.alphas_cumprod  # the sampler's schedule reads it
        self.alpha_bar = denoiser.alpha_bar  # and `renoise` its noise level

    def __call__(self, x: torch.Tensor, t: int, cond: torch.Tensor | None = None):
        weight = correction_weight(self.strength, t / len(self.alphas_cumprod))
        if weight == 0.0:
            return self.denoiser(x, t, cond)
        if weight == 1.0:
            x0 = self.estimate
        else:
            x0 = torch.lerp(self.denoiser(x, t, cond)[0], self.estimate, weight)
        alpha_bar = self.denoiser.alpha_bar(t)
        return x0, (x - alpha_bar**0.5 * x0) / (1.0 - alpha_bar) ** 0.5
