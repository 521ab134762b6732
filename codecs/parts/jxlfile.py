"""JPEG XL files read with libjxl through imagecodecs (BSD), as Pillow images: what the loader needs of a
JPEG XL source, and the header facts the jxl codec checks before it decodes a payload.

A JPEG XL file either keeps a JPEG (JPEG reconstruction data, a `jbrd` box: a JPEG recompressed without
loss) or codes pixels. The first is opened as the JPEG it gives back, so its colour profile and EXIF
orientation are applied exactly as for that JPEG. The second is decoded to pixels (libjxl applies the
orientation); imagecodecs gives no colour profile with them, so their colours are known only where the
codestream's header says sRGB (its colour encoding, read here), which is what encoders write for sRGB
sources. Any other colour encoding (an ICC profile, Display P3, Rec. 2100, …) is refused with that
reason rather than taken as sRGB, which would shift its colours. (pillow-jxl-plugin reads the profile,
but it is GPL-3.0; diffarc keeps to permissive dependencies.)

Sizes and the colour encoding are read from the codestream's SizeHeader and ImageMetadata (ISO/IEC
18181-1), bit by bit, without decoding: a file's pixel count is checked against the caller's limit
before libjxl sees it.
"""

from __future__ import annotations

import io
import struct
from typing import Iterator

import numpy as np
from PIL import Image

JXL_CODESTREAM = b"\xff\x0a"
JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
# xsize = ysize × ratio for the SizeHeader's 3-bit ratio code (ISO/IEC 18181-1, SizeHeader).
_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
_HEADER_BYTES = 4096  # the SizeHeader and ImageMetadata fit (extra channel names are at most 1071 bytes each)
# U32 distributions (ISO/IEC 18181-1, U32): an int is a value, a pair (bits, offset) a field of that many bits.
_ENUM = (0, 1, (4, 2), (6, 18))
_SIZE = ((9, 1), (13, 1), (18, 1), (30, 1))
_CUSTOM_XY = ((19, 0), (19, 524288), (20, 1048576), (21, 2097152))
SRGB_ENUMS = {"colour_space": (0, 1), "white_point": 1, "primaries": 1, "transfer": 13}  # RGB or grey, D65, sRGB
LINEAR = 8  # the linear transfer function's enum


def is_jxl(data: bytes) -> bool:
    return data[:2] == JXL_CODESTREAM or data[:12] == JXL_CONTAINER


class _Bits:
    """A JPEG XL header's bits, least significant first; SyntaxError past the end."""

    def __init__(self, data: bytes):
        self.value, self.length, self.position = int.from_bytes(data, "little"), 8 * len(data), 0

    def read(self, count: int) -> int:
        if self.position + count > self.length:
            raise SyntaxError("JPEG XL header is truncated")
        value = (self.value >> self.position) & ((1 << count) - 1)
        self.position += count
        return value

    def u32(self, *distributions) -> int:
        chosen = distributions[self.read(2)]
        return chosen if isinstance(chosen, int) else self.read(chosen[0]) + chosen[1]


def _size_header(bits: _Bits) -> tuple[int, int]:
    small = bits.read(1)
    height = (bits.read(5) + 1) * 8 if small else bits.u32(*_SIZE)
    ratio = bits.read(3)
    if ratio:
        numerator, denominator = _RATIOS[ratio]
        return height * numerator // denominator, height
    return (bits.read(5) + 1) * 8 if small else bits.u32(*_SIZE), height


def jxl_size(data: bytes) -> tuple[int, int]:
    """(width, height) a JPEG XL file declares in its codestream's SizeHeader, read without decoding;
    SyntaxError when the bytes hold no readable one. Orientation may swap the two in the decoded picture."""
    codestream = _codestream_start(data, 18)  # the SizeHeader fits in 9 bytes
    if codestream[:2] != JXL_CODESTREAM:
        raise SyntaxError("JPEG XL file has no codestream")
    return _size_header(_Bits(codestream[2:]))


def jxl_colour(data: bytes) -> dict | None:
    """The colour encoding a JPEG XL file's ImageMetadata declares: None when it wants an ICC profile (coded
    further on, compressed), else its enums (`SRGB_ENUMS`' names; the transfer function "gamma", with
    "gamma", when one is given instead). SyntaxError when the header cannot be read."""
    bits = _Bits(_codestream_start(data, _HEADER_BYTES)[2:])
    _size_header(bits)
    if bits.read(1):  # the whole ImageMetadata is its defaults: sRGB
        return {"colour_space": 0, "white_point": 1, "primaries": 1, "transfer": 13}
    if bits.read(1):  # extra fields: orientation, intrinsic size, preview, animation
        bits.read(3)
        if bits.read(1):
            _size_header(bits)
        if bits.read(1):  # preview: div8 ? U32(16, 32, 5+1, 9+33) : U32(6+1, 8+65, 10+321, 12+1345), ratio, xsize
            form = (16, 32, (5, 1), (9, 33)) if bits.read(1) else ((6, 1), (8, 65), (10, 321), (12, 1345))
            bits.u32(*form)
            if not bits.read(3):
                bits.u32(*form)
        if bits.read(1):  # animation: ticks numerator and denominator, loops, timecodes
            bits.u32(100, 1000, (10, 1), (30, 1))
            bits.u32(1, 1001, (8, 1), (10, 1))
            bits.u32(0, (3, 0), (16, 0), (32, 0))
            bits.read(1)
    _bit_depth(bits)
    bits.read(1)  # modular_16_bit_buffer_sufficient
    for _ in range(bits.u32(0, 1, (4, 2), (12, 1))):  # extra channels
        if bits.read(1):
            continue
        kind = bits.u32(*_ENUM)
        _bit_depth(bits)
        bits.u32(0, 3, 4, (3, 1))  # dim_shift
        for _ in range(bits.u32(0, (4, 0), (5, 16), (10, 48))):  # its name, in bytes
            bits.read(8)
        bits.read({0: 1, 2: 64}.get(kind, 0))  # alpha: premultiplied; spot colour: 4 half floats
        if kind == 5:  # a colour filter array's channel
            bits.u32(1, (2, 0), (4, 3), (8, 19))
    bits.read(1)  # xyb_encoded: libjxl turns XYB back into the colour encoding declared next
    if bits.read(1):  # the colour encoding is its defaults: sRGB
        return {"colour_space": 0, "white_point": 1, "primaries": 1, "transfer": 13}
    if bits.read(1):  # want_icc
        return None
    colour = {"colour_space": bits.u32(*_ENUM)}
    if colour["colour_space"] != 2:  # XYB's white point and primaries are implicit
        colour["white_point"] = bits.u32(*_ENUM)
        if colour["white_point"] == 2:
            colour["white"] = [bits.u32(*_CUSTOM_XY) for _ in range(2)]
        if colour["colour_space"] != 1:  # greys have no primaries
            colour["primaries"] = bits.u32(*_ENUM)
            if colour["primaries"] == 2:
                colour["custom primaries"] = [bits.u32(*_CUSTOM_XY) for _ in range(6)]
        if bits.read(1):
            colour["transfer"], colour["gamma"] = "gamma", bits.read(24) / 1e7  # encoded = linear ** gamma
        else:
            colour["transfer"] = bits.u32(*_ENUM)
    return colour


def _bit_depth(bits: _Bits) -> None:
    if bits.read(1):  # floating point samples: bits, then exponent bits
        bits.u32(32, 16, 24, (6, 1))
        bits.read(4)
    else:
        bits.u32(8, 10, 12, (6, 1))


def readable(colour: dict | None) -> bool:
    """Whether pixels of this colour encoding can be turned into sRGB without a profile: sRGB's primaries
    and white (or grey), and sRGB's curve, a linear one or a pure gamma."""
    if colour is None or colour["colour_space"] not in SRGB_ENUMS["colour_space"]:
        return False
    same = all(colour.get(name, SRGB_ENUMS[name]) == SRGB_ENUMS[name] for name in ("white_point", "primaries"))
    return same and colour["transfer"] in (SRGB_ENUMS["transfer"], LINEAR, "gamma")


def _codestream_start(data: bytes, count: int) -> bytes:
    """The first `count` bytes of the codestream: the file itself, or gathered from the boxes of the
    container (one `jxlc` box, or `jxlp` parts, each after a 4-byte index)."""
    if data[:2] == JXL_CODESTREAM:
        return data[:count]
    gathered = b""
    for kind, start, end in jxl_boxes(data):
        if kind == b"jxlc":
            gathered += data[start:end]
        elif kind == b"jxlp":
            gathered += data[start + 4 : end]
        if len(gathered) >= count:
            break
    return gathered[:count]


def jxl_boxes(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of each box of a JPEG XL container (ISO BMFF boxes), its contents data[start:end];
    stops at the first box whose size is damaged."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        start = offset + 8
        if size == 1:
            if offset + 16 > len(data):
                return
            size, start = struct.unpack_from(">Q", data, offset + 8)[0], offset + 16
        end = len(data) if size == 0 else offset + size
        if end < start or end > len(data):
            return
        yield kind, start, end
        offset = end


def keeps_jpeg(data: bytes) -> bool:
    """Whether a JPEG XL file carries JPEG reconstruction data (a `jbrd` box of the container)."""
    return data[:12] == JXL_CONTAINER and any(kind == b"jbrd" for kind, _, _ in jxl_boxes(data))


def open_jxl(data: bytes) -> Image.Image:
    """A JPEG XL file (its size already checked by the caller) as a Pillow image whose format is "JXL": the
    JPEG it keeps, opened, or its pixels decoded, when its header says they are sRGB. SyntaxError for a
    file libjxl cannot read, ValueError for one in another colour encoding (module docstring)."""
    # libjxl is loaded with the first JPEG XL file: a process that meets none (a training run on JPEGs on a
    # bare GPU box, say) runs without imagecodecs installed.
    import imagecodecs

    try:
        if keeps_jpeg(data):
            jpeg = bytes(imagecodecs.jpegxl_decode_jpeg(data, numthreads=1))
            image = Image.open(io.BytesIO(jpeg), formats=["JPEG"])
            image.format = "JXL"
            return image
        colour = jxl_colour(data)
        if not readable(colour):
            described = "an ICC profile" if colour is None else ", ".join(f"{k} {v}" for k, v in colour.items())
            raise ValueError(f"JPEG XL pixels in a colour encoding other than sRGB ({described}): not read, since "
                             "diffarc's JPEG XL reader gives no colour profile to convert them with")  # fmt: skip
        pixels = srgb_pixels(imagecodecs.jpegxl_decode(data, 0, numthreads=1), colour)
    except imagecodecs.JpegxlError:
        raise SyntaxError("JPEG XL data is damaged or truncated (libjxl cannot decode it)") from None
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    mode = "L" if pixels.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    image = Image.fromarray(np.ascontiguousarray(pixels), mode)
    image.format = "JXL"
    return image


def srgb_pixels(pixels: np.ndarray, colour: dict) -> np.ndarray:
    """libjxl's pixels (8 or 16 bits, or floats in [0, 1]) of a `readable` colour encoding as 8-bit sRGB.
    sRGB-coded 16-bit samples keep their 8 most significant bits, as the loader does for 16-bit PNGs; the
    others go through linear light (alpha, the last of 2 or 4 channels, is not a colour and only scaled)."""
    if colour["transfer"] == SRGB_ENUMS["transfer"] and pixels.dtype != np.float32 and pixels.dtype != np.float64:
        return (pixels >> 8).astype(np.uint8) if pixels.dtype == np.uint16 else pixels
    scale = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(pixels.dtype, 1)
    values = np.clip(pixels.astype(np.float64) / scale, 0, 1)
    colours = values if values.ndim == 2 or values.shape[2] in (1, 3) else values[..., :-1]
    if colour["transfer"] != SRGB_ENUMS["transfer"]:  # to linear light (a gamma's inverse), then sRGB's curve
        if colour["transfer"] == "gamma":
            colours **= 1 / colour["gamma"]
        colours[...] = np.where(colours <= 0.0031308, 12.92 * colours, 1.055 * colours ** (1 / 2.4) - 0.055)
    return np.rint(values * 255).astype(np.uint8)
