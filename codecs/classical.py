"""JPEG, WebP and AVIF through Pillow (JPEG XL through libjxl is jxl.py): the baselines every diffusion
codec is measured against.

They also prove the pipeline end to end without any model weights. Each payload is the plain file the
format defines (a .jpg, .webp or .avif), so `diffarc cat` output minus the container opens anywhere.

AVIF's `scale` codes the picture at 1/scale resolution (a Lanczos downscale) and decodes it back to full
size with Pillow's bicubic upsampling: the "downscaled AVIF" reference for rates below AVIF's floor,
and the base layer of the hfd codec. The header keeps the full size; the payload is the small picture.
AVIF's `grain` adds seeded Gaussian film grain when decoding (AV1 streams can carry film-grain synthesis
too): the control every detail decoder must beat, since fine noise alone lowers LPIPS on grainy photos.
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


def coded_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """The (width, height) a picture is coded at for `scale`: rounded up, at least one pixel each way."""
    return max(1, -(-width // scale)), max(1, -(-height // scale))


def add_grain(pixels: np.ndarray, std: float) -> np.ndarray:
    """Pixels plus Gaussian noise of `std` 8-bit levels from a fixed seed (numpy's PCG64: the same everywhere)."""
    if not std:
        return pixels
    noise = np.random.default_rng(0).standard_normal(pixels.shape, dtype=np.float32) * std
    return np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)


class PillowCodec(Codec):
    pillow_format: str

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        scale = self.config.get("scale", 1)
        payloads = []
        for image in images:
            picture = Image.fromarray(image, "RGB")
            if scale > 1:
                picture = picture.resize(coded_size(picture.width, picture.height, scale), Image.Resampling.LANCZOS)
            payloads.append(self._save(picture))
        return payloads

    def _save(self, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        options = {k: v for k, v in self.config.items() if k not in ("scale", "grain")}  # ours, not the format's
        image.save(buffer, self.pillow_format, **options)
        return buffer.getvalue()

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [self._decode(payload, header) for payload, header in zip(payloads, headers, strict=True)]

    def _decode(self, payload: bytes, header: Header) -> np.ndarray:
        """One payload, refused before any pixel is decoded unless it declares the size the header implies
        (which `check_cost` has bounded): the header's, or 1/scale of it for a scaled AVIF."""
        params = self.resolve_params(header.params)
        scale = params.get("scale", 1)
        expected = coded_size(header.width, header.height, scale)
        # Pillow's plugins parse hostile bytes with whatever error their format code hits first (OSError,
        # SyntaxError, struct.error, avif's RuntimeError, TypeError …): each means "this payload does not
        # decode". Only running out of memory is not the payload's fault alone, and is not hidden.
        try:
            with open_image(payload, expected[0] * expected[1], formats=[self.pillow_format]) as image:
                size = image.size
                if size == expected:
                    picture = image.convert("RGB")
                    if scale > 1:
                        picture = picture.resize((header.width, header.height), Image.Resampling.BICUBIC)
                    return add_grain(np.asarray(picture), params.get("grain", 0.0))
        except TooManyPixels as exc:
            size = (exc.width, exc.height)
        except MemoryError:
            raise
        except Exception as exc:
            raise BitstreamError(f"{self.name} payload does not decode: {type(exc).__name__}: {exc}") from None
        raise BitstreamError(
            f"{self.name} payload is {size[0]}×{size[1]}, the stream header says {expected[0]}×{expected[1]}"
            + (f" (1/{scale} of {header.width}×{header.height})" if scale > 1 else "")
        )


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
        Param("scale", int, 1, "code at 1/scale resolution, upsampled when decoded", choices=(1, 2, 4)),
        Param("grain", float, 0.0, "film grain added when decoding, std in 8-bit levels", minimum=0.0, maximum=16.0),
    )
    presets = _QUALITY_PRESETS
