"""The writer lease: one writer per archive, refused in words, freed when its writer dies — on local disk
(flock) and on a real S3 server (moto: conditional PUTs), with real processes killed by SIGKILL."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import s3fs

from diffarc.codecs.errors import ArchiveError
from diffarc.pipeline.archive.lease import LOCK, WriterLease, current_writer
from diffarc.pipeline.storage import Location

from ..conftest import cli_env

HOLD = """
import sys, time, json
from diffarc.pipeline.archive import WriterLease
from diffarc.pipeline.storage import Location
lease = WriterLease(Location(sys.argv[1], json.loads(sys.argv[2])), expire_seconds=float(sys.argv[3]), renew_seconds=0.5)
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(url: str, options: dict | None = None, expire_seconds: float = 60, env=None):
    """A process that takes the lease and keeps it until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, url, json.dumps(options), str(expire_seconds)],
                               stdout=subprocess.PIPE, env=env or cli_env())  # fmt: skip
    assert process.stdout.readline().strip() == b"held"
    return process


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture
def s3_archive(s3_server):
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    if not fs.exists("leases"):
        fs.mkdir("leases")
    return Location(f"s3://leases/{uuid.uuid4().hex}", s3_server["storage_options"])


def test_a_second_local_writer_is_refused_naming_the_first_until_it_is_done(tmp_path):
    archive = Location(str(tmp_path / "arc"))
    with WriterLease(archive):
        with pytest.raises(ArchiveError) as refused:
            WriterLease(archive)
        message = str(refused.value)
        assert f"{archive.url} is being written by process {os.getpid()} on host {socket.gethostname()}, writing since 20" in message
        assert "an ended process's lock is freed at once" in message
        assert current_writer(archive)["pid"] == os.getpid()
    assert current_writer(archive) is None
    with WriterLease(archive):  # given back: the next writer gets it
        pass
    assert not (tmp_path / "arc").exists()  # made only to hold the lock: gone with it


def test_a_killed_local_writer_frees_the_archive_at_once(tmp_path):
    archive = Location(str(tmp_path / "arc"))
    holder = hold_in_another_process(archive.url)
    with pytest.raises(ArchiveError, match=f"being written by process {holder.pid} on host"):
        WriterLease(archive)
    assert current_writer(archive)["pid"] == holder.pid  # a reader sees the writer, and takes nothing
    kill(holder)
    assert (tmp_path / "arc" / LOCK).exists()  # the dead writer's file is still there, its lock is not
    assert current_writer(archive) is None
    started = time.monotonic()
    with WriterLease(archive):
        assert time.monotonic() - started < 1


def test_a_second_s3_writer_is_refused_and_a_killed_ones_lease_expires(s3_archive, s3_server):
    holder = hold_in_another_process(s3_archive.url, s3_archive.storage_options, expire_seconds=3)
    with pytest.raises(ArchiveError) as refused:
        WriterLease(s3_archive)
    assert f"being written by process {holder.pid} on host" in str(refused.value)
    assert "if it has died, its lease expires at 20" in str(refused.value)
    assert current_writer(s3_archive)["pid"] == holder.pid
    time.sleep(3.5)  # renewed every 0.5 s: alive past its expiry time
    with pytest.raises(ArchiveError, match=f"process {holder.pid}"):
        WriterLease(s3_archive)

    kill(holder)
    # Unexpired, but its holder died on this host: taken over at once (lease.holder_died_here).
    deadline = time.monotonic() + 10
    while current_writer(s3_archive) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with WriterLease(s3_archive) as lease:  # the dead writer's lease is taken over
        assert current_writer(s3_archive)["token"] == lease.holder["token"]
    assert not s3_archive.exists(LOCK)


def test_an_s3_writer_whose_lease_was_taken_over_stops_before_committing(s3_archive):
    lease = WriterLease(s3_archive, renew_seconds=0.2)
    try:
        lease.check()
        # Another writer that found the lease expired (this process paused past it) took it over.
        intruder = {"token": "other", "host": "elsewhere", "pid": 7, "since": time.time(), "renewed": time.time(),
                    "expire_seconds": 60}  # fmt: skip
        s3_archive.write_atomic(LOCK, json.dumps(intruder).encode())
        time.sleep(0.6)
        with pytest.raises(ArchiveError, match="lost its writer lease .* to process 7 on host elsewhere"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(s3_archive.read(LOCK))["token"] == "other"  # releasing left the new holder's lease alone
