"""The lossless mode through the whole pipeline, on Kodak: encode with jxl lossless=1, info, decode, verify.

Two collections, each encoded, described, decoded and verified against its source folder:
- Kodak as JPEG q90 (made here, Pillow, 4:2:0): every item should be byte-exact, and every decoded file's
  SHA-256 the source's;
- the Kodak PNG originals: every item pixel-exact, every decoded PNG's picture the loaded source's.
Prints, per collection: the fidelity counts `diffarc info` gives, source and archive bytes, how many decoded
files are their source byte for byte (or picture for picture), verify's verdict, and the seconds of each step.

    nice -n 15 python benchmarks/lossless_pipeline.py [--images N] [--only jpeg|png] [--work /tmp/lossless-pipeline]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from diffarc.pipeline.decode import run_decode
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.images import load_picture
from diffarc.pipeline.info import archive_info
from diffarc.pipeline.verify import run_verify

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def run(src: Path, work: Path) -> None:
    timings = {}
    started = time.perf_counter()
    summary = run_encode(str(src), str(work / "arc"), EncodeOptions("jxl", {"lossless": 1}, actors=2))
    timings["encode"] = time.perf_counter() - started
    facts = archive_info(str(work / "arc"))
    started = time.perf_counter()
    decoded = run_decode(str(work / "arc"), str(work / "out"))
    timings["decode"] = time.perf_counter() - started
    same_bytes = same_picture = 0
    for source in sorted(src.iterdir()):
        data = source.read_bytes()
        kept = work / "out" / source.name  # a byte-exact item's file, or a PNG source's decoded PNG
        if kept.exists() and hashlib.sha256(kept.read_bytes()).digest() == hashlib.sha256(data).digest():
            same_bytes += 1
            continue
        with Image.open(work / "out" / f"{source.stem}.png") as png:
            same_picture += np.array_equal(np.asarray(png.convert("RGB")), load_picture(data).pixels)
    started = time.perf_counter()
    verified = run_verify(str(work / "arc"), against=str(src))
    timings["verify"] = time.perf_counter() - started
    print(f"{src.name}: {summary.encoded} encoded, {summary.failed} failed; info: {facts['fidelity']}, "
          f"{facts['colour_converted']} converted")  # fmt: skip
    print(f"  source {facts['source_bytes']:,} B → archive {facts['archive_bytes']:,} B "
          f"({100 * (1 - facts['archive_bytes'] / facts['source_bytes']):.1f} % smaller)")  # fmt: skip
    print(f"  decode: {decoded.decoded} files, {len(decoded.failures)} failed; {same_bytes} byte for byte the source, "
          f"{same_picture} PNGs the loaded source's picture exactly")  # fmt: skip
    print(f"  verify --against: {'INTACT' if verified.intact else 'NOT INTACT'}, {verified.decoded} decoded, "
          f"{len(verified.failures)} failures")  # fmt: skip
    print("  seconds: " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lossless-pipeline"))
    parser.add_argument("--only", choices=["jpeg", "png"], help="run one collection only")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    pngs = sorted(KODAK.glob("*.png"))[: args.images]
    jpegs = args.work / "kodak-jpeg-q90"
    jpegs.mkdir(parents=True)
    for png in pngs:
        buffer = io.BytesIO()
        Image.open(png).convert("RGB").save(buffer, "JPEG", quality=90)
        (jpegs / f"{png.stem}.jpg").write_bytes(buffer.getvalue())
    originals = args.work / "kodak-png"
    originals.mkdir()
    for png in pngs:
        shutil.copy(png, originals / png.name)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, src in (("jpeg", jpegs), ("png", originals)):
            if args.only in (None, name):
                run(src, args.work / f"{src.name}-run")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
