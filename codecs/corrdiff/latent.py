"""CorrDiff for latent-denoise: its few-step latent sampler corrected by a privileged end-to-end decode of
the transmitted latent, with the same knob as CorrDiff for HFD (codec.py; the paper's §4 says the
correction applies to any diffusion decoder of a transmitted representation).

    encoder: image ─► latent-denoise's payload (ẑ's words, t, γ) ─► ẑ, t, Δ·s as its decoder reads them
             for strengths g on a grid: decode(ẑ, g); keep the smallest g within `max_psnr_loss` of g = 1
             payload = [level of g: one byte] + latent-denoise's payload
    decoder: ẑ ─► end-to-end estimate ẑ_e: LatentRestorer(ẑ, Δ·s) where the model has one, else `estimate`
             DDIM from t on the corrected x̂0 = lerp(x̂0, ẑ_e, λ(τ)), λ(τ) = min(1, g·(1 + τ)), τ = t/T
             ─► VAE decoder ─► image

What this file decides (the correction and its derivation are in correction.py, the restorer in
restorer.py, its training in latent_task.py):
- latent-denoise's parameters are this codec's, with their meaning; `timestep` defaults to `predict`
  here (with `off`, t = 0: there is no sampler to correct, and the picture is that of
  lerp(ẑ, ẑ_e, min(1, g)), the correction's last estimate). `search` is not offered: its LPIPS choice
  of t and this encoder's PSNR choice of g would pull two ways.
- The end-to-end decoder: a restorer, a network trained for pixel MSE through the frozen VAE decoder
  (restorer.py, latent_task.py), where the model folder ships one in `corrdiff_latent/` (builtin:taef2,
  builtin:ldm-small) or `restorer` names one. Without one (a model folder that ships none, or
  `restorer=none`), `estimate` says which:
  - `unet` (the default): the UNet's own x̂0 from x_t = √ᾱ_t̂·ẑ at the predicted t̂ = t / t_scale, one
    call. The UNet is trained for the MSE of x̂0 in the latent, so this is the posterior mean E[z | ẑ]
    under the Gaussian reading of the quantization error: an MSE decoder that needs no weights of its
    own, but for the latent's MSE, not the picture's: with builtin:taef2 it was 0.1 dB above the
    sampler's picture on Kodak (MODELS.md).
  - `latent`: the latent codec's own decode ẑ = (q·Δ + μ)·s + b, the hyperprior's mean (the picture at
    perception 0 is latent-denoise's t = 0 decode). With builtin:taef2's UNet it is no MSE end: at
    latent-denoise's former defaults the sampler's picture had the higher PSNR, and at its present ones
    it wins on PSNR and LPIPS alike (MODELS.md). Streams made before `estimate` existed name none and
    decode as `latent`, as they did.
- The fingerprint is SHA-256(latent-denoise's ‖ the restorer's), or latent-denoise's alone without a
  restorer: a stream is bound to the end-to-end decoder it was made with, and `encode --embed-model`
  copies `corrdiff_latent/` beside `latent_denoise/` when there is one. Streams of builtin:taef2 made
  before it shipped a restorer are found with `restorer=none` (`builtin_weights`).
- The privileged level and the knob are CorrDiff's (correction.py): PSNR only, 2 bits, `perception`
  0 = the end-to-end decode VAE(ẑ_e), 1 = latent-denoise's own decode bit for bit, ½ = the encoder's choice.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..base import Codec, DecodeCost, Param
from ..container import Header, unpack
from ..errors import ModelError
from ..latent_denoise.codec import LatentDenoiseCodec, denoise, posterior_mean
from ..parts.denoisers import DiffusionDenoiser
from ..parts.metrics import psnr
from ..parts.colour import apply_colour, fit_colour, split_colour
from ..parts.models import PRECISIONS, builtin_model_weights, fingerprint, load_codec_model, part_folder
from .correction import LEVELS, CorrectedDenoiser, correction_weight, privileged_level, split_level, strength
from .restorer import LatentRestorer

RESTORER_FOLDER = "corrdiff_latent"  # where a model folder keeps its end-to-end restorer
NO_RESTORER = "none"  # the `restorer` that uses none, even where the model ships one
# Not latent-denoise's: the colour transform too, which follows the whole payload and is fitted to this
# codec's picture (the inner latent-denoise payload carries none).
OWN_PARAMS = ("restorer", "estimate", "perception", "max_psnr_loss", "colour")


@functools.lru_cache(maxsize=4)
def load_restorer(folder: str, device: str) -> tuple[LatentRestorer, bytes]:
    restorer, _ = load_codec_model(
        folder, LatentRestorer, device, f"train one with `diffarc train corrdiff-latent --model MODEL --out {folder}`"
    )
    return restorer, fingerprint({"restorer": restorer})


def restorer_folder(model_reference: str, restorer: str) -> Path | None:
    """The restorer's folder: the explicit reference, else `corrdiff_latent/` inside the model's folder;
    None for `none` or when the model ships none (`estimate` then makes the end-to-end estimate)."""
    if restorer == NO_RESTORER:
        return None
    folder = part_folder(model_reference, restorer, RESTORER_FOLDER, "restorer")
    return folder if restorer or folder.is_dir() else None


class LatentCorrDiffCodec(Codec):
    name = "corrdiff-latent"
    description = "latent-denoise corrected by an end-to-end MSE restorer of its latent, with a perception knob (CorrDiff)."
    params = (
        *(
            p if p.name != "timestep" else Param(
                "timestep", str, "predict", "t: predicted from the quantized latent, or off (t = 0)", choices=("predict", "off")
            )
            for p in LatentDenoiseCodec.params
        ),
        Param("restorer", str, "", "end-to-end latent restorer (folder or URL); default: the model's corrdiff_latent/ "
              f"if it has one; {NO_RESTORER}: `estimate` makes the estimate", location=True),
        Param("estimate", str, "unet", "the end-to-end estimate where there is no restorer: the UNet's x̂0 at the "
              "predicted t (one call), or the latent codec's own ẑ", choices=("unet", "latent"), absent="latent"),
        Param("perception", float, 0.5, "0: the end-to-end (MSE) decode … ½: the encoder's choice … 1: plain latent-denoise",
              minimum=0.0, maximum=1.0, decode_time=True),
        Param("max_psnr_loss", float, 0.3, "encoder: the most PSNR (dB) its choice may lose to the end-to-end decode",
              minimum=0.0, maximum=20.0),
    )  # fmt: skip
    presets = LatentDenoiseCodec.presets

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self.latent = LatentDenoiseCodec(device, **self._latent_params(self.config))
        self.restorer_dir = restorer_folder(self.config["model"], self.config["restorer"])
        self.restorer, self._fingerprint = None, self.latent.fingerprint
        if self.restorer_dir is not None:
            self.restorer, restorer_fingerprint = load_restorer(str(self.restorer_dir), str(device))
            self._fingerprint = hashlib.sha256(self.latent.fingerprint + restorer_fingerprint).digest()

    @classmethod
    def builtin_weights(cls) -> dict:
        """The latent codecs' built-in weights, and each without its restorer: builtin:taef2 shipped none
        before 2026-12-07 (session 6), and the streams made then decode as they did."""
        weights = builtin_model_weights()
        return {**weights, **{f"{reference} without its restorer": {**params, "restorer": NO_RESTORER}
                              for reference, params in weights.items()}}  # fmt: skip

    @staticmethod
    def _latent_params(config: dict) -> dict:
        return {**{k: v for k, v in config.items() if k not in OWN_PARAMS}, "colour": "off"}

    @property
    def fingerprint(self) -> bytes:
        return self._fingerprint

    def weights_folders(self) -> dict:
        restorer = {RESTORER_FOLDER: self.restorer_dir} if self.restorer is not None else {}
        return {**self.latent.weights_folders(), **restorer}

    def _latent_header(self, height: int, width: int, config: dict) -> Header:
        """The header of the latent-denoise stream this codec's inner payload would be."""
        return Header(LatentDenoiseCodec.name, self.latent.split_params(self._latent_params(config))[0], b"",
                      width=width, height=height)  # fmt: skip

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        header, payload = unpack(stream)
        config = self.stream_config(header)
        chosen, inner = split_level(split_colour(payload, config, self.name)[0])
        inner_header = self._latent_header(header.height, header.width, config)
        t = self.latent.side_info(inner, inner_header)[0]
        return {"chosen_strength": chosen, "t": t}

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """latent-denoise's cost for its payload, plus the restorer's pass if there is one."""
        config = self.stream_config(header)
        inner = split_level(split_colour(payload, config, self.name)[0])[1]
        cost = self.latent.decode_cost(self._latent_header(header.height, header.width, config), inner)
        return DecodeCost(cost.pixels, cost.passes + (self.restorer is not None or config["estimate"] == "unet"))

    # ------------------------------------------------------------------ encode: the privileged choice

    @torch.inference_mode()
    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        payloads = []
        for image, inner in zip(images, self.latent.encode_payloads(images), strict=True):
            size = image.shape[:2]
            z_hat, t, estimate = self._restored(inner, self._latent_header(*size, self.config), self.config)
            picture = lambda level: self.picture(z_hat, t, estimate, self.config, level / (LEVELS - 1), size)  # noqa: E731
            level = privileged_level(lambda lv: psnr(image, picture(lv)), self.config["max_psnr_loss"])
            payload = bytes([level]) + inner
            if self.config["colour"] == "affine":  # fitted at the strength chosen; the casts are the autoencoder's at any
                payload += fit_colour(image, picture(level))
            payloads.append(payload)
        return payloads

    def _restored(self, inner: bytes, header: Header, config: dict) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(ẑ, t, ẑ_e): what latent-denoise's decoder reads from its payload, and the end-to-end estimate."""
        z_hat, t, channel_step = self.latent.dequantized(inner, header)
        if self.restorer is not None:
            return z_hat, t, self.restorer(z_hat, channel_step).float()
        if config["estimate"] == "latent" or t == 0:
            return z_hat, t, z_hat
        # The sent t is t_scale times the prediction; the posterior mean wants the prediction itself.
        predicted = min(self.latent.predictors.config.max_timestep, round(t / config["t_scale"]))
        denoiser = DiffusionDenoiser.from_model(self.latent.model, PRECISIONS[config["precision"]])
        return z_hat, t, posterior_mean(denoiser, z_hat, predicted).float()

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        images = []
        for payload, header in zip(payloads, headers, strict=True):
            config = self.stream_config(header)
            payload, colour = split_colour(payload, config, self.name)
            chosen, inner = split_level(payload)
            z_hat, t, estimate = self._restored(inner, self._latent_header(header.height, header.width, config), config)
            g = strength(config["perception"], chosen)
            image = self.picture(z_hat, t, estimate, config, g, (header.height, header.width))
            images.append(image if colour is None else apply_colour(image, colour))
        return images

    def picture(self, z_hat: torch.Tensor, t: int, estimate: torch.Tensor, config: dict, g: float,
                size: tuple[int, int]) -> np.ndarray:  # fmt: skip
        """The picture at strength g: 0 is latent-denoise's own decode, 1 the end-to-end decode VAE(ẑ_e)."""
        denoiser = DiffusionDenoiser.from_model(self.latent.model, PRECISIONS[config["precision"]])
        if g == 0.0:
            latent = denoise(denoiser, z_hat, t, config["steps"], config["renoise"])
        elif t == 0:  # no sampler: the correction of its only estimate, ẑ itself
            latent = torch.lerp(z_hat, estimate, correction_weight(g, 0.0))
        else:
            latent = denoise(CorrectedDenoiser(denoiser, estimate, g), z_hat, t, config["steps"], config["renoise"])
        return self.latent.pixels(latent, config, size)
