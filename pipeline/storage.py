"""The one way diffarc opens storage: any fsspec URL (local path, s3://, memory://, gs://, …), its every
operation under the one retry policy for storage that fails for a while (`storage_failures.py`).

Credentials come from fsspec's and botocore's usual chain (the AWS_* environment variables, including
AWS_ENDPOINT_URL for an S3-compatible server, or config files) or from --storage-options; diffarc never
prints them.

Every path below a Location goes through `Location.path`, which refuses any that could leave it (absolute,
`..`, empty or `.` components, backslashes): paths read from an archive's manifest may be hostile. An
archive's Location also follows no link (`follow_links=False`): on local disk a path through a symbolic
link is refused (`LinkRefused`) and listing skips links, so a link planted in an archive can make diffarc
neither read, write nor delete anything outside it. Object stores have no links: there a key prefix is
the whole rule.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import uuid
from typing import Any

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from ..codecs.errors import StorageError
from .storage_failures import before_deadline, call, is_missing_bucket, retried, storage_errors


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

    @retried("read")
    def read(self, relative: str) -> bytes:
        return read_file(self.fs, self.path(relative))

    @retried("look for")
    def exists(self, relative: str) -> bool:
        return call(self.fs, "exists", self.path(relative))

    @retried("read the size of")
    def size(self, relative: str) -> int:
        return call(self.fs, "size", self.path(relative))

    @retried("delete")
    def delete(self, relative: str) -> None:
        if call(self.fs, "exists", self.path(relative)):
            call(self.fs, "rm_file", self.path(relative))

    @retried("list")
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

    @retried("read")
    def read_versioned(self, relative: str) -> tuple[bytes, str]:
        """A file's bytes and a version that changes whenever the file does: S3's ETag of exactly these
        bytes (one GET), elsewhere their SHA-256."""
        if self.has_conditional_writes:
            return _s3_get(self.fs, self.path(relative))
        data = self.read(relative)
        return data, hashlib.sha256(data).hexdigest()

    @retried("write")  # a retry after a lost answer may see its own write as a conflict: the caller re-reads
    def write_versioned(self, relative: str, data: bytes, expected: str | None) -> str:
        """Write `data` only if the file is still at version `expected` (None: only if there is no file);
        returns the new version, or raises WriteConflict.

        S3: one conditional PUT (If-Match: ETag, or If-None-Match: *), atomic against every other writer.
        Local disk: creating is atomic (a hard link that fails if the name exists); replacing compares,
        then renames, which is atomic only among processes holding the archive's writer lock — as every
        diffarc writer does (pipeline/archive/lease.py). Other stores: compare, then write.
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

    @retried("write")
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

    return before_deadline(lambda seconds: sync(fs.loop, get, timeout=seconds))


def check_reachable(location: Location, action: str) -> None:
    """Raise what stands between us and `location`: no bucket, no credentials, no endpoint, a file in the way.

    A folder that does not exist yet is not a failure here (a destination is created, a missing source
    is reported by its lister). `fs.exists` answers False to all of these, so this asks `fs.info`, which raises.
    """
    with storage_errors(action, location.url):
        try:
            location.fs.info(location.root)
        except FileNotFoundError as exc:
            if is_missing_bucket(exc):
                raise
