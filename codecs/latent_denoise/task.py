"""Training latent-denoise's predictors (γ-net, t-net, mean-scale hyperprior) for a frozen latent diffusion model.

    image (and its mirror) ──frozen VAE──► latents (diffusion space) ──► random latent crop z
    Δ log-uniform in STEP_RANGE ──► LatentDenoiseObjective(z, Δ):
        bits + λ(Δ) · MSE(ẑ, z) + w · (log-SNR(t-net's t) − log-SNR(t matched to the error's variance))²
    bits: y's and ζ's, from the hyperprior's own probabilities under uniform noise, per latent value
    output: the predictors' own folder (config.json + safetensors); MODEL/latent_denoise/ is found by default

The VAE and the UNet stay frozen; only the predictors learn, and only validation calls the UNet.
Validation reports, at each Δ of VALIDATION_STEPS, the bits per latent value, the mean predicted and
matched t, and what one denoising step from the predicted t buys over plain dequantization (dB of latent MSE).

Until issue 22 the distortion term was the MSE after one denoising step from the t-net's t, so the t-net
learnt the t that minimised latent MSE, which blurs (builtin:ldm-small's predictors, MODELS.md: `predict`
lost LPIPS at every preset). Now the t-net learns the noise level the quantization error has, the
paper's reading, and the γ-net and hyperprior the plain rate–distortion trade-off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..parts.crops import latent_crops, training_latents
from ..parts.latents import encode_latents
from ..parts.models import load_model
from ..task import SettingsError, TrainingTask, TrainSettings
from .nets import HYPER_STRIDE, LatentDenoiseObjective, LatentDenoisePredictors, lambda_for_step

PREDICTOR_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=16, hyper_channels=4, mixtures=2),
    "small": dict(hidden=64, hyper_channels=16, mixtures=4),
    "base": dict(hidden=128, hyper_channels=32, mixtures=6),
}
STEP_RANGE = (0.5, 8.0)  # Δ drawn log-uniformly: from about 1 bpp down to a few hundredths on Kodak
VALIDATION_STEPS = (1.0, 2.0, 4.0)  # quantization steps Δ at which the predictors are validated
TIMESTEP_WEIGHT = 0.1  # of the t-net's squared log-SNR error; it shares no parameter with the other terms


def _per_step(label: str, metric: str, spec: str) -> str:
    """A progress field showing one metric at every validation Δ, e.g. "t 221|343|193"."""
    return label + " " + "|".join(f"{{{metric}_d{v:g}:{spec}}}" for v in VALIDATION_STEPS)


class PredictorsTask(TrainingTask):
    name = "latent-denoise"
    model_class = LatentDenoisePredictors
    progress = (
        "bits {bits:.3f}",
        _per_step("val bits/value at Δ " + "|".join(f"{v:g}" for v in VALIDATION_STEPS), "val_bits", ".3f"),
        "denoising gain {val_gain_db:.2f} dB",
        _per_step("t", "val_t", ".0f"),
    )
    required = {"model": "training latent-denoise needs the frozen model's reference"}
    crop_multiple = 8 * HYPER_STRIDE  # whole hyper-latent positions of an 8× latent: no padding in training

    def __init__(self, settings: TrainSettings, train, validation, device):
        super().__init__(settings, train, validation, device)
        self.model = load_model(settings.model, str(device))
        if self.model.unet is None:
            raise SettingsError("model", f"model {settings.model} has no diffusion UNet")
        self.latent_crop = settings.crop // 8
        encode = lambda x: encode_latents(self.model, x)  # noqa: E731 — in the diffusion model's space
        cache = self.model.autoencoder_fingerprint.hex()  # the diffusion task's latents, when it ran first
        self.train = training_latents(encode, train, settings.crop, device, mirrored=True, cache=cache)
        self.validation = latent_crops(
            training_latents(encode, validation, settings.crop, device, mirrored=False, cache=cache), 16,
            self.latent_crop, np.random.default_rng(12345),
        )  # fmt: skip

    def new_model(self):
        channels = self.model.unet.config.in_channels
        return LatentDenoisePredictors(latent_channels=channels, **PREDICTOR_CONFIGS[self.settings.config])

    def wrap(self, model):
        return LatentDenoiseObjective(model, self.model).to(self.device)

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        z = latent_crops(self.train, self.settings.batch_size, self.latent_crop, rng)
        low, high = np.log(STEP_RANGE)
        step = torch.from_numpy(np.exp(rng.uniform(low, high, len(z)))).float().to(self.device)
        b, _, h, w = z.shape
        objective = getattr(wrapped, "module", wrapped)  # DDP wraps it
        zeta_shape = (b, objective.predictors.config.hyper_channels, h // HYPER_STRIDE, w // HYPER_STRIDE)
        noise = tuple(torch.from_numpy(rng.random(shape, dtype=np.float32)).to(self.device) for shape in (z.shape, zeta_shape))
        bits, error, z_hat, channel_step = wrapped(z, step, noise)
        t_loss, t, _ = objective.timestep_loss(z_hat, error, step, channel_step)
        # λ(Δ) makes Δ the rate knob (see its docstring); the t-net's term trains the t-net alone.
        loss = (bits + lambda_for_step(step) * error + TIMESTEP_WEIGHT * t_loss).mean()
        shown = {"bits": bits.mean(), "mse": error.mean(), "t": t.mean(), "t_loss": t_loss.mean()}
        return loss, {name: float(value.detach()) for name, value in shown.items()}

    def validate(self, model) -> dict:
        """Per validation Δ: bits per latent value, the predicted and the matched t, and what one denoising
        step from the predicted t buys over t = 0 (dB of latent MSE)."""
        objective, out = LatentDenoiseObjective(model, self.model).to(self.device), {}
        for value in VALIDATION_STEPS:
            step = torch.full((len(self.validation),), value, device=self.device)
            bits, plain, z_hat, channel_step = objective(self.validation, step, None)
            _, t, matched = objective.timestep_loss(z_hat, plain, step, channel_step)
            error = objective.denoised_error(self.validation, z_hat, t)
            out[f"val_bits_d{value:g}"] = float(bits.mean())
            out[f"val_gain_db_d{value:g}"] = float(10 * torch.log10(plain.mean() / error.mean()))
            out[f"val_t_d{value:g}"] = float(t.mean())
            out[f"val_matched_t_d{value:g}"] = float(matched.mean())
        out["val_gain_db"] = float(np.mean([out[f"val_gain_db_d{v:g}"] for v in VALIDATION_STEPS]))
        return out
