"""Should `encode` run on Ray Data's streaming executor? Today's actor pool against `write_archive`, measured.

    python benchmarks/ray_data_vs_pool.py [FOLDER] [--codec jpeg] [--repeat 8] [--shard-size 32] [--actors 2]

The same job both ways, each in a fresh process (its own Ray, so neither inherits the other's warm
workers), on --repeat copies of FOLDER's images (default: Kodak):

    pool       `run_encode` (what `diffarc encode` runs): the driver lists, cuts shards and hands them to
               its own pool of actors, which fetch, encode and write; it commits each shard
    ray data   `ray.data.read_binary_files` ─► `write_archive`: Ray Data reads the files and streams them
               in batches of --shard-size to an actor pool of --actors (ActorPoolStrategy), which encode
               and write; the driver commits each shard

Each is run twice: undisturbed, and with one encoding actor killed (SIGKILL) once two shards are
committed. Printed per run: images/s from the job's start (Ray started before it), the driver's peak
resident memory (ru_maxrss, which includes Python, torch and Ray's client), whether the killed job
finished with every key exactly once, and its time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline_throughput import DEFAULT_FOLDER, copy_images  # this folder is on the path of a script run here

from diffarc.pipeline.sources import is_image_name

ACTOR_CLASS = {"pool": "EncodeWorker", "ray data": "ShardEncoder"}  # Ray Data's is MapWorker(…ShardEncoder)


def kill_one_actor_after_two_commits(archive: str, mode: str, killed: list) -> None:
    """Wait for two commits, then SIGKILL one live encoding actor of `mode` (recorded in `killed`)."""
    from diffarc.pipeline.archive import load_manifest
    from diffarc.pipeline.storage import Location

    location = Location(archive)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        manifest = load_manifest(location)
        if manifest is not None and len(manifest.shards) >= 2:
            break
        time.sleep(0.2)
    for process in Path("/proc").iterdir():  # an actor's process is titled ray::<its class>
        try:
            title = (process / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and ACTOR_CLASS[mode] in title:
            os.kill(int(process.name), signal.SIGKILL)
            killed.append(title.split("\0")[0])
            return


def run_one(mode: str, src: str, archive: str, codec: str, shard_size: int, actors: int, kill: bool) -> dict:
    """One job in this process; its figures as a dict."""
    import ray

    from diffarc.pipeline.archive import load_manifest, read_shard
    from diffarc.pipeline.cluster import connect
    from diffarc.pipeline.storage import Location

    connect()
    killed: list = []
    if kill:
        threading.Thread(target=kill_one_actor_after_two_commits, args=(archive, mode, killed), daemon=True).start()
    started = time.perf_counter()
    if mode == "pool":
        from diffarc.pipeline.encode import EncodeOptions, run_encode

        run_encode(src, archive, EncodeOptions(codec, shard_size=shard_size, actors=actors))
    else:
        from diffarc.pipeline.ray_data import write_archive

        files = ray.data.read_binary_files(src, include_paths=True)
        rows = files.map(lambda row: {"key": os.path.relpath(row["path"], src), "bytes": row["bytes"]})
        write_archive(rows, archive, codec, shard_size=shard_size, actors=actors)
    seconds = time.perf_counter() - started
    location = Location(archive)
    manifest = load_manifest(location)
    keys = [k for e in manifest.shards for k in read_shard(location, e, columns=["key"]).column("key").to_pylist()]
    return {
        "mode": mode, "killed": bool(killed), "images": len(keys), "distinct": len(set(keys)),
        "complete": manifest.complete, "seconds": seconds, "images_per_s": len(keys) / seconds,
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--codec", default="jpeg")
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one job, print its JSON
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(run_one(**job, codec=args.codec, shard_size=args.shard_size, actors=args.actors)))
        return

    originals = sorted(p for p in Path(args.folder).iterdir() if is_image_name(p.name))
    if not originals:
        raise SystemExit(f"no images in {args.folder}")
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "src"
        total = len(copy_images(originals, args.repeat, src))
        print(f"{total} images ({args.repeat} × {args.folder}), codec {args.codec}, shard size {args.shard_size}, "
              f"{args.actors} actors, {os.cpu_count()} CPUs")
        print(f"{'mode':9} {'actor killed':>12} {'images/s':>9} {'seconds':>8} {'driver MB':>9}  every key once")
        for kill in (False, True):
            for mode in ("pool", "ray data"):
                archive = str(Path(scratch) / f"arc-{mode.replace(' ', '-')}-{kill}")
                job = json.dumps({"mode": mode, "src": str(src), "archive": archive, "kill": kill})
                done = subprocess.run([sys.executable, __file__, "--one", job, "--codec", args.codec,
                                       "--shard-size", str(args.shard_size), "--actors", str(args.actors)],
                                      capture_output=True, text=True)  # fmt: skip
                if done.returncode != 0:
                    print(f"{mode:9} {'yes' if kill else 'no':>12}  failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                once = r["images"] == r["distinct"] == total and r["complete"]
                print(f"{mode:9} {('yes' if r['killed'] else 'no (none found)') if kill else 'no':>12} "
                      f"{r['images_per_s']:9.1f} {r['seconds']:8.1f} {r['driver_peak_mb']:9.0f}  {once}")


if __name__ == "__main__":
    main()
