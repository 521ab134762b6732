"""Storage that fails: which failures are transient, the one policy for them (`retry_transient`, with a
deadline on every attempt on an object store: `call`), and what a failure means in words.

Transient failures (connection refused or reset, timeouts, HTTP 5xx, throttling) are retried with
backoff for up to DIFFARC_STORAGE_RETRY_SECONDS (60 s) per operation; permanent ones (not found, access
denied) are raised at once. Every `Location` operation and `sources.fetch` go through `retry_transient`.

Each attempt on an object store also has a deadline (`call`): DIFFARC_STORAGE_TIMEOUT_SECONDS (300 s)
plus one second per MB it sends. Without one, a connection that stops answering without being closed (a
NAT or load balancer that forgot it) would hold a worker forever: aiohttp's read timeout does not cover
the wait for an upload's answer. An attempt past its deadline is abandoned and counts as transient.

`describe_storage_failure` is the one place where fsspec's, s3fs's and botocore's exceptions become words
(`storage_errors` turns them into a StorageError naming the location); the command line uses it too, for
a storage failure that happens later in a job.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import random
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from fsspec.asyn import AsyncFileSystem
from fsspec.exceptions import FSTimeoutError

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
    return before_deadline(lambda seconds: getattr(fs, method)(*args, timeout=seconds, **kwargs), sending)


def before_deadline(run: Callable[[float], T], sending: int = 0) -> T:
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


def retried(verb: str):
    """A Location method run under `retry_transient`, its failure named by `verb` and the file's URL."""

    def decorate(method):
        @functools.wraps(method)
        def retried(self, relative: str = "", *args, **kwargs):
            return retry_transient(lambda: method(self, relative, *args, **kwargs), f"{verb} {self._name(relative)}")

        return retried

    return decorate




@contextmanager
def storage_errors(action: str, url: str) -> Iterator[None]:
    """Turn a storage failure inside the block into a StorageError: 'cannot ACTION URL: reason'."""
    try:
        yield
    except DiffarcError:
        raise
    except Exception as exc:
        reason = describe_storage_failure(exc, url)
        if reason is None:
            raise
        raise StorageError(f"cannot {action} {url}: {reason}") from exc


def is_missing_bucket(exc: BaseException) -> bool:
    # s3fs raises FileNotFoundError with S3's own message, from botocore's NoSuchBucket.
    cause = type(exc.__cause__).__name__ if exc.__cause__ else ""
    return isinstance(exc, FileNotFoundError) and (cause == "NoSuchBucket" or "bucket does not exist" in str(exc).lower())


def describe_storage_failure(exc: BaseException, url: str | None = None) -> str | None:
    """What a storage exception means, in words; None when it is no storage failure (then it is a bug).

    With `url` the caller names the location, so file names inside the exception are left out.
    """
    kind = type(exc)
    if kind.__module__.startswith("botocore"):
        if "Credentials" in kind.__name__:  # NoCredentialsError, PartialCredentialsError
            return (
                "no S3 credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or pass them in --storage-options"
            )
        if "Endpoint" in kind.__name__ or "Connect" in kind.__name__:
            return f"the storage endpoint cannot be reached ({exc})"
        return str(exc)  # botocore's messages are sentences: "An error occurred (X) when calling Y: …"
    if not isinstance(exc, OSError):
        return None
    if is_missing_bucket(exc):
        bucket = url.split("://", 1)[-1].split("/", 1)[0] if url and "://" in url else None
        return f"{f'bucket {bucket!r}' if bucket else 'the bucket'} does not exist (diffarc creates no buckets)"
    if isinstance(exc, (NotADirectoryError, FileExistsError)) and exc.strerror:
        reason = "a file is in the way where a folder is needed"
    elif isinstance(exc, PermissionError) and url and "://" in url:
        reason = f"access denied ({exc.strerror or exc}); check the credentials' permissions"
    elif exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
    else:
        message = str(exc)
        # s3fs raises FileNotFoundError(path) for a missing object: a bare path is no sentence.
        if isinstance(exc, FileNotFoundError) and message and " " not in message:
            message = f"{message} not found"
        return message or "the storage refused the request"
    filename = exc.filename if url is None else None
    return f"{reason} ({filename})" if filename else reason
