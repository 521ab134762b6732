"""The one image loader: bytes of any common image file → its picture in sRGB, within limits.

Formats: JPEG, PNG, WebP, AVIF, HEIF/HEIC, JPEG XL, TIFF, BMP, GIF and the rest Pillow reads (the HEIF
and JPEG XL plugins are registered in codecs/parts/imagefile.py).

Choices (also in README's guarantees):
- Pixels per image are bounded (`max_pixels`, default 100 MP) and checked from the header, before any
  pixel is decoded, so a decompression bomb costs nothing. The bound is this call's own, not Pillow's
  process-wide one, which stays as Pillow set it (see codecs/parts/imagefile.py for how a limit above
  Pillow's is honoured without touching it, and the formats for which it cannot be).
- What the picture is, `srgb_picture` in codecs/parts/imagefile.py decides, for the loader and for the
  codecs that keep a source file alike: EXIF orientation applied; an embedded ICC profile converted to
  sRGB (none: taken as sRGB); alpha composited over white (diffusion codecs model RGB only, and white is
  what most viewers show behind a transparent area; the source's checksum is kept, so an alpha image can
  be found in the archive and re-fetched if its alpha matters); 16-bit images keep their 8 most
  significant bits.
- Animated images (GIF, APNG, WebP): the first frame; a HEIF file with several images: its primary one.
Anything else that fails is an ImageLoadError whose message is the reason recorded in the failure table.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from ..codecs.errors import ImageLoadError
from ..codecs.parts.imagefile import DEFAULT_MAX_PIXELS, Picture, TooManyPixels, open_image, srgb_picture


def load_picture(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """The picture in an image file, in sRGB, with its format and what was done to its colours."""
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
        # No seek(0): Pillow opens at the first frame, and pillow-heif at the primary image, which need not be the first.
        try:
            image.load()
            return srgb_picture(image)
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"over Pillow's own limit for {image.format} images: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"image data is damaged or truncated: {exc}") from None


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The pixels alone of `load_picture`: H×W×3 uint8 sRGB."""
    return load_picture(data, max_pixels).pixels
