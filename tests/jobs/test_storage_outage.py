"""An encode whose S3 endpoint goes away for a while, against a real S3 server (moto) behind a TcpSwitch.

A short outage must cost nothing: no item recorded as failed, every key in the archive once. One that
outlasts the retry budget must end the job with one sentence, leaving an archive that the same command,
run again, completes.
botocore's own retries are switched off (`max_attempts: 1`), so that a few seconds of outage reach
diffarc's retry policy, as a longer one would with botocore's defaults.

The jobs join one Ray head started for the module (`--address`), as jobs on a cluster do: the retry
settings reach the actors as a joined cluster's are told (a runtime environment), and no job pays for
starting a Ray of its own.
"""

import json
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from diffarc.pipeline.archive import load_manifest
from diffarc.pipeline.storage import Location

from ..conftest import RAY_NODE_ENV, photo_like, ray_head
from ..tcp_switch import TcpSwitch

pytestmark = pytest.mark.slow

ITEMS = 48


@pytest.fixture(scope="module")
def head() -> str:
    with ray_head(cpus=2) as (address, _):
        yield address


@pytest.fixture
def s3_job(s3_server, head, tmp_path, request):
    """Source images in one bucket and an empty archive bucket, on the real server; the job's view of it
    goes through a switch."""
    direct = s3fs.S3FileSystem(**s3_server["storage_options"])
    name = request.node.name.replace("_", "-")[:40].strip("-")
    src = tmp_path / "src"
    src.mkdir()
    for index in range(ITEMS):
        Image.fromarray(photo_like(96, 120, seed=index)).save(src / f"img{index:03d}.png")
    for bucket in (f"{name}-src", f"{name}-arc"):
        direct.mkdir(bucket)
    direct.put(str(src) + "/", f"{name}-src/images/", recursive=True)
    switch = TcpSwitch(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    options = {**s3_server["storage_options"], "client_kwargs": {"endpoint_url": switch.endpoint},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    # One image per shard: the job fetches, writes and commits all the time, so an outage cannot miss it.
    command = [sys.executable, "-m", "diffarc.jobs.cli", "encode", f"s3://{name}-src/images", f"s3://{name}-arc/a",
               "--codec", "jpeg", "--shard-size", "1", "--actors", "2", "--storage-options", json.dumps(options), "--json",
               "--address", head]
    return direct, switch, command, f"{name}-arc/a"


def manifest(direct: s3fs.S3FileSystem, archive: str) -> dict | None:
    """The archive's whole manifest as JSON, read as diffarc reads it (pointer, checkpoint, commits)."""
    found = load_manifest(Location(f"s3://{archive}", direct.storage_options))
    return None if found is None else json.loads(found.to_json())


def committed_keys(direct: s3fs.S3FileSystem, archive: str) -> list[str]:
    keys = []
    for shard in manifest(direct, archive)["shards"]:
        with direct.open(f"{archive}/{shard['path']}", "rb") as handle:
            keys += pq.read_table(handle, columns=["key"])["key"].to_pylist()
    return keys


def run_with_outage(
    direct, switch, command, archive, seconds: float | None, silently: bool = False, **env
) -> subprocess.CompletedProcess:
    """Run the encode; once it has committed two shards, switch the endpoint off (`silently`: connections
    stop answering but stay open) for `seconds` (None: until the job ends)."""
    job = subprocess.Popen(command, env={**RAY_NODE_ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while (found := manifest(direct, archive)) is None or len(found["shards"]) < 2:
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the encode committed nothing"
            time.sleep(0.1)
        switch.off(silently)
        assert job.poll() is None and len(found["shards"]) < ITEMS, "the encode ended before the outage"
        try:
            job.wait(timeout=seconds or 600)
        except subprocess.TimeoutExpired:
            assert seconds, "the encode outlived the outage"
        switch.on()
        stdout, stderr = job.communicate(timeout=900)
    finally:
        switch.on()
        if job.poll() is None:
            job.kill()
    return subprocess.CompletedProcess(command, job.returncode, stdout.decode(), stderr.decode())


def test_a_short_outage_costs_no_item(s3_job):
    direct, switch, command, archive = s3_job
    result = run_with_outage(direct, switch, command, archive, seconds=5)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["encoded"] == ITEMS and summary["failed"] == 0 and summary["deferred"] == 0
    after = manifest(direct, archive)
    assert after["complete"] and after["failures"] is None  # nothing recorded as failed
    assert sorted(committed_keys(direct, archive)) == [f"img{i:03d}.png" for i in range(ITEMS)]


def test_a_silent_outage_costs_no_item(s3_job):
    """Connections that stop answering, without being closed, hold no worker for ever: each attempt has a
    deadline (DIFFARC_STORAGE_TIMEOUT_SECONDS), after which it is retried like any transient failure."""
    direct, switch, command, archive = s3_job
    result = run_with_outage(direct, switch, command, archive, seconds=5, silently=True,
                             DIFFARC_STORAGE_TIMEOUT_SECONDS="4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["encoded"] == ITEMS and summary["failed"] == 0 and summary["deferred"] == 0
    assert manifest(direct, archive)["complete"]
    assert sorted(committed_keys(direct, archive)) == [f"img{i:03d}.png" for i in range(ITEMS)]


def test_a_long_outage_ends_the_job_in_one_sentence_and_a_rerun_completes_it(s3_job):
    direct, switch, command, archive = s3_job
    result = run_with_outage(direct, switch, command, archive, seconds=None, DIFFARC_STORAGE_RETRY_SECONDS="3")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "storage kept failing" in result.stderr and "run the command again to resume" in result.stderr
    before = manifest(direct, archive)
    assert not before["complete"] and before["failures"] is None  # an outage is no item's fault

    rerun = subprocess.run(command, env=RAY_NODE_ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["already_done"] > 0 and summary["already_done"] + summary["encoded"] == ITEMS  # resumed
    assert sorted(committed_keys(direct, archive)) == [f"img{i:03d}.png" for i in range(ITEMS)]  # once each
    assert manifest(direct, archive)["complete"]
