"""The one way diffarc opens storage: any fsspec URL (local path, s3://, memory://, gs://, …), and the one
policy for storage that fails for a while (`retry_transient`).

Credentials come from fsspec's and botocore's usual chain (the AWS_* environment variables, including
AWS_ENDPOINT_URL for an S3-compatible server, or config files) or from --storage-options; diffarc never
prints them.

Every path below a Location goes through `Location.path`, which refuses any that could leave it (absolute,
`..`, empty or `.` components, backslashes): paths read from an archive's manifest may be hostile. An
archive's Location also follows no link (`follow_links=False`): on local disk a path through a symbolic
link is refused (`LinkRefused`) and listing skips links, so a link planted in an archive can make diffarc
neither read, write nor delete anything outside it. Object stores have no links: there a key prefix is
the whole rule.

Transient failures (connection refused or reset, timeouts, HTTP 5xx, throttling) are retried with
backoff for up to DIFFARC_STORAGE_RETRY_SECONDS (60 s) per operation; permanent ones (not found, access
denied) are raised at once. Every `Location` operation and `sources.fetch` go through `retry_transient`.

Each attempt on an object store also has a deadline (`call`): DIFFARC_STORAGE_TIMEOUT_SECONDS (300 s)
plus one second per MB it sends. Without one, a connection that stops answering without being closed (a
NAT or load balancer that forgot it) would hold a worker forever: aiohttp's read timeout does not cover
the wait for an upload's answer. An attempt past its deadline is abandoned and counts as transient.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import posixpath
import random
import stat
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

from ..codecs.errors import DiffarcError, StorageError

T = TypeVar("T")
logger = logging.getLogger("diffarc.storage")

RETRY_SECONDS_ENV = "DIFFARC_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0
TIMEOUT_SECONDS_ENV = "DIFFARC_STORAGE_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 300.0
# Each worker process reads these from its environment; a cluster it joins is told them (cluster.connect).
SETTINGS_ENV = (RETRY_SECONDS_ENV, TIMEOUT_SECONDS_ENV)

# What a client raises when the store is briefly away, by qualified class name (anywhere in the class's
# MRO), so that botocore, aiohttp and fsspec need not be importable to be recognised.
TRANSIENT_CLASSES = frozenset({
    "botocore.exceptions.ConnectionError",  # endpoint unreachable, connect timeout
    "botocore.exceptions.HTTPClientError",  # connection closed, read timeout, response cut short
    "botocore.exceptions.IncompleteReadError",
    "aiohttp.client_exceptions.ClientConnectionError",  # refused, reset, server disconnected, timeouts
    "aiohttp.client_exceptions.ClientPayloadError",
    "http.client.IncompleteRead",
    "urllib3.exceptions.ProtocolError",
})  # fmt: skip
TRANSIENT_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
})  # fmt: skip
# S3-style error codes that mean "later", whatever the HTTP status they come with.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
})  # fmt: skip


class StorageUnavailableError(StorageError):
    """Storage failed transiently for longer than the retry budget: the job stops, and resumes when run again."""


def retry_seconds() -> float:
    """The retry budget of one storage operation: DIFFARC_STORAGE_RETRY_SECONDS, else 60 s."""
    return _seconds_from_env(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS)


def attempt_seconds(sending: int = 0) -> float:
    """How long one attempt on an object store may take: DIFFARC_STORAGE_TIMEOUT_SECONDS (else 300 s), plus
    a second per MB of `sending`, so that a large upload on a slow link is not cut short."""
    return _seconds_from_env(TIMEOUT_SECONDS_ENV, DEFAULT_TIMEOUT_SECONDS) + sending / 1e6


def _seconds_from_env(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses NaN
        raise StorageError(f"{name}={value!r} is not a number of seconds")
    return seconds


def call(fs, method: str, *args, sending: int = 0, **kwargs):
    """`fs.<method>(*args, **kwargs)`, abandoned with a TimeoutError (transient, so retried) once it has
    taken `attempt_seconds(sending)`, when `fs` is an asynchronous (network) filesystem. Its synchronous
    methods run the coroutine on fsspec's event loop and take `timeout` for themselves; the coroutine is
    cancelled, which closes its connection."""
    if not isinstance(fs, AsyncFileSystem):
        return getattr(fs, method)(*args, **kwargs)
    return _before_deadline(lambda seconds: getattr(fs, method)(*args, timeout=seconds, **kwargs), sending)


def _before_deadline(run: Callable[[float], T], sending: int = 0) -> T:
    """`run(seconds)`, which gives up after `seconds`, with fsspec's timeout turned into a plain TimeoutError."""
    seconds = attempt_seconds(sending)
    try:
        return run(seconds)
    except FSTimeoutError:
        raise TimeoutError(f"no answer in {seconds:.0f} s ({TIMEOUT_SECONDS_ENV})") from None


def is_transient(exc: BaseException) -> bool:
    """Whether a storage failure may go away by itself: connection errors, timeouts, HTTP 5xx, 408, 429
    and throttling codes (found anywhere in the chain of causes, since s3fs wraps botocore's errors in
    OSErrors). Not found, access denied, bad requests and anything unrecognised are permanent."""
    if isinstance(exc, StorageUnavailableError):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, DiffarcError)):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        by_status = _transient_by_status(current)
        if by_status is not None:
            return by_status
        names = {f"{c.__module__}.{c.__name__}" for c in type(current).__mro__}
        if any("SSL" in name or "Certificate" in name for name in names):
            return False  # a certificate the client refuses is refused every time
        if names & TRANSIENT_CLASSES or isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _transient_by_status(exc: BaseException) -> bool | None:
    """From an HTTP answer (botocore's ClientError.response, aiohttp's .status): None when there is none."""
    response = getattr(exc, "response", None)
    code, status = None, getattr(exc, "status", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode", status)
    if code in TRANSIENT_CODES:
        return True
    if not isinstance(status, int) or isinstance(status, bool):
        return None
    return status >= 500 or status in (408, 429)


def retry_transient(operation: Callable[[], T], what: str = "use storage", seconds: float | None = None) -> T:
    """`operation()`, called again after each transient failure (`is_transient`) with exponential backoff
    (0.5 s doubling to 8 s, jittered so that many workers do not return at once) for at most `seconds`
    (default `retry_seconds()`) of waiting in all. A permanent failure is raised at once, as it is; a
    transient one that outlasts the budget as StorageUnavailableError, whose message says `what` failed."""
    budget = retry_seconds() if seconds is None else seconds
    started = time.monotonic()
    delay = 0.5
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, StorageUnavailableError):
                raise
            elapsed = time.monotonic() - started
            if elapsed >= budget:
                reason = str(exc).splitlines()[0] if str(exc) else "no detail"
                raise StorageUnavailableError(
                    f"cannot {what}: storage kept failing for {elapsed:.0f} s ({type(exc).__name__}: {reason}); "
                    f"gave up ({RETRY_SECONDS_ENV}={budget:g}). Finished work is kept: run the command again "
                    "to resume"
                ) from exc
            pause = min(delay * random.uniform(0.5, 1.0), budget - elapsed)
            logger.debug("cannot %s (%s); trying again in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
            delay = min(2 * delay, 8.0)


def _retried(verb: str):
    """A Location method run under `retry_transient`, its failure named by `verb` and the file's URL."""

    def decorate(method):
        @functools.wraps(method)
        def retried(self, relative: str = "", *args, **kwargs):
            return retry_transient(lambda: method(self, relative, *args, **kwargs), f"{verb} {self._name(relative)}")

        return retried

    return decorate


class WriteConflict(StorageError):
    """A conditional write found the file at another version than expected: someone else wrote it."""


class LinkRefused(StorageError):
    """A path below a Location that follows no links passes through a symbolic link."""


def relative_path_problem(relative: str) -> str | None:
    """Why `relative` could name something outside the folder it is relative to, or None when it cannot."""
    if not isinstance(relative, str):
        return "is not a string"
    if relative.startswith("/"):
        return "is absolute"
    if "\\" in relative:
        return "has a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in relative):
        return "has a control character"
    if any(part in ("", ".", "..") for part in relative.split("/")):
        return "has an empty, '.' or '..' component"
    return None


class Location:
    """A folder on some filesystem, with the file operations the pipeline needs under it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, follow_links: bool = True):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.follow_links = follow_links
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/") or "/"

    def __reduce__(self):
        # Ship the URL, not the live filesystem object, to Ray workers: each opens its own connection.
        return (Location, (self.url, self.storage_options, self.follow_links))

    def confined(self) -> Location:
        """This location, following no links (module docstring): how an archive is opened."""
        return self if not self.follow_links else Location(self.url, self.storage_options, follow_links=False)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        """The full path of `relative`, which must stay below this location ("" is the location itself)."""
        if relative == "":
            return self.root
        problem = relative_path_problem(relative)
        if problem:
            raise StorageError(f"refusing the path {relative!r} under {self.url}: it {problem}")
        if not self.follow_links and self.is_local:
            self._refuse_links(relative)
        return posixpath.join(self.root, relative)

    def _refuse_links(self, relative: str) -> None:
        """Raise LinkRefused when a component of `relative` that exists is a symbolic link (the location's
        own root may be one: that is where its user put it)."""
        current = self.root
        for part in relative.split("/"):
            current = posixpath.join(current, part)
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return
            if stat.S_ISLNK(mode):
                shown = current[len(self.root) :].lstrip("/")
                raise LinkRefused(
                    f"refusing {self._name(relative)}: {shown} is a symbolic link, and diffarc follows no link "
                    "inside an archive (it could lead outside it)"
                )

    @_retried("read")
    def read(self, relative: str) -> bytes:
        return read_file(self.fs, self.path(relative))

    @_retried("look for")
    def exists(self, relative: str) -> bool:
        return call(self.fs, "exists", self.path(relative))

    @_retried("read the size of")
    def size(self, relative: str) -> int:
        return call(self.fs, "size", self.path(relative))

    @_retried("delete")
    def delete(self, relative: str) -> None:
        if call(self.fs, "exists", self.path(relative)):
            call(self.fs, "rm_file", self.path(relative))

    @_retried("list")
    def list_files(self, relative: str = "") -> list[str]:
        """Relative paths of all files below `relative`, sorted."""
        base = self.path(relative)
        if not self.follow_links and self.is_local:
            return self._list_local_files(base)
        if not call(self.fs, "exists", base):
            return []
        found = call(self.fs, "find", base)
        if not self.follow_links:  # a store's listing by prefix: only keys below `relative` itself
            found = [p for p in found if p.startswith(base.rstrip("/") + "/")]
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    def _list_local_files(self, base: str) -> list[str]:
        """The regular files below `base`, walked without entering or listing symbolic links."""
        prefix = self.root.rstrip("/") + "/"
        found = []
        for folder, _, files in os.walk(base, followlinks=False):
            for name in files:
                path = os.path.join(folder, name)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    found.append(path[len(prefix):])
        return sorted(found)

    @property
    def has_conditional_writes(self) -> bool:
        """Whether the store itself refuses a write whose precondition fails (S3's If-Match / If-None-Match)."""
        return "s3" in _protocols(self.fs)

    @_retried("read")
    def read_versioned(self, relative: str) -> tuple[bytes, str]:
        """A file's bytes and a version that changes whenever the file does: S3's ETag of exactly these
        bytes (one GET), elsewhere their SHA-256."""
        if self.has_conditional_writes:
            return _s3_get(self.fs, self.path(relative))
        data = self.read(relative)
        return data, hashlib.sha256(data).hexdigest()

    @_retried("write")  # a retry after a lost answer may see its own write as a conflict: the caller re-reads
    def write_versioned(self, relative: str, data: bytes, expected: str | None) -> str:
        """Write `data` only if the file is still at version `expected` (None: only if there is no file);
        returns the new version, or raises WriteConflict.

        S3: one conditional PUT (If-Match: ETag, or If-None-Match: *), atomic against every other writer.
        Local disk: creating is atomic (a hard link that fails if the name exists); replacing compares,
        then renames, which is atomic only among processes holding the archive's writer lock — as every
        diffarc writer does (pipeline/lease.py). Other stores: compare, then write.
        """
        target = self.path(relative)
        if self.has_conditional_writes:
            condition = {"IfMatch": expected} if expected else {"mode": "create"}
            try:
                return call(self.fs, "pipe_file", target, data, sending=len(data), **condition)["ETag"]
            except FileExistsError:
                raise WriteConflict(f"{self.url}: {relative} was created by someone else") from None
            except FileNotFoundError:
                raise WriteConflict(f"{self.url}: {relative} was deleted by someone else") from None
            except OSError as exc:
                if _precondition_failed(exc):
                    raise WriteConflict(f"{self.url}: {relative} was changed by someone else") from None
                raise
        version = hashlib.sha256(data).hexdigest()
        if expected is None:
            if self.is_local:
                self._create_local(target, data)
            elif call(self.fs, "exists", target):
                raise WriteConflict(f"{self.url}: {relative} was created by someone else")
            else:
                self.write_atomic(relative, data)
            return version
        try:
            current = hashlib.sha256(self.read(relative)).hexdigest()
        except FileNotFoundError:
            raise WriteConflict(f"{self.url}: {relative} was deleted by someone else") from None
        if current != expected:
            raise WriteConflict(f"{self.url}: {relative} was changed by someone else")
        self.write_atomic(relative, data)
        return version

    def _create_local(self, target: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        temporary = self._write_temporary(target, data)
        try:
            os.link(temporary, target)  # fails, atomically, if the name exists
        except FileExistsError:
            raise WriteConflict(f"{self.url}: {target} was created by someone else") from None
        finally:
            os.remove(temporary)

    @_retried("write")
    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing/the old file or all of the new one.

        Local disk: write a temporary file beside the target, fsync, rename over it. Object stores: one
        PUT (or multipart upload), which the store only makes visible once it is complete.
        """
        target = self.path(relative)
        if not self.is_local:
            call(self.fs, "pipe_file", target, data, sending=len(data))
            return
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        temporary = self._write_temporary(target, data)
        try:
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    @staticmethod
    def _write_temporary(target: str, data: bytes) -> str:
        """`data` in a new file beside `target`, synced to disk: what a rename or link then publishes whole."""
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        return temporary

    def _name(self, relative: str) -> str:
        return f"{self.url.rstrip('/')}/{relative}" if relative else self.url



def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _precondition_failed(exc: OSError) -> bool:
    # s3fs turns S3's 412 for If-Match into a plain OSError; botocore's error, its cause, names it.
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def read_file(fs, path: str) -> bytes:
    """A whole file's bytes, in one request on S3 (s3fs's cat_file asks with a HEAD first: twice the
    requests and round trips per source image)."""
    if "s3" in _protocols(fs):
        return _s3_get(fs, path)[0]
    return call(fs, "cat_file", path)


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    """One GET: the object's bytes and the ETag of exactly those bytes (a HEAD then a GET could straddle a write)."""
    bucket, key, _ = fs.split_path(path)

    async def get():
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    return _before_deadline(lambda seconds: sync(fs.loop, get, timeout=seconds))
