"""JPEG XL through libjxl (imagecodecs, which bundles it; Pillow has no JPEG XL writer): a classical
reference, and diffarc's lossless mode. A module of its own so that the other classical codecs, and hfd's
AVIF base that uses them, load without libjxl.

Each payload is the plain .jxl file. JPEG XL (ISO/IEC 18181): `jxl:distance=D` is lossy, D the Butteraugli
distance libjxl aims at (1 ≈ visually lossless); `lossless=1` is diffarc's lossless mode: the pixels come
back exactly, and a JPEG source is kept as JPEG XL's lossless recompression of that file, with the
reconstruction data that gives the JPEG back byte for byte (`original`). Such a stream's pixels are the
kept JPEG's, decoded as the loader decodes a source (`srgb_picture`), so they equal the pixels that were
encoded; the codec checks both when it encodes, and codes the pixels instead when either fails (a JPEG
that libjxl cannot recompress: CMYK, arithmetic coding).
"""

from __future__ import annotations

import imagecodecs
import numpy as np

from .base import Codec, Param
from .container import Header
from .errors import BitstreamError
from .parts.imagefile import open_image, srgb_picture
from .parts.jxlfile import jxl_size, keeps_jpeg


class JxlCodec(Codec):
    name = "jxl"
    description = "JPEG XL (libjxl via imagecodecs): lossy by distance, or lossless=1, keeping a JPEG source whole."
    params = (
        Param("distance", float, 1.0, "Butteraugli distance: 0.05 (best) to 25 (smallest); unused with lossless=1",
              minimum=0.05, maximum=25.0),
        Param("effort", int, 7, "encoder effort, 1 (fast) to 9 (slow, smaller)", minimum=1, maximum=9),
        Param("lossless", int, 0, "1: pixels exact, and a JPEG source kept as its own file", choices=(0, 1)),
    )  # fmt: skip
    presets = {"low": {"distance": 6.0}, "medium": {"distance": 3.0}, "high": {"distance": 1.0}}  # lossless=1 is no rate

    @property
    def lossless(self) -> bool:
        return self.config["lossless"] == 1

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        options = {"lossless": True} if self.lossless else {"distance": self.config["distance"]}
        effort = self.config["effort"]
        return [bytes(imagecodecs.jpegxl_encode(image, effort=effort, numthreads=1, **options)) for image in images]

    def encode_originals(self, images: list[np.ndarray], originals: list[bytes | None]) -> list[bytes]:
        return [
            self._kept_jpeg(image, original) or self.encode_payloads([image])[0]
            for image, original in zip(images, originals, strict=True)
        ]

    def _kept_jpeg(self, image: np.ndarray, original: bytes | None) -> bytes | None:
        """JPEG XL's recompression of a JPEG source, if the file comes back from it byte for byte and its
        picture is `image`; else None."""
        if original is None or original[:3] != b"\xff\xd8\xff":
            return None
        try:
            payload = bytes(imagecodecs.jpegxl_encode_jpeg(original, numthreads=1))
            if imagecodecs.jpegxl_decode_jpeg(payload, numthreads=1) != original:
                return None
            height, width = image.shape[:2]
            if not np.array_equal(self._kept_picture(payload, width, height), image):
                return None
        except (imagecodecs.JpegxlError, BitstreamError, ValueError, RuntimeError):
            return None  # not a JPEG libjxl can recompress (CMYK, arithmetic coding, damage): code the pixels
        return payload

    def keeps_original(self, payload: bytes) -> bool:
        return keeps_jpeg(payload)

    def original_checked(self, header: Header, payload: bytes) -> bytes | None:
        if not keeps_jpeg(payload):
            return None
        self._check_size(payload, header.width, header.height, kept=True)
        try:
            return bytes(imagecodecs.jpegxl_decode_jpeg(payload, numthreads=1))
        except MemoryError:
            raise
        except Exception as exc:
            raise BitstreamError(f"jxl payload's JPEG does not reconstruct: {type(exc).__name__}: {exc}") from None

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [self._decode(payload, header) for payload, header in zip(payloads, headers, strict=True)]

    def _decode(self, payload: bytes, header: Header) -> np.ndarray:
        # libjxl reports hostile bytes as JpegxlError, ValueError or RuntimeError; Pillow (a kept JPEG) as
        # OSError and kin: each means "this payload does not decode". Running out of memory is not hidden.
        try:
            if keeps_jpeg(payload):
                return self._kept_picture(payload, header.width, header.height)
            self._check_size(payload, header.width, header.height, kept=False)
            pixels = imagecodecs.jpegxl_decode(payload, 0, numthreads=1)
        except (MemoryError, BitstreamError):
            raise
        except Exception as exc:
            raise BitstreamError(f"jxl payload does not decode: {type(exc).__name__}: {exc}") from None
        if pixels.shape != (header.height, header.width, 3) or pixels.dtype != np.uint8:
            raise BitstreamError(f"jxl payload decodes to a {pixels.shape} {pixels.dtype} picture, not 8-bit RGB")
        return pixels

    def _kept_picture(self, payload: bytes, width: int, height: int) -> np.ndarray:
        """The picture of the JPEG a payload keeps, as the loader makes it from the JPEG file."""
        self._check_size(payload, width, height, kept=True)
        jpeg = bytes(imagecodecs.jpegxl_decode_jpeg(payload, numthreads=1))
        with open_image(jpeg, width * height, formats=["JPEG", "MPO"]) as image:
            image.load()
            pixels = srgb_picture(image).pixels
        if pixels.shape[:2] != (height, width):
            raise BitstreamError(
                f"jxl payload keeps a JPEG of {pixels.shape[1]}×{pixels.shape[0]}; the stream header says {width}×{height}"
            )
        return pixels

    @staticmethod
    def _check_size(payload: bytes, width: int, height: int, kept: bool) -> None:
        """Refuse, before any decoding, a payload whose codestream is not the header's size (a kept JPEG's
        may be turned: its EXIF orientation is applied after decoding)."""
        try:
            size = jxl_size(payload)
        except SyntaxError as exc:
            raise BitstreamError(f"jxl payload has no readable size: {exc}") from None
        if size != (width, height) and not (kept and size == (height, width)):
            raise BitstreamError(f"jxl payload is {size[0]}×{size[1]}, the stream header says {width}×{height}")

