"""What decode and verify cost per stream, and what each of their actors is sent to start, before issue 27
and now.

    nice python benchmarks/archive_read_paths.py [--before 636b599] [--streams 2000] [--shard-size 16] [--repeat 3]

The code at --before (extracted with `git archive` into a temporary folder and imported from there in a
child process) and this checkout's code (in another child process) each write an archive of --streams
small jpeg streams (32×48 pictures, quality 75) in shards of --shard-size through their `ArchiveWriter`
(not timed). Then, in the same process, the decode and verify workers (the classes the actors run) work
through every shard, as the actors would but without Ray between them: decode writes PNGs to a fresh
folder (each file written and synced, as decode does), verify checks and decodes every stream. Printed for
each code, as medians of --repeat runs: wall and CPU milliseconds per stream of each (on a shared machine
the CPU time is the steadier figure), how many times each stream's CRC is checked (each parse checks it),
and the bytes each actor is built from, pickled as Ray sends them (the
shard list travels in them or not). Before issue 27 the workers are built from the archive's Location and
its whole manifest; now from an ArchiveReader.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
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


def workers(archive_url: str):
    """(decode work, verify work, the pickled bytes of each worker's arguments) for this checkout: two
    functions that run every shard through a DecodeWorker and a VerifyWorker built as the jobs build them."""
    from ray import cloudpickle

    from diffarc.pipeline import decode, verify
    from diffarc.pipeline.storage import Location

    try:
        from diffarc.pipeline.archive import ArchiveReader
    except ImportError:  # before issue 27: the workers take the Location and the whole manifest
        ArchiveReader = None
    summary = decode.DecodeSummary(0, 0)
    if ArchiveReader is not None:
        reader = ArchiveReader.open(archive_url)
        decode_args = (reader, None, reader.pixel_limit(), False, {}, False)
        verify_args = (reader, None, None, reader.pixel_limit(), None, False)
        tasks, _ = decode.claim_outputs(reader, None, "", "png", set(), summary)
        entries = reader.shards
        decode_shard = lambda worker, task, dst: worker.decode_shard(task, dst, "png", True, 8)  # noqa: E731
        verify_shard = lambda worker, entry: worker.verify_shard(entry, None, 1.0, None)  # noqa: E731
    else:
        archive = Location(archive_url)
        manifest = decode.require_manifest(archive)
        limit = decode.pixel_limit(manifest, None)
        decode_args = (archive, manifest, None, limit, False, {})
        verify_args = (archive, manifest, None, None, limit, None)
        tasks, _ = decode.claim_outputs(archive, decode.select_shards(manifest, None, ""), "png", set(), summary)
        entries = manifest.shards
        decode_shard = lambda worker, task, dst: worker.decode_shard(archive, task, dst, "png", True, 8)  # noqa: E731
        verify_shard = lambda worker, entry: worker.verify_shard(archive, entry, None, 1.0, None)  # noqa: E731

    def decode_all(dst: str) -> int:
        worker, location = decode.DecodeWorker(*decode_args), Location(dst)
        return sum(decode_shard(worker, task, location).decoded for task in tasks)

    def verify_all() -> int:
        worker = verify.VerifyWorker(*verify_args)
        reports = [verify_shard(worker, entry) for entry in entries]
        assert not any(r.problems or r.failures for r in reports)
        return sum(r.decoded for r in reports)

    sizes = {"decode": len(cloudpickle.dumps(decode_args)), "verify": len(cloudpickle.dumps(verify_args))}
    return decode_all, verify_all, sizes


def crc_checks(work) -> int:
    """How many times `work` checks a stream's CRC (`codecs/container.py` calling zlib.crc32): how often
    each stream is parsed and checked. Counted in a pass of its own, under a profiler, not timed."""
    profile = cProfile.Profile()
    profile.enable()
    work()
    profile.disable()
    return sum(calls[1] for (_, _, name), (*_, callers) in pstats.Stats(profile).stats.items()
               if name == "<built-in method zlib.crc32>"
               for (where, _, _), calls in callers.items() if where.endswith("container.py"))  # fmt: skip


def in_process(archive: str, streams: int, repeat: int, scratch: str) -> None:
    decode_all, verify_all, sizes = workers(archive)
    seconds: dict[str, list[float]] = {"decode": [], "verify": []}
    cpu: dict[str, list[float]] = {"decode": [], "verify": []}  # this process's CPU: no other job's load in it
    for run in range(repeat):
        for job, work in (("decode", lambda: decode_all(f"{scratch}/in-process-{run}")), ("verify", verify_all)):
            began, began_cpu = time.perf_counter(), time.process_time()
            assert work() == streams
            seconds[job].append(time.perf_counter() - began)
            cpu[job].append(time.process_time() - began_cpu)
    checks = {"decode": crc_checks(lambda: decode_all(f"{scratch}/checked")), "verify": crc_checks(verify_all)}
    for job in ("decode", "verify"):
        print(f"  {job} worker: {checks[job] / streams:.2f} stream CRC checks per stream; "
              f"{1e3 * statistics.median(seconds[job]) / streams:.3f} ms per stream, "
              f"{1e3 * statistics.median(cpu[job]) / streams:.3f} CPU-ms (runs {', '.join(f'{s:.2f}' for s in seconds[job])} s);"
              f" its actors start from {sizes[job]} pickled bytes")  # fmt: skip


CODE_ENV = "DIFFARC_BENCH_CODE"  # a checkout's root: the child process imports diffarc from there


def import_from(root: str) -> None:
    """Make `import diffarc` load the checkout at `root` (its api/, codecs/, pipeline/, jobs/ folders, as
    pyproject's package-dir maps them), ahead of the installed one."""
    from importlib.util import spec_from_file_location

    folders = {"diffarc": "api", "diffarc.codecs": "codecs", "diffarc.pipeline": "pipeline", "diffarc.jobs": "jobs"}

    class CheckoutFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in folders:
                return None
            folder = Path(root) / folders[name]
            return spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])

    sys.meta_path.insert(0, CheckoutFinder)


def measure(args) -> None:
    """This process's code: write the archive, run the workers, print the figures."""
    if os.environ.get(CODE_ENV):
        import_from(os.environ[CODE_ENV])
    import ray

    import diffarc

    print(f"  code imported from {Path(diffarc.__file__).parent.parent}")
    # The workers describe themselves through Ray's runtime context: started here, before any timing.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="diffarc-read-paths-") as scratch:
        write_archive(Path(scratch) / "archive", args.streams, args.shard_size)
        in_process(f"{scratch}/archive", args.streams, args.repeat, scratch)
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="636b599", help="the commit to compare with (before issue 27)")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # a child: this code only
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    repository = Path(__file__).resolve().parent.parent
    child = [sys.executable, __file__, "--measure", "--streams", str(args.streams), "--shard-size",
             str(args.shard_size), "--repeat", str(args.repeat)]  # fmt: skip
    print(f"{args.streams} jpeg streams of 32×48 in shards of {args.shard_size}, median of {args.repeat} runs")
    with tempfile.TemporaryDirectory(prefix="diffarc-before-") as before:
        archive = subprocess.run(["git", "-C", str(repository), "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", before], input=archive.stdout, check=True)
        for label, code in ((f"before ({args.before})", before), ("now (this checkout)", "")):
            print(label, flush=True)
            subprocess.run(child, env={**os.environ, CODE_ENV: code}, check=True)


if __name__ == "__main__":
    sys.exit(main())
