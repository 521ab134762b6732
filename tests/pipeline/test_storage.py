"""Location: the one filesystem opener, on local disk, fsspec's in-memory filesystem and a real S3 server;
and the retry policy for storage that fails for a while."""

import pickle
import socket
import threading
import time
import uuid

import pytest
import s3fs

from diffarc.codecs.errors import StorageError
from diffarc.pipeline.storage import LinkRefused, Location, WriteConflict
from diffarc.pipeline.storage_failures import (
    RETRY_SECONDS_ENV, TIMEOUT_SECONDS_ENV, StorageUnavailableError, is_transient, retry_transient,
)

from ..tcp_switch import TcpSwitch


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(str(tmp_path / "root"))
    return Location(f"memory://diffarc-test-{uuid.uuid4().hex}")


def test_write_read_list_delete(location):
    location.write_atomic("b/two.bin", b"2" * 5)
    location.write_atomic("a.bin", b"1")
    location.write_atomic("b/c/three.bin", b"")
    assert location.read("b/two.bin") == b"22222" and location.size("b/two.bin") == 5
    assert location.list_files() == ["a.bin", "b/c/three.bin", "b/two.bin"]
    assert location.list_files("b/c") == ["b/c/three.bin"]
    assert location.exists("a.bin") and not location.exists("nope.bin")
    location.delete("a.bin")
    location.delete("a.bin")  # deleting what is not there is not an error
    assert location.list_files() == ["b/c/three.bin", "b/two.bin"]
    assert Location(location.url + "/missing").list_files() == []
    with pytest.raises(FileNotFoundError):
        location.read("nope.bin")


def test_write_atomic_replaces_whole_and_leaves_no_temporary_files(location):
    location.write_atomic("manifest.json", b"old" * 1000)
    location.write_atomic("manifest.json", b"new")
    assert location.read("manifest.json") == b"new"
    assert location.list_files() == ["manifest.json"]


def test_a_failed_local_write_leaves_the_old_file_and_no_temporary_files(tmp_path):
    location = Location(str(tmp_path))
    (tmp_path / "target").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        location.write_atomic("target", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (tmp_path / "target").is_dir()


def test_a_location_travels_as_its_url_and_options(tmp_path):
    location = Location(str(tmp_path), {"auto_mkdir": True})
    copy = pickle.loads(pickle.dumps(location))
    assert (copy.url, copy.storage_options, copy.root) == (location.url, {"auto_mkdir": True}, location.root)
    assert copy.is_local and not Location("memory://x").is_local


@pytest.mark.parametrize("hostile", ["../other.arc/shards/part-1.parquet", "/etc/hostname", "a//b", "a/./b",
                                     "a/../../x", "back\\slash", "nul\0byte", ".."])  # fmt: skip
def test_paths_that_could_leave_the_location_are_refused(location, hostile, tmp_path):
    (tmp_path / "other.arc" / "shards").mkdir(parents=True)
    (tmp_path / "other.arc" / "shards" / "part-1.parquet").write_bytes(b"another archive's shard")
    for operation in (location.read, location.exists, location.delete, lambda p: location.write_atomic(p, b"x")):
        with pytest.raises(StorageError, match="refusing the path"):
            operation(hostile)
    assert (tmp_path / "other.arc" / "shards" / "part-1.parquet").exists()


def test_a_location_that_follows_no_links_neither_reads_writes_deletes_nor_lists_through_one(tmp_path):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "secret.txt").write_bytes(b"secret")
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "folder").symlink_to(outside / "folder")
    (tmp_path / "arc" / "file.txt").symlink_to(outside / "folder" / "secret.txt")
    (tmp_path / "arc" / "own.txt").write_bytes(b"own")
    archive = Location(str(tmp_path / "arc"), follow_links=False)
    assert pickle.loads(pickle.dumps(archive)).follow_links is False
    for path in ("folder/secret.txt", "file.txt", "folder/new.txt"):
        for operation in (archive.read, archive.exists, archive.delete, lambda p: archive.write_atomic(p, b"x")):
            with pytest.raises(LinkRefused, match="is a symbolic link"):
                operation(path)
    assert archive.list_files() == ["own.txt"]
    with pytest.raises(LinkRefused):
        archive.list_files("folder")
    assert sorted(p.name for p in (outside / "folder").iterdir()) == ["secret.txt"]
    assert (outside / "folder" / "secret.txt").read_bytes() == b"secret"
    assert Location(str(tmp_path / "arc")).read("file.txt") == b"secret"  # a plain Location (SRC) follows them


@pytest.fixture(params=["local", "memory", "s3"])
def any_location(request, tmp_path) -> Location:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        fs = s3fs.S3FileSystem(**server["storage_options"])
        if not fs.exists("versioned"):
            fs.mkdir("versioned")
        return Location(f"s3://versioned/{uuid.uuid4().hex}", server["storage_options"])
    if request.param == "local":
        return Location(str(tmp_path / "root"))
    return Location(f"memory://v-{uuid.uuid4().hex}")


def test_versioned_writes_create_once_and_replace_only_the_version_read(any_location):
    location = any_location
    first = location.write_versioned("manifest.json", b"one", None)
    with pytest.raises(WriteConflict, match="created by someone else"):
        location.write_versioned("manifest.json", b"two", None)
    assert location.read_versioned("manifest.json") == (b"one", first)
    second = location.write_versioned("manifest.json", b"two", first)
    assert second != first and location.read("manifest.json") == b"two"
    with pytest.raises(WriteConflict, match="changed by someone else"):
        location.write_versioned("manifest.json", b"three", first)  # a writer that read "one" is refused
    assert location.read("manifest.json") == b"two"
    location.delete("manifest.json")
    with pytest.raises(WriteConflict, match="deleted by someone else"):
        location.write_versioned("manifest.json", b"four", second)
    assert location.list_files() == []  # no temporary files left


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_of_writers_racing_to_create_one_file_exactly_one_wins(kind, tmp_path, request):
    from concurrent.futures import ThreadPoolExecutor

    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        fs = s3fs.S3FileSystem(**server["storage_options"])
        if not fs.exists("versioned"):
            fs.mkdir("versioned")
        url, options = f"s3://versioned/{uuid.uuid4().hex}", server["storage_options"]
    else:
        url, options = str(tmp_path / "race"), None

    def create(index: int) -> bool:
        try:
            Location(url, options).write_versioned("writer.lock", str(index).encode(), None)
            return True
        except WriteConflict:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(create, range(16)))
    assert won.count(True) == 1
    assert Location(url, options).read("writer.lock") == str(won.index(True)).encode()


# Transient failures: retried for a bounded time; permanent ones raised at once.

NO_CLIENT_RETRIES = {"retries": {"max_attempts": 1}}  # botocore's own retries off: failures reach diffarc at once


def client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("status, code, transient", [
    (503, "SlowDown", True), (500, "InternalError", True), (429, "TooManyRequests", True),
    (400, "RequestTimeout", True), (404, "NoSuchKey", False), (403, "AccessDenied", False),
    (400, "InvalidArgument", False),
])  # fmt: skip
def test_http_answers_are_classified_also_inside_s3fs_wrappers(status, code, transient):
    from s3fs.errors import translate_boto_error

    error = client_error(status, code)
    assert is_transient(error) is transient
    assert is_transient(translate_boto_error(error)) is transient  # an OSError caused by the ClientError


def test_undecodable_images_and_unknown_errors_are_permanent():
    from diffarc.codecs.errors import ImageLoadError

    assert not is_transient(ImageLoadError("not an image"))
    assert not is_transient(ValueError("a bug"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())


@pytest.mark.slow
def test_a_permanent_failure_is_raised_at_once_without_retrying(s3_server):
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.mkdir("retry-permanent")
    archive = Location("s3://retry-permanent/a", s3_server["storage_options"])
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        archive.read("missing.json")
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_an_unreachable_endpoint_is_retried_for_the_budget_then_named(monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
               "config_kwargs": NO_CLIENT_RETRIES}
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"cannot read s3://nowhere/a/manifest.json: storage kept "
                       r"failing for \d+ s \(EndpointConnectionError.*run the command again to resume"):
        Location("s3://nowhere/a", options).read("manifest.json")
    assert 2 <= time.monotonic() - started < 10


@pytest.mark.slow
def test_a_read_during_a_short_outage_waits_for_the_server(s3_server, monkeypatch):
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.mkdir("retry-outage")
    fs.pipe_file("retry-outage/a/manifest.json", b"{}")
    switch = TcpSwitch(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    options = {**s3_server["storage_options"], "client_kwargs": {"endpoint_url": switch.endpoint},
               "config_kwargs": NO_CLIENT_RETRIES}
    monkeypatch.setenv(RETRY_SECONDS_ENV, "30")
    switch.off()
    threading.Timer(3.0, switch.on).start()
    started = time.monotonic()
    assert Location("s3://retry-outage/a", options).read("manifest.json") == b"{}"
    assert time.monotonic() - started >= 2.5  # it waited out the outage instead of failing
    assert retry_transient(lambda: "first try", seconds=0) == "first try"


@pytest.mark.slow
def test_a_write_that_gets_no_answer_is_abandoned_at_its_deadline_and_retried(s3_server, monkeypatch):
    """A connection that stops answering without closing: aiohttp would wait for the PUT's answer forever."""
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.mkdir("deadline")
    switch = TcpSwitch(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    location = Location("s3://deadline/a", {**s3_server["storage_options"], "config_kwargs": NO_CLIENT_RETRIES,
                                            "client_kwargs": {"endpoint_url": switch.endpoint}})
    monkeypatch.setenv(TIMEOUT_SECONDS_ENV, "1")
    monkeypatch.setenv(RETRY_SECONDS_ENV, "30")
    location.write_atomic("before.bin", b"1")  # a pooled connection, which the outage leaves hanging
    switch.off(silently=True)
    threading.Timer(4.0, switch.on).start()
    started = time.monotonic()
    location.write_atomic("during.bin", b"2" * 100_000)
    assert time.monotonic() - started >= 3.5 and fs.cat_file("deadline/a/during.bin") == b"2" * 100_000

    switch.off(silently=True)
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    with pytest.raises(StorageUnavailableError, match=r"cannot write s3://deadline/a/x.bin: .*no answer in 1 s "
                       rf"\({TIMEOUT_SECONDS_ENV}\)"):
        location.write_atomic("x.bin", b"3")
    monkeypatch.setenv(TIMEOUT_SECONDS_ENV, "soon")
    with pytest.raises(StorageError, match=f"{TIMEOUT_SECONDS_ENV}='soon' is not a number of seconds"):
        location.write_atomic("x.bin", b"3")
