"""What a small job costs the machine: CPU seconds of encode, decode and verify of a few images on a local
Ray, with the bare codec loop (the same images, in this process) beside them as the baseline.

    python benchmarks/small_job_cost.py [--codec jpeg] [--images 6] [--shard-size 6]

Ray's start-ups dominate a small job: each actor is a new Python process that imports what its codec
needs, so the figures are whole-machine CPU seconds read from /proc/stat (Linux), nice time included,
because Ray runs its workers at nice 15 (user + system of this process would miss them). Run it on an
otherwise idle machine. Printed per job: wall seconds and machine CPU seconds (each job starts one actor
per CPU, two here).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from suite_cpu import machine_cpu_seconds  # beside this script


def measured(what: str, run) -> None:
    cpu, began = machine_cpu_seconds(), time.perf_counter()
    run()
    wall, cpu = time.perf_counter() - began, machine_cpu_seconds() - cpu
    print(f"{what:<32} {wall:7.2f} s wall {cpu:7.2f} CPU-s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="jpeg")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--shard-size", type=int, default=6, help="images per shard")
    args = parser.parse_args()

    import ray

    from diffarc.codecs.registry import create_codec
    from diffarc.pipeline.decode import run_decode
    from diffarc.pipeline.encode import EncodeOptions, run_encode
    from diffarc.pipeline.verify import run_verify

    folder = Path(tempfile.mkdtemp(prefix="small-job-"))
    (folder / "src").mkdir()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(args.images)]
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / "src" / f"{index}.png")

    codec = create_codec(args.codec)
    measured("bare codec loop (encode+decode)", lambda: codec.decode(codec.encode(images)))
    measured("local Ray start (2 CPUs)", lambda: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
    time.sleep(3)  # its prestarted workers settle before the jobs are measured
    archive, options = str(folder / "arc"), EncodeOptions(args.codec, shard_size=args.shard_size)
    measured("encode", lambda: run_encode(str(folder / "src"), archive, options))
    measured("decode", lambda: run_decode(archive, str(folder / "out")))
    measured("verify (no originals)", lambda: run_verify(archive))
    measured("verify --against", lambda: run_verify(archive, against=str(folder / "src")))
    ray.shutdown()


if __name__ == "__main__":
    main()
