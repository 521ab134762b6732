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
- The per-image strength (the privileged choice) and the user's knob are in codec.py.
"""

from __future__ import annotations

import torch

from ..hfd.nets import DetailDecoder
from .nets import EndToEndDecoder


def correction_weight(strength: float, t: float) -> float:
    """λ(t) = min(1, g·(1 + t)) at noise level t ∈ [0, 1] (1: the start)."""
    return min(1.0, strength * (1.0 + t))


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

    @property
    def multiple(self) -> int:
        return max(self.detail.multiple, self.end_to_end.decoder.multiple)

    def forward(self, state, base, quality, scale, t) -> torch.Tensor:
        estimate = self.end_to_end(base, quality, scale)
        weight = correction_weight(self.strength, float(t.flatten()[0]))
        if weight == 1.0:
            return estimate
        return torch.lerp(self.detail(state, base, quality, scale, t).float(), estimate, weight)
