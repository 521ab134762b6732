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
BMP, AVIF, HEIF and the other formats go as high as the caller's limit. A JPEG XL file's size is read
from its own header (`jxlfile.jxl_size`) and checked before libjxl decodes it.

HEIF/HEIC (pillow-heif, over libheif) is registered with Pillow when this module is imported; JPEG XL,
which Pillow does not read, is opened by jxlfile.py (libjxl through imagecodecs) as a Pillow image, so
every caller of `open_image` reads both.

`srgb_picture` turns an opened image into the picture a colour-managed viewer shows, in sRGB: the one
conversion the loader (pipeline/images.py) and any codec that decodes a kept source file (jxl) share, so
both give the same pixels for the same file.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .jxlfile import is_jxl, jxl_size, open_jxl

pillow_heif.register_heif_opener(thumbnails=False)


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
    if is_jxl(data) and (not formats or "JXL" in formats):  # Pillow has no JPEG XL reader: jxlfile.py
        width, height = jxl_size(data)
        if width * height > max_pixels:
            raise TooManyPixels(width, height, max_pixels)
        return open_jxl(data)
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        image = _open_without_pillow_limit(data, formats)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(_why_unidentified(data, formats)) from None
    if image.width * image.height > max_pixels:
        image.close()
        raise TooManyPixels(image.width, image.height, max_pixels)
    return image


def _why_unidentified(data: bytes, formats: Sequence[str] | None) -> str:
    """Why Pillow could not open `data`: what the plugin of the format its first bytes announce (a truncated
    HEIF file, say) found wrong, where one does; Pillow itself says only that no plugin could."""
    for name in [f.upper() for f in formats] if formats else Image.ID:
        factory, accept = Image.OPEN[name]
        if accept and accept(data[:16]) and not isinstance(accept(data[:16]), str):
            try:
                factory(io.BytesIO(data), "").close()
            except Exception as exc:  # whatever the plugin raises is the reason, said once
                return f"cannot read it as {name}: {exc}"
    return "cannot identify image file"


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


@dataclass(frozen=True)
class Picture:
    """An image file's picture as the archive stores it, and what was done to its colours on the way."""

    pixels: np.ndarray  # H×W×3 uint8, sRGB
    format: str  # the file's format as Pillow names it: "JPEG", "PNG", "HEIF", "JXL", …
    profile: str | None = None  # the embedded ICC profile's description; None: the file has none (taken as sRGB)
    converted: bool = False  # the pixels were converted from that profile to sRGB (False with a profile: unusable)


_PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}  # an ICC colour space → the Pillow mode it describes
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "PA": "RGB", "LA": "L", "La": "L"}  # … and the mode without it


def srgb_picture(image: Image.Image) -> Picture:
    """The picture a colour-managed viewer shows for an opened image (its current frame), as sRGB pixels.

    - EXIF orientation is applied.
    - An embedded ICC profile (RGB, greyscale or CMYK) is applied with littleCMS (Pillow's ImageCms), to
      sRGB, perceptual intent (matrix-shaper profiles, such as Display P3 or Adobe RGB, have only the
      colorimetric one, which littleCMS then uses). A profile that littleCMS cannot read, or that does
      not describe the image's colour space, is left unused and the pixels are taken as sRGB, as
      browsers do. Without a profile the pixels are taken as sRGB (CMYK: Pillow's profile-free formula).
    - Alpha is composited over white, after the conversion; 16-bit greyscale keeps its 8 most
      significant bits; palette and greyscale images are expanded to RGB.
    Pillow's decoding errors (OSError, ValueError, …) pass through to the caller.
    """
    image_format = image.format or ""
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow stores 16-bit greyscale as 'I;16' or 'I'; its conversions clip instead of scaling.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    alpha = None
    if image.mode in _ALPHA_MODES:
        alpha = image.convert("RGBA").getchannel("A")
        image = image.convert(_ALPHA_MODES[image.mode])
    profile, converted = None, False
    if icc:
        image, profile, converted = _convert_to_srgb(image, icc)
    picture = image.convert("RGB")
    if alpha is not None:
        picture.putalpha(alpha)
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(white, picture).convert("RGB")
    return Picture(np.ascontiguousarray(np.asarray(picture, dtype=np.uint8)), image_format, profile, converted)


def _convert_to_srgb(image: Image.Image, icc: bytes) -> tuple[Image.Image, str, bool]:
    """(image in sRGB or as it was, the profile's description, whether it was converted)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = " ".join(ImageCms.getProfileDescription(profile).split()) or "(a profile without a description)"
    except (OSError, ImageCms.PyCMSError):
        return image, "(an unreadable profile)", False
    mode = _PROFILE_MODES.get(profile.profile.xcolor_space.strip())
    if mode == "RGB" and image.mode == "L":
        image = image.convert("RGB")  # grey pixels tagged with an RGB profile: the profile's greys
    if mode != image.mode:
        return image, description, False
    try:
        # A fresh sRGB profile each time: littleCMS profile handles are not to be shared between threads.
        srgb = ImageCms.createProfile("sRGB")
        transform = ImageCms.buildTransform(profile, srgb, mode, "RGB", ImageCms.Intent.PERCEPTUAL)
        return ImageCms.applyTransform(image, transform), description, True
    except ImageCms.PyCMSError:
        return image, description, False
