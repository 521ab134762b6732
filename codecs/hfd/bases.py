"""HFD's base layers: the picture the bits pay for, which the detail decoder refines.

    avif        image ─► the `avif` codec's payload at (quality, scale, speed) ─► a plain .avif file
                payload ─► the `avif` codec's decoder (upsampled to full size when scale > 1) ─► base
    hyperprior  image ─► the `hyperprior` codec's payload at step Δ (`base_step`) ─► its MSE picture

Every base gives the picture in [−1, 1] as (1, 3, H, W), and the value of the detail decoder's rate input.

- avif: the payload is exactly what the `avif` codec writes, so any AVIF decoder (Pillow alone) opens it,
  and `diffarc decode --base-only` turns an archive back into pictures with no model weights at all.
- hyperprior: the paper's own stage 1, a learned MSE codec (`codecs/hyperprior/`). Its model belongs to
  the detail decoder trained on its pictures, so it lives in that decoder's folder, under `hyperprior/`.

The training task and the codec both make bases through these classes, so the decoder is trained on
exactly the bases it will see.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..classical import AvifCodec
from ..container import Header
from ..hyperprior.codec import HyperpriorCodec

BASES = ("avif", "hyperprior")
HYPERPRIOR_FOLDER = "hyperprior"  # inside a detail decoder's folder: the base model it was trained on
STEP_RANGE = (0.5, 4.0)  # the Δ the hyperprior model (and so the detail decoder) was trained for


class AvifBase:
    name = "avif"

    def encode(self, image: np.ndarray, config: dict) -> bytes:
        """The base payload of an H×W×3 uint8 image."""
        return AvifCodec(quality=config["quality"], speed=config["speed"], scale=config["scale"]).encode_payloads([image])[0]

    def decode(self, payload: bytes, height: int, width: int, config: dict) -> torch.Tensor:
        """The base picture; BitstreamError for a payload that is not an AVIF of the size the header implies."""
        header = Header("avif", {"scale": config["scale"]}, b"", width=width, height=height)
        [pixels] = AvifCodec().decode_payloads([payload], [header])
        return _to_tensor(pixels)

    def encode_with_picture(self, image: np.ndarray, config: dict) -> tuple[bytes, torch.Tensor]:
        """(payload, the picture `decode` gives for it)."""
        payload = self.encode(image, config)
        return payload, self.decode(payload, *image.shape[:2], config)

    @staticmethod
    def rate(config: dict) -> float:
        return float(config["quality"])


class HyperpriorBase:
    name = "hyperprior"

    def __init__(self, folder: Path, device: str = "cpu"):
        self.codec = HyperpriorCodec(device, model=str(folder))

    def encode(self, image: np.ndarray, config: dict) -> bytes:
        return self.codec.encode_picture(image, config["base_step"])[0]

    def decode(self, payload: bytes, height: int, width: int, config: dict) -> torch.Tensor:
        return _to_tensor(self.codec.decode_picture(payload, height, width, config["base_step"]))

    def encode_with_picture(self, image: np.ndarray, config: dict) -> tuple[bytes, torch.Tensor]:
        """(payload, the picture `decode` gives for it), the picture without decoding: the encoder has it."""
        payload, picture = self.codec.encode_picture(image, config["base_step"])
        return payload, _to_tensor(picture)

    @staticmethod
    def rate(config: dict) -> float:
        """Δ on the decoder's 0 … 50 rate input, logarithmically: Δ 4 (the coarsest) is 0, Δ 0.5 is 50."""
        low, high = STEP_RANGE
        return 50.0 * math.log(high / config["base_step"]) / math.log(high / low)


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
