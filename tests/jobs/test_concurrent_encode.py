"""Two `diffarc encode` runs into one archive, started 0.5 s apart, on local disk and on a real S3 server
(moto): one writes, the other is refused naming it, and readers meanwhile see a sound archive."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from PIL import Image

from diffarc.pipeline.archive import read_shard, require_manifest
from diffarc.pipeline.archive import current_writer
from diffarc.pipeline.storage import Location

from ..conftest import cli_env, photo_like

pytestmark = pytest.mark.slow

ITEMS = 8


def diffarc(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "diffarc.jobs.cli", *map(str, args)], env=env or cli_env(),
                          capture_output=True, text=True, timeout=600, **kwargs)  # fmt: skip


def start_encode(src, archive, env) -> subprocess.Popen:
    # Slow AVIF settings and 2-image shards: the job commits several times, with time between commits.
    command = [sys.executable, "-m", "diffarc.jobs.cli", "encode", str(src), str(archive), "--codec", "avif",
               "--param", "speed=2", "--param", "quality=90", "--shard-size", "2", "--actors", "1", "--json"]  # fmt: skip
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    for index in range(ITEMS):
        Image.fromarray(photo_like(64, 80, seed=index)).save(folder / f"img{index:03d}.png")
    return [f"img{index:03d}.png" for index in range(ITEMS)]


def two_encodes(src, archive_url, env) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Start two encodes 0.5 s apart; return (writer, refused) once the refused one has ended."""
    jobs = [start_encode(src, archive_url, env)]
    time.sleep(0.5)
    jobs.append(start_encode(src, archive_url, env))
    deadline = time.monotonic() + 300
    while all(job.poll() is None for job in jobs):
        assert time.monotonic() < deadline, "neither encode ended: the second was not refused"
        time.sleep(0.2)
    refused = next(job for job in jobs if job.poll() is not None)
    writer = next(job for job in jobs if job is not refused)
    _, stderr = refused.communicate()
    assert refused.returncode == 1, stderr[-2000:]
    assert re.search(rf"{re.escape(str(archive_url))} is being written by process {writer.pid} on host \S+, writing since", stderr)
    assert "Traceback" not in stderr
    return writer, refused


def wait_for_commits(archive: Location, shards: int, writer: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while True:
        if archive.exists("manifest.json") and len(require_manifest(archive).shards) >= shards:
            return
        assert writer.poll() is None, writer.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "encode made no progress"
        time.sleep(0.2)


def committed_keys(archive: Location) -> list[str]:
    manifest = require_manifest(archive)
    return sorted(k for e in manifest.shards for k in read_shard(archive, e, columns=["key"]).column("key").to_pylist())


def test_two_local_encodes_one_refused_and_readers_see_a_sound_archive_meanwhile(tmp_path):
    keys = write_images(tmp_path / "src")
    archive = Location(str(tmp_path / "arc"))
    writer, _ = two_encodes(tmp_path / "src", archive.url, cli_env())
    wait_for_commits(archive, 2, writer)
    # Hold the writer still, mid-job and holding the lock, while readers look (SIGSTOP: paused, not dead).
    os.killpg(writer.pid, signal.SIGSTOP)
    try:
        assert current_writer(archive)["pid"] == writer.pid
        info = diffarc("info", archive.url, "--json")
        facts = json.loads(info.stdout)
        assert info.returncode == 0 and not facts["complete"] and facts["writing"]["pid"] == writer.pid
        assert facts["problems"] == [] and 4 <= facts["items"] < ITEMS
        verified = diffarc("verify", archive.url, "--actors", "1")
        assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]
        assert verified.stdout.startswith(f"INTACT: {facts['items']} items")
        assert f"being written by process {writer.pid}" in verified.stdout
        decoded = diffarc("decode", archive.url, tmp_path / "out", "--actors", "1")
        assert decoded.returncode == 0 and len(list((tmp_path / "out").iterdir())) == facts["items"]
        assert writer.poll() is None
    finally:
        os.killpg(writer.pid, signal.SIGCONT)
    stdout, stderr = writer.communicate(timeout=600)
    assert writer.returncode == 0, stderr[-2000:]
    assert json.loads(stdout)["encoded"] == ITEMS
    assert committed_keys(archive) == keys  # none lost, none twice
    assert require_manifest(archive).complete and current_writer(archive) is None
    assert diffarc("verify", archive.url, "--actors", "1").stdout.startswith(f"INTACT: {ITEMS} items")


def test_two_encodes_into_one_s3_archive_one_refused_none_lost(s3_server, tmp_path):
    keys = write_images(tmp_path / "src")
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    if not fs.exists("concurrent"):
        fs.mkdir("concurrent")
    fs.put(str(tmp_path / "src") + "/", "concurrent/src/", recursive=True)
    env = cli_env(**s3_server["env"])
    archive = Location("s3://concurrent/arc", s3_server["storage_options"])
    writer, _ = two_encodes("s3://concurrent/src", archive.url, env)
    wait_for_commits(archive, 1, writer)
    while writer.poll() is None:  # a reader polling the archive while it is written
        info = diffarc("info", archive.url, "--json", env=env)
        assert info.returncode == 0, info.stderr[-2000:]
        facts = json.loads(info.stdout)
        assert facts["problems"] == [] and (facts["complete"] or facts["writing"]["pid"] == writer.pid)
        time.sleep(0.5)  # a reader looking twice a second: back to back, the readers' processes held a core
    stdout, stderr = writer.communicate()
    assert writer.returncode == 0, stderr[-2000:]
    assert json.loads(stdout)["encoded"] == ITEMS
    assert committed_keys(archive) == keys
    assert not fs.exists("concurrent/arc/writer.lock")
