"""The file decode and cat give back for each item, by the fidelity its row records (docs/FORMAT.md):

    byte-exact    the source file itself, rebuilt from the stream (`Codec.original_checked`) and written under
                  its own key, once its SHA-256 is the row's source_sha256: a file that differs is never written
    pixel-exact   the picture the loader made of the source, exactly, in the output format (PNG by default)
    lossy         the decoded picture, in the output format

Every picture is sRGB (the loader converts every source to it), so a PNG says so: its sRGB chunk, with the
gAMA and cHRM values the PNG specification gives for readers that do not know that chunk.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, PngImagePlugin

from ..codecs.base import Codec
from ..codecs.container import Header
from ..codecs.errors import BitstreamError
from .archive import BYTE_EXACT, LOSSY, Failure
from .batches import decode_streams
from .keys import output_name

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "bmp": "BMP"}


def srgb_png_chunks() -> PngImagePlugin.PngInfo:
    """sRGB (perceptual intent), and the gAMA (1/2.2) and cHRM (sRGB's primaries, D65) the PNG specification
    asks a writer of sRGB to add."""
    info = PngImagePlugin.PngInfo()
    info.add(b"sRGB", bytes([0]))
    info.add(b"gAMA", (45455).to_bytes(4, "big"))
    chromaticities = (31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)  # white, red, green, blue; ×100 000
    info.add(b"cHRM", b"".join(value.to_bytes(4, "big") for value in chromaticities))
    return info


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """An sRGB picture as a file of the output format (a PNG tagged sRGB)."""
    buffer = io.BytesIO()
    options = {"pnginfo": srgb_png_chunks()} if image_format == "png" else {}
    Image.fromarray(pixels, "RGB").save(buffer, OUTPUT_FORMATS[image_format], **options)
    return buffer.getvalue()


def decoded_name(key: str, image_format: str, fidelity: str) -> str:
    """The file under DST an item decodes to: a byte-exact item's original under its own key, any other's
    picture under its key with the output format's extension. An unsafe key raises UnsafeKeyError."""
    name = output_name(key, image_format)  # refuses a key that could climb out of DST
    return key if fidelity == BYTE_EXACT else name


def promises(table: pa.Table) -> dict[str, tuple[str, str]]:
    """key → (fidelity, source_sha256) of a shard's rows (read with those columns)."""
    return dict(zip(table.column("key").to_pylist(),
                    zip(table.column("fidelity").to_pylist(), table.column("source_sha256").to_pylist())))  # fmt: skip


def original_file(codec: Codec, stream: tuple[Header, bytes], sha256: str, max_pixels: int) -> bytes:
    """The source file a byte-exact item's stream keeps (the stream checked first, as for decoding), once
    its SHA-256 is `sha256`; BitstreamError otherwise."""
    codec.check(*stream, max_pixels)
    original = codec.original_checked(*stream)
    if original is None:
        raise BitstreamError("its row promises the source file byte for byte, but its stream keeps none")
    found = hashlib.sha256(original).hexdigest()
    if found != sha256:
        raise BitstreamError(f"the file rebuilt from its stream has SHA-256 {found}, the source's is {sha256}")
    return original


def output_files(
    codec: Codec, keys: list[str], streams: list[tuple[Header, bytes]], promised: dict[str, tuple[str, str]],
    failures: list[Failure], max_pixels: int, image_format: str,
) -> Iterator[tuple[str, bytes]]:  # fmt: skip
    """(key, file) for each item of a batch: byte-exact items' originals (`original_file`), the others'
    pictures decoded (`decode_streams`) and encoded in `image_format`; an item that fails is a failure."""
    others = []
    for key, stream in zip(keys, streams, strict=True):
        if promised[key][0] != BYTE_EXACT:
            others.append((key, stream))
            continue
        try:
            yield key, original_file(codec, stream, promised[key][1], max_pixels)
        except BitstreamError as exc:
            failures.append(Failure(key, "decode", str(exc)))
    decoded = decode_streams(codec, [key for key, _ in others], [stream for _, stream in others], failures, max_pixels)
    for key, pixels in decoded:
        yield key, encode_image(pixels, image_format)


def original_failures(
    codec: Codec, batch: list[tuple[str, tuple[Header, bytes]]], promised: dict[str, tuple[str, str]], max_pixels: int
) -> list[Failure]:  # fmt: skip
    """verify's check of what decode would write for the byte-exact items of a batch: a file that is rebuilt
    and has the source's SHA-256 (`original_file`)."""
    failures = []
    for key, stream in batch:
        if promised[key][0] == BYTE_EXACT:
            try:
                original_file(codec, stream, promised[key][1], max_pixels)
            except BitstreamError as exc:
                failures.append(Failure(key, "verify", f"original not rebuilt exactly: {exc}"))
    return failures


def exactness_problem(fidelity: str, source: np.ndarray, decoded: np.ndarray) -> str | None:
    """Why a decoded picture breaks its row's promise of exactness, compared with its source's picture."""
    if fidelity == LOSSY or np.array_equal(source, decoded):
        return None
    differ = int(np.any(source != decoded, axis=-1).sum())
    return f"{fidelity}, but {differ} of its pixels differ from the source's picture"
