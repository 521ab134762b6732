"""Training CorrDiff's end-to-end decoder for latent-denoise (`diffarc train corrdiff-latent --model M`).

    training image ─frozen VAE encoder─► z (whole image, once)
    Δ log-uniform in STEP_RANGE ─► latent-denoise's own quantizer (its trained γ-net and hyperprior) ─► ẑ
    the same random crop of ẑ and of the image ─► LatentRestorer(ẑ, Δ·s) ─► ẑ_e ─frozen VAE decoder─► x̂_e
    loss = ‖x̂_e − x‖²  (pixels in [-1, 1]; MSE only, never LPIPS, the bench's metric)

The VAE, the UNet and latent-denoise's predictors stay frozen: only the restorer learns. Validation
reports, on held-out centre crops at each Δ of VALIDATION_STEPS, the PSNR of x̂_e over that of the plain
decode of ẑ (the codec's `timestep=off`).

Choices:
- ẑ is made as the codec makes it, in float32 rather than the coder's float64 (a difference of ~10⁻⁷
  in μ): γ from the whole image's latent, then y = (z − b)/s, μ from the rounded hyper-latent,
  q = round((y − μ)/Δ), ẑ = (q·Δ + μ)·s + b.
- Crops start on whole hyper-latent positions (multiples of 4 latent pixels), so a crop's hyper-latent
  is the whole image's, but for the crop's edges.
- STEP_RANGE covers the presets of latent-denoise (Δ 0.3–0.9) and coarser steps.
- Crops must be large (`--crop 384`): the VAE decoder's GroupNorm layers normalise over the whole
  picture, so what a latent change does to the pixels depends on the picture's size. A restorer trained
  on 128-px crops gained +0.5 dB on held-out 128-px crops and lost 3–4.5 dB on 512-px ones (and 5.6 dB on
  a whole Kodak image): it had learned to shift the statistics of a small picture.
"""

from __future__ import annotations

import numpy as np
import torch

from ..latent_denoise.codec import PREDICTORS_FOLDER, load_predictors
from ..latent_denoise.nets import HYPER_STRIDE
from ..parts.crops import fit_crop
from ..parts.latent_codecs import dequantize, mean_and_scale
from ..parts.latents import decode_latents, encode_latents
from ..parts.metrics import psnr
from ..parts.models import load_model, part_folder
from ..task import SettingsError, TrainingTask
from .restorer import LatentRestorer

CONFIGS = {"tiny": dict(width=16, blocks=1), "small": dict(width=64, blocks=4)}
STEP_RANGE = (0.25, 2.5)
VALIDATION_STEPS = (0.3, 0.9, 2.0)
LATENT_GRID = HYPER_STRIDE  # crops start on whole hyper-latent positions


def _gain_key(step: float) -> str:
    return f"val_gain_d{step:g}".replace(".", "p")  # a format field name cannot hold a dot


def quantize(predictors, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ẑ, Δ·s) of latents z (B, C, H, W) at steps Δ (B,), as latent-denoise's encoder quantizes them."""
    shift, scale = predictors.sent_transform(z, step)
    y = (z - shift[..., None, None]) / scale[..., None, None]
    means, _ = mean_and_scale(predictors.hyper_synthesis(torch.round(predictors.hyper_analysis(y))))
    box = step.view(-1, 1, 1, 1)
    y_hat = dequantize(torch.round((y - means) / box), means, torch.ones_like(means), box)
    return y_hat * scale[..., None, None] + shift[..., None, None], step[:, None] * scale


class LatentRestorerTask(TrainingTask):
    name = "corrdiff-latent"
    model_class = LatentRestorer
    configs = tuple(CONFIGS)
    crop_multiple = 8 * LATENT_GRID
    required = {"model": "training corrdiff-latent needs the latent diffusion model whose latents it restores"}
    progress = ("mse {mse:.5f}", "val PSNR gain at Δ " + "|".join(f"{v:g}" for v in VALIDATION_STEPS) + " "
                + "|".join(f"{{{_gain_key(v)}:+.2f}}" for v in VALIDATION_STEPS) + " dB")  # fmt: skip

    def __init__(self, settings, train, validation, device):
        super().__init__(settings, train, validation, device)
        self.model = load_model(settings.model, str(device))
        self.model.vae.requires_grad_(False)
        self.predictors, _ = load_predictors(str(part_folder(settings.model, "", PREDICTORS_FOLDER, "predictors")), str(device))
        self.side = settings.crop // 8
        self.train = [self._prepared(image) for image in train]
        self.validation = [self._prepared(image) for image in validation[:16]]
        if not self.train:
            raise SettingsError("data", "corrdiff-latent found no training images")

    @torch.no_grad()
    def _prepared(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (3, H, W) in [-1, 1], latent (C, H/8, W/8)) of an image cut to whole hyper-latent positions."""
        grid = 8 * LATENT_GRID
        image = fit_crop(image, self.settings.crop)
        image = image[: image.shape[0] // grid * grid, : image.shape[1] // grid * grid]
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().to(self.device) / 127.5 - 1
        return pixels, encode_latents(self.model, pixels[None])[0]

    def new_model(self) -> LatentRestorer:
        return LatentRestorer(latent_channels=self.predictors.config.latent_channels, **CONFIGS[self.settings.config])

    def _batch(self, examples, steps: torch.Tensor, corners) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel crops, ẑ crops, Δ·s) of `examples` at `steps`, each crop at its (latent) corner."""
        pixels, latents, channel_steps = [], [], []
        with torch.no_grad():
            for (image, z), step, (y, x) in zip(examples, steps, corners):
                z_hat, channel_step = quantize(self.predictors, z[None], step[None])
                latents.append(z_hat[0, :, y : y + self.side, x : x + self.side])
                pixels.append(image[:, 8 * y : 8 * (y + self.side), 8 * x : 8 * (x + self.side)])
                channel_steps.append(channel_step[0])
        return torch.stack(pixels), torch.stack(latents), torch.stack(channel_steps)

    def loss(self, wrapped, rng):
        examples = [self.train[i] for i in rng.integers(len(self.train), size=self.settings.batch_size)]
        low, high = np.log(STEP_RANGE)
        steps = torch.from_numpy(np.exp(rng.uniform(low, high, len(examples)))).float().to(self.device)
        corners = []
        for _, z in examples:
            rows, cols = (z.shape[1] - self.side) // LATENT_GRID + 1, (z.shape[2] - self.side) // LATENT_GRID + 1
            corners.append((LATENT_GRID * int(rng.integers(rows)), LATENT_GRID * int(rng.integers(cols))))
        pixels, z_hat, channel_step = self._batch(examples, steps, corners)
        decoded = decode_latents(self.model, wrapped(z_hat, channel_step))
        mse = ((decoded - pixels) ** 2).mean()
        return mse, {"mse": float(mse.detach())}

    def validate(self, model) -> dict:
        corners = [
            (((z.shape[1] - self.side) // 2) // LATENT_GRID * LATENT_GRID, ((z.shape[2] - self.side) // 2) // LATENT_GRID * LATENT_GRID)
            for _, z in self.validation
        ]  # fmt: skip
        out = {}
        for value in VALIDATION_STEPS:
            steps = torch.full((len(self.validation),), value, device=self.device)
            pixels, z_hat, channel_step = self._batch(self.validation, steps, corners)
            plain, restored = (decode_latents(self.model, z).clamp(-1, 1) for z in (z_hat, model(z_hat, channel_step)))
            gains = [psnr(_uint8(x), _uint8(r)) - psnr(_uint8(x), _uint8(p)) for r, p, x in zip(restored, plain, pixels)]
            out[_gain_key(value)] = float(np.mean(gains))
        return out


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
