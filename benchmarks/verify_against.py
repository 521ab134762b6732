"""What `verify --against` costs next to `decode`: time and the peak memory of a worker.

    nice python benchmarks/verify_against.py [FOLDER] [--codec hfd] [--images 24] [--actors 1] [--shard-size 24]

FOLDER (default: Kodak) is encoded with --codec (the first --images files, not timed); then `diffarc decode`
and `diffarc verify --against FOLDER` run on the archive, each as its own command (its own Ray), with
--actors workers. While each runs, every worker process (ray::DecodeWorker, ray::VerifyWorker) has its
resident memory read from /proc five times a second. Printed for each: wall seconds and the largest
worker's peak RSS, and verify's ratio to decode for both (issue 27's targets: memory ≤ 1.5×, time ≤ 1.3×).
LPIPS-squeeze is measured when its weights are found (DIFFARC_LPIPS_WEIGHTS or ../shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline_throughput import DEFAULT_FOLDER  # this folder is on the path of a script run here

WORKERS = ("ray::DecodeWorker", "ray::VerifyWorker")


def peak_worker_rss(stop: threading.Event, peaks: dict[int, int]) -> None:
    """Until `stop`, the peak VmRSS (bytes) of every live decode or verify worker, by pid."""
    while not stop.wait(0.2):
        for process in Path("/proc").iterdir():
            if not process.name.isdigit():
                continue
            try:
                title = (process / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if not title.startswith(WORKERS):
                    continue
                rss = next(int(line.split()[1]) * 1024 for line in (process / "status").read_text().splitlines()
                           if line.startswith("VmRSS:"))  # fmt: skip
            except (OSError, StopIteration, ValueError):
                continue
            peaks[int(process.name)] = max(peaks.get(int(process.name), 0), rss)


def timed(command: list[str]) -> tuple[float, int]:
    """(wall seconds, the largest worker's peak RSS) of one `diffarc` command."""
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=peak_worker_rss, args=(stop, peaks), daemon=True)
    sampler.start()
    began = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "diffarc.jobs.cli", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    stop.set()
    sampler.join()
    if run.returncode not in (0, 3, 4):
        raise SystemExit(f"{' '.join(command)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return seconds, max(peaks.values(), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--codec", default="hfd")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffarc-verify-against-") as scratch:
        source = Path(scratch) / "source"
        source.mkdir()
        for path in sorted(Path(args.folder).iterdir())[: args.images]:
            shutil.copyfile(path, source / path.name)
        archive = f"{scratch}/archive"
        common = ["--actors", str(args.actors)]
        subprocess.run([sys.executable, "-m", "diffarc.jobs.cli", "encode", str(source), archive, "--codec", args.codec,
                        "--shard-size", str(args.shard_size), *common], check=True, capture_output=True)  # fmt: skip
        decode = timed(["decode", archive, f"{scratch}/out", *common])
        verify = timed(["verify", archive, "--against", str(source), *common])
    print(f"{args.images} images of {args.folder}, {args.codec}, {args.actors} worker(s), shards of {args.shard_size}")
    for name, (seconds, rss) in (("decode", decode), ("verify --against", verify)):
        print(f"  {name}: {seconds:.1f} s, worker peak RSS {rss / 2**30:.2f} GiB")
    print(f"  verify / decode: time {verify[0] / decode[0]:.2f}×, memory {verify[1] / max(decode[1], 1):.2f}×")


if __name__ == "__main__":
    os.environ.setdefault("DIFFARC_LOG_LEVEL", "warning")
    sys.exit(main())
