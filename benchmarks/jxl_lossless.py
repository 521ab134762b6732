"""The lossless mode (`jxl:lossless=1`) on Kodak: JPEG sources come back byte for byte, PNG sources pixel for pixel.

    python benchmarks/jxl_lossless.py [FOLDER] [--quality 90] [--effort 7]

1. Each image of FOLDER (default the Kodak set in ../shared/data/kodak; the script says so and stops when it
   is absent) is saved as a JPEG of --quality (Pillow, libjpeg-turbo, 4:2:0), loaded by the pipeline's
   loader, and encoded with its file (`encode(pixels, originals=[file])`), as the pipeline hands a source.
   Every reconstructed file's SHA-256 must equal the JPEG's; reported: bytes against the JPEGs.
2. Each PNG original is encoded from its pixels; every decoded picture must equal the loaded one.
   Reported: bytes against the PNG files and against lossless WebP (Pillow, libwebp, method 6: its
   smallest) of the same pixels.
Sizes are whole streams (the container's framing included: what a standalone stream costs); times are
one core's (libjxl on one thread), for encoding and for decoding the pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffarc.codecs.registry import create_codec
from diffarc.pipeline.images import load_picture
from diffarc.pipeline.sources import is_image_name

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"


def saved(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the JPEG sources")
    parser.add_argument("--effort", type=int, default=7, help="libjxl effort")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not there: give a folder of images (the Kodak set is ../shared/data/kodak)")
    files = sorted(p for p in folder.iterdir() if is_image_name(p.name))
    codec = create_codec("jxl", {"lossless": 1, "effort": args.effort})

    jpeg_bytes = kept_bytes = exact = 0
    encode_s = decode_s = 0.0
    for path in files:
        jpeg = saved(load_picture(path.read_bytes()).pixels, "JPEG", quality=args.quality)
        picture = load_picture(jpeg).pixels
        started = time.perf_counter()
        stream = codec.encode([picture], originals=[jpeg])[0]
        encode_s += time.perf_counter() - started
        started = time.perf_counter()
        decoded = codec.decode([stream])[0]
        decode_s += time.perf_counter() - started
        original = codec.original(stream)
        same = original is not None and hashlib.sha256(original).digest() == hashlib.sha256(jpeg).digest()
        exact += same and np.array_equal(decoded, picture)
        jpeg_bytes += len(jpeg)
        kept_bytes += len(stream)
    n = len(files)
    print(f"JPEG q{args.quality} sources, {n} images: {exact}/{n} byte-exact (SHA-256 equal) and pixel-exact")
    print(f"  JPEG files {jpeg_bytes:,} B, jxl lossless streams {kept_bytes:,} B: "
          f"{100 * (1 - kept_bytes / jpeg_bytes):.1f} % saved")  # fmt: skip
    print(f"  encode {encode_s / n:.3f} s, decode (pixels) {decode_s / n:.3f} s per image")

    png_bytes = webp_bytes = jxl_bytes = exact = 0
    encode_s = decode_s = 0.0
    for path in files:
        data = path.read_bytes()
        picture = load_picture(data).pixels
        started = time.perf_counter()
        stream = codec.encode([picture], originals=[data])[0]
        encode_s += time.perf_counter() - started
        started = time.perf_counter()
        exact += np.array_equal(codec.decode([stream])[0], picture)
        decode_s += time.perf_counter() - started
        png_bytes += len(data)
        webp_bytes += len(saved(picture, "WEBP", lossless=True, quality=100, method=6))
        jxl_bytes += len(stream)
    print(f"PNG originals ({folder.name}), {n} images: {exact}/{n} pixel-exact")
    print(f"  PNG {png_bytes:,} B, lossless WebP (method 6) {webp_bytes:,} B, jxl lossless {jxl_bytes:,} B: "
          f"{100 * (1 - jxl_bytes / png_bytes):.1f} % under PNG, {100 * (1 - jxl_bytes / webp_bytes):.1f} % under WebP")  # fmt: skip
    print(f"  encode {encode_s / n:.3f} s, decode {decode_s / n:.3f} s per image")


if __name__ == "__main__":
    main()
