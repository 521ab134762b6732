"""Training the built-in models on Ray Train: the latent autoencoder, then a diffusion model on its latents.

    images (any fsspec folder) ──list_sources / fetch / load_rgb──► train split │ held-out split (5 %, by key hash)
        train_autoencoder:  random crop + flip ──► AutoencoderKL ──► L1 + λ·LPIPS-squeeze (+ tiny KL)
        train_diffusion:    image (and its mirror) ──frozen VAE──► latents × scaling ──► random latent crop
                            ──► UNet2DModel, ε-prediction, DDIM/DDPM noise schedule of Stable Diffusion
    every --checkpoint-minutes: checkpoint = {model/ (diffusers format), optimizer.pt, progress.json}
    end: the driver turns the last checkpoint into a diffusers model folder (vae/, unet/, scheduler/)

Choices:
- Latents are the posterior's mode, not a sample: codecs encode with the mode, so the decoder is trained
  on exactly what it will see. A KL weight of 1e-6 only keeps the latents from drifting in scale.
- No attention in the autoencoder's middle block: a full-size image (Kodak: 96×64 latents) would make
  it the slowest layer on a CPU, and convolutions alone run on any size.
- ε-prediction with Stable Diffusion's schedule (1000 steps, scaled-linear β from 0.00085 to 0.012), so
  the codecs drive the built-in model and an SD 2.1-base mirror through the same code path.
- The latent scaling factor is 1 / std of the training latents (SD's recipe), stored in vae/config.json.
- Resume: re-running with the same --work-dir continues from the newest checkpoint there (Ray Train's
  own restore when it has one, else the newest checkpoint folder found on disk). The data order is a
  function of the step number, so a resumed run sees the batches it would have seen.
- Checkpoints hold weights as safetensors; the optimizer state is a torch file read back with
  `weights_only=True` (no arbitrary unpickling), and only from the run's own work dir.
"""

from __future__ import annotations

import hashlib
import json
import copy
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..codecs.errors import ImageLoadError
from .images import DEFAULT_MAX_PIXELS, load_rgb
from .sources import fetch, list_sources

VALIDATION_PERCENT = 5
KL_WEIGHT = 1e-6
NOISE_LEVELS = (50, 250, 500, 750, 950)  # timesteps at which the diffusion validation loss is reported
DENOISE_VALIDATION_STEPS = (1.0, 2.0, 4.0)  # quantization steps Δ at which latent-denoise is validated
WARMDOWN_FRACTION = 0.25  # the learning rate falls linearly to 10 % over the last quarter of --steps


def learning_rate(base: float, step: int, total: int) -> float:
    """Constant, then a linear warm-down: the last steps at a small rate settle the weights (where a constant rate keeps them jittering)."""
    start = total * (1 - WARMDOWN_FRACTION)
    if step < start:
        return base
    return base * (1 - 0.9 * min(1.0, (step - start) / max(total - start, 1)))

AUTOENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    # Sized for a CPU: about 1 M parameters, trainable on 2 shared cores in an hour. 16 latent channels:
    # with 8 the bottleneck held reconstructions near 22 dB on Kodak (see MODELS.md).
    "small": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16),
    # For a GPU run: SD's VAE layout at a quarter of its width.
    "base": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=16, latent_channels=16),
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    "small": dict(
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    "base": dict(
        block_out_channels=(128, 256, 384), layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}  # fmt: skip
PREDICTOR_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=16, mixtures=2),
    "small": dict(hidden=64, mixtures=4),
    "base": dict(hidden=128, mixtures=6),
}
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="leading",
)  # fmt: skip


@dataclass
class TrainSettings:
    """Everything a training run needs; the click command fills it, the worker loop reads it."""

    what: str  # "autoencoder", "diffusion" or "latent-denoise"
    data: str
    out: str
    work_dir: str
    steps: int = 2000
    batch_size: int = 8
    crop: int = 256
    lr: float = 2e-4
    workers: int = 1
    gpu: bool = False
    checkpoint_minutes: float = 5.0
    report_seconds: float = 30.0
    config: str = "small"
    autoencoder: str | None = None  # diffusion: the model reference of the frozen autoencoder
    model: str | None = None  # latent-denoise: the frozen latent diffusion model the predictors serve
    lpips_weights: str | None = None
    lpips_weight: float = 0.5
    save_dtype: str = "float32"
    storage_options: dict = field(default_factory=dict)
    seed: int = 0
    max_images: int | None = None  # use only the first N images (smoke tests)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger training images are skipped, as encode would skip them


# ---------------------------------------------------------------- data


def is_validation_key(key: str) -> bool:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < VALIDATION_PERCENT


def load_training_images(settings: TrainSettings) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, validation) images; at least one image is held out, even from a tiny folder."""
    items = list_sources(settings.data, settings.storage_options or None).items
    if settings.max_images:
        items = items[: settings.max_images]
    train, validation = [], []
    for item in items:
        try:
            image = load_rgb(fetch(item, settings.storage_options or None), settings.max_pixels)
        except ImageLoadError as exc:
            print(f"skipping {item.key}: {exc}", flush=True)
            continue
        (validation if is_validation_key(item.key) else train).append(image)
    if not validation and len(train) > 1:
        validation.append(train.pop())
    if not train:
        raise ValueError(f"no training images under {settings.data}")
    return train, validation


def fit_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """Mirror-pad an image smaller than the crop so every image yields full crops."""
    pad_h, pad_w = max(0, crop - image.shape[0]), max(0, crop - image.shape[1])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    return image


def random_crops(images: list[np.ndarray], count: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, 3, crop, crop) in [-1, 1]: random image, random position, random horizontal flip."""
    out = []
    for _ in range(count):
        image = fit_crop(images[rng.integers(len(images))], crop)
        y = rng.integers(image.shape[0] - crop + 1)
        x = rng.integers(image.shape[1] - crop + 1)
        patch = image[y : y + crop, x : x + crop]
        out.append(patch[:, ::-1] if rng.random() < 0.5 else patch)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def center_crops(images: list[np.ndarray], crop: int, limit: int = 16) -> torch.Tensor:
    out = []
    for image in images[:limit]:
        image = fit_crop(image, crop)
        y, x = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
        out.append(image[y : y + crop, x : x + crop])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- models


def new_autoencoder(config: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        mid_block_add_attention=False,
        **AUTOENCODER_CONFIGS[config],
    )


def new_unet(config: str, latent_channels: int):
    from diffusers import UNet2DModel

    return UNet2DModel(in_channels=latent_channels, out_channels=latent_channels, **UNET_CONFIGS[config])


def new_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


class _AutoencoderPass(torch.nn.Module):
    """encode → mode → decode as one forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mode()).sample, posterior.kl().mean()


def psnr_batch(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1], after rounding to 8 bits as a viewer would see them."""
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = ((to8(x) - to8(y)) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


# ---------------------------------------------------------------- checkpoints


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (highest step) under a run's folder, or None."""
    best, best_step = None, -1
    for progress in run_dir.glob("checkpoint_*/progress.json"):
        try:
            step = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written when the run was killed
        if (progress.parent / "model").is_dir() and step > best_step:
            best, best_step = progress.parent, step
    return best


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / "progress.json").read_text())["step"]


def save_checkpoint(folder: Path, model, optimizer, step: int, metrics: dict) -> None:
    model.save_pretrained(str(folder / "model"), safe_serialization=True)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    # Written last: a checkpoint without progress.json is incomplete and never resumed from.
    (folder / "progress.json").write_text(json.dumps({"step": step, "metrics": metrics}))


def load_checkpoint(folder: Path, model_class, optimizer_factory) -> tuple[Any, Any, int]:
    model = model_class.from_pretrained(str(folder / "model"), use_safetensors=True)
    optimizer = optimizer_factory(model)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return model, optimizer, json.loads((folder / "progress.json").read_text())["step"]


# ---------------------------------------------------------------- the per-worker loop


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    settings = TrainSettings(**config["settings"])
    if not settings.gpu:
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    log = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)

    train_images, validation_images = load_training_images(settings)
    log(f"{settings.what}: {len(train_images)} training images, {len(validation_images)} held out")
    task = TASKS[settings.what](settings, train_images, validation_images, device)

    # Ray Train's own restore and the newest folder on disk can disagree when a kill fell between writing
    # a checkpoint and recording it; the one further along wins.
    candidates = [Path(config["resume_from"])] if config["resume_from"] else []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        candidates.append(Path(checkpoint.to_directory()))
    resume = max(candidates, key=checkpoint_step, default=None)
    optimizer_factory = lambda m: torch.optim.AdamW(m.parameters(), lr=settings.lr, weight_decay=0.0)  # noqa: E731
    if resume is not None:
        model, optimizer, step = load_checkpoint(resume, task.model_class, optimizer_factory)
        log(f"resumed from step {step} ({resume})")
    else:
        torch.manual_seed(settings.seed)
        model, step = task.new_model(), 0
        optimizer = optimizer_factory(model)
    model.to(device)
    # Optimizer state tensors must follow the parameters to the device.
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(device)
    trained = ray.train.torch.prepare_model(task.wrap(model), move_to_device=False)

    last_report = last_checkpoint = time.monotonic()
    images_since = 0
    metrics: dict[str, Any] = {}
    while step < settings.steps:
        # The batch depends only on (seed, step, rank): a resumed run sees the same data.
        rng = np.random.default_rng([settings.seed, step, rank])
        model.train()
        loss, parts = task.loss(trained, rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings.lr, step, settings.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        images_since += settings.batch_size * world

        now = time.monotonic()
        report_due = now - last_report >= settings.report_seconds or step == settings.steps
        checkpoint_due = now - last_checkpoint >= settings.checkpoint_minutes * 60 or step == settings.steps
        if report_due or checkpoint_due:
            model.eval()
            with torch.no_grad():
                validation = task.validate(model)
            metrics = {"step": step, "loss": float(loss.detach()), **parts, **validation,
                       "images_per_s": images_since / max(now - last_report, 1e-9)}  # fmt: skip
            log(format_progress(settings, metrics))
            last_report, images_since = now, 0
        if checkpoint_due:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(Path(tmp), model, optimizer, step, metrics)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(metrics)
            log(f"checkpoint at step {step}")
            last_checkpoint = time.monotonic()
    if step >= settings.steps and not metrics:  # resumed a finished run: nothing left to train
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                model.eval()
                with torch.no_grad():
                    metrics = {"step": step, **task.validate(model)}
                save_checkpoint(Path(tmp), model, optimizer, step, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report({})


def format_progress(settings: TrainSettings, m: dict) -> str:
    shown = [f"step {m['step']}/{settings.steps}", f"loss {m['loss']:.4f}"]
    if "val_psnr" in m:
        shown.append(f"val PSNR {m['val_psnr']:.2f} dB")
    if "val_eps_mse" in m:
        shown.append(f"val ε-MSE {m['val_eps_mse']:.4f}")
    if "val_gain_db" in m:
        steps = DENOISE_VALIDATION_STEPS
        shown.append(f"bits {m['bits']:.3f}, val bits/value at Δ " + "|".join(f"{v:g}" for v in steps) + " "
                     + "|".join(f"{m[f'val_bits_d{v:g}']:.3f}" for v in steps)
                     + f", denoising gain {m['val_gain_db']:.2f} dB, t " + "|".join(f"{m[f'val_t_d{v:g}']:.0f}" for v in steps))
    shown.append(f"{m['images_per_s']:.1f} img/s")
    return f"[{settings.what}] " + ", ".join(shown)


class _AutoencoderTask:
    def __init__(self, settings: TrainSettings, train, validation, device):
        from diffusers import AutoencoderKL

        self.settings, self.train, self.device = settings, train, device
        self.model_class = AutoencoderKL
        self.validation = center_crops(validation, settings.crop).to(device)
        self.lpips = None
        if settings.lpips_weight > 0:
            from ..codecs.parts.metrics import lpips_network

            if not settings.lpips_weights:
                raise ValueError("the LPIPS loss needs --lpips-weights (or $DIFFARC_LPIPS_WEIGHTS), or --lpips-weight 0")
            self.lpips = lpips_network(settings.lpips_weights, device)

    def new_model(self):
        return new_autoencoder(self.settings.config)

    def wrap(self, model):
        return _AutoencoderPass(model)

    def loss(self, trained, rng) -> tuple[torch.Tensor, dict]:
        x = random_crops(self.train, self.settings.batch_size, self.settings.crop, rng).to(self.device)
        reconstruction, kl = trained(x)
        l1 = F.l1_loss(reconstruction, x)
        loss = l1 + KL_WEIGHT * kl
        parts = {"l1": float(l1.detach())}
        if self.lpips is not None:
            perceptual = self.lpips(reconstruction, x).mean()
            loss = loss + self.settings.lpips_weight * perceptual
            parts["lpips"] = float(perceptual.detach())
        return loss, parts

    def validate(self, model) -> dict:
        reconstruction = model.decode(model.encode(self.validation).latent_dist.mode()).sample
        return {"val_psnr": psnr_batch(self.validation, reconstruction)}


class _DiffusionTask:
    def __init__(self, settings: TrainSettings, train, validation, device):
        from diffusers import UNet2DModel

        from ..codecs.parts.models import load_model

        if not settings.autoencoder:
            raise ValueError("training the diffusion model needs --autoencoder (a model reference)")
        self.settings, self.device = settings, device
        self.model_class = UNet2DModel
        self.vae = load_model(settings.autoencoder).vae.to(device)
        self.latent_crop = settings.crop // 8
        encode = lambda x: self.vae.encode(x).latent_dist.mode()  # noqa: E731 — raw: the scaling is learnt here
        self.train = training_latents(encode, train, settings.crop, device, mirrored=True)
        self.scaling_factor = 1.0 / float(torch.cat([z.flatten() for z in self.train]).std())
        self.validation = training_latents(encode, validation, settings.crop, device, mirrored=False)
        self.scheduler = new_scheduler()
        self.alphas = self.scheduler.alphas_cumprod.to(device)

    def new_model(self):
        return new_unet(self.settings.config, self.vae.config.latent_channels)

    def wrap(self, model):
        return model

    def _crops(self, latents, count, rng) -> torch.Tensor:
        return latent_crops(latents, count, self.latent_crop, rng) * self.scaling_factor

    def loss(self, trained, rng) -> tuple[torch.Tensor, dict]:
        z0 = self._crops(self.train, self.settings.batch_size, rng)
        noise = torch.from_numpy(rng.standard_normal(z0.shape, dtype=np.float32)).to(self.device)
        t = torch.from_numpy(rng.integers(0, 1000, size=len(z0))).to(self.device)
        noisy = self.scheduler.add_noise(z0, noise, t)
        return F.mse_loss(trained(noisy, t).sample, noise), {}

    def validate(self, model) -> dict:
        rng = np.random.default_rng(12345)  # the same noise at every report: figures comparable over time
        z0 = self._crops(self.validation, 16, rng)
        noise = torch.from_numpy(rng.standard_normal(z0.shape, dtype=np.float32)).to(self.device)
        by_level = {}
        for level in NOISE_LEVELS:
            t = torch.full((len(z0),), level, device=self.device)
            noisy = self.scheduler.add_noise(z0, noise, t)
            by_level[f"val_eps_mse_t{level}"] = float(F.mse_loss(model(noisy, t).sample, noise))
        return {"val_eps_mse": float(np.mean(list(by_level.values()))), **by_level,
                "scaling_factor": self.scaling_factor}  # fmt: skip


class _LatentDenoiseTask:
    """Trains γ-net, t-net and entropy density on a frozen model's latents: min bits + λ(Δ)·MSE after denoising."""

    STEP_RANGE = (0.5, 8.0)  # Δ drawn log-uniformly: from about 1 bpp down to a few hundredths on Kodak

    def __init__(self, settings: TrainSettings, train, validation, device):
        from ..codecs.latent_denoise.nets import LatentDenoisePredictors
        from ..codecs.parts.latents import encode_latents
        from ..codecs.parts.models import load_model

        if not settings.model:
            raise ValueError("training the latent-denoise predictors needs --model (the frozen latent diffusion model)")
        self.settings, self.device = settings, device
        self.model_class = LatentDenoisePredictors
        self.model = load_model(settings.model, str(device))
        if self.model.unet is None:
            raise ValueError(f"model {settings.model} has no diffusion UNet")
        self.latent_crop = settings.crop // 8
        encode = lambda x: encode_latents(self.model, x)  # noqa: E731 — in the diffusion model's space
        self.train = training_latents(encode, train, settings.crop, device, mirrored=True)
        self.validation = latent_crops(
            training_latents(encode, validation, settings.crop, device, mirrored=False), 16, self.latent_crop,
            np.random.default_rng(12345),
        )  # fmt: skip

    def new_model(self):
        from ..codecs.latent_denoise.nets import LatentDenoisePredictors

        return LatentDenoisePredictors(latent_channels=self.model.unet.config.in_channels, **PREDICTOR_CONFIGS[self.settings.config])

    def wrap(self, model):
        from ..codecs.latent_denoise.nets import LatentDenoiseObjective

        return LatentDenoiseObjective(model, self.model).to(self.device)

    def loss(self, trained, rng) -> tuple[torch.Tensor, dict]:
        from ..codecs.latent_denoise.nets import lambda_for_step

        z = latent_crops(self.train, self.settings.batch_size, self.latent_crop, rng)
        low, high = np.log(self.STEP_RANGE)
        step = torch.from_numpy(np.exp(rng.uniform(low, high, len(z)))).float().to(self.device)
        uniform = torch.from_numpy(rng.random(z.shape, dtype=np.float32)).to(self.device)
        bits, error, _, t = trained(z, step, uniform)
        loss = (bits + lambda_for_step(step) * error).mean()  # λ(Δ) makes Δ the rate knob (see its docstring)
        return loss, {"bits": float(bits.mean()), "mse": float(error.mean()), "t": float(t.mean())}

    def validate(self, model) -> dict:
        """Per validation Δ: bits per latent value, and what one denoising step buys over t = 0 (dB)."""
        from ..codecs.latent_denoise.nets import LatentDenoiseObjective

        passes, out = LatentDenoiseObjective(model, self.model).to(self.device), {}
        for value in DENOISE_VALIDATION_STEPS:
            step = torch.full((len(self.validation),), value, device=self.device)
            bits, error, plain, t = passes(self.validation, step, None)
            out[f"val_bits_d{value:g}"] = float(bits.mean())
            out[f"val_gain_db_d{value:g}"] = float(10 * torch.log10(plain.mean() / error.mean()))
            out[f"val_t_d{value:g}"] = float(t.mean())
        out["val_gain_db"] = float(np.mean([out[f"val_gain_db_d{v:g}"] for v in DENOISE_VALIDATION_STEPS]))
        return out


@torch.no_grad()
def training_latents(encode, images: list[np.ndarray], crop: int, device, mirrored: bool) -> list[torch.Tensor]:
    """Each image (and its mirror image) through a frozen encoder once: (C, h, w) latents to crop from."""
    latents = []
    for image in images:
        image = fit_crop(image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8], crop)
        for view in (image, image[:, ::-1]) if mirrored else (image,):
            x = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
            latents.append(encode(x)[0])
    return latents


def latent_crops(latents: list[torch.Tensor], count: int, side: int, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for _ in range(count):
        z = latents[rng.integers(len(latents))]
        y, x = rng.integers(z.shape[1] - side + 1), rng.integers(z.shape[2] - side + 1)
        out.append(z[:, y : y + side, x : x + side])
    return torch.stack(out)


TASKS = {"autoencoder": _AutoencoderTask, "diffusion": _DiffusionTask, "latent-denoise": _LatentDenoiseTask}


# ---------------------------------------------------------------- the driver


def run_training(settings: TrainSettings, address: str | None = None) -> dict:
    """Train (or resume) on Ray Train and write the diffusers model folder to `settings.out`.

    Returns the final metrics. The run's checkpoints live in `<work_dir>/<what>/`.
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .cluster import connect

    work_dir = Path(settings.work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    settings.work_dir = str(work_dir)
    resume = find_resume_checkpoint(work_dir / settings.what)
    connect(address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "settings": asdict(settings),
            "resume_from": str(resume) if resume else None,
            "threads": max(1, cpus // settings.workers),
        },
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=settings.what, storage_path=str(work_dir), checkpoint_config=CheckpointConfig(num_to_keep=2)
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see {work_dir / settings.what}")
    with result.checkpoint.as_directory() as folder:
        progress = json.loads((Path(folder) / "progress.json").read_text())
        export_model(settings, Path(folder) / "model", progress["metrics"])
    return progress["metrics"]


def export_model(settings: TrainSettings, trained: Path, metrics: dict) -> None:
    """Write the diffusers folder: vae/ for the autoencoder; vae/ (with its scaling) + unet/ + scheduler/."""
    from diffusers import AutoencoderKL, UNet2DModel

    dtype = {"float32": torch.float32, "float16": torch.float16}[settings.save_dtype]
    out = Path(settings.out).expanduser()
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    if settings.what == "autoencoder":
        AutoencoderKL.from_pretrained(str(trained)).to(dtype).save_pretrained(str(staging / "vae"))
    elif settings.what == "latent-denoise":  # the folder is the predictors' own: MODEL/latent_denoise/ by default
        from ..codecs.latent_denoise.nets import LatentDenoisePredictors

        LatentDenoisePredictors.from_pretrained(str(trained)).to(dtype).save_pretrained(str(staging))
    else:
        from ..codecs.parts.models import load_model

        vae = copy.deepcopy(load_model(settings.autoencoder).vae)
        vae.register_to_config(scaling_factor=metrics["scaling_factor"])
        vae.to(dtype).save_pretrained(str(staging / "vae"))
        UNet2DModel.from_pretrained(str(trained)).to(dtype).save_pretrained(str(staging / "unet"))
        new_scheduler().save_pretrained(str(staging / "scheduler"))
    (staging / "training.json").write_text(
        json.dumps({"settings": {**asdict(settings), "storage_options": "(not recorded)"}, "metrics": metrics}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def sample_grid(model, path: str | os.PathLike, rows: int = 4, side: int = 256, steps: int = 50, seed: int = 0) -> None:
    """Unconditional DDIM samples of a LatentDiffusionModel, as one PNG grid (rows × rows)."""
    from PIL import Image

    from ..codecs.parts.latents import decode_latents, tensor_to_images

    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    channels = model.unet.config.in_channels
    z = torch.randn((rows * rows, channels, side // 8, side // 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(model.unet(z, t).sample, t, z).prev_sample
        images = np.stack(tensor_to_images(decode_latents(model, z), [(side, side)] * (rows * rows)))
    grid = images.reshape(rows, rows, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(rows * side, rows * side, 3)
    Image.fromarray(grid).save(path)
