"""Commit time and manifest bytes as an archive grows: the commit log against the single manifest.json.

    python benchmarks/manifest_scaling.py [--sizes 100,1000,10000] [--s3-sizes 100,1000] [--checkpoint-every 100]

For each size N, one job commits N shards, one commit each, through the real `ArchiveWriter` (shards are
synthetic manifest entries: no image data is written), and is left unfinished, as a killed or running
job leaves it; then a reader loads the manifest. "before" is the writer as it was at BEFORE (its
archive.py, read from git, run against today's storage and lease code): one manifest.json rewritten
at each commit. "after" is the writer of this tree: one commit file each, a checkpoint every
--checkpoint-every commits, whose shard list is in parts that are written once each (ARCHIVE/_log/shards-*). On S3 (a moto server on 127.0.0.1, started here) the same, for the
--s3-sizes. Columns:

    last ms      mean wall time of the job's last 100 commits (10 % below 1000; the archive at ~N shards)
    job s        wall time of all N commits
    B/commit     bytes written per commit, over the whole job (manifest files only; checkpoints included)
    last B       bytes written by those last commits, per commit
    read B       bytes a reader reads to load the manifest at the end; reads: its requests (GETs)

"-": not measured, where the before-writer's commits but the last were made as one (--before-all-commits).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import diffarc.pipeline.archive as after_module
from diffarc.pipeline.storage import Location

BEFORE = "e119733"
REPOSITORY = Path(__file__).resolve().parents[1]


def before_module():
    """pipeline/archive.py as it was at BEFORE, loaded as a module of today's package (its relative
    imports, codecs/, storage.py and lease.py, resolve to today's, which it uses unchanged)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:pipeline/archive.py"], cwd=REPOSITORY, check=True,
                            capture_output=True).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader("diffarc.pipeline.archive_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "diffarc.pipeline"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"pipeline/archive.py@{BEFORE}", "exec"), module.__dict__)
    return module


class CountingLocation(Location):
    """A Location that tallies the bytes and requests of the manifest's reads and writes (the writer and
    reader call only these), each counted once however the calls nest."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written = self.read_bytes = self.reads = 0
        self._depth = 0

    def _counted(self, method, relative, *args):
        self._depth += 1
        try:
            return method(self, relative, *args)
        finally:
            self._depth -= 1

    def write_atomic(self, relative, data):
        if self._depth == 0:
            self.written += len(data)
        return self._counted(Location.write_atomic, relative, data)

    def write_versioned(self, relative, data, expected):
        if self._depth == 0:
            self.written += len(data)
        return self._counted(Location.write_versioned, relative, data, expected)

    def read(self, relative):
        data = self._counted(Location.read, relative)
        if self._depth == 0:
            self.read_bytes += len(data)
            self.reads += 1
        return data

    def read_versioned(self, relative):
        data, version = self._counted(Location.read_versioned, relative)
        if self._depth == 0:
            self.read_bytes += len(data)
            self.reads += 1
        return data, version


def shard_entry(module, index: int):
    """A manifest entry like a real shard's: random name and checksum, 1000 keys of a photo bucket."""
    return module.ShardEntry(
        path=f"shards/part-{uuid.uuid4().hex}.parquet", rows=1000, bytes=250_000_000,
        sha256=hashlib.sha256(str(index).encode()).hexdigest(),
        first_key=f"photos/2024/{index:07d}/img000000000.jpg", last_key=f"photos/2024/{index:07d}/img000000999.jpg",
        source_bytes=2_500_000_000, bitstream_bytes=249_000_000, pixels=12_000_000_000,
    )  # fmt: skip


def run_job(module, url: str, shards: int, storage_options: dict | None, fast_forward: bool, **writer_options) -> dict:
    """Commit `shards` shards one by one and load the manifest; with `fast_forward`, the first 90 % go in
    one commit (the before-writer's O(N²) job is hours at 10 000), so only the last ones are figures."""
    archive = CountingLocation(url, storage_options, follow_links=False)
    spec = module.CodecSpec("jpeg", {"quality": 75}, "")
    writer = module.ArchiveWriter(archive, spec, source="s3://photos/2024", **writer_options)
    times, tail_bytes, tail = [], 0, max(1, min(shards // 10, 100))
    first = 0
    if fast_forward:
        first = shards - tail  # the tail alone is committed one by one
        entries = [shard_entry(module, index) for index in range(first)]
        writer.manifest.shards.extend(entries[:-1])
        writer.commit(entries[-1], [entries[-1].first_key, entries[-1].last_key], [])
    archive.written = 0  # count the commits only
    started = time.perf_counter()
    for index in range(first, shards):
        entry = shard_entry(module, index)
        before_bytes, commit_started = archive.written, time.perf_counter()
        writer.commit(entry, [entry.first_key, entry.last_key], [])
        times.append(time.perf_counter() - commit_started)
        if index >= shards - tail:
            tail_bytes += archive.written - before_bytes
    job_seconds = time.perf_counter() - started
    written = archive.written
    writer.close()  # unfinished: what a reader of a running (or killed) job finds

    reader = CountingLocation(url, storage_options, follow_links=False)
    manifest = module.load_manifest(reader)
    assert len(manifest.shards) == shards
    return {
        "last_ms": 1000 * sum(times[-tail:]) / tail,
        "job_s": None if fast_forward else job_seconds, "per_commit": None if fast_forward else written / shards,
        "last_bytes": tail_bytes / tail, "read_bytes": reader.read_bytes, "reads": reader.reads,
    }


def start_moto() -> tuple[dict, object]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("bench")
    return options, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--s3-sizes", default="100,1000", help="'' to skip S3")
    parser.add_argument("--checkpoint-every", type=int, default=after_module.CHECKPOINT_EVERY)
    parser.add_argument("--before-all-commits", type=int, default=1000,
                        help="above this size, the before-writer commits only the last 100 one by one")
    args = parser.parse_args()
    writers = {"before": (before_module(), {}), "after": (after_module, {"checkpoint_every": args.checkpoint_every})}
    runs = [("local", int(n)) for n in args.sizes.split(",") if n] + [("s3", int(n)) for n in args.s3_sizes.split(",") if n]
    options, server = start_moto() if any(store == "s3" for store, _ in runs) else (None, None)
    print(f"checkpoint every {args.checkpoint_every} commits; before = {BEFORE}")
    print(f"{'store':6} {'shards':>7} {'writer':7} {'last ms':>8} {'job s':>8} {'B/commit':>10} {'last B':>10} "
          f"{'read B':>10} {'reads':>6}")  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for store, shards in runs:
                for name, (module, writer_options) in writers.items():
                    folder = uuid.uuid4().hex
                    url = f"{scratch}/{folder}" if store == "local" else f"s3://bench/{folder}"
                    fast_forward = name == "before" and shards > args.before_all_commits
                    figures = run_job(module, url, shards, options if store == "s3" else None, fast_forward,
                                      **writer_options)  # fmt: skip
                    job = "-" if figures["job_s"] is None else f"{figures['job_s']:.2f}"
                    per_commit = "-" if figures["per_commit"] is None else f"{figures['per_commit']:,.0f}"
                    print(f"{store:6} {shards:>7} {name:7} {figures['last_ms']:>8.2f} {job:>8} {per_commit:>10} "
                          f"{figures['last_bytes']:>10,.0f} {figures['read_bytes']:>10,} {figures['reads']:>6}",
                          flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
