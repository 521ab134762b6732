"""SIGKILL a running `diffarc encode`, run it again, and find every key exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ..conftest import cli_env, photo_like

pytestmark = pytest.mark.slow

ITEMS = 20


def encode_command(src: Path, archive: Path) -> list[str]:
    # Slow AVIF settings make each 2-image shard take long enough to be killed between commits.
    return [sys.executable, "-m", "diffarc.jobs.cli", "encode", str(src), str(archive), "--codec", "avif",
            "--param", "speed=2", "--param", "quality=90", "--shard-size", "2", "--actors", "1", "--json"]


def committed_keys(archive: Path) -> list[str]:
    manifest = json.loads((archive / "manifest.json").read_text())
    return [k for s in manifest["shards"] for k in pq.read_table(archive / s["path"], columns=["key"])["key"].to_pylist()]


def test_killed_encode_resumes_with_no_key_lost_or_repeated(tmp_path):
    src, archive = tmp_path / "src", tmp_path / "archive"
    src.mkdir()
    for index in range(ITEMS):
        Image.fromarray(photo_like(96, 120, seed=index)).save(src / f"img{index:03d}.png")

    # Its own process group, so SIGKILL takes the job's local Ray with it, as a killed job on a node would.
    job = subprocess.Popen(encode_command(src, archive), env=cli_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while True:
        manifest = archive / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "encode made no progress"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()

    before = json.loads((archive / "manifest.json").read_text())
    assert not before["complete"]
    partial = committed_keys(archive)
    assert 0 < len(partial) < ITEMS

    rerun = subprocess.run(encode_command(src, archive), env=cli_env(), capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["already_done"] == len(partial)
    assert summary["encoded"] == ITEMS - len(partial)  # committed shards were not redone

    keys = committed_keys(archive)
    assert sorted(keys) == [f"img{i:03d}.png" for i in range(ITEMS)]  # none lost, none twice
    after = json.loads((archive / "manifest.json").read_text())
    assert after["complete"] and after["totals"]["items"] == ITEMS
    listed = {s["path"] for s in after["shards"]}
    on_disk = {f"shards/{p.name}" for p in (archive / "shards").iterdir()}
    assert on_disk == listed  # shards of the killed run that were never committed are gone
