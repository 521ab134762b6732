"""The latent-denoise predictors (γ-net, t-net, mean-scale hyperprior) and the objective they are trained on.

    z ──γ-net──► shift b, scale s (per channel) ──► y = (z − b) / s       (the γ-normalised latent)
    y ──hyper_analysis──► ζ (hyper_channels × H/4 × W/4) ──round──► ζ̂ ──hyper_synthesis──► μ, σ of each value of y

The hyperprior runs on the γ-normalised y rather than on the raw latent: Δ then keeps its meaning (a step
relative to each channel's spread, for every image), so the t-net's features and λ(Δ) are unchanged.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..parts.denoisers import DiffusionDenoiser, timestep_at
from ..parts.entropy import LogisticMixtureDensity
from ..parts.latent_codecs import down, gaussian_bits, mean_and_scale, up

MAX_SCALE_LOG = 4.0  # γ's scale stays within e^±4 of the channel's std: fp16-safe, and no runaway
HYPER_STRIDE = 4  # hyper_analysis: two stride-2 layers, so ζ is at 1/32 of the image


class LatentDenoisePredictors(ModelMixin, ConfigMixin):
    """The trained parts: γ-net (transform), t-net (timestep) and the mean-scale hyperprior (entropy model)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 4, hidden: int = 64, hyper_channels: int = 16, mixtures: int = 4,
                 max_timestep: int = 999):  # fmt: skip
        super().__init__()
        c, h = latent_channels, hyper_channels
        self.gamma_net = torch.nn.Sequential(
            torch.nn.Linear(2 * c + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2 * c),
        )  # fmt: skip
        self.t_net = torch.nn.Sequential(
            torch.nn.Linear(3 * c + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1)
        )
        # Start from the identity correction (γ = the channel's own mean and std) and t ≈ 10 % of max.
        torch.nn.init.zeros_(self.gamma_net[-1].weight)
        torch.nn.init.zeros_(self.gamma_net[-1].bias)
        torch.nn.init.constant_(self.t_net[-1].bias, -2.2)
        self.hyper_analysis = torch.nn.Sequential(
            torch.nn.Conv2d(c, hidden, 3, padding=1), torch.nn.LeakyReLU(), down(hidden, hidden), torch.nn.LeakyReLU(),
            down(hidden, h),
        )  # fmt: skip
        self.hyper_synthesis = torch.nn.Sequential(
            up(h, hidden), torch.nn.LeakyReLU(), up(hidden, hidden), torch.nn.LeakyReLU(), torch.nn.Conv2d(hidden, 2 * c, 3, padding=1)
        )
        # Start from the γ-normalised prior: mean 0 and σ = softplus(0.5413) = 1 everywhere.
        torch.nn.init.zeros_(self.hyper_synthesis[-1].weight)
        torch.nn.init.constant_(self.hyper_synthesis[-1].bias[:c], 0.0)
        torch.nn.init.constant_(self.hyper_synthesis[-1].bias[c:], math.log(math.expm1(1.0)))
        self.z_density = LogisticMixtureDensity(h, mixtures)

    def transform(self, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (shift, scale), each (B, C), for latents z (B, C, H, W) and steps Δ (B,)."""
        mean, log_std = channel_stats(z)
        out = self.gamma_net(torch.cat([mean, log_std, torch.log(step)[:, None]], dim=1))
        c = z.shape[1]
        std = log_std.exp()
        return mean + std * out[:, :c], std * torch.exp(MAX_SCALE_LOG * torch.tanh(out[:, c:] / MAX_SCALE_LOG))

    def sent_transform(self, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`transform` as the stream carries it: fp16-rounded, the scale kept positive, so the encoder
        quantizes with exactly the (shift, scale) the decoder will read."""
        shift, scale = self.transform(z, step)
        return shift.half().float(), scale.half().float().clamp_min(1e-4)

    def timestep(self, z_hat: torch.Tensor, step: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Predicted (continuous) timestep (B,) of dequantized latents quantized with step Δ·scale."""
        mean, log_std = channel_stats(z_hat)
        features = torch.cat([mean, log_std, torch.log(step[:, None] * scale), torch.log(step)[:, None]], dim=1)
        return self.config.max_timestep * torch.sigmoid(self.t_net(features)[:, 0])


def channel_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = z.flatten(2)
    return flat.mean(-1), torch.log(flat.std(-1).clamp_min(1e-3))


class LatentDenoiseObjective(torch.nn.Module):
    """What `diffarc train latent-denoise` minimises: the rate of the quantized latent (uniform noise for
    rounding), its distortion, and the t-net's distance to the timestep whose noise the quantization error
    matches; and, for validation, what denoising from the predicted t buys.

    Rate and distortion train the γ-net and the hyperprior; the t-net sees ẑ detached and learns only
    from its own term. Its target is the timestep at which the forward process's noise, in the units of z,
    has the quantization error's variance v = mean((ẑ − z)²): (1 − ᾱ_t)/ᾱ_t = v, the paper's reading of
    quantization error as diffusion noise. It needs no UNet (the ᾱ table only), so the predictors can be
    trained before the diffusion model and stay valid when it is retrained.
    """

    def __init__(self, predictors, model):
        super().__init__()
        self.predictors = predictors
        self.denoiser = DiffusionDenoiser.from_model(model)

    def forward(self, z: torch.Tensor, step: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None):
        """(bits per latent value, squared error of ẑ, ẑ, Δ·s) per image, for latents whose sides are multiples
        of HYPER_STRIDE. noise: uniform [0, 1) of y's and ζ's shapes (the rate relaxation, and y's
        quantization error as the decoder sees it); None rounds as the codec does."""
        predictors = self.predictors
        shift, scale = predictors.transform(z, step)
        y = (z - shift[..., None, None]) / scale[..., None, None]
        box = step.view(-1, 1, 1, 1)
        zeta = predictors.hyper_analysis(y)
        zeta_hat = zeta + (torch.round(zeta) - zeta).detach()  # the hyper-decoder sees ζ rounded (straight through)
        zeta_rated = zeta + noise[1] - 0.5 if noise is not None else torch.round(zeta)
        zeta_bits = predictors.z_density.bits(zeta_rated, torch.ones_like(step)).flatten(1).sum(1)
        means, scales = mean_and_scale(predictors.hyper_synthesis(zeta_hat))
        offsets = (y - means) / box
        rated = offsets + noise[0] - 0.5 if noise is not None else torch.round(offsets)
        y_bits = gaussian_bits(rated, scales / box).flatten(1).sum(1)
        bits = (y_bits + zeta_bits) / y[0].numel()
        z_hat = (means + box * rated) * scale[..., None, None] + shift[..., None, None]
        return bits, ((z_hat - z) ** 2).flatten(1).mean(1), z_hat, step[:, None] * scale

    def timestep_loss(self, z_hat: torch.Tensor, error: torch.Tensor, step: torch.Tensor, channel_step: torch.Tensor):
        """(squared log-SNR distance of the t-net's t to the matched timestep, t, matched t) per image; the
        t-net's inputs are detached, so only it learns from this."""
        scale = (channel_step / step[:, None]).detach()
        t = self.predictors.timestep(z_hat.detach(), step, scale)
        matched = self.matched_timestep(error.detach())
        return (log_snr(self.denoiser.alpha_bar(t)) - log_snr(self.denoiser.alpha_bar(matched))) ** 2, t, matched

    def matched_timestep(self, variance: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep whose noise has variance `variance` in z's units: ᾱ = 1 / (1 + v)."""
        values = timestep_at(self.denoiser.alphas_cumprod, (1 / (1 + variance)).cpu().double().numpy())
        return torch.as_tensor(values, dtype=torch.float32, device=variance.device)

    def denoised_error(self, z: torch.Tensor, z_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Squared error per image after one denoising step from ẑ at timestep t: x̂0 of x_t = √ᾱ_t·ẑ."""
        alpha_bar = self.denoiser.alpha_bar(t).view(-1, 1, 1, 1)
        x0_hat, _ = self.denoiser.predict(alpha_bar.sqrt() * z_hat, t, alpha_bar)
        return ((x0_hat - z) ** 2).flatten(1).mean(1)


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    alpha_bar = alpha_bar.clamp(1e-6, 1 - 1e-6)
    return torch.log(alpha_bar / (1 - alpha_bar))


def lambda_for_step(step: torch.Tensor) -> torch.Tensor:
    """Rate–distortion weight that makes Δ the rate knob: the slope of a uniform quantizer of step Δ.

    At high rate, D = Δ²/12 and dD/dR = −2·ln2·D per bit, so minimising R + λ·D with λ = 6 / (ln2 · Δ²)
    is optimal exactly where the quantizer of step Δ is: the γ-net then allocates bits as Δ implies.
    """
    return 6.0 / (math.log(2) * step**2)
