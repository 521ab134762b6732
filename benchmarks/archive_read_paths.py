"""What decode and verify cost per stream, and what each of their actors is sent to start.

    nice python benchmarks/archive_read_paths.py [--streams 2000] [--shard-size 16] [--actors 2] [--repeat 3]

An archive of --streams small jpeg streams (32×48 pictures, quality 75) in shards of --shard-size is written
in this process through `ArchiveWriter` (not timed), and one of a tenth as many beside it. Then, with one
local Ray started first, `run_decode` (to a fresh folder) and `run_verify` run --repeat times on each
archive. Printed, as medians: seconds per stream of the whole job on the large archive, and the marginal
seconds per stream, (large − small) / (difference in streams), which leaves out what a job costs whatever
it holds (starting actors, listing DST). Also the bytes each actor is built from, pickled as Ray sends
them (recorded where `cluster.ActorPool` starts its actors): the shard list travels in them or not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_archive(folder: Path, streams: int, shard_size: int) -> None:
    from diffarc.codecs.registry import create_codec
    from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, write_shard
    from diffarc.pipeline.storage import Location

    codec = create_codec("jpeg", {"quality": 75})
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:48].astype(np.float32)
    archive = Location(str(folder))
    spec = CodecSpec("jpeg", codec.stream_params, "")
    writer = ArchiveWriter(archive, spec, source="benchmark")
    spec = writer.manifest.codec
    for start in range(0, streams, shard_size):
        keys = [f"img{index:06d}.jpg" for index in range(start, min(streams, start + shard_size))]
        smooth = [np.stack([128 + 90 * np.sin(x / (7 + c) + i) * np.cos(y / 5 - i) for c in range(3)], 2)
                  for i in range(len(keys))]
        images = [np.clip(s + rng.normal(0, 8, s.shape), 0, 255).astype(np.uint8) for s in smooth]
        items = [EncodedItem(k, s, 48, 32, 4000, "0" * 64) for k, s in zip(keys, codec.encode(images))]
        writer.commit(write_shard(archive, items, spec), keys, [])
    writer.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from ray import cloudpickle
    import ray

    from diffarc.pipeline import cluster
    from diffarc.pipeline.decode import run_decode
    from diffarc.pipeline.verify import run_verify

    started_with: dict[tuple[str, str], int] = {}  # (job, archive) → pickled bytes of its actors' arguments
    running = [("", "")]
    original = cluster.ActorPool.__init__

    def recording(self, remote, actor_args, size):
        started_with[running[0]] = len(cloudpickle.dumps(actor_args))
        original(self, remote, actor_args, size)

    cluster.ActorPool.__init__ = recording
    sizes = {"large": args.streams, "small": max(1, args.streams // 10)}
    with tempfile.TemporaryDirectory(prefix="diffarc-read-paths-") as scratch:
        for name, streams in sizes.items():
            write_archive(Path(scratch) / name, streams, args.shard_size)
        ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
        seconds: dict[tuple[str, str], list[float]] = {}
        for run in range(args.repeat):
            for name in sizes:
                archive = str(Path(scratch) / name)
                running[0] = ("decode", name)
                began = time.perf_counter()
                summary = run_decode(archive, f"{scratch}/out-{name}-{run}", actors=args.actors)
                seconds.setdefault(("decode", name), []).append(time.perf_counter() - began)
                assert summary.decoded == sizes[name] and not summary.failures, summary
                running[0] = ("verify", name)
                began = time.perf_counter()
                report = run_verify(archive, actors=args.actors)
                seconds.setdefault(("verify", name), []).append(time.perf_counter() - began)
                assert report.intact and report.decoded == sizes[name], report.summary()
        ray.shutdown()
    print(f"{args.streams} jpeg streams of 32×48 in shards of {args.shard_size}, {args.actors} actors, "
          f"median of {args.repeat} runs")  # fmt: skip
    for job in ("decode", "verify"):
        large, small = (statistics.median(seconds[job, name]) for name in ("large", "small"))
        marginal = (large - small) / (sizes["large"] - sizes["small"])
        print(f"  {job}: {1e3 * large / sizes['large']:.3f} ms per stream (job {large:.2f} s), "
              f"marginal {1e3 * marginal:.3f} ms per stream")
    for (job, name), size in sorted(started_with.items()):
        print(f"  {job} actors start from {size} pickled bytes ({sizes[name]} streams, "
              f"{-(-sizes[name] // args.shard_size)} shards)")


if __name__ == "__main__":
    sys.exit(main())
