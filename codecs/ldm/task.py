"""Training the built-in latent diffusion model: the autoencoder, then a diffusion UNet on its latents.

    autoencoder:  random crop + flip ──► AutoencoderKL ──► L1 + λ·LPIPS-squeeze (+ tiny KL)
    decoder:      the same, from a trained model's autoencoder with its encoder frozen: only the decoder learns
    diffusion:    image (and its mirror) ──frozen VAE──► latents × scaling ──► random latent crop
                  ──► UNet2DModel with the config's objective (nets.py): ε under SD's schedule (ldm-small),
                      v under the cosine schedule, or rectified flow (taef2-*)
    output:       autoencoder: vae/;   diffusion: vae/ (with the learnt scaling, or taef2's own) + unet/ + scheduler/

Choices:
- Latents are the posterior's mode, not a sample: codecs encode with the mode, so the decoder is trained
  on exactly what it will see. A KL weight of 1e-6 only keeps the latents from drifting in scale.
- The latent scaling factor is 1 / std of the training latents (SD's recipe), stored in vae/config.json.
- The diffusion model's latents are computed once, before the loop: the autoencoder is frozen. taef2's are
  read from the disk cache keyed by its fingerprint (parts/crops.py): 20 CPU-minutes saved per run.
- Validation: held-out x̂0-MSE at six log-SNR levels, the same noise and crops at every report, through the
  codecs' own denoiser (parts/denoisers.py): one figure that compares ε, v and flow models.
- `decoder` leaves the latent space exactly as it was, so everything trained on the latents (the UNet,
  latent-denoise's predictors, corrdiff-latent's restorer, which only stays inside the quantization
  cell) stays valid: a better decoder raises every latent codec's ceiling without retraining them.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel

from ..parts.crops import center_crops, latent_crops, random_crops, training_latents
from ..parts.denoisers import DiffusionDenoiser, noise_schedule, timestep_at
from ..parts.latents import encode_latents
from ..parts.models import load_model
from ..task import SettingsError, TrainingTask, TrainSettings, save_trained
from .nets import AUTOENCODER_CONFIGS, DIFFUSION_CONFIGS, AutoencoderPass, new_autoencoder, new_scheduler, new_unet

KL_WEIGHT = 1e-6
NOISE_LEVELS = (50, 250, 500, 750, 950)  # timesteps at which an ε model's validation ε-MSE is reported
LOG_SNR_LEVELS = (-4, -2, 0, 2, 4, 6)  # log(ᾱ / (1 − ᾱ)) at which every model's held-out x̂0-MSE is reported
VALIDATION_CROPS = 32


def psnr_batch(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1], after rounding to 8 bits as a viewer would see them."""
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = ((to8(x) - to8(y)) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


class AutoencoderTask(TrainingTask):
    name = "autoencoder"
    model_class = AutoencoderKL
    progress = ("val PSNR {val_psnr:.2f} dB",)
    export_folder = "vae"
    configs = tuple(AUTOENCODER_CONFIGS)

    @classmethod
    def check(cls, settings: TrainSettings) -> None:
        super().check(settings)
        if settings.lpips_weight > 0 and not settings.lpips_weights:
            raise SettingsError("lpips_weights", "the LPIPS loss needs the LPIPS-squeeze weights, or an LPIPS weight of 0")

    def __init__(self, settings: TrainSettings, train, validation, device):
        super().__init__(settings, train, validation, device)
        self.train = train
        self.validation = center_crops(validation, settings.crop).to(device)
        self.lpips = None
        if settings.lpips_weight > 0:
            from ..parts.metrics import lpips_network

            self.lpips = lpips_network(settings.lpips_weights, device)

    def new_model(self):
        return new_autoencoder(self.settings.config)

    def wrap(self, model):
        return AutoencoderPass(model)

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        x = random_crops(self.train, self.settings.batch_size, self.settings.crop, rng).to(self.device)
        reconstruction, kl = wrapped(x)
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


class DecoderTask(AutoencoderTask):
    name = "decoder"
    required = {"model": "fine-tuning a decoder needs the model whose autoencoder it comes from (--model)"}

    def new_model(self):
        return copy.deepcopy(load_model(self.settings.model).vae).float()  # loaded models come frozen

    def wrap(self, model):
        # Frozen here rather than in new_model, so that a resumed run (whose model comes from a checkpoint)
        # freezes it too; parameters without gradients are skipped by AdamW and by the clipping.
        model.requires_grad_(True)
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
        return super().wrap(model)


class DiffusionTask(TrainingTask):
    name = "diffusion"
    model_class = UNet2DModel
    progress = ("val x0-MSE {val_x0_mse:.4f}",)
    required = {"autoencoder": "training the diffusion model needs the autoencoder's reference"}
    configs = tuple(DIFFUSION_CONFIGS)

    def __init__(self, settings: TrainSettings, train, validation, device):
        super().__init__(settings, train, validation, device)
        self.spec = DIFFUSION_CONFIGS[settings.config]
        autoencoder = load_model(settings.autoencoder)
        self.vae = autoencoder.vae.to(device)
        self.latent_crop = settings.crop // 8
        if self.spec.own_scaling:  # the autoencoder's diffusion space, its latents cached on disk by its fingerprint
            encode, cache = (lambda x: encode_latents(autoencoder, x)), autoencoder.autoencoder_fingerprint.hex()
        else:  # raw latents: the scaling is learnt here
            encode, cache = (lambda x: self.vae.encode(x).latent_dist.mode()), None
        self.train = training_latents(encode, train, settings.crop, device, mirrored=True, cache=cache)
        self.validation = training_latents(encode, validation, settings.crop, device, mirrored=False, cache=cache)
        self.scaling_factor = (
            autoencoder.scaling_factor if self.spec.own_scaling else 1.0 / float(torch.cat([z.flatten() for z in self.train]).std())
        )
        self.crop_scale = 1.0 if self.spec.own_scaling else self.scaling_factor
        self.scheduler = new_scheduler(self.spec.objective)

    def new_model(self):
        return new_unet(self.spec.unet, self.train[0].shape[0])

    def _crops(self, latents, count, rng) -> torch.Tensor:
        return latent_crops(latents, count, self.latent_crop, rng) * self.crop_scale

    def loss(self, wrapped, rng) -> tuple[torch.Tensor, dict]:
        z0 = self._crops(self.train, self.settings.batch_size, rng)
        noise = torch.from_numpy(rng.standard_normal(z0.shape, dtype=np.float32)).to(self.device)
        if self.spec.objective == "flow":  # σ uniform in (0, 1]; the network sees σ·T as its timestep
            sigma = torch.from_numpy(1 - rng.random(len(z0), dtype=np.float32)).to(self.device)
            s = sigma.view(-1, 1, 1, 1)
            prediction = wrapped((1 - s) * z0 + s * noise, sigma * self.scheduler.config.num_train_timesteps).sample
            return F.mse_loss(prediction, noise - z0), {}
        t = torch.from_numpy(rng.integers(0, 1000, size=len(z0))).to(self.device)
        noisy = self.scheduler.add_noise(z0, noise, t)
        target = self.scheduler.get_velocity(z0, noise, t) if self.spec.objective == "v" else noise
        return F.mse_loss(wrapped(noisy, t).sample, target), {}

    def validate(self, model) -> dict:
        """x̂0-MSE on held-out latent crops at fixed log-SNR levels: comparable across objectives (the
        ablation's figure); ε-MSE at fixed timesteps too for an ε model (ldm-small's figures)."""
        rng = np.random.default_rng(12345)  # the same crops and noise at every report: figures comparable over time
        z0 = self._crops(self.validation, VALIDATION_CROPS, rng)
        noise = torch.from_numpy(rng.standard_normal(z0.shape, dtype=np.float32)).to(self.device)
        table, prediction_type = noise_schedule(self.scheduler)
        denoiser = DiffusionDenoiser(model, table, prediction_type, timestep_scale=self.scheduler.config.num_train_timesteps)
        metrics = {}
        for level in LOG_SNR_LEVELS:
            alpha_bar = 1 / (1 + math.exp(-level))
            noisy = alpha_bar**0.5 * z0 + (1 - alpha_bar) ** 0.5 * noise
            t = torch.full((len(z0),), timestep_at(table, alpha_bar), device=self.device)
            metrics[f"val_x0_mse_lsnr{level:+d}"] = float(F.mse_loss(denoiser.predict(noisy, t, alpha_bar)[0], z0))
        metrics["val_x0_mse"] = float(np.mean(list(metrics.values())))
        if self.spec.objective == "epsilon":
            by_level = {}
            for level in NOISE_LEVELS:
                t = torch.full((len(z0),), level, device=self.device)
                noisy = self.scheduler.add_noise(z0, noise, t)
                by_level[f"val_eps_mse_t{level}"] = float(F.mse_loss(model(noisy, t).sample, noise))
            metrics.update(val_eps_mse=float(np.mean(list(by_level.values()))), **by_level)
        return {**metrics, "scaling_factor": self.scaling_factor}

    @classmethod
    def export(cls, settings: TrainSettings, trained: Path, metrics: dict, folder: Path) -> None:
        """vae/ + unet/ + scheduler/: a model folder codecs load. vae/ is the frozen autoencoder with the learnt
        scaling, or an autoencoder with its own scaling (taef2) copied file for file; a model shipped in
        its autoencoder's folder (builtin:taef2) takes only unet/ and scheduler/ from here."""
        spec = DIFFUSION_CONFIGS[settings.config]
        autoencoder = load_model(settings.autoencoder)
        if spec.own_scaling:
            shutil.copytree(autoencoder.folder / "vae", folder / "vae")
        else:
            vae = copy.deepcopy(autoencoder.vae)
            vae.register_to_config(scaling_factor=metrics["scaling_factor"])
            vae.to(settings.weights_dtype).save_pretrained(str(folder / "vae"))
        save_trained(UNet2DModel, trained, settings.weights_dtype, folder / "unet")
        new_scheduler(spec.objective).save_pretrained(str(folder / "scheduler"))
