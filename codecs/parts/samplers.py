"""Sampling loops as short pure functions of (denoiser, x, schedule), and the step pieces they are made of.

    codebook_ddpm   DDPM (DDIM η = 1) from x_T; each step's noise is chosen by a callback (DDCM's codebooks)
    ddim            deterministic DDIM (η = 0) from x_t at the schedule's first timestep (latent-denoise)
    euler           Euler steps x_{t+dt} = x_t + dt·v(x_t, t) of a rectified flow over any time grid

A diffusion denoiser is any callable (x, t, cond) → (x̂0, ε̂) (`denoisers.DiffusionDenoiser`); a
velocity is any callable (x, t, cond) → v (`denoisers.VelocityField`). The noise levels come from the
model's own ᾱ_t table, so one sampler serves the built-in model and any diffusers model. Arithmetic
between network calls is float32 (the denoisers return float32), so CPU and GPU agree up to the
network's own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    """The timesteps a sampler visits (descending) and ᾱ at each, with ᾱ of the step after it."""

    timesteps: list[int]
    alpha_bar: list[float]
    alpha_bar_next: list[float]  # ᾱ of the following (less noisy) step; 1.0 after the last


def linspace_schedule(alphas_cumprod: torch.Tensor, steps: int, first: int | None = None) -> Schedule:
    """`steps` timesteps evenly spaced from `first` (default: the last training step) down to 0."""
    first = len(alphas_cumprod) - 1 if first is None else first
    timesteps = [int(t) for t in np.unique(np.linspace(0, first, steps).round().astype(int))[::-1]]
    table = alphas_cumprod.double()
    alpha_bar = [float(table[t]) for t in timesteps]
    return Schedule(timesteps, alpha_bar, alpha_bar[1:] + [1.0])


def ddpm_sigma(alpha_bar: float, alpha_bar_next: float) -> float:
    """Standard deviation of the DDPM posterior q(x_next | x_t, x0), i.e. DDIM with η = 1."""
    return ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)) ** 0.5


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_next: float, sigma: float) -> torch.Tensor:
    """The deterministic part of a DDIM step; the caller adds σ·z with the noise of its choice."""
    return alpha_bar_next**0.5 * x0 + max(1 - alpha_bar_next - sigma**2, 0.0) ** 0.5 * eps


def codebook_ddpm(
    denoiser, x: torch.Tensor, schedule: Schedule, pick_noise: Callable[[int, torch.Tensor], torch.Tensor],
    cond: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """DDPM posterior steps from x at schedule.timesteps[0]; returns x̂0 of the network's call at the last timestep.

    `pick_noise(step, x0_hat)` returns the unit-variance noise (shaped like x) of step `step` =
    0 … len(timesteps) − 2; the last timestep adds none. DDCM's encoder picks the codebook entries that
    point from x̂0 towards the true latent, its decoder replays the recorded ones; plain DDPM would draw
    Gaussian noise.
    """
    last = len(schedule.timesteps) - 1
    for step, (t, alpha_bar, alpha_bar_next) in enumerate(
        zip(schedule.timesteps, schedule.alpha_bar, schedule.alpha_bar_next)
    ):
        x0_hat, eps = denoiser(x, t, cond)
        if step == last:
            break
        sigma = ddpm_sigma(alpha_bar, alpha_bar_next)
        x = ddim_mean(x0_hat, eps, alpha_bar_next, sigma) + sigma * pick_noise(step, x0_hat)
    return x0_hat


def ddim(denoiser, x: torch.Tensor, schedule: Schedule, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from x at schedule.timesteps[0] towards its last timestep.

    The network runs at every timestep but the last, and the x̂0 of its final call is the result (that
    call already estimates the clean latent; stepping to the last timestep would only add its small
    noise back). A schedule of one timestep makes no call and returns x unchanged.
    """
    calls = len(schedule.timesteps) - 1
    for i in range(calls):
        x0_hat, eps = denoiser(x, schedule.timesteps[i], cond)
        if i < calls - 1:
            x = ddim_mean(x0_hat, eps, schedule.alpha_bar_next[i], 0.0)
    return x0_hat if calls else x


def euler(velocity, x: torch.Tensor, times: Sequence[float], cond: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t, cond) with Euler steps over the time grid `times` (any order); returns x at times[-1].

    For a rectified flow (x_t = (1 − t)·x0 + t·ε) sampling runs t from 1 down to 0, e.g.
    `times = torch.linspace(1, 0, steps + 1).tolist()`.
    """
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, t, cond)
    return x
