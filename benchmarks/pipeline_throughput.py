"""Images/s of the full `encode` pipeline next to a bare single-process loop, and the driver's memory as jobs grow.

    python benchmarks/pipeline_throughput.py [FOLDER] [--codec jpeg] [--repeat 120] [--runs 3] [--memory-images 1000,10000]

Throughput. The bare loop reads, loads and encodes each image in this process, one at a time: what a
user's own script would do. The pipeline figure is `run_encode` into a fresh archive (listing, actor
start-up, Ray tasks, Parquet shards, commits), with the default shard size and one actor per CPU; Ray's
own start-up is reported beside it, not in it. `--repeat` copies the folder's images N times under
distinct keys, so that the job is long enough for a steady state, as real jobs are: each job pays about
1 CPU-s per actor to start it (Ray's worker, the imports), which is most of a 96-image job and 10 % of
a 960-image one (2 880 by default). Other processes on the machine slow both figures:
the CPU-seconds they took during each phase are printed beside it, and `--runs` pairs are measured, each
on a Ray started for it, and the median ratio reported. So is each side's own CPU time per image (the
pipeline's: driver, Ray's processes and actors): what the pipeline costs beyond the codec. Other load
moves it less than it moves wall time, but does move it (9.3 to 13.6 CPU-ms per Kodak image here).

Driver memory. For each of `--memory-images` (a small synthetic PNG linked under that many keys, so the
count is all that changes), a fresh process starts Ray and encodes them with the same codec. Its peak
resident set size is read from `getrusage` (`ru_maxrss`): the kernel's own high-water mark of the whole
process, Python objects, Arrow buffers and Ray's C++ core worker alike, so no sample can miss a peak and
nothing is left out (tracemalloc would see Python's allocations only). A fresh process per size keeps one
job's memory out of the next one's figure. Its RSS just before the encode is printed too, so the
encode's own part can be told from Python's, Ray's and the libraries' fixed cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from diffarc.codecs.registry import create_codec
from diffarc.pipeline.cluster import connect
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.images import load_rgb
from diffarc.pipeline.sources import is_image_name

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"
TICKS = os.sysconf("SC_CLK_TCK")


def bare_loop(files: list[Path], codec_name: str) -> float:
    codec = create_codec(codec_name)
    started = time.perf_counter()
    for path in files:
        codec.encode([load_rgb(path.read_bytes())])
    return len(files) / (time.perf_counter() - started)


def machine_cpu_seconds() -> float:
    """Busy CPU-seconds of the whole machine since boot (every process, including those that have exited)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICKS


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and its descendants (Ray's raylet, GCS, workers, actors) still running."""
    parents, cpu = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            parents[int(entry.name)] = int(stat[1])
            cpu[int(entry.name)] = (int(stat[11]) + int(stat[12])) / TICKS
    ours = {os.getpid()}
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= found
        grew = bool(found)
    return sum(cpu[pid] for pid in ours if pid in cpu)


class CpuMeter:
    """CPU-seconds between `start` and `stop`: `own`, this process and its descendants'; `others`, everyone else's."""

    def start(self) -> None:
        self._machine, self._own = machine_cpu_seconds(), own_cpu_seconds()

    def stop(self) -> None:
        self.own = own_cpu_seconds() - self._own
        self.others = machine_cpu_seconds() - self._machine - self.own


def throughput(src: Path, files: list[Path], args) -> dict:
    """One bare loop, then one encode into a fresh archive on a Ray started for it (and stopped after, so the
    bare loop never shares the machine with Ray's idle processes)."""
    bare_cpu, pipeline_cpu = CpuMeter(), CpuMeter()
    bare_cpu.start()
    bare = bare_loop(files, args.codec)
    bare_cpu.stop()
    started = time.perf_counter()
    connect()
    startup = time.perf_counter() - started
    options = EncodeOptions(args.codec, shard_size=args.shard_size) if args.shard_size else EncodeOptions(args.codec)

    def on_progress(done: int, total: int, failed: int) -> None:
        if done == total:
            pipeline_cpu.stop()  # before run_encode ends its actors, whose CPU time would leave the sum with them

    with tempfile.TemporaryDirectory() as scratch:
        pipeline_cpu.start()
        summary = run_encode(str(src), str(Path(scratch) / "archive"), options, on_progress=on_progress)
    ray.shutdown()
    return {"bare": bare, "bare_cpu": bare_cpu, "summary": summary, "startup": startup, "pipeline_cpu": pipeline_cpu}


def synthetic_png(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def driver_memory(images: int, codec: str, size: int) -> dict:
    """Run in a fresh process: encode `images` keys of one small PNG; this process's RSS before, and its peak."""
    with tempfile.TemporaryDirectory() as scratch:
        original = Path(scratch) / "image.png"
        synthetic_png(original, size)
        src = Path(scratch) / "src"
        for index in range(images):
            folder = src / f"{index // 1000:04d}"
            if index % 1000 == 0:
                folder.mkdir(parents=True)
            os.link(original, folder / f"{index:08d}.png")  # a new key, no new bytes on disk
        connect()
        before = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        started = time.perf_counter()
        summary = run_encode(str(src), str(Path(scratch) / "archive"), EncodeOptions(codec))
        seconds = time.perf_counter() - started
        ray.shutdown()
    assert summary.encoded == images, summary
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}


def copy_images(originals: list[Path], repeat: int, src: Path) -> list[Path]:
    """`repeat` copies of the images under distinct keys (src/copy<i>/<name>), so a job is long enough to time."""
    for copy in range(repeat):
        (src / f"copy{copy}").mkdir(parents=True)
        for path in originals:
            shutil.copy(path, src / f"copy{copy}" / path.name)
    return sorted(p for p in src.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--codec", default="jpeg")
    parser.add_argument("--repeat", type=int, default=120, help="copies of the folder's images (24 × 120 = 2 880 for Kodak)")
    parser.add_argument("--runs", type=int, default=3, help="bare-loop / pipeline pairs (the median ratio is reported)")
    parser.add_argument("--shard-size", type=int, default=None, help="default: encode's own")
    parser.add_argument("--memory-images", default="1000,10000", help="image counts for the driver-memory runs ('' skips them)")
    parser.add_argument("--memory-image-size", type=int, default=64, help="side of the synthetic PNG, pixels")
    args = parser.parse_args()

    originals = sorted(p for p in Path(args.folder).iterdir() if is_image_name(p.name))
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "src"
        files = copy_images(originals, args.repeat, src)
        print(f"{len(files)} images ({len(originals)} × {args.repeat}) from {args.folder}, codec {args.codec}, "
              f"{os.cpu_count()} CPUs; {args.runs} runs, each a bare loop then an encode")  # fmt: skip
        ratios = []
        for run in range(1, args.runs + 1):
            measured = throughput(src, files, args)
            summary, bare = measured["summary"], measured["bare"]
            ratios.append(summary.images_per_second / bare)
            bare_cpu, pipeline_cpu = measured["bare_cpu"], measured["pipeline_cpu"]
            print(f"run {run}: {'bare single-process loop':<32}{bare:8.2f} images/s  ({len(files) / bare:.1f} s; "
                  f"{1000 * bare_cpu.own / len(files):.1f} CPU-ms/image; other processes took {bare_cpu.others:.1f} "
                  "CPU-s meanwhile)")  # fmt: skip
            print(f"       {'diffarc encode pipeline (Ray)':<32}{summary.images_per_second:8.2f} images/s  "
                  f"({len(summary.workers)} actors; {summary.seconds:.1f} s, plus {measured['startup']:.1f} s Ray "
                  f"start-up; {1000 * pipeline_cpu.own / len(files):.1f} CPU-ms/image, driver and Ray included; "
                  f"other processes took {pipeline_cpu.others:.1f} CPU-s meanwhile)")  # fmt: skip
            print(f"       {'pipeline / bare':<32}{ratios[-1]:8.2f}×")
    print(f"pipeline / bare, median of {len(ratios)} runs: {statistics.median(ratios):.2f}× "
          f"(from {min(ratios):.2f}× to {max(ratios):.2f}×)")

    counts = [int(n) for n in args.memory_images.split(",") if n]
    if not counts:
        return
    peaks = {}
    print(f"driver memory (peak RSS, getrusage ru_maxrss; a fresh process per job; {args.memory_image_size}² PNG, "
          f"codec {args.codec}, default shard size):")  # fmt: skip
    for count in counts:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as child:
            result = child.submit(driver_memory, count, args.codec, args.memory_image_size).result()
        peaks[count] = result["peak"]
        print(f"  {count:>8} images  peak {result['peak'] / 2**20:7.1f} MiB  (before the encode "
              f"{result['before'] / 2**20:7.1f} MiB; encode {result['seconds']:.1f} s)")  # fmt: skip
    first, last = counts[0], counts[-1]
    print(f"  peak growth {first} → {last} images: {100 * (peaks[last] / peaks[first] - 1):+.1f} %")


if __name__ == "__main__":
    main()
