"""One writer per archive: the lease on ARCHIVE/writer.lock that an encode holds while it writes.

    local disk    flock(LOCK_EX) on writer.lock, held until the writer ends. The kernel drops it when the
                  process dies, however it dies, so a killed writer never blocks the next run.
    object store  writer.lock is the lease: created with a conditional PUT (If-None-Match: *), renewed
                  every RENEW_SECONDS by a heartbeat thread with a conditional PUT (If-Match: its ETag),
                  abandoned once EXPIRE_SECONDS pass without a renewal. The next writer takes an
                  abandoned lease over with a PUT conditional on the abandoned version: exactly one does.

The file holds who writes (host, process) and since when; a second writer is refused with
that, and, on an object store, when the lease expires if its holder has died. There is no --break-lock:
a dead writer's lock frees itself (at once on local disk, within EXPIRE_SECONDS on an object store).
Expiry compares the holder's clock with the reader's, so hosts' clocks must agree to within seconds (NTP).

The lease keeps a second writer out, but alone it cannot make commits safe: a writer paused past its
lease's expiry may wake to find another writer in its place. So commits are conditional as well
(`ArchiveWriter` creates commit N only if no commit N exists), and `check` stops a writer that has lost
its lease before it commits.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import threading
import time
from datetime import datetime, timezone

from ...codecs.errors import ArchiveError
from ..storage import Location, WriteConflict

LOCK = "writer.lock"
EXPIRE_SECONDS = 60.0
RENEW_SECONDS = 15.0
MAX_EXPIRE_SECONDS = 3600.0  # whatever a lock file says: a damaged one must not block an archive for ever
# A local flock attempt can collide with a reader's instantaneous probe (`current_writer`): retry briefly.
LOCAL_ATTEMPT_SECONDS = 1.0


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holder(holder: dict) -> str:
    """'process 123 on host h, writing since …' from a lock's contents."""
    if not holder:
        return "another process (it has not yet said which)"
    words = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if isinstance(holder.get("since"), (int, float)):
        words += f", writing since {_stamp(holder['since'])}"
    return words


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class WriterLease:
    """The right to write one archive, for as long as this object is open (a context manager).

    `expire_seconds` and `renew_seconds` apply to object stores only; local disk needs neither.
    """

    def __init__(self, archive: Location, expire_seconds: float = EXPIRE_SECONDS, renew_seconds: float = RENEW_SECONDS):
        self.archive = archive
        self.expire_seconds = expire_seconds
        self.renew_seconds = renew_seconds
        self.holder = {
            "token": os.urandom(16).hex(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        self._descriptor: int | None = None  # local: the flocked file
        self._created: list[str] = []  # local: folders made to hold the lock file
        self._version: str | None = None  # object store: the ETag of our lease
        self._renewed = 0.0  # time.monotonic() of the last renewal that succeeded
        self._lost: str | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.acquire()

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ taking and giving back

    def acquire(self) -> None:
        if self.archive.is_local:
            self._acquire_local()
        else:
            self._acquire_object()
            self._heartbeat = threading.Thread(target=self._beat, name="diffarc-writer-lease", daemon=True)
            self._heartbeat.start()

    def release(self) -> None:
        """Give the archive up (idempotent). A lease another writer has taken over is left to it."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._descriptor is not None:
            # Unlink while still holding the lock; a writer that opened the old file finds it unlinked
            # once it gets the lock and starts again (`_acquire_local`).
            try:
                os.unlink(self.archive.path(LOCK))
            except FileNotFoundError:
                pass
            os.close(self._descriptor)
            self._descriptor = None
            for folder in self._created:  # deepest first; one that is not empty is the archive now
                try:
                    os.rmdir(folder)
                except OSError:
                    break
        elif self._version is not None and self._lost is None:
            try:
                data, _ = self.archive.read_versioned(LOCK)
                if _parse(data).get("token") == self.holder["token"]:
                    self.archive.delete(LOCK)
            except FileNotFoundError:
                pass
            self._version = None

    def _acquire_local(self) -> None:
        import fcntl

        path = self.archive.path(LOCK)
        folder = os.path.dirname(path)
        while not os.path.exists(folder):  # made for the lock: removed again if the job leaves them empty
            self._created.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        deadline = time.monotonic() + LOCAL_ATTEMPT_SECONDS
        while True:
            descriptor = _open_lock(path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._refusal(current_writer(self.archive) or {}) from None
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # its holder unlinked it as we opened it: lock the file now at the path
                os.close(descriptor)
                continue
            os.ftruncate(descriptor, 0)
            os.write(descriptor, json.dumps(self.holder).encode())
            self._descriptor = descriptor
            return

    def _acquire_object(self) -> None:
        for _ in range(10):  # each turn follows a change someone else made; ten is plenty
            self._renewed = time.monotonic()
            try:
                self._version = self.archive.write_versioned(LOCK, self._contents(), None)
                return
            except WriteConflict:
                pass
            try:
                data, version = self.archive.read_versioned(LOCK)
            except FileNotFoundError:
                continue  # released in between: try to create it again
            current = _parse(data)
            if current.get("token") == self.holder["token"]:  # our own create, answered late
                self._version = version
                return
            if not lease_expired(current) and not holder_died_here(current):
                raise self._refusal(current)
            try:
                self._version = self.archive.write_versioned(LOCK, self._contents(), version)
                return
            except WriteConflict:
                continue  # another writer took it over first; see who
        raise ArchiveError(f"{self.archive.url}: the writer lock keeps changing; is another encode starting?")

    def _refusal(self, holder: dict) -> ArchiveError:
        if self.archive.is_local:
            remedy = "wait for it to finish, or end it (an ended process's lock is freed at once), and run this again"
        else:  # `_acquire_object` refuses only a lease that has not expired, so both figures are numbers
            remedy = (
                f"wait for it to finish; if it has died, its lease expires at "
                f"{_stamp(holder['renewed'] + min(holder['expire_seconds'], MAX_EXPIRE_SECONDS))} "
                "and running this again then takes over"
            )
        return ArchiveError(f"{self.archive.url} is being written by {describe_holder(holder)}: {remedy}")

    # ------------------------------------------------------------------ keeping it

    def _contents(self) -> bytes:
        return json.dumps({**self.holder, "renewed": time.time(), "expire_seconds": self.expire_seconds}).encode()

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self._renew()
            except ArchiveError:
                return  # lost: `check` says so before the next commit
            except Exception:  # a storage hiccup: try again at the next beat; `check` watches the age
                continue

    def _renew(self) -> None:
        with self._guard:
            if self._lost:
                raise ArchiveError(self._lost)
            data = self._contents()
            try:
                self._version = self.archive.write_versioned(LOCK, data, self._version)
            except WriteConflict:
                try:
                    current, version = self.archive.read_versioned(LOCK)
                except FileNotFoundError:
                    current, version = b"", None
                if _parse(current).get("token") != self.holder["token"]:
                    self._lost = (
                        f"this job lost its writer lease on {self.archive.url} to "
                        f"{describe_holder(_parse(current))}; it stopped without committing more"
                    )
                    raise ArchiveError(self._lost) from None
                self._version = version  # our own write, retried after a lost answer
            self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise unless this writer still holds the archive; called before every commit.

        A lease that has gone unrenewed for more than two beats (a storage outage, a paused process) is
        renewed here first: the renewal is conditional on the lease being as this writer left it, so once
        it succeeds nobody else can have taken the archive over, however long the pause.
        """
        if self._descriptor is not None:
            return
        if self._lost:
            raise ArchiveError(self._lost)
        if time.monotonic() - self._renewed > 2 * self.renew_seconds:
            self._renew()


def current_writer(archive: Location) -> dict | None:
    """Who holds the archive's writer lock now (host, pid, since), or None when nobody does.

    Readers use it to tell an encode in progress from one that was stopped. On local disk it asks the
    kernel with a shared flock taken and dropped at once, which never waits and never creates the file.
    """
    try:
        if archive.is_local:
            return _local_writer(archive.path(LOCK))
        data, _ = archive.read_versioned(LOCK)
    except FileNotFoundError:
        return None
    holder = _parse(data)
    return None if lease_expired(holder) else holder


def holder_died_here(holder: dict) -> bool:
    """Whether the lease names a process of this host that no longer runs: a writer that died here (e.g.
    ended by a storage outage before it could release) need not be waited out. A reused pid only makes
    this say "alive", never the reverse."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def lease_expired(holder: dict) -> bool:
    """Whether an object-store lease has gone unrenewed past its expiry (by this host's clock)."""
    renewed, expires = holder.get("renewed"), holder.get("expire_seconds")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (renewed, expires)):
        return True  # not a lease diffarc wrote: nobody is renewing it
    return time.time() > renewed + min(expires, MAX_EXPIRE_SECONDS)


def _open_lock(path: str, flags: int) -> int:
    """The lock file's descriptor, refused (ArchiveError) when the path is a symbolic link or a file with
    other names too (a hard link): writing the lease there would write outside the archive."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise ArchiveError(f"{path} is a symbolic link; diffarc writes its lock only to a file of the archive's own") from None
    if os.fstat(descriptor).st_nlink > 1:
        os.close(descriptor)
        raise ArchiveError(f"{path} has other names (a hard link); diffarc writes its lock only to a file of the archive's own")
    return descriptor


def _local_writer(path: str) -> dict | None:
    import fcntl

    descriptor = _open_lock(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse(os.pread(descriptor, 1 << 16, 0))
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)
