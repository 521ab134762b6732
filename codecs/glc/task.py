"""Training glc's transforms and entropy model on taef2's latents (`diffarc train glc`).

    image (and its mirror) ──taef2 encoder (frozen; latents cached on disk)──► z (unit variance)
    random latent crop ──GlcModel(z, Δ, noise)──► ẑ, bits of y, bits of ζ;  Δ log-uniform in STEP_RANGE
    configs tiny | small | base:  loss = Δ · (bpp + λ(Δ) · MSE(ẑ, z)),            λ(Δ) = LAMBDA_LATENT / Δ²
    configs *-pixels:             loss = Δ · (bpp + λ(Δ) · MSE₂₅₅(D(ẑ), x)),       λ(Δ) = LAMBDA_PIXELS / Δ²
                                  D the frozen taef2 decoder with the pooled statistics of the crop's whole
                                  picture, x the pixels of the crop, the MSE over the crop less a margin of
                                  MARGIN latent px (the decoder sees no picture there)
    output: the model's own folder (config.json + safetensors); MODEL/glc/ is found by default

Choices:
- The first objective is the issue's: rate and MSE in the latent, which costs no decoder pass, so the
  transforms train at 1 latent px per 64 pixels. The *-pixels configs are the fine-tune (start them with
  --init from a latent run): the same model, the distortion now what PSNR measures, through the decoder
  on small crops. No perceptual loss in either (LPIPS is how glc is judged, not what it is trained on).
- λ(Δ) = λ₀/Δ² as for the hyperprior codec: the trade-off whose optimum is step Δ at high rate, so Δ is
  the rate knob of one model; each image's loss is weighted by Δ so that both ends of the range count.
  λ₀ of the pixel objective is the latent one's times what a unit of latent MSE costs in pixel MSE
  near Δ = 1 (measured on the held-out crops), so the fine-tune keeps each Δ's rate.
- The decoder normalises its pooled blocks over the whole picture; a crop decoded with its own statistics
  renders far from its place in the picture (parts/taef2.py: 22.7 against 29.3 dB on a crop of kodim23).
  The pixel objective and the validation PSNR decode each crop with its picture's statistics (those of
  the true latent: ẑ's are not known for the picture, and the objective pulls ẑ towards z).
- Flips: the mirror images' latents (a flipped latent is not the latent of the flipped image).
- Validation: fixed latent crops of the held-out images, rounded as the codec rounds, at each Δ of
  VALIDATION_STEPS: bpp from the model's own probabilities (what the range coder spends, within a few
  bytes), latent MSE, and PSNR of the decoded pixels of the first VALIDATION_PIXEL_CROPS crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..parts.crops import mirrored_views, training_latents
from ..parts.latents import decode_latents, encode_latents, picture_statistics
from ..parts.models import load_model
from ..task import TrainingTask, TrainSettings
from .codec import DEFAULT_AUTOENCODER
from .nets import HYPER_STRIDE, LATENT_STRIDE, STEP_RANGE, GlcModel

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=8, y_channels=8, hyper_channels=8, blocks=1, mixtures=2),
    "small": dict(channels=64, y_channels=128, hyper_channels=64, blocks=2, mixtures=3),
    "base": dict(channels=192, y_channels=192, hyper_channels=128, blocks=3, mixtures=3),
}
PIXELS = "-pixels"  # the suffix of a config trained on pixel MSE through the decoder
LAMBDA_LATENT = 2.0  # λ₀: bpp per unit of latent MSE at Δ = 1
LATENT_PER_PIXEL_MSE = 1 / 400  # latent MSE per unit of MSE₂₅₅ near Δ = 1 (module docstring)
LAMBDA_PIXELS = LAMBDA_LATENT * LATENT_PER_PIXEL_MSE
MARGIN = 3  # latent px left out of the pixel loss and PSNR at each side of a crop (crops are at least 8)
INNER = slice(8 * MARGIN, -8 * MARGIN)
VALIDATION_STEPS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
VALIDATION_CROPS = 16
VALIDATION_PIXEL_CROPS = 6


def metric_at(metric: str, step: float) -> str:
    """A validation metric at one Δ, e.g. val_bpp_d0p5 (no dot: progress fields are format strings)."""
    return f"{metric}_d{step:g}".replace(".", "p")


def paired_crops(latents, views, count: int, side: int, rng: np.random.Generator, pixels: bool):
    """(count, C, side, side) latent crops, random latent and position, with `pixels` the (count, 3, 8·side,
    8·side) pixels in [-1, 1] they were encoded from (else None), and the index of each crop's latent."""
    zs, xs, indices = [], [], []
    for _ in range(count):
        index = int(rng.integers(len(latents)))
        indices.append(index)
        z = latents[index]
        top, left = int(rng.integers(z.shape[1] - side + 1)), int(rng.integers(z.shape[2] - side + 1))
        zs.append(z[:, top : top + side, left : left + side])
        if pixels:
            xs.append(views[index][8 * top : 8 * (top + side), 8 * left : 8 * (left + side)])
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1 if pixels else None
    return torch.stack(zs), x, indices


class GlcTask(TrainingTask):
    name = "glc"
    model_class = GlcModel
    configs = (*MODEL_CONFIGS, *(name + PIXELS for name in MODEL_CONFIGS))
    progress = (
        "bpp {bpp:.4f}",
        "mse {mse:.4g}",
        *(f"val Δ {v:g}: {{{metric_at('val_bpp', v)}:.4f}} bpp {{{metric_at('val_psnr', v)}:.2f}} dB" for v in VALIDATION_STEPS),
    )
    crop_multiple = 8 * LATENT_STRIDE * HYPER_STRIDE  # whole ζ positions: no padding inside the training pass

    def __init__(self, settings: TrainSettings, train, validation, device):
        super().__init__(settings, train, validation, device)
        self.autoencoder = load_model(settings.model or DEFAULT_AUTOENCODER, str(device))
        self.pixels = settings.config.endswith(PIXELS)
        self.side = settings.crop // 8
        encode = lambda x: encode_latents(self.autoencoder, x)  # noqa: E731 — the unit-variance space
        cache = self.autoencoder.autoencoder_fingerprint.hex()
        self.train = training_latents(encode, train, settings.crop, device, mirrored=True, cache=cache)
        self.train_views = mirrored_views(train, settings.crop, mirrored=True) if self.pixels else []
        held_out = training_latents(encode, validation, settings.crop, device, mirrored=False, cache=cache)
        self.validation = paired_crops(
            held_out, mirrored_views(validation, settings.crop, mirrored=False), VALIDATION_CROPS, self.side,
            np.random.default_rng(12345), pixels=True,
        )  # fmt: skip
        self.validation_statistics = self.statistics(held_out, self.validation[2][:VALIDATION_PIXEL_CROPS], {})
        self.train_statistics: dict = {}  # latent index → its picture's pooled statistics, filled as crops are drawn

    def new_model(self):
        return GlcModel(latent_channels=self.autoencoder.vae.config.latent_channels,
                        **MODEL_CONFIGS[self.settings.config.removesuffix(PIXELS)])  # fmt: skip

    @torch.no_grad()
    def statistics(self, latents, indices: list[int], memo: dict) -> list:
        """The decoder's pooled statistics of each crop's whole picture, as `decode_latents` takes them."""
        for index in set(indices) - set(memo):
            memo[index] = picture_statistics(self.autoencoder, latents[index][None])
        return [memo[index] for index in indices]

    def _noise(self, model, z, rng: np.random.Generator):
        y_shape, zeta_shape = getattr(model, "module", model).code_shapes(z.shape[2], z.shape[3])  # DDP wraps it
        draw = lambda shape: torch.from_numpy(rng.random((len(z), *shape), dtype=np.float32)).to(self.device)  # noqa: E731
        return draw(y_shape), draw(zeta_shape)

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        z, x, indices = paired_crops(self.train, self.train_views, self.settings.batch_size, self.side, rng, self.pixels)
        z = z.to(self.device)
        low, high = np.log(STEP_RANGE)
        step = torch.from_numpy(np.exp(rng.uniform(low, high, len(z)))).float().to(self.device)
        z_hat, y_bits, zeta_bits = wrapped(z, step, *self._noise(wrapped, z, rng))
        bpp = (y_bits + zeta_bits) / (64 * z.shape[2] * z.shape[3])
        if self.pixels:
            decoded = decode_latents(self.autoencoder, z_hat, self.statistics(self.train, indices, self.train_statistics))
            error = (127.5 * (decoded - x.to(self.device)))[..., INNER, INNER].pow(2).flatten(1).mean(1)
            lam = LAMBDA_PIXELS / step**2
        else:
            error = (z_hat - z).pow(2).flatten(1).mean(1)
            lam = LAMBDA_LATENT / step**2
        loss = (step * (bpp + lam * error)).mean()
        return loss, {"bpp": float(bpp.detach().mean()), "mse": float(error.detach().mean())}

    def validate(self, model) -> dict:
        z, x = (t.to(self.device) for t in self.validation[:2])
        out = {}
        for value in VALIDATION_STEPS:
            step = torch.full((len(z),), value, device=self.device)
            z_hat, y_bits, zeta_bits = model(z, step, None, None)
            out[metric_at("val_bpp", value)] = float(((y_bits + zeta_bits) / (64 * z.shape[2] * z.shape[3])).mean())
            out[metric_at("val_latent_mse", value)] = float((z_hat - z).pow(2).mean())
            decoded = decode_latents(self.autoencoder, z_hat[:VALIDATION_PIXEL_CROPS], self.validation_statistics)
            decoded = torch.round((decoded.clamp(-1, 1) + 1) * 127.5)  # 8-bit, as the codec outputs
            mse = ((x[:VALIDATION_PIXEL_CROPS] + 1) * 127.5 - decoded)[..., INNER, INNER].pow(2).flatten(1).mean(1)
            out[metric_at("val_psnr", value)] = float((10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).mean())
        return out
