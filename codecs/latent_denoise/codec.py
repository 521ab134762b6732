"""Foundation latent denoising (Relic, Azevedo, Gross, Schroers, ECCV 2024; seed 001).

A latent diffusion model's quantized latent is sent; the decoder treats the quantization error as the
noise of the diffusion forward process at a timestep t and removes it with a few denoising steps of the
frozen model. Only small predictors and the entropy model are trained; the backbone is untouched.

    image ─VAE─► z ─γ-net(per-channel stats of z, Δ)─► shift b_c, scale s_c     (fp16, side info)
      y = (z − b) / s ─MeanScaleHyperpriorLatentCodec(Δ)─► ζ's and y's ranges and words
        (ζ = hyper_analysis(y), factorized; y ≈ Gaussians of mean μ and scale σ = hyper_synthesis(ζ̂))
      ẑ = (q·Δ + μ)·s + b ─t-net(stats of ẑ, Δ·s)─► t_scale · t̂ = t               (u16, side info)
    decoder: q ─► ẑ (+ seeded noise: `renoise`, t grows) ─► x_t = √ᾱ_t · ẑ
             ─► DDIM (η = 0), min(steps, t) UNet calls ─► x̂0 ─VAE─► image
             ─► colour transform (colour=affine: 24 bytes the encoder fitted to this picture, parts/colour.py)

Why x_t = √ᾱ_t · ẑ: the forward process makes x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε; scaling ẑ = z + e by √ᾱ_t
gives √ᾱ_t·z + √ᾱ_t·e, the same thing when the quantization error has the noise's variance,
(1−ᾱ_t)/ᾱ_t. The t-net learns that match (and where a uniform error is better treated as more or less
noise than its variance says) from the denoised result.

Choices made here:
- t is predicted from the quantized latent (the paper's way) and also sent, 16 bits: the decoder never
  runs the t-net, so no float rounding on another device can change it. `timestep=search` lets the
  encoder, which has the original, try 0, ½, 1, 1½ and 2 times the prediction and keep the one with the
  best LPIPS; `timestep=off` decodes the quantized latent as it is (t = 0), the baseline the denoising
  is measured against.
- The encoder sends `t_scale` times the predicted t (½ by default). The t-net is trained for the MSE of
  the denoised latent, and a sampler started at the MSE-optimal t returns the smooth posterior mean: with
  builtin:taef2's UNet (issue 22), `predict` at the full t gained 0.4–0.5 dB over t = 0 and lost LPIPS at
  every rate but the highest. Half the predicted t, with `renoise` ½ and 8 steps, beat t = 0 on PSNR and
  LPIPS at every preset on the 17 held-out training images (never Kodak) and on Kodak 24 (MODELS.md), so
  that is the default. The decoder reads only the sent t, so streams made before `t_scale` decode as
  they did. `search` (the best of 0, ½, 1, 1½, 2 × the prediction by LPIPS, 25× slower to encode, needs
  $DIFFARC_LPIPS_WEIGHTS) remains a parameter, and `off` is the baseline.
  History: on builtin:ldm-small (issue 13) `predict` lost LPIPS at every preset (0.364 against `off`'s
  0.337 at 0.15bpp), and `off` was the default until issue 22.
- γ and t come from pooled per-channel statistics, so they cost the same at any image size; the
  predicted γ is rounded to fp16 before the encoder uses it, so both sides quantize with one transform.
- The entropy model is the mean-scale hyperprior (Minnen et al., NeurIPS 2018) over the γ-normalised
  y = (z − b) / s, one for all step sizes Δ, coded by the shared `parts/latent_codecs.MeanScaleHyperpriorLatentCodec`.
  It replaced a per-channel density (one logistic mixture per channel, the same at every position):
  with a step several times a channel's spread, that density sent 0 at most positions, and a 0 decoded to
  the channel's shift b everywhere — whole regions of one flat colour (benchmarks/latent_collapse.py,
  MODELS.md). Now a 0 decodes to the local mean μ the hyperprior predicts, and σ puts the bits where the
  content is. y rather than the raw z: Δ stays a step relative to each channel's spread.
  Streams of the old predictors are refused (their fingerprint differs) with a message saying so.
- Steps: n = min(`steps`, t) DDIM steps evenly spaced from t to 0 — a handful of UNet calls, far under
  10 % of the 1000-step process.
- `renoise` r (the "noise type" gap that Relic et al.'s follow-up, arXiv 2504.02579, names): quantization
  error is not Gaussian (it is the detail the quantizer dropped), and a deterministic sampler started on it
  stays as smooth as its input. With r > 0 the decoder adds seeded Gaussian noise of r times t's noise
  variance to ẑ (parts/noise.py: the same field on every device, any image size) and starts from the
  timestep of the sum, t' with v_t' = (1 + r)·v_t; the fresh noise is what the sampler turns into detail.
  Streams from before it name no `renoise` and decode with none.
- Any image size: edge-padded to what the VAE and UNet need, cropped after decoding.
- `colour=affine` (the default): the autoencoder turns hues (a red hat decodes orange) whatever the rate;
  the encoder decodes its own stream, fits a 3×3 matrix and an offset from that picture to the original,
  and sends them (24 bytes). Streams from before it name no `colour` and decode as they did.

Payload: t (u16), C fp16 shifts, C fp16 scales, y's symbol range (2 × i16), ζ's symbol range (2 × i16),
the length of ζ's words in bytes (u32), ζ's words, y's words (the range coder's 32-bit words), then with
`colour=affine` the 12 fp16 values of the colour transform. bpp counts the whole stream, container
header included.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from ..base import Codec, DecodeCost, Param
from ..container import Header
from ..errors import BitstreamError, EntropyCodingError, ModelError
from ..parts.denoisers import DiffusionDenoiser, timestep_at
from ..parts.latent_codecs import MeanScaleHyperpriorLatentCodec
from ..parts.latents import VAE_DOWNSAMPLING, decode_latents, encode_latents, images_to_tensor, latent_size, tensor_to_images
from ..parts.models import (
    DEFAULT_MODEL, MODEL_PARAM_HELP, PRECISIONS, UNET_PARAM_HELP, builtin_model_weights, check_safetensors, fingerprint,
    load_model, part_folder,
)
from ..parts.colour import COLOUR_BYTES, COLOUR_PARAM, apply_colour, fit_colour, split_colour
from ..parts.noise import gaussian
from ..parts.samplers import ddim, linspace_schedule
from .nets import HYPER_STRIDE, LatentDenoisePredictors

PREDICTORS_FOLDER = "latent_denoise"  # where a model folder keeps its trained predictors
SEARCH_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0)  # timestep=search tries these multiples of the predicted t
RENOISE_SEED = 0x22  # of the noise field `renoise` adds (parts/noise.py: the same numbers on every device)
TIMESTEP = struct.Struct("<H")  # the payload: t, C fp16 shifts, C fp16 scales, CODED, ζ's words, y's words
CODED = struct.Struct("<4s4sI")  # y's symbol range, ζ's symbol range, ζ's words in bytes


def start_timestep(alphas_cumprod: torch.Tensor, t: int, renoise: float) -> int:
    """Where denoising starts: t itself, or with `renoise` r the timestep whose noise variance (in z's units)
    is (1 + r) times t's, v_t = (1 − ᾱ_t)/ᾱ_t, rounded (float64 arithmetic: the same on every machine)."""
    if t == 0 or renoise == 0:
        return t
    alpha_bar = float(alphas_cumprod[t])
    variance = (1 + renoise) * (1 - alpha_bar) / alpha_bar
    return min(len(alphas_cumprod) - 1, int(round(timestep_at(alphas_cumprod, 1 / (1 + variance)))))


def denoise(denoiser: DiffusionDenoiser, z_hat: torch.Tensor, t: int, steps: int, renoise: float = 0.0) -> torch.Tensor:
    """Treat ẑ as the clean part of x_t at timestep t and run min(steps, t) DDIM (η = 0) steps to 0. With
    `renoise` r, first add seeded Gaussian noise of r times t's noise variance to ẑ and start from the
    timestep of the sum (`start_timestep`): the quantization error is not Gaussian, and the fresh noise
    gives the sampler noise of the kind it was trained on to turn into detail."""
    if t == 0:
        return z_hat
    start = start_timestep(denoiser.alphas_cumprod, t, renoise)
    if start != t:
        alpha_bar = denoiser.alpha_bar(t)
        noise = gaussian(RENOISE_SEED, 0, [0], tuple(z_hat.shape[1:]), z_hat.device)
        z_hat = z_hat + (renoise * (1 - alpha_bar) / alpha_bar) ** 0.5 * noise
    # The schedule ends at timestep 0: the UNet runs at every step before it (see samplers.ddim).
    schedule = linspace_schedule(denoiser.alphas_cumprod, min(steps, start) + 1, first=start)
    return ddim(denoiser, schedule.alpha_bar[0] ** 0.5 * z_hat, schedule)


def posterior_mean(denoiser: DiffusionDenoiser, z_hat: torch.Tensor, t: int) -> torch.Tensor:
    """The UNet's x̂0 from x_t = √ᾱ_t·ẑ, one call: E[z | ẑ] when the quantization error is read as t's noise
    (the UNet is trained for x̂0's MSE). ẑ itself at t = 0."""
    return denoiser(denoiser.alpha_bar(t) ** 0.5 * z_hat, t)[0] if t else z_hat


@functools.lru_cache(maxsize=8)
def load_predictors(folder: str, device: str) -> tuple[LatentDenoisePredictors, bytes]:
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} holds no latent-denoise predictors; train them with `diffarc train latent-denoise "
            f"--model MODEL --out {path}`"
        )
    check_safetensors(path)
    if "hyper_channels" not in json.loads((path / "config.json").read_text()):
        raise ModelError(
            f"{path} holds latent-denoise predictors of the per-channel entropy model, replaced by the mean-scale "
            f"hyperprior; retrain them with `diffarc train latent-denoise --model MODEL --out {path}`"
        )
    predictors = LatentDenoisePredictors.from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False)
    predictors.to(device).eval().requires_grad_(False)
    return predictors, fingerprint({"predictors": predictors})


def side_info_bytes(channels: int) -> int:
    """t, the shifts and scales, and the latent codec's fixed fields: what precedes ζ's words."""
    return TIMESTEP.size + 4 * channels + CODED.size


class LatentDenoiseCodec(Codec):
    name = "latent-denoise"
    description = "Quantized latent, denoised by the frozen diffusion model from a predicted timestep (ECCV 2024)."
    params = (
        Param("model", str, DEFAULT_MODEL, MODEL_PARAM_HELP, location=True),
        Param("unet", str, "", UNET_PARAM_HELP, location=True),
        Param("predictors", str, "", "trained γ/t/entropy predictors (folder or URL); default: the model's latent_denoise/",
              location=True),
        Param("step", float, 1.0, "quantization step Δ of the transformed latent: the rate knob", minimum=0.01, maximum=64),
        Param("timestep", str, "predict", "t: predicted from the quantized latent, searched by LPIPS at the encoder, or off (t = 0)",
              choices=("predict", "search", "off")),
        Param("t_scale", float, 0.5, "timestep=predict: the encoder sends this multiple of the predicted t",
              minimum=0.0, maximum=2.0, absent=1.0),
        Param("steps", int, 8, "most denoising UNet calls (fewer when t is smaller)", minimum=1, maximum=100),
        Param("renoise", float, 0.5, "seeded Gaussian noise added before denoising, as a multiple of t's noise variance",
              minimum=0.0, maximum=16.0, absent=0.0),
        COLOUR_PARAM,
        Param("precision", str, "fp32", "UNet and VAE arithmetic", choices=tuple(PRECISIONS), build_time=True),
    )  # fmt: skip
    # Named by bpp with the default model, builtin:taef2 (issue 22), timestep=off, colour=affine: Δ interpolated
    # in log–log between Δ 2 / 3.5 / 6 = 0.570 / 0.290 / 0.109 bpp, the mean of kodim01 and kodim23 (MODELS.md).
    # builtin:ldm-small's were Δ 0.9 / 0.65 / 0.45 / 0.3 (16 channels, not 32: a Δ means another rate there).
    presets = {
        "0.15bpp": {"step": 5.0},
        "0.25bpp": {"step": 3.8},
        "0.35bpp": {"step": 3.0},
        "0.5bpp": {"step": 2.2},
    }

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self.model = load_model(self.config["model"], device, PRECISIONS[self.config["precision"]], self.config["unet"])
        if self.model.unet is None:
            raise ModelError(f"model {self.config['model']} has no diffusion UNet; latent-denoise needs one")
        self.predictors_dir = part_folder(self.config["model"], self.config["predictors"], PREDICTORS_FOLDER, "predictors")
        folder = str(self.predictors_dir)
        self.predictors, predictors_fingerprint = load_predictors(folder, str(device))
        channels = self.model.unet.config.in_channels
        if self.predictors.config.latent_channels != channels:
            raise ModelError(
                f"predictors in {folder} are for {self.predictors.config.latent_channels}-channel latents; "
                f"model {self.config['model']} has {channels}"
            )
        self._fingerprint = hashlib.sha256(self.model.fingerprint + predictors_fingerprint).digest()
        self.denoiser = DiffusionDenoiser.from_model(self.model)  # its ᾱ table: where denoising starts
        self.latent_codec = MeanScaleHyperpriorLatentCodec(
            self.predictors.hyper_analysis, self.predictors.hyper_synthesis, self.predictors.z_density, HYPER_STRIDE
        )

    @classmethod
    def builtin_weights(cls) -> dict:
        return builtin_model_weights()

    @property
    def fingerprint(self) -> bytes:
        """The model's and the predictors' weights together: the entropy tables depend on both."""
        return self._fingerprint

    def weights_folders(self) -> dict:
        return {**self.model.weights_folders(), PREDICTORS_FOLDER: self.predictors_dir}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return latent_size(self.model, height, width)

    # ------------------------------------------------------------------ encode

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        return [self.encode_one(image) for image in images]

    @torch.inference_mode()
    def encode_one(self, image: np.ndarray) -> bytes:
        config, dtype = self.config, PRECISIONS[self.config["precision"]]
        _, h, w = self.latent_shape(*image.shape[:2])
        x = images_to_tensor([image], (h * VAE_DOWNSAMPLING, w * VAE_DOWNSAMPLING), self.device, dtype)
        z = encode_latents(self.model, x).float()
        step = torch.tensor([config["step"]], device=self.device)
        shift, scale = self.predictors.sent_transform(z, step)
        coded = self.latent_codec.compress((z - shift[..., None, None]) / scale[..., None, None], config["step"])
        z_hat = coded["y_hat"] * scale[..., None, None] + shift[..., None, None]
        if config["timestep"] == "off":
            t = 0
        else:
            predicted = float(self.predictors.timestep(z_hat, step, scale)[0])
            if config["timestep"] == "search":
                t = self._search_timestep(image, z_hat, round(predicted))
            else:
                t = min(self.predictors.config.max_timestep, round(config["t_scale"] * predicted))
        (y_range,), (y_words,), (z_range,), (z_words,) = coded["strings"]
        gamma = torch.cat([shift[0], scale[0]]).half().cpu().numpy().astype("<f2").tobytes()
        payload = TIMESTEP.pack(t) + gamma + CODED.pack(y_range, z_range, len(z_words)) + z_words + y_words
        if config["colour"] == "affine":  # fitted to the decoder's own picture, which the encoder computes exactly
            payload += fit_colour(image, self._pixels(z_hat, t, config, image.shape[:2]))
        return payload

    def _search_timestep(self, image: np.ndarray, z_hat: torch.Tensor, predicted: int) -> int:
        """The candidate t whose decoded image is closest to the original in LPIPS."""
        from ..parts.metrics import find_lpips_weights

        weights = find_lpips_weights()
        if weights is None:
            raise ValueError("latent-denoise timestep=search scores candidates with LPIPS: set $DIFFARC_LPIPS_WEIGHTS")
        lpips = _lpips(str(weights), str(self.device))
        candidates = sorted({min(self.predictors.config.max_timestep, round(predicted * f)) for f in SEARCH_FACTORS})
        scores = {}
        for t in candidates:
            decoded = self._pixels(z_hat, t, self.config, image.shape[:2])
            scores[t] = lpips(image, decoded)
        return min(scores, key=scores.get)

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        header, payload = self.read(stream)
        (t,) = TIMESTEP.unpack_from(payload)
        config = self.stream_config(header)
        side = side_info_bytes(self.predictors.config.latent_channels)
        z_bytes = CODED.unpack_from(payload, side - CODED.size)[2] if len(payload) >= side else 0
        colour_bytes = COLOUR_BYTES if config["colour"] == "affine" else 0
        start = start_timestep(self.denoiser.alphas_cumprod, t, config["renoise"])
        return {"t": t, "denoising_steps": min(config["steps"], start), "side_info_bits": 8 * (side + z_bytes + colour_bytes)}

    # ------------------------------------------------------------------ decode

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [self._decode_one(payload, header) for payload, header in zip(payloads, headers)]

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """min(steps, t) UNet calls and the VAE over the padded image, after checking the side information."""
        config = self.stream_config(header)
        _, h, w = self.latent_shape(header.height, header.width)
        t = self.side_info(split_colour(payload, config, self.name)[0], header)[0]
        start = start_timestep(self.denoiser.alphas_cumprod, t, config["renoise"])
        return DecodeCost(h * w * VAE_DOWNSAMPLING**2, min(config["steps"], start) + 1)

    def side_info(self, payload: bytes, header: Header) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(t, shift, scale) from a payload, each checked: BitstreamError for what no encoder writes."""
        c = self.latent_shape(header.height, header.width)[0]
        side_bytes = side_info_bytes(c)
        if len(payload) < side_bytes:
            raise BitstreamError(f"latent-denoise payload is {len(payload)} bytes, shorter than its {side_bytes}-byte side info")
        (t,) = TIMESTEP.unpack_from(payload)
        if t > self.predictors.config.max_timestep:
            raise BitstreamError(f"latent-denoise side info holds t {t}, beyond the predictors' {self.predictors.config.max_timestep}")
        halves = np.frombuffer(payload, dtype="<f2", count=2 * c, offset=TIMESTEP.size).astype(np.float32)
        shift, scale = (torch.from_numpy(v.copy())[None].to(self.device) for v in (halves[:c], halves[c:]))
        if not torch.isfinite(shift).all() or not (scale > 0).all() or not torch.isfinite(scale).all():
            raise BitstreamError("latent-denoise side info holds a non-finite shift or a non-positive or infinite scale")
        return t, shift, scale

    @torch.inference_mode()
    def _decode_one(self, payload: bytes, header: Header) -> np.ndarray:
        config = self.stream_config(header)
        payload, colour = split_colour(payload, config, self.name)
        z_hat, t, _ = self.dequantized(payload, header)
        image = self._pixels(z_hat, t, config, (header.height, header.width))
        return image if colour is None else apply_colour(image, colour)

    @torch.inference_mode()
    def dequantized(self, payload: bytes, header: Header) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(ẑ, t, Δ·s) of a payload: the latent the decoder denoises, the timestep the encoder sent, and
        each channel's quantization step in latent units (B, C). `payload` is the latent's: without the colour
        transform (split_colour)."""
        config = self.stream_config(header)
        c, h, w = self.latent_shape(header.height, header.width)
        t, shift, scale = self.side_info(payload, header)
        side = side_info_bytes(c)
        y_range, z_range, z_bytes = CODED.unpack_from(payload, side - CODED.size)
        if side + z_bytes > len(payload):
            raise BitstreamError(f"latent-denoise payload says ζ takes {z_bytes} bytes; only {len(payload) - side} follow")
        z_words, y_words = payload[side : side + z_bytes], payload[side + z_bytes :]
        try:
            y_hat = self.latent_codec.decompress([[y_range], [y_words], [z_range], [z_words]], (h, w), config["step"])["y_hat"]
        except EntropyCodingError as exc:
            raise BitstreamError(f"latent-denoise payload: {exc}") from None
        return y_hat.to(self.device) * scale[..., None, None] + shift[..., None, None], t, config["step"] * scale

    def _pixels(self, z_hat: torch.Tensor, t: int, config: dict, size: tuple[int, int]) -> np.ndarray:
        dtype = PRECISIONS[config["precision"]]
        latent = denoise(DiffusionDenoiser.from_model(self.model, dtype), z_hat, t, config["steps"], config["renoise"])
        return self.pixels(latent, config, size)

    def pixels(self, latent: torch.Tensor, config: dict, size: tuple[int, int]) -> np.ndarray:
        """The picture of a (denoised) latent: the VAE decoder, cropped to the image's size."""
        dtype = PRECISIONS[config["precision"]]
        return tensor_to_images(decode_latents(self.model, latent.to(dtype)), [size])[0]


@functools.lru_cache(maxsize=2)
def _lpips(weights: str, device: str):
    from ..parts.metrics import LPIPS

    return LPIPS(weights, device)
