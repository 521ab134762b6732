"""Training HFD's detail decoder (`diffarc train hfd --config CONFIG`).

    training image ─► base at a random (quality, scale), or step Δ ─► the same random crop of image and base
    r = x − b;  t (τ) random;  state = noisy_state(r, ε, t) ─► DetailDecoder ─► r̂;  loss = ‖r̂ − r‖²

Choices:
- Bases are made on the fly, from the whole training image and with the codec's own functions
  (bases.py): AVIF's artefacts on a crop are not those on a photograph. The AVIF payload (a few KB) of
  each (image, quality, scale) is kept in memory once made, so later draws of it cost a 3 ms decode.
  Each step draws BATCH_IMAGES images and cuts batch_size / BATCH_IMAGES crops from each.
- Quality and scale are inputs to the network; one decoder serves the whole grid QUALITIES × SCALES.
- The `*-hyperprior` configs train the same networks on the learned base (`--model`, the hyperprior
  model; default builtin:hyperprior-small) at steps Δ of BASE_STEPS, fed to the rate input as
  `HyperpriorBase.rate` says; the export keeps that model in the decoder's folder (bases.py). They are
  best started from the AVIF decoder's weights (`--init builtin:hfd-small`): the two bases lose the
  same kind of detail, and fine-tuning takes a fraction of the steps.
- The loss is the MSE of the residual (x-prediction), for both objectives: no perceptual term, and
  never LPIPS, the metric the codec is judged by. The full velocity weighting of a flow and
  v-prediction from scratch both pushed the first call's estimate below the base's PSNR in a prototype
  (docs/notes/hfd-prototype.md).
- A quarter of the draws sit at the start time t = 1: the first sampling call, whose estimate is the
  restoration every decode is built on, gets a quarter of the training.
- Validation reports what the first call buys over the base, in dB of PSNR, at scale 1 and 2: the
  restoration gain (positive once the decoder removes more error than it adds).

The `latent-*` configs train the latent detail decoder (detail.py) on the same objective in the latent of
the autoencoder `--model` (default builtin:taef2): r = z_x − z_b, the latents of the original and of its
AVIF base, pairs from latent_data.py (cached on disk; no flips there). Its restoration gain is measured in
the latent (the MSE of unit-variance latents), not in pixels. The export is a model folder the codec
loads: the autoencoder's vae/ and the network in hfd/ (detail.LATENT_FOLDER).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..hyperprior.codec import DEFAULT_HYPERPRIOR
from ..parts.models import load_model, resolve_folder, weights_files
from ..task import SettingsError, TrainingTask, TrainSettings, save_trained
from .bases import HYPERPRIOR_FOLDER, AvifBase, HyperpriorBase
from .detail import LATENT_DOWNSAMPLING, LATENT_FOLDER
from .latent_data import LatentPairs
from .latent_data import SPEED as LATENT_SPEED
from .nets import DetailDecoder, noisy_state

DEFAULT_AUTOENCODER = "builtin:taef2"  # the latent configs' autoencoder when --model names none
LATENT_CHANNELS = 32
# The flow's start noise in unit-variance latent units: about the RMS of the residual z_x − z_b, which on
# training images is 0.57–0.74 at quality 35–30, 0.9–1.0 at quality 0–5 and 0.9–1.1 at scale 4: taef2's
# latent holds the texture AVIF removes, so the base's latent is nearly as far from the original's as the
# latent's own spread (std 1).
LATENT_SIGMA = 1.0

CONFIGS: dict[str, dict] = {
    "tiny": dict(widths=(16, 16, 32), objective="flow"),
    "small": dict(widths=(48, 64, 96), objective="flow"),
    "small-diffusion": dict(widths=(48, 64, 96), objective="diffusion", shift=8.0),
    "small-diffusion-unshifted": dict(widths=(48, 64, 96), objective="diffusion", shift=1.0),
    "base": dict(widths=(64, 96, 128), objective="flow"),
}
CONFIGS |= {f"{name}-hyperprior": CONFIGS[name] for name in ("tiny", "small")}  # the learned base's decoders
CONFIGS |= {  # the latent detail decoders: the flow at latent resolution (space-to-depth 1)
    f"latent-{name}": dict(widths=widths, objective="flow", channels=LATENT_CHANNELS, space_to_depth=1, sigma=LATENT_SIGMA)
    for name, widths in (("tiny", (16, 16, 32)), ("small", (96, 128, 192)))
}
QUALITIES = tuple(range(0, 51, 10))  # a coarse grid: fewer AVIF encodes; the network interpolates
SCALES = (1, 2, 4)
SPEED = 6  # the codec's default AVIF speed: the decoder learns the artefacts it will be given
BASE_STEPS = (0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0)  # hyperprior bases: Δ over the trained range, log-spaced
BATCH_IMAGES = 2
START_FRACTION = 0.25
VALIDATION = {
    "avif": [{"quality": q, "scale": s, "speed": SPEED} for s in (1, 2) for q in (0, 20, 40)],
    "hyperprior": [{"base_step": step, "scale": 1} for step in (0.71, 2.0, 4.0)],
    "latent": [{"quality": q, "scale": s, "speed": LATENT_SPEED} for q, s in ((0, 1), (20, 1), (35, 1), (20, 2))],
}


def base_kind(config: str) -> str:
    """The base layer a training config's decoder is for."""
    return "hyperprior" if config.endswith("-hyperprior") else "avif"


def is_latent(config: str) -> bool:
    """Whether a training config's decoder runs in an autoencoder's latent (detail.LatentDetail)."""
    return config.startswith("latent-")


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
        multiple = LATENT_DOWNSAMPLING * 2 ** (len(CONFIGS[settings.config]["widths"]) - 1)
        if is_latent(settings.config) and settings.crop % multiple:
            raise SettingsError("crop", f"the latent configs' training crop must be a multiple of {multiple} (whole latent cells)")

    def __init__(self, settings: TrainSettings, train, validation, device):
        super().__init__(settings, train, validation, device)
        crop = settings.crop
        self.train = [image for image in train if min(image.shape[:2]) >= crop]
        if not self.train:
            raise SettingsError("crop", f"no training image is at least {crop}×{crop} pixels")
        held_out = [image for image in validation if min(image.shape[:2]) >= crop][:8]
        self.pairs = None
        if is_latent(settings.config):
            autoencoder = load_model(settings.model or DEFAULT_AUTOENCODER, device)
            self.pairs = LatentPairs(autoencoder, self.train, crop, device)
            self.validation = LatentPairs(autoencoder, held_out, crop, device, VALIDATION["latent"]).centre_crops()
            return
        if base_kind(settings.config) == "hyperprior":
            self.base_layer = HyperpriorBase(hyperprior_folder(settings))
        else:
            self.base_layer = AvifBase()
        self.payloads: dict[tuple, bytes] = {}
        self.validation = self._validation_batch(held_out)

    def new_model(self):
        return DetailDecoder(**CONFIGS[self.settings.config])

    def draw_base_config(self, rng: np.random.Generator) -> dict:
        """The settings of one training base, drawn from the grid of its kind."""
        if self.base_layer.name == "hyperprior":
            return {"base_step": float(rng.choice(BASE_STEPS)), "scale": 1}
        return {"quality": int(rng.choice(QUALITIES)), "scale": int(rng.choice(SCALES)), "speed": SPEED}

    def base(self, index: int, config: dict) -> torch.Tensor:
        """The base of training image `index` at `config`, (1, 3, H, W) in [−1, 1]."""
        image = self.train[index]
        key = (index, *sorted(config.items()))
        if key in self.payloads:
            return self.base_layer.decode(self.payloads[key], *image.shape[:2], config)
        self.payloads[key], picture = self.base_layer.encode_with_picture(image, config)
        return picture

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        per_image = self.settings.batch_size // BATCH_IMAGES
        if self.pairs is not None:
            x, base, rate, scale = self.pairs.draw(rng, BATCH_IMAGES, per_image)
        else:
            x, base, rate, scale = self._pixel_batch(rng, per_image)
        count = len(x)
        t = torch.from_numpy(rng.random(count, dtype=np.float32))
        t = torch.where(torch.from_numpy(rng.random(count)) < START_FRACTION, torch.ones_like(t), t).to(self.device)
        noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)).to(self.device)
        residual = x - base
        decoder = getattr(wrapped, "module", wrapped)  # data parallelism wraps the model
        estimate = wrapped(noisy_state(decoder, residual, noise, t), base, rate, scale, t)
        mse = ((estimate - residual) ** 2).mean()
        return mse, {"mse": float(mse.detach())}

    def _pixel_batch(self, rng, per_image: int) -> tuple[torch.Tensor, ...]:
        """(x, base, rate, scale) of BATCH_IMAGES images × `per_image` crops, each with one dihedral transform."""
        crop = self.settings.crop
        xs, bases, rates, scales = [], [], [], []
        for index in rng.integers(len(self.train), size=BATCH_IMAGES):
            config = self.draw_base_config(rng)
            image = torch.from_numpy(np.array(self.train[index])).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
            base = self.base(int(index), config)
            for _ in range(per_image):
                y, x = rng.integers(image.shape[2] - crop + 1), rng.integers(image.shape[3] - crop + 1)
                pair = torch.cat([image, base])[:, :, y : y + crop, x : x + crop]
                pair = _dihedral(pair, int(rng.integers(8)))
                xs.append(pair[0])
                bases.append(pair[1])
                rates.append(self.base_layer.rate(config))
                scales.append(config["scale"])
        x, base = torch.stack(xs).to(self.device), torch.stack(bases).to(self.device)
        rate = torch.tensor(rates, dtype=torch.float32, device=self.device)
        scale = torch.tensor(scales, dtype=torch.float32, device=self.device)
        return x, base, rate, scale

    def _validation_batch(self, images: list[np.ndarray]) -> dict:
        """Centre crops of held-out images with their bases at the VALIDATION settings, made once."""
        crop, rows = self.settings.crop, []
        for image in images:
            y, x = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
            original = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
            for config in VALIDATION[self.base_layer.name]:
                base = self.base_layer.encode_with_picture(image, config)[1]
                crops = original[..., y : y + crop, x : x + crop], base[..., y : y + crop, x : x + crop]
                rows.append((*crops, self.base_layer.rate(config), config["scale"]))
        if not rows:
            return {}
        return {
            "x": torch.cat([r[0] for r in rows]).to(self.device),
            "base": torch.cat([r[1] for r in rows]).to(self.device),
            "rate": torch.tensor([float(r[2]) for r in rows], device=self.device),
            "scale": torch.tensor([float(r[3]) for r in rows], device=self.device),
        }

    def validate(self, model) -> dict:
        """PSNR gain of the first sampling call's estimate over the base, per scale (fixed noise); in the
        latent for the latent configs (no clamp there: latents are not bounded)."""
        v = self.validation
        if not v:
            return {"val_gain_s1": float("nan"), "val_gain_s2": float("nan")}
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(v["x"].shape, generator=generator).to(self.device)
        start = torch.ones(len(v["x"]), device=self.device)
        estimate = model(noisy_state(model, torch.zeros_like(noise), noise, start), v["base"], v["rate"], v["scale"], start)
        out = {}
        for scale in (1, 2):
            rows = v["scale"] == scale
            if not rows.any():  # hyperprior bases are all at scale 1
                out[f"val_gain_s{scale}"] = float("nan")
                continue
            before = ((v["base"][rows] - v["x"][rows]) ** 2).mean()
            restored = v["base"][rows] + estimate[rows]
            restored = restored if self.pairs is not None else restored.clamp(-1, 1)
            after = ((restored - v["x"][rows]) ** 2).mean()
            out[f"val_gain_s{scale}"] = float(10 * torch.log10(before / after))
        return out


    @classmethod
    def export(cls, settings: TrainSettings, trained: Path, metrics: dict, folder: Path) -> None:
        """The decoder's weights; a hyperprior-base decoder also keeps its base model, in HYPERPRIOR_FOLDER;
        a latent decoder is written to LATENT_FOLDER beside a copy of its autoencoder's vae/."""
        if is_latent(settings.config):
            save_trained(cls.model_class, trained, settings.weights_dtype, folder / LATENT_FOLDER)
            copy_weights(model_folder(settings.model or DEFAULT_AUTOENCODER) / "vae", folder / "vae")
            return
        super().export(settings, trained, metrics, folder)
        if base_kind(settings.config) == "hyperprior":
            copy_weights(hyperprior_folder(settings), folder / HYPERPRIOR_FOLDER)


def model_folder(reference: str) -> Path:
    """The local folder of a model reference (`--model`); SettingsError for a hub id, which has none."""
    folder = resolve_folder(reference)
    if folder is None:
        raise SettingsError("model", f"hfd's --model must be builtin:NAME, a folder or a URL; got {reference!r}")
    return folder


def copy_weights(source: Path, target: Path) -> None:
    """The files a loader reads from the folder `source` (`weights_files`), into `target`."""
    for name in weights_files(source):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)


def hyperprior_folder(settings: TrainSettings) -> Path:
    """The local folder of the hyperprior model a hyperprior config trains on (`--model`, or the built-in)."""
    return model_folder(settings.model or DEFAULT_HYPERPRIOR)


def _dihedral(pair: torch.Tensor, choice: int) -> torch.Tensor:
    """One of the 8 flips/rotations, the same for image and base."""
    if choice & 1:
        pair = pair.flip(2)
    if choice & 2:
        pair = pair.flip(3)
    if choice & 4:
        pair = pair.transpose(2, 3)
    return pair
