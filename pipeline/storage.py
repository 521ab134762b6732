"""The one way diffarc opens storage: any fsspec URL (local path, s3://, memory://, gs://, …).

Credentials come from fsspec's and botocore's usual chain (the AWS_* environment variables, including
AWS_ENDPOINT_URL for an S3-compatible server, or config files) or from --storage-options; diffarc never
prints them.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
        return posixpath.join(self.root, relative) if relative else self.root

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
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
