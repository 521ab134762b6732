"""Networks as predictions a sampler can use: a diffusion UNet as (x̂0, ε̂), a flow network as a velocity.

    x_t ─┬─ cat(x_t, cond) on channels ─► network(·, t) ─► output ─┬─ DiffusionDenoiser: (x̂0, ε̂) by prediction type
         └──────────────────────────────────────────────────────────┘─ VelocityField:     v, and (x̂0, ε̂) from it

Noise conventions:
- Diffusion (DDPM/DDIM, diffusers' schedulers): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, integer t in [0, T), ᾱ from
  the model's scheduler. The network predicts ε (`epsilon`), x0 (`sample`) or v = √ᾱ·ε − √(1−ᾱ)·x0
  (`v_prediction`); all three become the same pair (x̂0, ε̂).
- Rectified flow: x_t = (1 − t)·x0 + t·ε with t ∈ [0, 1] (t = 1 is pure noise, diffusers' flow-matching
  convention), velocity v = dx_t/dt = ε − x0. The network sees t·`timestep_scale` as its timestep, so a
  UNet2DModel's sinusoidal embedding gets the range it was built for.
- A flow model as a diffusion denoiser (prediction type `flow`, a diffusers FlowMatchEulerDiscreteScheduler):
  the flow's x_σ = (1 − σ)·x0 + σ·ε is the diffusion's x_t scaled by k = 1/(√ᾱ + √(1−ᾱ)), with
  σ = k·√(1−ᾱ), i.e. ᾱ(σ) = (1−σ)² / ((1−σ)² + σ²). So the flow's σ grid becomes an ᾱ table
  (`noise_schedule`), and every diffusion sampler (DDIM, DDPM, DDCM's codebooks, latent-denoise's start at a
  predicted t) runs a flow model unchanged: the denoiser scales x_t by k, asks for v at σ and returns
  x̂0 = x_σ − σ·v, ε̂ = x_σ + (1 − σ)·v. A DDIM step with these is the flow's Euler step.

Conditioning: `cond` (B, C_cond, H, W) is concatenated to x_t on the channel axis, so the network's
`in_channels` is C + C_cond (a decoder conditioned on a base image, as HFD-style codecs need). A
text-conditioned UNet (Stable Diffusion's UNet2DConditionModel) gets an all-zero context of one token:
unconditional use without a text encoder (SD's own empty-prompt embedding would need CLIP's text encoder,
which diffarc does not load).

Arithmetic: x_t and cond are cast to the denoiser's `dtype` (the network's precision); the predictions
are formed in that dtype and returned as float32, so samplers step in float32 whatever the precision.
"""

from __future__ import annotations

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def noise_schedule(scheduler) -> tuple[torch.Tensor, str]:
    """(ᾱ table over the integer timesteps, float64; prediction type) of a diffusers scheduler object.

    A diffusion scheduler's own `alphas_cumprod`; a flow-matching scheduler's σ_t = (t + 1)/T, shifted as
    its config says (σ' = s·σ / (1 + (s − 1)·σ)), as the equivalent ᾱ (module docstring), prediction `flow`.
    """
    if type(scheduler).__name__ in FLOW_SCHEDULERS:
        config = scheduler.config
        if config.get("use_dynamic_shifting"):
            raise ValueError("a flow schedule with dynamic shifting depends on the image size; diffarc needs a fixed one")
        steps, shift = int(config["num_train_timesteps"]), float(config.get("shift", 1.0))
        sigma = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2), "flow"
    return scheduler.alphas_cumprod.to(torch.float64), scheduler.config.get("prediction_type", "epsilon")


def run_network(network, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """One evaluation of a diffusers UNet (UNet2DModel or UNet2DConditionModel) on x ⊕ cond; output in x's dtype."""
    if cond is not None:
        x_in = torch.cat([x, cond.to(x.dtype)], dim=1)
    else:
        x_in = x
    context_width = getattr(network.config, "cross_attention_dim", None)
    if context_width:
        context = torch.zeros(x.shape[0], 1, context_width, device=x.device, dtype=x.dtype)
        output = network(x_in, timesteps, encoder_hidden_states=context).sample
    else:
        output = network(x_in, timesteps).sample
    return output.to(x.dtype)


def x0_eps_from_output(output: torch.Tensor, x: torch.Tensor, alpha_bar, prediction_type: str):
    """(x̂0, ε̂) from a diffusion network's output at x_t with ᾱ_t (a number, or a tensor broadcastable to x)."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    if prediction_type == "sample":
        return output, (x - a * output) / s
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def timestep_at(table: torch.Tensor, alpha_bar):
    """The (fractional) timestep where a decreasing ᾱ table, linear between its entries, equals `alpha_bar`
    (a float, or a numpy array of them)."""
    values = table.double().numpy()
    found = np.interp(alpha_bar, values[::-1], np.arange(len(values), dtype=np.float64)[::-1])
    return float(found) if np.ndim(found) == 0 else found


def alpha_bar_at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at continuous timesteps, linear between the integer entries (differentiable in t)."""
    t = t.clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    frac = t - low
    return table[low] * (1 - frac) + table[low + 1] * frac


class DiffusionDenoiser:
    """A diffusion network with its ᾱ table and prediction type: (x_t, t) → (x̂0, ε̂).

    `alphas_cumprod` is kept in float64 on the CPU: integer timesteps read ᾱ_t from it exactly as the
    schedules in `samplers` do, so sampler arithmetic and predictions agree bit for bit on any device.
    """

    def __init__(
        self, network, alphas_cumprod: torch.Tensor, prediction_type: str, dtype: torch.dtype = torch.float32,
        timestep_scale: float = 1000.0,
    ):  # fmt: skip
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
        self.network, self.prediction_type, self.dtype = network, prediction_type, dtype
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.timestep_scale = timestep_scale  # a flow network's timestep is σ·timestep_scale

    @classmethod
    def from_model(cls, model, dtype: torch.dtype = torch.float32) -> "DiffusionDenoiser":
        """The UNet of a loaded latent diffusion model (parts/models.py), with its scheduler's ᾱ table."""
        scheduler = model.make_scheduler()
        table, prediction_type = noise_schedule(scheduler)
        return cls(model.unet, table, prediction_type, dtype, float(scheduler.config["num_train_timesteps"]))

    def alpha_bar(self, t):
        """ᾱ_t: a float for an integer t; for a tensor of (possibly fractional) t, float32 on t's device,
        interpolated linearly and differentiable in t (training the latent-denoise timestep predictor)."""
        if torch.is_tensor(t):
            return alpha_bar_at(self.alphas_cumprod.to(t.device, torch.float32), t)
        return float(self.alphas_cumprod[t])

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor | None = None):
        """(x̂0, ε̂) at integer timestep t (the same for the whole batch)."""
        return self.predict(x, t, self.alpha_bar(t), cond)

    def predict(self, x: torch.Tensor, t, alpha_bar, cond: torch.Tensor | None = None):
        """(x̂0, ε̂) with ᾱ_t given: t a number or a (B,) tensor, ᾱ_t a number or a tensor broadcastable to x.
        A flow network's timestep is σ(ᾱ_t)·timestep_scale: there t is not used."""
        x = x.to(self.dtype)
        if self.prediction_type == "flow":
            a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
            x, sigma = x / (a + s), s / (a + s)  # x_t on the flow's line, and its σ
            t = (sigma.reshape(-1).expand(x.shape[0]) if torch.is_tensor(sigma) else sigma) * self.timestep_scale
        timesteps = t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device)
        output = run_network(self.network, x, timesteps, cond)
        if self.prediction_type == "flow":
            x0, eps = VelocityField.x0_eps(x, sigma, output)
        else:
            x0, eps = x0_eps_from_output(output, x, alpha_bar, self.prediction_type)
        return x0.float(), eps.float()


class VelocityField:
    """A rectified-flow network: (x_t, t ∈ [0, 1]) → velocity v = ε − x0 (see the module docstring)."""

    def __init__(self, network, timestep_scale: float = 1000.0, dtype: torch.dtype = torch.float32):
        self.network, self.timestep_scale, self.dtype = network, timestep_scale, dtype

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.dtype)
        t = t if torch.is_tensor(t) else torch.full((x.shape[0],), float(t), device=x.device)
        return run_network(self.network, x, t * self.timestep_scale, cond).float()

    @staticmethod
    def x0_eps(x: torch.Tensor, t, velocity: torch.Tensor):
        """(x̂0, ε̂) on the straight line through x_t with slope v: x0 = x_t − t·v, ε = x_t + (1 − t)·v."""
        if torch.is_tensor(t):
            t = t.view(-1, *([1] * (x.dim() - 1)))
        return x - t * velocity, x + (1 - t) * velocity
