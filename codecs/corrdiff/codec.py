"""CorrDiff: HFD's diffusion decoder corrected by a privileged end-to-end MSE decoder, with a knob between
them (Ma, Yang, Liu, ICML 2024; seed 003; `../shared/docs/methods.md` §4).

    encoder: image ─► HFD's base payload (AVIF) ─► base b
             for strengths g on a grid: decode(b, g); keep the smallest g within `max_psnr_loss` of g = 1
             payload = [level of g: one byte] + the base payload
    decoder: b ─► EndToEndDecoder ─► r̂_e
             HFD's sampler on the corrected estimate lerp(r̂_d, r̂_e, λ(t)), λ(t) = min(1, g·(1 + t)),
             g from the knob `perception` and the transmitted level ─► b + r̃ ─► image

The correction and its derivation are in correction.py; the end-to-end decoder in nets.py, its training
in task.py. What this file decides:
- **The privileged choice.** The encoder sees the original, so it decodes the image at a few strengths
  and transmits one in 2 bits (a byte of the payload): the smallest g (the most realistic decode) whose
  PSNR is within `max_psnr_loss` dB of the end-to-end decode's (g = 1). Binary search over the 4 levels
  g = k/3 (an end-to-end pass and two sampler runs per image: every probe is a full decode, so a finer
  grid costs encode time), assuming PSNR grows with g; only a level that was decoded and met the bound
  is sent, and g = 1 always meets it. The criterion is PSNR only: no perceptual metric is needed, and LPIPS, the
  bench's metric, is never looked at.
- **The knob.** `perception` ∈ [0, 1] maps to g piecewise linearly through (0, 1), (½, g*), (1, 0),
  g* the transmitted strength: 0 is the end-to-end decoder's output, 1 the plain HFD decode (same
  steps, detail and seed, bit for bit), ½ (the default) the encoder's choice. It is a decode-time
  parameter: `diffarc decode --param perception=P` decodes one archive for fidelity or for realism.
- HFD's parameters (quality, scale, steps, detail, seed, …) are this codec's, with the same meaning;
  HFD's `model` is `detail_model` here, and `model` names the end-to-end decoder, whose folder may
  hold the detail decoder as `detail/` (what `encode --embed-model` writes). The stream's fingerprint
  is the SHA-256 of both models' fingerprints: a stream refuses other weights of either.
- `steps` is at least 1: the correction acts inside the sampler.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..base import Codec, DecodeCost, Param
from ..container import Header, unpack
from ..errors import ModelError, ParameterError
from ..hfd.codec import HfdCodec
from ..parts.latents import tensor_to_images
from ..parts.metrics import psnr
from ..parts.models import fingerprint, load_codec_model, resolve_folder
from .correction import LEVELS, CorrectedDetailDecoder, EndToEndEstimates, privileged_level, split_level, strength
from .nets import EndToEndDecoder

DEFAULT_MODEL = "builtin:corrdiff-small"
DEFAULT_DETAIL_MODEL = "builtin:hfd-small"  # when the end-to-end decoder's folder holds no detail/
DETAIL_FOLDER = "detail"
LATENT_END_TO_END_FOLDER = "corrdiff"  # inside a latent detail model's folder (vae/, hfd/): the end-to-end decoder
OWN_PARAMS = ("model", "detail_model", "perception", "max_psnr_loss")


@functools.lru_cache(maxsize=4)
def load_end_to_end_decoder(reference: str, device: str) -> tuple[EndToEndDecoder, Path, Path | None, bytes]:
    """(decoder, its folder, the latent model folder it lives in or None, fingerprint), once per process.

    A pixel end-to-end decoder is a save_pretrained folder of its own (its detail decoder, if any, in
    DETAIL_FOLDER); a latent one lives in LATENT_END_TO_END_FOLDER of the latent detail model it corrects."""
    folder = resolve_folder(reference)
    model_folder = folder if folder is not None and (folder / LATENT_END_TO_END_FOLDER).is_dir() else None
    own = str(model_folder / LATENT_END_TO_END_FOLDER) if model_folder else reference
    decoder, own_folder = load_codec_model(own, EndToEndDecoder, device, "train one with `diffarc train corrdiff`")
    return decoder, own_folder, model_folder, fingerprint({"end_to_end": decoder})


class CorrDiffCodec(Codec):
    name = "corrdiff"
    description = "HFD corrected by an end-to-end MSE decoder, with a perception knob (CorrDiff, Ma et al. 2024)."
    params = (
        Param("model", str, DEFAULT_MODEL, "end-to-end decoder: builtin:NAME, folder or URL", location=True),
        Param("detail_model", str, "", "HFD detail decoder; default: the latent model holding `model`, its detail/, else builtin:hfd-small",
              location=True),
        *(p for p in HfdCodec.params if p.name != "model"),
        Param("perception", float, 0.5, "0: the end-to-end (MSE) decode … ½: the encoder's choice … 1: plain hfd",
              minimum=0.0, maximum=1.0, decode_time=True),
        Param("max_psnr_loss", float, 0.3, "encoder: the most PSNR (dB) its choice may lose to the end-to-end decode",
              minimum=0.0, maximum=20.0),
    )  # fmt: skip
    # Named by Kodak bpp, as hfd's presets of the same bases.
    presets = {"0.05bpp": {"quality": 20, "scale": 2}, "0.17bpp": {"quality": 20}}

    @classmethod
    def check_config(cls, config: dict) -> None:
        if config["steps"] < 1:
            raise ParameterError("corrdiff needs steps >= 1: the correction acts inside the sampler")
        if config["base"] != "avif":
            raise ParameterError("corrdiff's end-to-end decoder is trained on hfd's avif bases: base must be avif")

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self.end_to_end, self.folder, self.model_folder, e2e_fingerprint = load_end_to_end_decoder(self.config["model"], str(device))
        detail_model = self.config["detail_model"] or self._default_detail_model()
        self.hfd = HfdCodec(device, **self._hfd_params(self.config), model=detail_model)
        if self.hfd.decoder.network.multiple % self.end_to_end.multiple:
            raise ModelError(f"the end-to-end decoder {self.config['model']} does not fit the grid of the detail decoder {detail_model}")
        self._fingerprint = hashlib.sha256(self.hfd.fingerprint + e2e_fingerprint).digest()
        self.estimates = EndToEndEstimates(self.end_to_end)

    def _default_detail_model(self) -> str:
        """The latent model the end-to-end decoder lives in; else the end-to-end folder's detail/; else the built-in."""
        if self.model_folder is not None:
            return str(self.model_folder)
        return str(self.folder / DETAIL_FOLDER) if (self.folder / DETAIL_FOLDER).is_dir() else DEFAULT_DETAIL_MODEL

    @staticmethod
    def _hfd_params(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in OWN_PARAMS}

    @property
    def fingerprint(self) -> bytes:
        return self._fingerprint

    def weights_folders(self) -> dict:
        """A latent decoder's layout (the detail model's folders and LATENT_END_TO_END_FOLDER), or a pixel one's
        (the end-to-end decoder at the root, the detail decoder's folders under DETAIL_FOLDER)."""
        if self.model_folder is not None:
            return {**self.hfd.weights_folders(), LATENT_END_TO_END_FOLDER: self.folder}
        detail = {f"{DETAIL_FOLDER}/{sub}" if sub else DETAIL_FOLDER: folder for sub, folder in self.hfd.weights_folders().items()}
        return {"": self.folder, **detail}

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        """The strength the encoder chose (the bench averages it)."""
        return {"chosen_strength": split_level(unpack(stream)[1])[0]}

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """HFD's cost for the base payload, plus the end-to-end decoder's pass."""
        base_payload = split_level(payload)[1]
        config = self.resolve_params(header.params)
        cost = self.hfd.decode_cost(self._hfd_header(header.height, header.width, config), base_payload)
        return DecodeCost(cost.pixels, cost.passes + 1)

    def _hfd_header(self, height: int, width: int, config: dict) -> Header:
        """The header of the hfd stream this codec's base payload would be: what HfdCodec reads it by."""
        return Header(HfdCodec.name, self._hfd_params(config), b"", width=width, height=height)

    # ------------------------------------------------------------------ encode: the privileged choice

    @torch.inference_mode()
    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        payloads = []
        for image, base_payload in zip(images, self.hfd.encode_payloads(images), strict=True):
            base = self.hfd.base_picture(base_payload, self._hfd_header(*image.shape[:2], self.config))
            payloads.append(bytes([self.choose_level(image, base, self.config)]) + base_payload)
            self.estimates.clear()
        return payloads

    def choose_level(self, image: np.ndarray, base: torch.Tensor, config: dict) -> int:
        """The smallest level whose decode is within max_psnr_loss dB of the end-to-end decode (docstring)."""
        return privileged_level(
            lambda level: psnr(image, self.decode_picture(base, config, level / (LEVELS - 1))), config["max_psnr_loss"]
        )

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        images = []
        for payload, header in zip(payloads, headers, strict=True):
            config = self.stream_config(header)
            chosen, base_payload = split_level(payload)
            base = self.hfd.base_picture(base_payload, self._hfd_header(header.height, header.width, config))
            images.append(self.decode_picture(base, config, strength(config["perception"], chosen)))
            self.estimates.clear()
        return images

    def decode_picture(self, base: torch.Tensor, config: dict, g: float) -> np.ndarray:
        """The picture of a base at strength g: 0 is HFD's own decode, 1 the end-to-end decoder's."""
        hfd_config = self.hfd.resolve_params(self._hfd_params(config))
        base = base.to(self.device)
        # HFD's tiling, padding, noise and sampler, run on the corrected network.
        network = None if g == 0.0 else CorrectedDetailDecoder(self.hfd.decoder.network, self.estimates, g)
        residual = self.hfd.detail(base, hfd_config, network)
        return tensor_to_images((base + residual).clamp(-1, 1), [tuple(base.shape[2:])])[0]

