"""A learned MSE image codec with a mean-scale hyperprior (Ballé et al., ICLR 2018; Minnen et al., NeurIPS 2018).

    image ──edge-pad to 16 px──► g_a ──► y ──MeanScaleHyperpriorLatentCodec(Δ)──► z's and y's strings
    strings ──► ŷ ──g_s──► crop ──► image

HFD's stage 1 (Hoogeboom et al., 2023): a base picture optimised for MSE, which a detail decoder refines.
Used alone it is a codec of its own, compared with AVIF in the bench.

Choices made here:
- The rate knob is the quantization step Δ of y (the `step` parameter) on one trained model, not a model
  per λ: the model was trained with Δ drawn log-uniformly from 0.5 to 4 and the loss R + λ₀/Δ² · D,
  the trade-off whose optimum is step Δ under the high-rate approximation (task.py). One 2.7 MB model
  serves every rate; a model per preset would need a training run each (not measured here). Measured
  on Kodak with the shipped model, from Δ = 0.85 to 4.3: bpp falls roughly as 1/Δ (exponent −0.9 to
  −1.2) and PSNR by 0.8 dB (near Δ = 1) to 1.9 dB (near Δ = 3) per doubling of Δ (MODELS.md). Δ outside
  the trained range still decodes, at a worse trade-off.
- z is always coded at step 1, whatever Δ: its ~3.4 kbit on a Kodak image (0.009 bpp) are a tenth of
  the 0.1bpp preset's stream.
- Small transforms for a CPU: 64 channels, y of 96 channels at 1/16 resolution, z of 64 at 1/64 (nets.py).
- Entropy coding: `parts/latent_codecs.MeanScaleHyperpriorLatentCodec` (Gaussian tables at 64 fixed
  scale levels, hyper-decoder in float64 on the CPU, so both sides pick the same tables).
- Any image size: edge-padded to a multiple of 16 for g_a; y is padded again inside the latent codec
  for the hyper-encoder. A 1×1 image costs about what a 16×16 one does (20 and 32 payload bytes).
- Images are coded one at a time (no batching across images of different sizes).
- Other codecs build on it through `encode_picture` / `decode_picture`: the payload and the picture
  the decoder will produce from it, without a container around it.

Payload: y's symbol range (2 × i16), z's symbol range (2 × i16), the length of z's words in bytes
(u32), z's words, y's words (32-bit words of the range coder, little-endian).
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import torch

from ..base import Codec, Param
from ..container import Header
from ..errors import BitstreamError, EntropyCodingError
from ..parts.latent_codecs import MeanScaleHyperpriorLatentCodec
from ..parts.latents import images_to_tensor, padded_size, tensor_to_images
from ..parts.models import canonical_reference, fingerprint, load_codec_model
from .nets import HYPER_STRIDE, IMAGE_STRIDE, HyperpriorModel

DEFAULT_HYPERPRIOR = "builtin:hyperprior-small"
SIDE = struct.Struct("<4s4sI")  # y's symbol range, z's symbol range, z's words in bytes


@functools.lru_cache(maxsize=8)
def load_hyperprior(reference: str, device: str) -> tuple[HyperpriorModel, bytes, Path]:
    """(model in eval mode without gradients, fingerprint, folder) of a hyperprior model reference."""
    model, folder = load_codec_model(reference, HyperpriorModel, device, "train one with `diffarc train hyperprior --out FOLDER`")
    return model, fingerprint({"hyperprior": model}), folder


class HyperpriorCodec(Codec):
    name = "hyperprior"
    description = "Learned MSE autoencoder with a mean-scale hyperprior entropy model (Ballé 2018, Minnen 2018)."
    params = (
        Param("model", str, DEFAULT_HYPERPRIOR, "trained hyperprior model: builtin:NAME, folder or URL", location=True),
        Param("step", float, 1.0, "quantization step Δ of the latent: the rate knob (trained for 0.5 … 4)",
              minimum=0.05, maximum=64),
    )  # fmt: skip
    # Named by the mean bpp they give on Kodak with builtin:hyperprior-small, lowest rate first.
    presets = {"0.1bpp": {"step": 3.6}, "0.2bpp": {"step": 2.0}, "0.3bpp": {"step": 1.35}, "0.5bpp": {"step": 0.72}}

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self.model, self._fingerprint, self.folder = load_hyperprior(canonical_reference(self.config["model"]), str(device))
        self.latent_codec = MeanScaleHyperpriorLatentCodec(
            self.model.hyper_analysis, self.model.hyper_synthesis, self.model.z_density, HYPER_STRIDE
        )

    @property
    def fingerprint(self) -> bytes:
        return self._fingerprint

    def weights_folders(self) -> dict:
        return {"": self.folder}

    # ------------------------------------------------------------------ for codecs built on this one

    @torch.inference_mode()
    def encode_picture(self, image: np.ndarray, step: float) -> tuple[bytes, np.ndarray]:
        """(payload, the picture `decode_picture` will give for it) of one H×W×3 uint8 image at step Δ."""
        size = image.shape[:2]
        x = images_to_tensor([image], padded_size(*size, IMAGE_STRIDE), self.device, torch.float32)
        coded = self.latent_codec.compress(self.model.analysis(x), step)
        (y_range,), (y_words,), (z_range,), (z_words,) = coded["strings"]
        payload = SIDE.pack(y_range, z_range, len(z_words)) + z_words + y_words
        return payload, tensor_to_images(self.model.synthesis(coded["y_hat"]), [size])[0]

    @torch.inference_mode()
    def decode_picture(self, payload: bytes, height: int, width: int, step: float) -> np.ndarray:
        """The H×W×3 uint8 picture of a payload `encode_picture` wrote; BitstreamError if it is damaged."""
        if len(payload) < SIDE.size:
            raise BitstreamError(f"hyperprior payload is {len(payload)} bytes, shorter than its {SIDE.size}-byte side info")
        y_range, z_range, z_bytes = SIDE.unpack_from(payload)
        if SIDE.size + z_bytes > len(payload):
            raise BitstreamError(f"hyperprior payload says z takes {z_bytes} bytes; only {len(payload) - SIDE.size} follow")
        z_words, y_words = payload[SIDE.size : SIDE.size + z_bytes], payload[SIDE.size + z_bytes :]
        padded = padded_size(height, width, IMAGE_STRIDE)
        shape = (padded[0] // IMAGE_STRIDE, padded[1] // IMAGE_STRIDE)
        try:
            y_hat = self.latent_codec.decompress([[y_range], [y_words], [z_range], [z_words]], shape, step)["y_hat"]
        except EntropyCodingError as exc:
            raise BitstreamError(f"hyperprior payload: {exc}") from None
        return tensor_to_images(self.model.synthesis(y_hat), [(height, width)])[0]

    # ------------------------------------------------------------------ the Codec interface

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        return [self.encode_picture(image, self.config["step"])[0] for image in images]

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [
            self.decode_picture(payload, header.height, header.width, self.resolve_params(header.params)["step"])
            for payload, header in zip(payloads, headers)
        ]

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        """The side information's share: z's words and the fixed fields, in bits."""
        payload = self.read(stream)[1]
        if len(payload) < SIDE.size:
            raise BitstreamError(f"hyperprior payload is {len(payload)} bytes, shorter than its side info")
        return {"side_info_bits": 8 * (SIDE.size + SIDE.unpack_from(payload)[2])}
