"""Make what a training run on a lent GPU machine needs fit what that machine is sent (infra/lent-gpu/README.md).

That machine is sent this checkout's working tree plus the folders a call carries, 64 MiB in all; it has
PyTorch and CUDA but no Ray, diffusers or pillow-heif, and no network. This script, run here:

1. writes the training images, re-encoded to fit (`.device/images/`: JPEG, long side at most --max-side);
2. downloads the wheels the run needs that the machine lacks (`.device/wheels/`, this environment's versions);
3. moves the tracked files the run does not need out of the working tree (into `.device-aside/`, which git
   ignores): every built-in model but those named by --keep, and the documentation's pictures;
4. prints what will travel, against the limit.

`--restore` puts the set-aside files back. Never point --data at Kodak: it is the evaluation set.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / ".device"
ASIDE = REPO / ".device-aside"
LIMIT = 64 * 2**20  # what one call may send: the working tree and its carried folders
# The distributions the training run imports that the machine's image does not hold (KINDS.md's list):
# diffusers (and its importlib_metadata), pillow-heif (which needs a newer Pillow than the image may have).
WHEELS = ["diffusers", "importlib_metadata", "pillow", "pillow_heif"]
SET_ASIDE = ["codecs/builtin", "docs/models"]  # minus what --keep names
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"}


def pack_images(data: Path, out: Path, max_side: int, quality: int) -> int:
    """Every image under `data`, at most `max_side` pixels on its long side (Lanczos), as JPEG; the bytes written."""
    from PIL import Image  # only here: --restore runs in any Python

    total = 0
    for source in sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(source) as image:
            picture = image.convert("RGB")
        scale = max_side / max(picture.size)
        if scale < 1:
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=quality)
        target = out / source.relative_to(data).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def download_wheels(out: Path, python: str) -> None:
    """This environment's versions, built for the machine's Python (3.12 there) on x86-64 Linux."""
    out.mkdir(parents=True, exist_ok=True)
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", tag)]  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *platforms, "--dest", str(out), *pinned], check=True)  # fmt: skip


def tracked(paths: list[str]) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=REPO, capture_output=True, check=True).stdout
    return [Path(name) for name in listed.decode().split("\0") if name]


def set_aside(keep: list[str]) -> int:
    """Move the tracked files under SET_ASIDE, but not under `keep`, into ASIDE; the bytes moved."""
    moved = 0
    for relative in tracked(SET_ASIDE):
        if any(relative.is_relative_to(Path("codecs/builtin") / kept) for kept in keep) or not (REPO / relative).exists():
            continue
        target = ASIDE / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        moved += (REPO / relative).stat().st_size
        shutil.move(REPO / relative, target)
    return moved


def restore() -> None:
    for moved in sorted(p for p in ASIDE.rglob("*") if p.is_file()):
        target = REPO / moved.relative_to(ASIDE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(moved, target)
    shutil.rmtree(ASIDE, ignore_errors=True)


def size_of(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder of training images (../shared/data/train)")
    parser.add_argument("--keep", action="append", default=["taef2/vae"],
                        help="a built-in model folder (under codecs/builtin) the run needs, e.g. taef2/unet to fine-tune it")
    parser.add_argument("--max-side", type=int, default=768)
    parser.add_argument("--quality", type=int, default=88)
    parser.add_argument("--python", default="3.12", help="the machine's Python version, for the wheels")
    parser.add_argument("--restore", action="store_true", help="put the set-aside files back, and stop")
    args = parser.parse_args()
    if args.restore:
        restore()
        print(f"restored the files set aside in {ASIDE}")
        return
    if args.data is None:
        parser.error("--data is required")
    shutil.rmtree(PACK / "images", ignore_errors=True)
    images = pack_images(args.data, PACK / "images", args.max_side, args.quality)
    shutil.rmtree(PACK / "wheels", ignore_errors=True)
    download_wheels(PACK / "wheels", args.python)
    moved = set_aside(args.keep)
    tree = size_of([REPO / p for p in tracked(["."])])
    untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    tree += size_of([REPO / n for n in untracked.stdout.decode().split("\0") if n])
    carried = size_of(list(PACK.rglob("*")))
    print(f"images {images / 2**20:.1f} MiB, wheels {size_of(list((PACK / 'wheels').iterdir())) / 2**20:.1f} MiB; "
          f"set aside {moved / 2**20:.1f} MiB of tracked files (restore: {Path(__file__).name} --restore)")  # fmt: skip
    print(f"travels: tree {tree / 2**20:.1f} MiB + carried .device {carried / 2**20:.1f} MiB = "
          f"{(tree + carried) / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB")  # fmt: skip
    if tree + carried > LIMIT:
        sys.exit("over the limit: lower --max-side or --quality, or keep fewer models")


if __name__ == "__main__":
    main()
