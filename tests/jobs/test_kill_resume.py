"""SIGKILL (or Ctrl-C) a running `diffarc encode` (or SIGKILL one of its actors), and find every key exactly once."""

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

from diffarc.pipeline.archive import load_manifest
from diffarc.pipeline.storage import Location

from ..conftest import cli_env, photo_like, session_processes

pytestmark = pytest.mark.slow

ITEMS = 12  # 6 shards: killed after 2, at least 1 left for the rerun


def encode_command(src: Path, archive: Path, actors: int = 1) -> list[str]:
    # Slow AVIF settings make each 2-image shard take long enough to be killed between commits.
    return [sys.executable, "-m", "diffarc.jobs.cli", "encode", str(src), str(archive), "--codec", "avif",
            "--param", "speed=2", "--param", "quality=90", "--shard-size", "2", "--actors", str(actors), "--json"]


def write_sources(src: Path, items: int) -> list[str]:
    src.mkdir()
    for index in range(items):
        Image.fromarray(photo_like(96, 120, seed=index)).save(src / f"img{index:03d}.png")
    return [f"img{index:03d}.png" for index in range(items)]


def whole_manifest(archive: Path) -> dict | None:
    """The archive's whole manifest as JSON, read as diffarc reads it (pointer, checkpoint, commits)."""
    found = load_manifest(Location(str(archive)))
    return None if found is None else json.loads(found.to_json())


def committed_keys(archive: Path) -> list[str]:
    manifest = whole_manifest(archive)
    return [k for s in manifest["shards"] for k in pq.read_table(archive / s["path"], columns=["key"])["key"].to_pylist()]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_a_stopped_encode_resumes_with_no_key_lost_or_repeated(tmp_path, stop):
    src, archive = tmp_path / "src", tmp_path / "archive"
    write_sources(src, ITEMS)

    # Its own process group, so the signal reaches the job's local Ray too: SIGKILL as a killed job on a node
    # would see, SIGINT as a terminal sends Ctrl-C to the whole foreground group.
    # A shell gives its foreground job Ctrl-C's default action; a test runner's worker may ignore SIGINT, and
    # an ignored SIGINT is inherited (Python then installs no KeyboardInterrupt handler).
    job = subprocess.Popen(encode_command(src, archive), env=cli_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while True:
        manifest = whole_manifest(archive)
        if manifest is not None and len(manifest["shards"]) >= 2:
            break
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "encode made no progress"
        time.sleep(0.2)
    os.killpg(job.pid, stop)
    _, stderr = job.communicate(timeout=120)
    if stop == signal.SIGINT:  # not click's bare "Aborted!": what is kept, and that a re-run resumes
        assert job.returncode == 130, stderr.decode()[-2000:]
        assert stderr.decode().rstrip().endswith("interrupted: what was finished is kept (encode: every committed "
                                                 "shard; decode: every image written), and running the same command "
                                                 "again resumes from there")  # fmt: skip
        try:
            os.killpg(job.pid, signal.SIGKILL)  # what of its Ray outlived it
        except ProcessLookupError:
            pass

    before = whole_manifest(archive)
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
    after = whole_manifest(archive)
    assert after["complete"] and after["totals"]["items"] == ITEMS
    listed = {s["path"] for s in after["shards"]}
    on_disk = {f"shards/{p.name}" for p in (archive / "shards").iterdir()}
    assert on_disk == listed  # shards of the killed run that were never committed are gone


def encode_actor_pids(session: int) -> set[int]:
    """The EncodeWorker actors' processes of one job."""
    return session_processes(session, b"ray::EncodeWorker")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actors' processes through /proc")
def test_one_of_two_actors_killed_three_times_costs_no_key_and_stdout_stays_json(tmp_path):
    src, archive = tmp_path / "src", tmp_path / "archive"
    expected = write_sources(src, 40)
    job = subprocess.Popen(encode_command(src, archive, actors=2), env=cli_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def running(what: str) -> None:
        if job.poll() is not None:
            pytest.fail(f"{what}; the encode ended: {job.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, what

    try:
        killed: list[int] = []
        deadline = time.monotonic() + 300
        while len(actors := encode_actor_pids(job.pid)) < 2:
            running("the actors never started")
            time.sleep(0.1)
        victim, survivor = sorted(actors)
        while len(killed) < 3:
            time.sleep(1.0)  # let the actor take work
            running(f"the encode ended after {len(killed)} kills: make it longer")
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            while len(killed) < 3 and not (fresh := encode_actor_pids(job.pid) - {survivor, *killed}):
                running("no actor took the dead one's place")
                time.sleep(0.1)
            victim = min(fresh) if len(killed) < 3 else victim
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr.decode()[-3000:]
    assert "Traceback" not in stderr.decode()
    summary = json.loads(stdout)  # the whole of stdout: no Ray message mixed in
    assert summary["encoded"] == len(expected) and summary["failed"] == 0
    assert sorted(committed_keys(archive)) == expected  # none lost, none twice

    decoded = subprocess.run([sys.executable, "-m", "diffarc.jobs.cli", "decode", str(archive), str(tmp_path / "out"),
                              "--json"], env=cli_env(), capture_output=True, timeout=600)
    assert decoded.returncode == 0, decoded.stderr.decode()[-3000:]
    assert json.loads(decoded.stdout)["decoded"] == len(expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected
