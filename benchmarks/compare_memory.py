"""What `verify --against`'s comparisons hold in memory as image sizes change, with and without handing
freed heap back after each (`verify.release_freed_memory`, glibc's malloc_trim).

    nice python benchmarks/compare_memory.py [FOLDER]

Each Kodak image (FOLDER, default ../shared/data/kodak), cropped to a size of its own, is compared with a
noisy copy as verify compares a decoded image with its original (PSNR, MS-SSIM, LPIPS-squeeze where its
weights are found: DIFFARC_LPIPS_WEIGHTS or ../shared), in a child process per mode on one thread. Printed for each mode: the process's RSS
after the first, 8th, 16th and last image, and its largest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline_throughput import DEFAULT_FOLDER  # this folder is on the path of a script run here


def measure(folder: Path, release: bool) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from diffarc.codecs.parts.metrics import LPIPS, find_lpips_weights, ms_ssim, psnr
    from diffarc.pipeline.verify import release_freed_memory

    torch.set_num_threads(1)
    shipped = sorted((DEFAULT_FOLDER.parents[1] / "weights" / "lpips-squeeze").glob("*.safetensors"))
    weights = find_lpips_weights() or (shipped[0] if shipped else None)
    lpips = LPIPS(weights, "cpu") if weights else None
    rng = np.random.default_rng(0)
    seen = []
    for index, path in enumerate(sorted(folder.glob("*.png")), 1):
        picture = np.asarray(Image.open(path).convert("RGB"))
        height, width = picture.shape[:2]
        original = np.ascontiguousarray(picture[: height - 7 * index, : width - 11 * index])  # a size of its own
        decoded = np.clip(original.astype(int) + rng.integers(-5, 5, original.shape), 0, 255).astype(np.uint8)
        psnr(original, decoded), ms_ssim(original, decoded)
        if lpips is not None:
            lpips(original, decoded)
        if release:
            release_freed_memory()
        seen.append(int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024)
    marks = ", ".join(str(seen[i]) for i in (0, 7, 15, len(seen) - 1) if i < len(seen))
    print(f"  {'released' if release else 'kept    '}: RSS after images 1, 8, 16, last: {marks} MiB; "
          f"largest {max(seen)} MiB (LPIPS {'on' if lpips else 'off: no weights'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--mode", choices=("released", "kept"), help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    if args.mode:
        return measure(Path(args.folder), args.mode == "released")
    print(f"verify's comparisons over {args.folder}, each image at a size of its own, one thread")
    for mode in ("kept", "released"):
        subprocess.run([sys.executable, __file__, args.folder, "--mode", mode], check=True)


if __name__ == "__main__":
    sys.exit(main())
