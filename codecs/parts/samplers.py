"""Reverse-diffusion steps as short pure functions of (model output, x_t, noise levels).

The noise levels come from the model's own scheduler config (its ᾱ_t table and prediction type), so
one sampler serves the built-in model and any diffusers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    """The timesteps a sampler visits (descending) and ᾱ at each, with ᾱ of the step after it."""

    timesteps: list[int]
    alpha_bar: list[float]
    alpha_bar_next: list[float]  # ᾱ of the following (less noisy) step; 1.0 after the last
    prediction_type: str


def linspace_schedule(scheduler, steps: int, first: int | None = None) -> Schedule:
    """`steps` timesteps evenly spaced from `first` (default: the last training step) down to 0."""
    total = scheduler.config.num_train_timesteps
    first = total - 1 if first is None else first
    timesteps = [int(t) for t in np.unique(np.linspace(0, first, steps).round().astype(int))[::-1]]
    table = scheduler.alphas_cumprod.double()
    alpha_bar = [float(table[t]) for t in timesteps]
    return Schedule(timesteps, alpha_bar, alpha_bar[1:] + [1.0], scheduler.config.prediction_type)


def predict(unet, x: torch.Tensor, t, alpha_bar, prediction_type: str):
    """(x̂0, ε̂) from one UNet evaluation at timestep t.

    t and ᾱ_t are numbers, or per-image tensors — t of shape (B,), ᾱ_t broadcastable to x — which may
    be fractional and carry gradients (training the latent-denoise timestep predictor).

    A text-conditioned UNet (Stable Diffusion's UNet2DConditionModel) gets an all-zero context of one
    token: unconditional use without a text encoder. (Stable Diffusion's own empty-prompt embedding
    would need its CLIP text encoder, which diffarc does not load yet.)
    """
    timesteps = t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device)
    context_width = getattr(unet.config, "cross_attention_dim", None)
    if context_width:
        context = torch.zeros(x.shape[0], 1, context_width, device=x.device, dtype=x.dtype)
        output = unet(x, timesteps, encoder_hidden_states=context).sample
    else:
        output = unet(x, timesteps).sample
    output = output.to(x.dtype)
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    if prediction_type == "sample":
        return output, (x - a * output) / s
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def ddpm_sigma(alpha_bar: float, alpha_bar_next: float) -> float:
    """Standard deviation of the DDPM posterior q(x_next | x_t, x0), i.e. DDIM with η = 1."""
    return ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)) ** 0.5


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_next: float, sigma: float) -> torch.Tensor:
    """The deterministic part of a DDIM step; the caller adds σ·z with the noise of its choice."""
    return alpha_bar_next**0.5 * x0 + max(1 - alpha_bar_next - sigma**2, 0.0) ** 0.5 * eps
