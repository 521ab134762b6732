"""Training latent-denoise's predictors (γ-net, t-net, mean-scale hyperprior) for a frozen latent diffusion model.

    image (and its mirror) ──frozen VAE──► latents (diffusion space) ──► random latent crop z
    Δ log-uniform in STEP_RANGE ──► LatentDenoiseObjective(z, Δ): bits + λ(Δ) · MSE after one denoising step
    bits: y's and ζ's, from the hyperprior's own probabilities under uniform noise, per latent value
    output: the predictors' own folder (config.json + safetensors); MODEL/latent_denoise/ is found by default

The VAE and the UNet stay frozen; only the predictors learn. Validation reports, at each Δ of
VALIDATION_STEPS, the bits per latent value, the mean predicted t, and what one denoising step buys over
plain dequantization (dB of latent MSE).
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
        self.train = training_latents(encode, train, settings.crop, device, mirrored=True)
        self.validation = latent_crops(
            training_latents(encode, validation, settings.crop, device, mirrored=False), 16, self.latent_crop,
            np.random.default_rng(12345),
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
        hyper_channels = getattr(wrapped, "module", wrapped).predictors.config.hyper_channels  # DDP wraps it
        zeta_shape = (b, hyper_channels, h // HYPER_STRIDE, w // HYPER_STRIDE)
        noise = tuple(torch.from_numpy(rng.random(shape, dtype=np.float32)).to(self.device) for shape in (z.shape, zeta_shape))
        bits, error, _, t = wrapped(z, step, noise)
        loss = (bits + lambda_for_step(step) * error).mean()  # λ(Δ) makes Δ the rate knob (see its docstring)
        shown = {"bits": bits.mean(), "mse": error.mean(), "t": t.mean()}
        return loss, {name: float(value.detach()) for name, value in shown.items()}

    def validate(self, model) -> dict:
        """Per validation Δ: bits per latent value, and what one denoising step buys over t = 0 (dB)."""
        passes, out = LatentDenoiseObjective(model, self.model).to(self.device), {}
        for value in VALIDATION_STEPS:
            step = torch.full((len(self.validation),), value, device=self.device)
            bits, error, plain, t = passes(self.validation, step, None)
            out[f"val_bits_d{value:g}"] = float(bits.mean())
            out[f"val_gain_db_d{value:g}"] = float(10 * torch.log10(plain.mean() / error.mean()))
            out[f"val_t_d{value:g}"] = float(t.mean())
        out["val_gain_db"] = float(np.mean([out[f"val_gain_db_d{v:g}"] for v in VALIDATION_STEPS]))
        return out
