"""Training HFD's detail decoder (`diffarc train hfd --config CONFIG`).

    training image ─► base at a random (quality, scale) ─► the same random crop of image and base
    r = x − b;  t (τ) random;  state = noisy_state(r, ε, t) ─► DetailDecoder ─► r̂;  loss = ‖r̂ − r‖²

Choices:
- Bases are made on the fly, from the whole training image and with the codec's own functions
  (bases.py): AVIF's artefacts on a crop are not those on a photograph. The AVIF payload (a few KB) of
  each (image, quality, scale) is kept in memory once made, so later draws of it cost a 3 ms decode.
  Each step draws BATCH_IMAGES images and cuts batch_size / BATCH_IMAGES crops from each.
- Quality and scale are inputs to the network; one decoder serves the whole grid QUALITIES × SCALES.
- The loss is the MSE of the residual (x-prediction), for both objectives: no perceptual term, and
  never LPIPS, the metric the codec is judged by. The full velocity weighting of a flow and
  v-prediction from scratch both pushed the first call's estimate below the base's PSNR in a prototype
  (docs/notes/hfd-prototype.md).
- A quarter of the draws sit at the start time t = 1: the first sampling call, whose estimate is the
  restoration every decode is built on, gets a quarter of the training.
- Validation reports what the first call buys over the base, in dB of PSNR, at scale 1 and 2: the
  restoration gain (positive once the decoder removes more error than it adds).
"""

from __future__ import annotations

import numpy as np
import torch

from ..task import SettingsError, TrainingTask, TrainSettings
from .bases import decode_avif_base, encode_avif_base
from .nets import DetailDecoder, noisy_state

CONFIGS: dict[str, dict] = {
    "tiny": dict(widths=(16, 16, 32), objective="flow"),
    "small": dict(widths=(48, 64, 96), objective="flow"),
    "small-diffusion": dict(widths=(48, 64, 96), objective="diffusion", shift=8.0),
    "small-diffusion-unshifted": dict(widths=(48, 64, 96), objective="diffusion", shift=1.0),
    "base": dict(widths=(64, 96, 128), objective="flow"),
}
QUALITIES = tuple(range(0, 51, 10))  # a coarse grid: fewer AVIF encodes; the network interpolates
SCALES = (1, 2, 4)
SPEED = 6  # the codec's default AVIF speed: the decoder learns the artefacts it will be given
BATCH_IMAGES = 2
START_FRACTION = 0.25
VALIDATION = [(q, s) for s in (1, 2) for q in (0, 20, 40)]


class DetailDecoderTask(TrainingTask):
    name = "hfd"
    model_class = DetailDecoder
    progress = ("mse {mse:.5f}", "restoration gain s1 {val_gain_s1:+.2f} dB, s2 {val_gain_s2:+.2f} dB")
    crop_multiple = 16
    configs = tuple(CONFIGS)

    @classmethod
    def check(cls, settings: TrainSettings) -> None:
        super().check(settings)
        if settings.batch_size % BATCH_IMAGES:
            raise SettingsError("batch_size", f"hfd's batch size must be a multiple of {BATCH_IMAGES}")

    def __init__(self, settings: TrainSettings, train, validation, device):
        super().__init__(settings, train, validation, device)
        crop = settings.crop
        self.train = [image for image in train if min(image.shape[:2]) >= crop]
        if not self.train:
            raise SettingsError("crop", f"no training image is at least {crop}×{crop} pixels")
        self.payloads: dict[tuple[int, int, int], bytes] = {}
        self.validation = self._validation_batch([image for image in validation if min(image.shape[:2]) >= crop][:8])

    def new_model(self):
        return DetailDecoder(**CONFIGS[self.settings.config])

    def base(self, index: int, quality: int, scale: int) -> torch.Tensor:
        """The base of training image `index` at (quality, scale), (1, 3, H, W) in [−1, 1]."""
        image = self.train[index]
        key = (index, quality, scale)
        if key not in self.payloads:
            self.payloads[key] = encode_avif_base(image, quality, scale, SPEED)
        return decode_avif_base(self.payloads[key], *image.shape[:2], scale)

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        crop, per_image = self.settings.crop, self.settings.batch_size // BATCH_IMAGES
        xs, bases, qualities, scales = [], [], [], []
        for index in rng.integers(len(self.train), size=BATCH_IMAGES):
            quality, scale = int(rng.choice(QUALITIES)), int(rng.choice(SCALES))
            image = torch.from_numpy(np.array(self.train[index])).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
            base = self.base(int(index), quality, scale)
            for _ in range(per_image):
                y, x = rng.integers(image.shape[2] - crop + 1), rng.integers(image.shape[3] - crop + 1)
                pair = torch.cat([image, base])[:, :, y : y + crop, x : x + crop]
                pair = _dihedral(pair, int(rng.integers(8)))
                xs.append(pair[0])
                bases.append(pair[1])
                qualities.append(quality)
                scales.append(scale)
        x, base = torch.stack(xs).to(self.device), torch.stack(bases).to(self.device)
        quality = torch.tensor(qualities, dtype=torch.float32, device=self.device)
        scale = torch.tensor(scales, dtype=torch.float32, device=self.device)
        count = len(xs)
        t = torch.from_numpy(rng.random(count, dtype=np.float32))
        t = torch.where(torch.from_numpy(rng.random(count)) < START_FRACTION, torch.ones_like(t), t).to(self.device)
        noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)).to(self.device)
        residual = x - base
        decoder = getattr(wrapped, "module", wrapped)  # data parallelism wraps the model
        estimate = wrapped(noisy_state(decoder, residual, noise, t), base, quality, scale, t)
        mse = ((estimate - residual) ** 2).mean()
        return mse, {"mse": float(mse.detach())}

    def _validation_batch(self, images: list[np.ndarray]) -> dict:
        """Centre crops of held-out images with their bases at the VALIDATION settings, made once."""
        crop, rows = self.settings.crop, []
        for image in images:
            y, x = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
            original = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
            for quality, scale in VALIDATION:
                base = decode_avif_base(encode_avif_base(image, quality, scale, SPEED), *image.shape[:2], scale)
                rows.append((original[..., y : y + crop, x : x + crop], base[..., y : y + crop, x : x + crop], quality, scale))
        if not rows:
            return {}
        return {
            "x": torch.cat([r[0] for r in rows]).to(self.device),
            "base": torch.cat([r[1] for r in rows]).to(self.device),
            "quality": torch.tensor([float(r[2]) for r in rows], device=self.device),
            "scale": torch.tensor([float(r[3]) for r in rows], device=self.device),
        }

    def validate(self, model) -> dict:
        """PSNR gain of the first sampling call's estimate over the base, per scale (fixed noise)."""
        v = self.validation
        if not v:
            return {"val_gain_s1": float("nan"), "val_gain_s2": float("nan")}
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(v["x"].shape, generator=generator).to(self.device)
        start = torch.ones(len(v["x"]), device=self.device)
        estimate = model(noisy_state(model, torch.zeros_like(noise), noise, start), v["base"], v["quality"], v["scale"], start)
        out = {}
        for scale in (1, 2):
            rows = v["scale"] == scale
            before = ((v["base"][rows] - v["x"][rows]) ** 2).mean()
            after = (((v["base"][rows] + estimate[rows]).clamp(-1, 1) - v["x"][rows]) ** 2).mean()
            out[f"val_gain_s{scale}"] = float(10 * torch.log10(before / after))
        return out


def _dihedral(pair: torch.Tensor, choice: int) -> torch.Tensor:
    """One of the 8 flips/rotations, the same for image and base."""
    if choice & 1:
        pair = pair.flip(2)
    if choice & 2:
        pair = pair.flip(3)
    if choice & 4:
        pair = pair.transpose(2, 3)
    return pair
