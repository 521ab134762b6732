"""glc: a learned transform codec in the latent space of a pretrained autoencoder (Generative Latent Coding,
Jia et al., CVPR 2024), on taef2's latent.

    image ──edge-pad to 16 px──► taef2 encoder ──► z (32 × H/8 × W/8, ×1.19: unit variance)
          ──g_a(Δ)──► y ──MeanScaleHyperpriorLatentCodec(Δ)──► ζ's and y's strings
    strings ──► ŷ ──g_s(Δ)──► ẑ ──taef2 decoder──► crop ──► image

GLC codes the latent of a generative autoencoder (a VQ-GAN there) with a transform codec, so that the bits
go to what the decoder needs to render, and the decoder renders texture the bits do not carry. Here the
autoencoder is taef2 (parts/taef2.py: 30.19 dB, LPIPS-squeeze 0.028 on Kodak unquantized) and stays
frozen; only the transforms and the entropy model are trained (task.py).

Choices the paper leaves open, or that differ from it:
- No code-prediction or VQ branch, no adversarial or perceptual loss: the transforms learn rate + λ·MSE in
  the latent, then optionally pixel MSE through the frozen decoder (task.py). The decoder's own training
  supplies the texture.
- The rate knob is the quantization step Δ of y on one model whose transforms see Δ (nets.py), presets
  named by the mean bpp they give on Kodak. Δ outside the trained range still decodes, at a worse trade-off.
- y at 1/16 of the image (one stride-2 layer in the latent), ζ at 1/64; ζ is coded at step 1 whatever Δ.
- Entropy coding: `parts/latent_codecs.MeanScaleHyperpriorLatentCodec` with `thread_invariant` (its
  hyper-decoder in float64 on one thread), and g_s and the taef2 decoder in channels_last: a stream decodes
  to the same pixels whatever torch's thread count (tested in fresh processes with 1 and 2 threads).
- Any image size: edge-padded to a multiple of 16 pixels (whole y positions), cropped after decoding.
  The autoencoder sees the whole picture (its pooled statistics are over all of it); its decoder works
  in tiles with halos, so memory is bounded by the tile for the pixels (parts/taef2.py).
- Images are coded one at a time (no batching across images of different sizes).

Payload: `parts/latent_codecs.join_strings` of one image (y's and ζ's symbol ranges, the length of ζ's
words, ζ's words, y's words).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib

import numpy as np
import torch

from ..base import Codec, DecodeCost, Param
from ..container import Header
from ..errors import BitstreamError, EntropyCodingError, ModelError
from ..parts.latent_codecs import MeanScaleHyperpriorLatentCodec, join_strings, split_strings
from ..parts.latents import decode_latents, encode_latents, images_to_tensor, padded_size, tensor_to_images
from ..parts.models import fingerprint, load_codec_model, load_model, part_folder
from ..parts.threads import one_torch_thread
from .nets import HYPER_STRIDE, LATENT_STRIDE, GlcModel

DEFAULT_AUTOENCODER = "builtin:taef2"
TRANSFORMS_FOLDER = "glc"  # where an autoencoder's folder keeps glc's trained transforms
# Transforms shipped before the current ones (MODELS.md): streams name their weights by fingerprint, so
# theirs are still found (`builtin_weights`, registry.open_codec) and decode as they did.
FORMER_TRANSFORMS: tuple[str, ...] = ("builtin:taef2/glc-2026-12-06",)
IMAGE_STRIDE = 8 * LATENT_STRIDE  # pixels per position of y
# Latents of fewer px are decoded on one thread: on a few px oneDNN orders its sums by the thread count
# (parts/taef2.py), and a picture this small (256 × 256) decodes in a fraction of a second anyway.
ONE_THREAD_BELOW = 1024


@functools.lru_cache(maxsize=8)
def load_transforms(folder: str, device: str) -> tuple[GlcModel, bytes]:
    """(model in eval mode without gradients, fingerprint) of a glc transforms folder."""
    model, _ = load_codec_model(folder, GlcModel, device, f"train them with `diffarc train glc --out {folder}`")
    return model.to(memory_format=torch.channels_last), fingerprint({"glc": model})


class GlcCodec(Codec):
    name = "glc"
    description = "Learned transform codec in the latent space of the pretrained taef2 autoencoder (GLC, CVPR 2024)."
    params = (
        Param("model", str, DEFAULT_AUTOENCODER, "the taef2 autoencoder: builtin:NAME, folder or URL", location=True),
        Param("transforms", str, "", "glc's trained transforms (folder or URL); default: the model's glc/", location=True),
        Param("step", float, 2.0, "quantization step Δ of y: the rate knob", minimum=0.1, maximum=64),
    )  # fmt: skip
    # Named by the mean bpp they give on Kodak 24 with the shipped transforms (benchmarks/glc_presets.py,
    # MODELS.md). ζ alone costs about 0.02 bpp, so 0.02bpp is the coarsest step measured (Δ 48: 0.0206 bpp).
    presets = {"0.02bpp": {"step": 48.0}, "0.05bpp": {"step": 6.78}, "0.1bpp": {"step": 3.42}, "0.2bpp": {"step": 1.71}}

    @classmethod
    def builtin_weights(cls) -> dict:
        return {**super().builtin_weights(), **{former: {"transforms": former} for former in FORMER_TRANSFORMS}}

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self.autoencoder = load_model(self.config["model"], device)
        self.transforms_dir = part_folder(self.config["model"], self.config["transforms"], TRANSFORMS_FOLDER, "transforms")
        self.model, transforms_fingerprint = load_transforms(str(self.transforms_dir), str(device))
        channels = self.autoencoder.vae.config.latent_channels
        if self.model.config.latent_channels != channels:
            raise ModelError(
                f"glc transforms in {self.transforms_dir} are for {self.model.config.latent_channels}-channel latents; "
                f"model {self.config['model']} has {channels}"
            )
        self._fingerprint = hashlib.sha256(self.autoencoder.autoencoder_fingerprint + transforms_fingerprint).digest()
        self.latent_codec = MeanScaleHyperpriorLatentCodec(
            self.model.hyper_analysis, self.model.hyper_synthesis, self.model.z_density, HYPER_STRIDE, thread_invariant=True
        )

    @property
    def fingerprint(self) -> bytes:
        """taef2's (without any UNet its folder may hold) and the transforms' weights together: the pictures depend on both."""
        return self._fingerprint

    def weights_folders(self) -> dict:
        return {"": self.autoencoder.folder, TRANSFORMS_FOLDER: self.transforms_dir}

    def _log_step(self, step: float) -> torch.Tensor:
        return torch.full((1,), step, dtype=torch.float32, device=self.device).log()

    # ------------------------------------------------------------------ encode

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        return [self.encode_one(image) for image in images]

    @torch.inference_mode()
    def encode_one(self, image: np.ndarray) -> bytes:
        x = images_to_tensor([image], padded_size(*image.shape[:2], IMAGE_STRIDE), self.device, torch.float32)
        y = self.model.analysis(encode_latents(self.autoencoder, x), self._log_step(self.config["step"]))
        return join_strings(self.latent_codec.compress(y, self.config["step"])["strings"])

    # ------------------------------------------------------------------ decode

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [self._decode_one(payload, header) for payload, header in zip(payloads, headers)]

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """One pass of the transforms and taef2 over the padded image, after checking the payload's layout."""
        self._strings(payload)
        height, width = padded_size(header.height, header.width, IMAGE_STRIDE)
        return DecodeCost(height * width)

    def _strings(self, payload: bytes) -> list[list[bytes]]:
        try:
            return split_strings(payload)
        except EntropyCodingError as exc:
            raise BitstreamError(f"glc payload: {exc}") from None

    @torch.inference_mode()
    def _decode_one(self, payload: bytes, header: Header) -> np.ndarray:
        step = self.stream_config(header)["step"]
        height, width = padded_size(header.height, header.width, IMAGE_STRIDE)
        try:
            y_hat = self.latent_codec.decompress(self._strings(payload), (height // IMAGE_STRIDE, width // IMAGE_STRIDE), step)["y_hat"]
        except EntropyCodingError as exc:
            raise BitstreamError(f"glc payload: {exc}") from None
        small = height * width < ONE_THREAD_BELOW * 64
        with one_torch_thread() if small else contextlib.nullcontext():
            z_hat = self.model.synthesis(y_hat.contiguous(memory_format=torch.channels_last), self._log_step(step))
            return tensor_to_images(decode_latents(self.autoencoder, z_hat), [(header.height, header.width)])[0]

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        """The side information's share: ζ's words and the fixed fields, in bits."""
        strings = self._strings(self.read(stream)[1])
        return {"side_info_bits": 8 * (len(join_strings(strings)) - len(strings[1][0]))}
