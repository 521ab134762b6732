"""The one way diffarc opens storage: any fsspec URL (local path, s3://, memory://, gs://, …).

Credentials come from fsspec's and botocore's usual chain (the AWS_* environment variables, including
AWS_ENDPOINT_URL for an S3-compatible server, or config files) or from --storage-options; diffarc never
prints them.

Every path below a Location goes through `Location.path`, which refuses any that could leave it (absolute,
`..`, empty or `.` components, backslashes): paths read from an archive's manifest may be hostile.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..codecs.errors import StorageError


class WriteConflict(StorageError):
    """A conditional write found the file at another version than expected: someone else wrote it."""


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

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/") or "/"

    def __reduce__(self):
        # Ship the URL, not the live filesystem object, to Ray workers: each opens its own connection.
        return (Location, (self.url, self.storage_options))

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
        return posixpath.join(self.root, relative)

    def read(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def size(self, relative: str) -> int:
        return self.fs.size(self.path(relative))

    def delete(self, relative: str) -> None:
        if self.fs.exists(self.path(relative)):
            self.fs.rm_file(self.path(relative))

    def list_files(self, relative: str = "") -> list[str]:
        """Relative paths of all files below `relative`, sorted."""
        base = self.path(relative)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    @property
    def has_conditional_writes(self) -> bool:
        """Whether the store itself refuses a write whose precondition fails (S3's If-Match / If-None-Match)."""
        return "s3" in _protocols(self.fs)

    def read_versioned(self, relative: str) -> tuple[bytes, str]:
        """A file's bytes and a version that changes whenever the file does: S3's ETag of exactly these
        bytes (one GET), elsewhere their SHA-256."""
        if self.has_conditional_writes:
            return _s3_get(self.fs, self.path(relative))
        data = self.read(relative)
        return data, hashlib.sha256(data).hexdigest()

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
                return self.fs.pipe_file(target, data, **condition)["ETag"]
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
            elif self.fs.exists(target):
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

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing/the old file or all of the new one.

        Local disk: write a temporary file beside the target, fsync, rename over it. Object stores: one
        PUT (or multipart upload), which the store only makes visible once it is complete.
        """
        target = self.path(relative)
        if not self.is_local:
            self.fs.pipe_file(target, data)
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


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _precondition_failed(exc: OSError) -> bool:
    # s3fs turns S3's 412 for If-Match into a plain OSError; botocore's error, its cause, names it.
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    """One GET: the object's bytes and the ETag of exactly those bytes (a HEAD then a GET could straddle a write)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get():
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    return sync(fs.loop, get)
