"""HFD's base layer: the picture the bits pay for, decodable without the detail decoder.

    image ─► the `avif` codec's payload at (quality, scale, speed) ─► a plain .avif file
    payload ─► the `avif` codec's decoder (upsampled to full size when scale > 1) ─► base, [−1, 1]

The payload is exactly what the `avif` codec writes, so any AVIF decoder (Pillow alone) opens it, and
`diffarc decode --base-only` turns an archive back into pictures with no model weights at all. The
training task and the codec both make bases through these two functions, so the decoder is trained on
exactly the bases it will see.
"""

from __future__ import annotations

import numpy as np
import torch

from ..classical import AvifCodec
from ..container import Header


def encode_avif_base(image: np.ndarray, quality: int, scale: int, speed: int) -> bytes:
    """The base payload of an H×W×3 uint8 image."""
    return AvifCodec(quality=quality, speed=speed, scale=scale).encode_payloads([image])[0]


def decode_avif_base(payload: bytes, height: int, width: int, scale: int) -> torch.Tensor:
    """The base picture (1, 3, height, width) in [−1, 1]; raises BitstreamError for a payload that is not
    an AVIF of the size the header implies."""
    header = Header("avif", {"scale": scale}, b"", width=width, height=height)
    [pixels] = AvifCodec().decode_payloads([payload], [header])
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
