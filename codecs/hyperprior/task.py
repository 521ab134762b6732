"""Training the hyperprior codec's transforms and entropy model: rate + λ(Δ) · MSE, one model for every Δ.

    random crop + flip ──► HyperpriorModel(x, Δ, noise) ──► x̂, bits of y, bits of z
    Δ log-uniform in STEP_RANGE per image;  loss = Δ · (bpp + λ(Δ) · MSE₂₅₅),  λ(Δ) = LAMBDA / Δ²
    output: the model's own folder (config.json + safetensors), what the codec's `model` parameter names

Choices:
- λ(Δ) = λ₀/Δ²: at high rate, quantizing with step Δ costs D ∝ Δ² and saves log2 of it in rate, so the
  trade-off that makes step Δ optimal scales as 1/Δ²; training on it teaches one set of transforms to
  serve the whole range of steps, and Δ = 1 sits at λ₀ (CompressAI's convention: λ · 255² · MSE + bpp).
- Each image's loss is weighted by Δ: the Lagrangian of a fine step is tens of times larger than that
  of a coarse one, and the weight keeps both ends of the range in the gradient.
- MSE only: this is a fidelity base (HFD's stage 1); no perceptual loss.
- Validation: held-out centre crops at each Δ of VALIDATION_STEPS, rounded as the codec rounds: bpp from
  the model's own probabilities (what the range coder spends, within its few bytes) and PSNR.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..parts.crops import center_crops, random_crops
from ..task import TrainingTask
from .nets import HYPER_STRIDE, IMAGE_STRIDE, HyperpriorModel

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=8, latent_channels=8, hyper_channels=8, mixtures=2),
    "small": dict(channels=64, latent_channels=96, hyper_channels=64, mixtures=3),
    "base": dict(channels=128, latent_channels=192, hyper_channels=128, mixtures=3),
}
LAMBDA = 0.0067  # λ₀: the rate–distortion trade-off at Δ = 1 (bpp per unit of MSE on 0 … 255)
STEP_RANGE = (0.5, 4.0)  # Δ drawn log-uniformly: from about 1 bpp down to a few hundredths on Kodak
VALIDATION_STEPS = (0.5, 1.0, 2.0, 4.0)


def lambda_for_step(step: torch.Tensor) -> torch.Tensor:
    return LAMBDA / step**2


def mse_255(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image MSE on the 0 … 255 scale, of images in [-1, 1]."""
    return (127.5 * (x - y)).pow(2).flatten(1).mean(1)


def metric_at(metric: str, step: float) -> str:
    """The name of a validation metric at one Δ, e.g. val_psnr_d0p5 (no dot: progress fields are format strings)."""
    return f"{metric}_d{step:g}".replace(".", "p")


class HyperpriorTask(TrainingTask):
    name = "hyperprior"
    model_class = HyperpriorModel
    progress = (
        "bpp {bpp:.3f}",
        "PSNR {psnr:.2f}",
        *(f"val Δ {v:g}: {{{metric_at('val_bpp', v)}:.3f}} bpp {{{metric_at('val_psnr', v)}:.2f}} dB" for v in VALIDATION_STEPS),
    )
    crop_multiple = IMAGE_STRIDE * HYPER_STRIDE  # whole z positions: no padding inside the training pass

    def __init__(self, settings, train, validation, device):
        super().__init__(settings, train, validation, device)
        self.train = train
        self.validation = center_crops(validation, settings.crop).to(device)

    def new_model(self):
        return HyperpriorModel(**MODEL_CONFIGS[self.settings.config])

    def _noise(self, model, x, rng: np.random.Generator | None):
        """Uniform noise in [0, 1) of y's and z's shapes, from the loop's rng (None: round, as the codec does)."""
        if rng is None:
            return None, None
        y_shape, z_shape = getattr(model, "module", model).latent_shapes(x.shape[2], x.shape[3])  # DDP wraps it
        draw = lambda shape: torch.from_numpy(rng.random((len(x), *shape), dtype=np.float32)).to(self.device)  # noqa: E731
        return draw(y_shape), draw(z_shape)

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        x = random_crops(self.train, self.settings.batch_size, self.settings.crop, rng).to(self.device)
        low, high = np.log(STEP_RANGE)
        step = torch.from_numpy(np.exp(rng.uniform(low, high, len(x)))).float().to(self.device)
        x_hat, y_bits, z_bits = wrapped(x, step, *self._noise(wrapped, x, rng))
        bpp = (y_bits + z_bits) / (x.shape[2] * x.shape[3])
        error = mse_255(x_hat, x)
        loss = (step * (bpp + lambda_for_step(step) * error)).mean()
        psnr = 10 * torch.log10(255.0**2 / error.clamp_min(1e-10))
        return loss, {"bpp": float(bpp.detach().mean()), "psnr": float(psnr.detach().mean())}

    def validate(self, model) -> dict:
        out = {}
        x = self.validation
        for value in VALIDATION_STEPS:
            step = torch.full((len(x),), value, device=self.device)
            x_hat, y_bits, z_bits = model(x, step, None, None)
            x_hat = torch.round((x_hat.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # 8-bit, as the codec outputs
            out[metric_at("val_bpp", value)] = float(((y_bits + z_bits) / (x.shape[2] * x.shape[3])).mean())
            out[metric_at("val_psnr", value)] = float((10 * torch.log10(255.0**2 / mse_255(x_hat, x).clamp_min(1e-10))).mean())
        return out
