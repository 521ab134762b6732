"""Training CorrDiff's end-to-end decoder for latent-denoise (`diffarc train corrdiff-latent --model M`).

    training image (and its mirror) ─frozen VAE encoder─► z (whole image, once; cached on disk)
    Δ log-uniform in STEP_RANGE ─► latent-denoise's own quantizer (its trained γ-net and hyperprior) ─► ẑ
    a random crop of ẑ, with the window around it that it depends on ─LatentRestorer(ẑ, Δ·s)─► ẑ_e of the crop
    ─frozen VAE decoder (the whole picture's pooled statistics, where it has them)─► x̂_e
    loss = ‖x̂_e − x‖² over the crop less MARGIN latent px  (pixels in [-1, 1]; MSE only, never LPIPS)

The VAE, the UNet and latent-denoise's predictors stay frozen: only the restorer learns. Validation
reports, on held-out crops (each picture's centre and top left corner) at each Δ of VALIDATION_STEPS (the
presets'), the PSNR of x̂_e over that of the plain decode of ẑ (the codec's `timestep=off`).

Choices:
- ẑ is made as the codec makes it, in float32 rather than the coder's float64 (a difference of ~10⁻⁷
  in μ): γ and the hyper-latent from the whole image's latent, then y = (z − b)/s, q = round((y − μ)/Δ),
  ẑ = (q·Δ + μ)·s + b. So a crop of ẑ at any position is what the codec's decoder reads there.
- The restorer runs on a window `halo` latent px (its receptive radius) larger than the crop on every
  side, cut where the picture ends, so the crop's ẑ_e is the whole picture's. Crops lie anywhere in the
  picture: a first run kept them (and their windows) 10 latent px inside its edges, and the restorer
  learned to move the untrained edge band far off (−1.5 dB there on a whole Kodak image). Through the
  decoder's pooled statistics that cost the whole picture, so whole images lost PSNR while held-out
  centre crops gained 1 dB.
- A decoder that normalises over the whole picture (taef2's pooled blocks, parts/taef2.py) decodes each
  crop with the pooled statistics of the whole image's ẑ_e, as the codec decodes it; a crop decoded with
  its own statistics renders far from its place in the picture. The MSE leaves out MARGIN latent px at
  each side, where the decoder sees no picture. With those statistics small crops train what whole
  pictures decode, at a fraction of the decoder's cost.
- A decoder without them (diffusers' AutoencoderKL, builtin:ldm-small) normalises its GroupNorm layers
  over the crop, so its crops must be large (`--crop 384`): a restorer trained on 128-px crops gained
  +0.5 dB on held-out 128-px crops and lost 3–4.5 dB on 512-px ones (5.6 dB on a whole Kodak image).
- STEP_RANGE spans latent-denoise's presets with some room each side.
"""

from __future__ import annotations

import numpy as np
import torch

from ..latent_denoise.codec import PREDICTORS_FOLDER, LatentDenoiseCodec, load_predictors
from ..latent_denoise.nets import HYPER_STRIDE
from ..parts.crops import mirrored_views, training_latents
from ..parts.latent_codecs import dequantize, mean_and_scale
from ..parts.latents import decode_latents, encode_latents, picture_statistics
from ..parts.models import load_model, part_folder
from ..task import SettingsError, TrainingTask
from .restorer import LatentRestorer

CONFIGS = {"tiny": dict(width=16, blocks=1), "small": dict(width=64, blocks=4)}
PRESET_STEPS = sorted(preset["step"] for preset in LatentDenoiseCodec.presets.values())
STEP_RANGE = (PRESET_STEPS[0] / 1.5, PRESET_STEPS[-1] * 1.6)
VALIDATION_STEPS = tuple(PRESET_STEPS)
MARGIN = 3  # latent px of each crop side left out of the MSE: the decoder sees no picture beyond them


def _gain_key(step: float) -> str:
    return f"val_gain_d{step:g}".replace(".", "p")  # a format field name cannot hold a dot


def quantize(predictors, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ẑ, Δ·s) of latents z (B, C, H, W), H and W multiples of HYPER_STRIDE, at steps Δ (B,), as
    latent-denoise's encoder quantizes them."""
    shift, scale = predictors.sent_transform(z, step)
    y = (z - shift[..., None, None]) / scale[..., None, None]
    means, _ = mean_and_scale(predictors.hyper_synthesis(torch.round(predictors.hyper_analysis(y))))
    box = step.view(-1, 1, 1, 1)
    y_hat = dequantize(torch.round((y - means) / box), means, torch.ones_like(means), box)
    return y_hat * scale[..., None, None] + shift[..., None, None], step[:, None] * scale


def halo(config: str) -> int:
    """The restorer's receptive radius in latent px: its first and last convolutions and two per block."""
    return 2 + 2 * CONFIGS[config]["blocks"]


class LatentRestorerTask(TrainingTask):
    name = "corrdiff-latent"
    model_class = LatentRestorer
    configs = tuple(CONFIGS)
    required = {"model": "training corrdiff-latent needs the latent diffusion model whose latents it restores"}
    progress = ("mse {mse:.5f}", "val PSNR gain at Δ " + "|".join(f"{v:g}" for v in VALIDATION_STEPS) + " "
                + "|".join(f"{{{_gain_key(v)}:+.2f}}" for v in VALIDATION_STEPS) + " dB")  # fmt: skip

    @classmethod
    def check(cls, settings) -> None:
        super().check(settings)
        if settings.crop // 8 <= 2 * MARGIN:
            raise SettingsError("crop", f"the training crop must be over {16 * MARGIN} px: {MARGIN} latent px of each side are not scored")

    def __init__(self, settings, train, validation, device):
        super().__init__(settings, train, validation, device)
        if not train:
            raise SettingsError("data", "corrdiff-latent found no training images")
        self.model = load_model(settings.model, str(device))
        self.model.vae.requires_grad_(False)
        self.predictors, _ = load_predictors(str(part_folder(settings.model, "", PREDICTORS_FOLDER, "predictors")), str(device))
        self.side, self.halo = settings.crop // 8, halo(settings.config)
        encode = lambda x: encode_latents(self.model, x)  # noqa: E731
        cache = self.model.autoencoder_fingerprint.hex()
        self.train = self._paired(training_latents(encode, train, settings.crop, device, mirrored=True, cache=cache),
                                  mirrored_views(train, settings.crop, mirrored=True))  # fmt: skip
        self.validation = self._paired(training_latents(encode, validation[:16], settings.crop, device, mirrored=False, cache=cache),
                                       mirrored_views(validation[:16], settings.crop, mirrored=False))  # fmt: skip
        self.pooled = hasattr(self.model.vae, "pool_statistics")

    def _paired(self, latents, views) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pixels (3, H, W) in [-1, 1], latent (C, H/8, W/8)) of each view, cut to whole hyper-latent positions."""
        pairs = []
        for z, view in zip(latents, views, strict=True):
            h, w = z.shape[1] // HYPER_STRIDE * HYPER_STRIDE, z.shape[2] // HYPER_STRIDE * HYPER_STRIDE
            pixels = torch.from_numpy(np.array(view[: 8 * h, : 8 * w])).permute(2, 0, 1).float() / 127.5 - 1  # a copy
            pairs.append((pixels.to(self.device), z[:, :h, :w]))
        return pairs

    def new_model(self) -> LatentRestorer:
        return LatentRestorer(latent_channels=self.predictors.config.latent_channels, **CONFIGS[self.settings.config])

    def _decoded_crops(self, restorer, examples, steps: torch.Tensor, corners, plain: bool = False) -> tuple:
        """(pixel crops, decoded ẑ_e crops, and with `plain` decoded ẑ crops, else None) of `examples` at
        `steps`, each crop's top left at its latent `corners`, all without their margins; only the ẑ_e
        decode carries gradients."""
        crops, restored, plain_crops, statistics, restored_statistics = [], [], [], [], []
        side = self.side
        pictures = {}  # (latent, Δ) → its whole-picture work, done once for several crops of it (validation's)
        for (image, z), step, (y, x) in zip(examples, steps, corners):
            key = (id(z), float(step))
            if key not in pictures:
                pictures[key] = self._picture(restorer, z, step, plain)
            z_hat, channel_step, whole_restored, whole_plain = pictures[key]
            # The window the crop's ẑ_e depends on, cut at the picture's edges as the whole pass sees them.
            top, left = max(y - self.halo, 0), max(x - self.halo, 0)
            window = z_hat[..., top : y + side + self.halo, left : x + side + self.halo]
            restored.append(restorer(window, channel_step)[0, :, y - top : y - top + side, x - left : x - left + side])
            plain_crops.append(z_hat[0, :, y : y + side, x : x + side])
            crops.append(image[:, 8 * y : 8 * (y + side), 8 * x : 8 * (x + side)])
            if self.pooled:
                restored_statistics.append(whole_restored)
                if plain:
                    statistics.append(whole_plain)
        inner = (..., slice(8 * MARGIN, 8 * (side - MARGIN)), slice(8 * MARGIN, 8 * (side - MARGIN)))
        decoded = decode_latents(self.model, torch.stack(restored), restored_statistics or None)[inner]
        plain_decoded = None
        if plain:
            with torch.no_grad():
                plain_decoded = decode_latents(self.model, torch.stack(plain_crops), statistics or None)[inner]
        return torch.stack(crops)[inner], decoded, plain_decoded

    @torch.no_grad()
    def _picture(self, restorer, z: torch.Tensor, step: torch.Tensor, plain: bool) -> tuple:
        """(ẑ, its channels' steps, and where the decoder pools: the pooled statistics of the whole ẑ_e and,
        with `plain`, of ẑ, as the codec decodes them) of one picture's latent z at step Δ."""
        z_hat, channel_step = quantize(self.predictors, z[None], step[None])
        if not self.pooled:
            return z_hat, channel_step, None, None
        restored = picture_statistics(self.model, restorer(z_hat, channel_step))
        return z_hat, channel_step, restored, picture_statistics(self.model, z_hat) if plain else None

    def _corner(self, z: torch.Tensor, rng: np.random.Generator | None) -> tuple[int, int]:
        """The latent top left of a crop inside z: random, or the centre without `rng`."""
        rows, cols = z.shape[1] - self.side + 1, z.shape[2] - self.side + 1
        if rng is None:
            return rows // 2, cols // 2
        return int(rng.integers(rows)), int(rng.integers(cols))

    def loss(self, wrapped, rng):
        examples = [self.train[i] for i in rng.integers(len(self.train), size=self.settings.batch_size)]
        low, high = np.log(STEP_RANGE)
        steps = torch.from_numpy(np.exp(rng.uniform(low, high, len(examples)))).float().to(self.device)
        corners = [self._corner(z, rng) for _, z in examples]
        pixels, decoded, _ = self._decoded_crops(wrapped, examples, steps, corners)
        mse = ((decoded - pixels) ** 2).mean()
        return mse, {"mse": float(mse.detach())}

    def validate(self, model) -> dict:
        # Each held-out picture's centre and its top left corner, where the restorer meets the picture's edge.
        examples = self.validation * 2
        corners = [self._corner(z, None) for _, z in self.validation] + [(0, 0)] * len(self.validation)
        out = {}
        for value in VALIDATION_STEPS:
            steps = torch.full((len(examples),), value, device=self.device)
            pixels, restored, plain = self._decoded_crops(model, examples, steps, corners, plain=True)
            gains = [_psnr(x, r) - _psnr(x, p) for x, r, p in zip(pixels, restored, plain)]
            out[_gain_key(value)] = float(np.mean(gains))
        return out


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR (dB) of two [-1, 1] pictures as the codec outputs them: 8-bit."""
    to_8bit = lambda p: torch.round((p.clamp(-1, 1) + 1) * 127.5)  # noqa: E731
    mse = float((to_8bit(x) - to_8bit(y)).pow(2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))
