"""Opening an image file with Pillow under the caller's own pixel limit, leaving Pillow's limit alone.

Pillow guards against decompression bombs with one process-wide setting, `Image.MAX_IMAGE_PIXELS`
(about 89 MP: a warning above it, `DecompressionBombError` above twice it). diffarc needs a limit per
call instead: the loader's `--max-pixels` may be raised for huge scans, a codec bounds a payload by
its stream header. Changing the global would change it for every thread and every other caller in the
process at once (switching it off leaves payloads from untrusted archives unguarded), and Python
3.11's warning filters are process-wide too, so neither is touched. Instead:

1. `Image.open` as usual. It parses only the header, and Pillow's own check runs on the declared size.
2. If Pillow refuses the size (its error, or its warning where warnings are errors), read the header
   again through the format's plugin directly, which is `Image.open` without that one check. Pillow's
   registry (`Image.ID`, `Image.OPEN`) is what `Image.open` itself walks.
3. Either way, the declared size is checked against the caller's limit before any pixel is decoded.

What this leaves: Pillow still warns (DecompressionBombWarning) for images between its limit and
twice it. Some plugins apply Pillow's limit themselves, in their header parser (WebP) or while
decoding (TIFF, GIF frames, ICO, MPO); those formats stay within twice Pillow's limit (about 179 MP),
and `open_image` or `load()` raises Pillow's `DecompressionBombError` for larger ones. JPEG, PNG,
BMP, AVIF and the other formats go as high as the caller's limit.
"""

from __future__ import annotations

import io
import struct
from typing import Sequence

from PIL import Image, UnidentifiedImageError


class TooManyPixels(ValueError):
    """The image declares more pixels than the caller allows (found before any pixel is decoded)."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"image is {width}×{height} = {width * height} pixels, over the limit of {limit}")
        self.width, self.height, self.limit = width, height, limit


# The loader's default pixel limit per image (`--max-pixels`); a user may set it above Pillow's own.
DEFAULT_MAX_PIXELS = 100_000_000


def open_image(data: bytes, max_pixels: int, formats: Sequence[str] | None = None) -> Image.Image:
    """The image in `data`, opened (header read, no pixels decoded) if it declares at most `max_pixels`.

    Raises TooManyPixels; Pillow's DecompressionBombError for a format that applies Pillow's limit
    itself (above); or what Pillow raises for a file it cannot identify (OSError and kin).
    """
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        image = _open_without_pillow_limit(data, formats)
    if image.width * image.height > max_pixels:
        image.close()
        raise TooManyPixels(image.width, image.height, max_pixels)
    return image


def _open_without_pillow_limit(data: bytes, formats: Sequence[str] | None) -> Image.Image:
    Image.init()  # registers every plugin; Image.open has done so already on the way here
    prefix = data[:16]
    for name in [f.upper() for f in formats] if formats else Image.ID:
        factory, accept = Image.OPEN[name]
        accepted = not accept or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a string is Pillow's "almost, but no" message
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError("cannot identify image file")
