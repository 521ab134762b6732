"""A two-node Ray cluster on this machine (`ray start --head` and `ray start --address`): an encode that
joins it with --address runs actors on both nodes, and finishes with every key once when one node dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import RAY_NODE_ENV, ray_head, start_ray_node, stop_node
from .test_kill_resume import committed_keys, encode_command, write_sources

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds each node's processes through /proc"),
]


@pytest.fixture
def cluster():
    """(address, head session, worker session): a head with 2 CPUs and a worker node with 1."""
    with ray_head(cpus=2) as (address, head):
        worker = start_ray_node(f"--address={address}", "--num-cpus=1")
        try:
            yield address, head, worker
        finally:
            stop_node(worker)


def run_encode(src: Path, archive: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen(encode_command(src, archive, actors=2) + ["--address", address], env=RAY_NODE_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def test_an_encode_runs_on_both_nodes_and_survives_losing_one(cluster, tmp_path):
    address, _, worker_session = cluster
    few = write_sources(tmp_path / "few", 6)  # a small job is split across both actors
    job = run_encode(tmp_path / "few", tmp_path / "first", address)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout)
    assert len({worker["node"] for worker in summary["workers"]}) == 2, summary["workers"]  # SPREAD: one per node
    assert sorted(committed_keys(tmp_path / "first")) == few

    # Again, longer, and the worker node dies once work is under way on both nodes.
    src = tmp_path / "src"
    expected = write_sources(src, 24)
    job = run_encode(src, tmp_path / "second", address)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "second" / "shards").is_dir() or len(list((tmp_path / "second" / "shards").iterdir())) < 2:
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the encode made no progress"
            time.sleep(0.2)
        stop_node(worker_session)
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr.decode()[-3000:]
    assert "work lost its actor" in stderr.decode()  # the node went with work on it
    summary = json.loads(stdout)
    assert summary["encoded"] == len(expected) and summary["failed"] == 0
    assert sorted(committed_keys(tmp_path / "second")) == expected  # none lost, none twice
