"""S3 requests per image of `encode`, `decode` and `verify`, counted by the S3 server that answers them.

    python benchmarks/s3_requests.py [--images 2048] [--shard-size 256] [--prefixes 8]

A moto S3 server on 127.0.0.1 (started here) logs every request; this script uploads --images small
synthetic images under --prefixes folders of one bucket, then runs the real CLI (a local Ray cluster, 2
actors) from S3 to S3 and reports, per command, the requests by HTTP method and by what they touched
(the originals, shards, the manifest's commit log, the writer lease, the decoded files) per image. The
counts do not depend on the images' size or content, only on their number and the shard size; they are
what docs/scale.md multiplies by a billion.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from urllib.parse import unquote

import numpy as np
from PIL import Image

REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (/[^ ?]*)(\?[^ ]*)? HTTP')


class RequestCounter(logging.Handler):
    """Counts the server's request log lines as (method, what) pairs."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        found = REQUEST.search(record.getMessage())
        if found:
            method, path, query = found.group(1), found.group(2), found.group(3) or ""
            if method == "GET" and path.count("/") == 1:  # GET /bucket?list-type=2&prefix=…
                method = "LIST"
                prefix = re.search(r"[?&]prefix=([^&]*)", query)
                path = f"{path}/{unquote(prefix.group(1)) if prefix else ''}"
            with self._lock:
                self.counts[(method, _what(path))] += 1

    def take(self) -> Counter:
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts


def _what(path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[0] == "src":
        return "originals"
    if parts[0] == "out":
        return "decoded files"
    inside = "/".join(parts[2:])  # arc/a/...
    for prefix, name in (("shards/", "shards"), ("_log/", "commit log"), ("manifest.json", "manifest pointer"),
                         ("writer.lock", "writer lease"), ("failures/", "failure table"),
                         (".diffarc-write-probe", "write probe")):
        if inside.startswith(prefix):
            return name
    return "archive listing" if inside == "" else inside


def start_server() -> tuple[dict, object, RequestCounter]:
    from moto.server import ThreadedMotoServer

    counter = RequestCounter()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    werkzeug.addHandler(counter)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    return options, server, counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--prefixes", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    options, server, counter = start_server()
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    for bucket in ("src", "arc", "out"):
        fs.mkdir(bucket)
    rng = np.random.default_rng(0)
    files = {}
    for index in range(args.images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
        files[f"src/images/p{index % args.prefixes}/img{index:07d}.png"] = buffer.getvalue()
    fs.pipe(files)
    counter.take()

    storage = ["--storage-options", json.dumps(options)]
    commands = {
        "encode": ["encode", "s3://src/images", "s3://arc/a", "--codec", "jpeg", "--shard-size",
                   str(args.shard_size), "--actors", "2"],
        "verify": ["verify", "s3://arc/a"],
        "decode": ["decode", "s3://arc/a", "s3://out/images"],
    }  # fmt: skip
    print(f"{args.images} images in {args.prefixes} folders, shard size {args.shard_size}; requests per image")
    for name, command in commands.items():
        done = subprocess.run([sys.executable, "-m", "diffarc.jobs.cli", *command, *storage, "--json"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        counts = counter.take()
        total = sum(counts.values())
        print(f"\n{name}: {total} requests, {total / args.images:.4f} per image")
        for (method, what), count in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"  {method:6} {what:18} {count:7d}  {count / args.images:.4f}/image")
    server.stop()


if __name__ == "__main__":
    main()
