"""Images/s of the full `encode` pipeline next to a bare single-process loop over the same codec and images.

    python benchmarks/pipeline_throughput.py [FOLDER] [--codec jpeg] [--repeat 4]

The bare loop reads, loads and encodes each image in this process, one at a time: what a user's own
script would do. The pipeline figure is `run_encode` into a fresh archive (listing, Ray actors,
Parquet shards, manifest commits), timed after Ray has started, so start-up is reported separately.
`--repeat` copies the folder's images N times under distinct keys so the run is long enough to measure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray

from diffarc.codecs.registry import create_codec
from diffarc.pipeline.cluster import connect
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.images import load_rgb
from diffarc.pipeline.sources import is_image_name

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"


def bare_loop(files: list[Path], codec_name: str) -> float:
    codec = create_codec(codec_name)
    started = time.perf_counter()
    for path in files:
        codec.encode([load_rgb(path.read_bytes())])
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--codec", default="jpeg")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()

    originals = sorted(p for p in Path(args.folder).iterdir() if is_image_name(p.name))
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "src"
        for copy in range(args.repeat):
            (src / f"copy{copy}").mkdir(parents=True)
            for path in originals:
                shutil.copy(path, src / f"copy{copy}" / path.name)
        files = sorted(p for p in src.rglob("*") if p.is_file())

        bare = bare_loop(files, args.codec)
        started = time.perf_counter()
        connect()
        startup = time.perf_counter() - started
        summary = run_encode(str(src), str(Path(scratch) / "archive"), EncodeOptions(args.codec, shard_size=args.shard_size))
        ray.shutdown()

    cpus = os.cpu_count()
    print(f"{len(files)} images ({len(originals)} × {args.repeat}) from {args.folder}, codec {args.codec}, {cpus} CPUs")
    print(f"{'bare single-process loop':<34}{bare:8.2f} images/s")
    print(f"{'diffarc encode pipeline (Ray)':<34}{summary.images_per_second:8.2f} images/s  "
          f"({len(summary.workers)} actors; {summary.seconds:.1f} s, plus {startup:.1f} s Ray start-up)")
    print(f"{'pipeline / bare':<34}{summary.images_per_second / bare:8.2f}×")


if __name__ == "__main__":
    main()
