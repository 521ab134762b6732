"""JPEG, WebP and AVIF through Pillow: the baselines every diffusion codec is measured against.

They also prove the pipeline end to end without any model weights. Each payload is the plain file the
format defines (a .jpg, .webp or .avif), so `diffarc cat` output minus the container opens anywhere.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .base import Codec, Param
from .container import Header
from .errors import BitstreamError
from .parts.imagefile import TooManyPixels, open_image

_QUALITY_PRESETS = {"low": {"quality": 30}, "medium": {"quality": 60}, "high": {"quality": 85}}


class PillowCodec(Codec):
    pillow_format: str

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        return [self._save(Image.fromarray(image, "RGB")) for image in images]

    def _save(self, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, self.pillow_format, **self.config)
        return buffer.getvalue()

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [self._decode(payload, header) for payload, header in zip(payloads, headers, strict=True)]

    def _decode(self, payload: bytes, header: Header) -> np.ndarray:
        """One payload, refused before any pixel is decoded unless it declares the header's size (which
        `check_cost` has bounded)."""
        # Pillow's plugins parse hostile bytes with whatever error their format code hits first (OSError,
        # SyntaxError, struct.error, avif's RuntimeError, TypeError …): each means "this payload does not
        # decode". Only running out of memory is not the payload's fault alone, and is not hidden.
        try:
            with open_image(payload, header.width * header.height, formats=[self.pillow_format]) as image:
                size = image.size
                if size == (header.width, header.height):
                    return np.asarray(image.convert("RGB"))
        except TooManyPixels as exc:
            size = (exc.width, exc.height)
        except MemoryError:
            raise
        except Exception as exc:
            raise BitstreamError(f"{self.name} payload does not decode: {type(exc).__name__}: {exc}") from None
        raise BitstreamError(f"{self.name} payload is {size[0]}×{size[1]}, the stream header says {header.width}×{header.height}")


class JpegCodec(PillowCodec):
    name = "jpeg"
    description = "Baseline JPEG (libjpeg-turbo via Pillow), 4:2:0 chroma."
    pillow_format = "JPEG"
    params = (Param("quality", int, 75, "JPEG quality, 1 (smallest) to 95 (best)", minimum=1, maximum=95),)
    presets = _QUALITY_PRESETS


class WebpCodec(PillowCodec):
    name = "webp"
    description = "Lossy WebP (libwebp via Pillow)."
    pillow_format = "WEBP"
    params = (
        Param("quality", int, 75, "WebP quality, 0 (smallest) to 100 (best)", minimum=0, maximum=100),
        Param("method", int, 4, "encoder effort, 0 (fast) to 6 (slow, smaller)", minimum=0, maximum=6),
    )
    presets = _QUALITY_PRESETS


class AvifCodec(PillowCodec):
    name = "avif"
    description = "AVIF still image (libavif/aom via Pillow), 4:4:4."
    pillow_format = "AVIF"
    params = (
        Param("quality", int, 60, "AVIF quality, 0 (smallest) to 100 (lossless)", minimum=0, maximum=100),
        Param("speed", int, 6, "encoder speed, 0 (slow, smaller) to 10 (fast)", minimum=0, maximum=10),
        Param("subsampling", str, "4:4:4", "chroma subsampling", choices=("4:4:4", "4:2:0")),
    )
    presets = _QUALITY_PRESETS
