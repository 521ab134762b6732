"""The one image loader: bytes of any common image file → an H×W×3 uint8 RGB array, within limits.

Choices (also in README's guarantees):
- Pixels per image are bounded (`max_pixels`, default 100 MP) and checked from the header, before any
  pixel is decoded, so a decompression bomb costs nothing. The bound is this call's own, not Pillow's
  process-wide one, which stays as Pillow set it (see codecs/parts/imagefile.py for how a limit above
  Pillow's is honoured without touching it, and the formats for which it cannot be).
- EXIF orientation is applied, so the archive stores the picture as people see it.
- Animated images (GIF, APNG, WebP): the first frame.
- Alpha (RGBA, LA, palette with transparency) is composited over white: diffusion codecs model RGB
  only, and white is what most viewers show behind a transparent area. The source's checksum is kept,
  so an alpha image can be found in the archive and re-fetched if its alpha matters.
- 16-bit images keep their 8 most significant bits; CMYK is converted by Pillow's profile-free
  conversion; palette and greyscale images are expanded to RGB.
Anything else that fails is an ImageLoadError whose message is the reason recorded in the failure table.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageOps

from ..codecs.errors import ImageLoadError
from ..codecs.parts.imagefile import DEFAULT_MAX_PIXELS, TooManyPixels, open_image



def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    try:
        image = open_image(data, max_pixels)
    except TooManyPixels as exc:
        raise ImageLoadError(f"{exc} (possible decompression bomb)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"over Pillow's own limit for this format: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow names the buffer by its memory address: dropped, so one bad file gives one reason every run.
        raise ImageLoadError(f"not a readable image: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(exc))}") from None
    with image:
        try:
            image.seek(0)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"over Pillow's own limit for {image.format} images: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"image data is damaged or truncated: {exc}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow stores 16-bit greyscale as 'I;16' or 'I'; its RGB conversion clips instead of scaling.
        grey = (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
