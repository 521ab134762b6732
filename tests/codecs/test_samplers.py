"""Sampling loops on denoisers whose right answer is known in closed form: a data set of one point."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffarc.codecs.parts.samplers import codebook_ddpm, ddim, euler, linspace_schedule

TABLE = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
X0 = torch.tensor([[1.5, -0.5, 0.25]])  # the one point of the "data set"


class PointMassDenoiser:
    """The exact denoiser of a data set holding only X0: x̂0 = X0, ε̂ = (x_t − √ᾱ·X0) / √(1 − ᾱ). Records its inputs."""

    def __init__(self):
        self.calls, self.inputs = [], []

    def __call__(self, x, t, cond=None):
        self.calls.append(t)
        self.inputs.append(x)
        alpha_bar = float(TABLE.double()[t])
        x0 = X0.to(x.dtype).expand_as(x)
        return x0, (x - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5


def test_linspace_schedule_runs_down_to_zero_and_pairs_each_step_with_the_next():
    schedule = linspace_schedule(TABLE, 5)
    assert schedule.timesteps == [999, 749, 500, 250, 0]
    assert schedule.alpha_bar == [float(TABLE.double()[t]) for t in schedule.timesteps]
    assert schedule.alpha_bar_next == schedule.alpha_bar[1:] + [1.0]
    # From a given timestep, more steps than timesteps collapse to the distinct ones.
    assert linspace_schedule(TABLE, 10, first=3).timesteps == [3, 2, 1, 0]


def test_ddim_with_no_steps_returns_its_input_without_calling_the_network():
    denoiser, x = PointMassDenoiser(), torch.randn(2, 3)
    assert ddim(denoiser, x, linspace_schedule(TABLE, 1, first=0)) is x
    assert denoiser.calls == []


@pytest.mark.parametrize("steps, first", [(1, 400), (4, 400), (20, 999)])
def test_ddim_from_t_calls_the_network_at_each_timestep_but_the_last_and_keeps_the_noise_direction(steps, first):
    """With the exact denoiser, DDIM (η = 0) moves along x_t = √ᾱ_t·X0 + √(1 − ᾱ_t)·ε with one fixed ε."""
    denoiser, eps = PointMassDenoiser(), torch.randn(4, 3, dtype=torch.float64)
    schedule = linspace_schedule(TABLE, steps + 1, first=first)
    on_path = lambda alpha_bar: alpha_bar**0.5 * X0.double() + (1 - alpha_bar) ** 0.5 * eps  # noqa: E731
    out = ddim(denoiser, on_path(schedule.alpha_bar[0]), schedule)
    assert denoiser.calls == schedule.timesteps[:-1] and len(denoiser.calls) == steps
    for x, alpha_bar in zip(denoiser.inputs, schedule.alpha_bar):
        assert torch.allclose(x, on_path(alpha_bar), atol=1e-9)
    assert torch.allclose(out, X0.double().expand_as(out))


def test_codebook_ddpm_asks_for_noise_once_per_noisy_step_and_returns_the_last_estimate():
    denoiser, asked = PointMassDenoiser(), []

    def pick_noise(step, x0_hat):
        asked.append(step)
        assert torch.equal(x0_hat, X0.expand(2, 3))  # the estimate of the step's own network call
        return torch.zeros(2, 3)

    schedule = linspace_schedule(TABLE, 6)
    out = codebook_ddpm(denoiser, torch.randn(2, 3), schedule, pick_noise)
    assert asked == [0, 1, 2, 3, 4]  # the last timestep adds no noise
    assert denoiser.calls == schedule.timesteps  # the network also runs at the last timestep
    assert torch.equal(out, X0.expand(2, 3))


def test_codebook_ddpm_steps_keep_the_forward_process_marginals_with_gaussian_noise():
    """x_next = mean + σ·z is the DDPM posterior: starting from x_t ~ q(x_t | X0), x_next ~ q(x_next | X0)."""
    generator = torch.Generator().manual_seed(0)
    schedule = linspace_schedule(TABLE, 4)
    first = schedule.alpha_bar[0]
    x = first**0.5 * X0 + (1 - first) ** 0.5 * torch.randn(200_000, 3, generator=generator)
    pick_noise = lambda step, x0_hat: torch.randn(x.shape, generator=generator)  # noqa: E731
    # The denoiser sees every intermediate x_t: record them.
    seen, denoiser = [], PointMassDenoiser()
    codebook_ddpm(lambda x, t, cond=None: (seen.append(x), denoiser(x, t))[1], x, schedule, pick_noise)
    for x_t, alpha_bar in zip(seen[1:], schedule.alpha_bar[1:]):
        residual = x_t - alpha_bar**0.5 * X0
        assert residual.mean().abs() < 0.01
        assert residual.var().item() == pytest.approx(1 - alpha_bar, rel=0.02)


def test_euler_is_exact_on_the_rectified_flow_to_a_point():
    """For data = {X0}, x_t = (1 − t)·X0 + t·ε has velocity (x_t − X0) / t: straight lines Euler follows exactly."""
    velocity = lambda x, t, cond=None: (x - X0) / t  # noqa: E731
    noise = torch.randn(5, 3)
    for steps in (1, 3, 50):
        times = torch.linspace(1, 0, steps + 1).tolist()
        assert torch.allclose(euler(velocity, noise, times), X0.expand(5, 3), atol=1e-6)
    # Part way, it is on the straight line between noise and data.
    halfway = euler(velocity, noise, [1.0, 0.75, 0.5])
    assert torch.allclose(halfway, 0.5 * X0 + 0.5 * noise, atol=1e-6)


def test_euler_on_a_linear_field_is_first_order():
    """dx/dt = a·x: Euler gives x·(1 + a·dt)^n, converging to x·e^(a·T) with error O(dt)."""
    velocity = lambda x, t, cond=None: -2.0 * x  # noqa: E731
    x = torch.tensor([1.0], dtype=torch.float64)
    errors = []
    for steps in (10, 20, 40):
        times = [i / steps for i in range(steps + 1)]
        out = euler(velocity, x, times)
        assert out.item() == pytest.approx((1 - 2.0 / steps) ** steps, rel=1e-12)
        errors.append(abs(out.item() - math.exp(-2.0)))
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.1) and errors[1] / errors[2] == pytest.approx(2, rel=0.1)


def test_euler_passes_the_conditioning_through():
    seen = []
    euler(lambda x, t, cond: (seen.append(cond), torch.zeros_like(x))[1], torch.zeros(1, 2), [1.0, 0.5, 0.0], cond="base")
    assert seen == ["base", "base"]
