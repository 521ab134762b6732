"""What to encode: the image files under a folder URL, or the URLs in a list file.

A source item's key is its path relative to the folder (for a list file: the URL without its scheme),
with '/' separators; keys name items everywhere after this (archive rows, failures, decoded files).
Files whose extension is not an image format's are left out and counted, so a stray README or .DS_Store
does not show up as a failure; an image-named file that is not an image does.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import fsspec

from ..codecs.errors import SourceError
from .storage import Location, retry_transient

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".ppm", ".pgm", ".tga"}
)


@dataclass(frozen=True)
class SourceItem:
    key: str
    url: str


@dataclass(frozen=True)
class Listing:
    items: list[SourceItem]
    skipped_non_images: int


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_sources(src: str, storage_options: dict | None = None) -> Listing:
    location = Location(src, storage_options)
    if location.fs.isfile(location.root):
        return _list_file(location)
    names = location.list_files()
    if not names and not location.fs.exists(location.root):
        raise SourceError(f"source {src} does not exist")
    base = src.rstrip("/")
    items = [SourceItem(name, f"{base}/{name}") for name in names if is_image_name(name)]
    return Listing(items, len(names) - len(items))


def _list_file(location: Location) -> Listing:
    urls = [line.strip() for line in location.read("").decode("utf-8").splitlines()]
    urls = [u for u in urls if u and not u.startswith("#")]
    items = {}
    for url in urls:
        key = url.split("://", 1)[-1].lstrip("/")
        items.setdefault(key, SourceItem(key, url))  # the same URL twice is one item
    return Listing(sorted(items.values(), key=lambda i: i.key), 0)


def fetch(item: SourceItem, storage_options: dict | None = None) -> bytes:
    """The item's bytes; transient storage failures are retried (`storage.retry_transient`)."""

    def read() -> bytes:
        with fsspec.open(item.url, "rb", **(storage_options or {})) as handle:
            return handle.read()

    return retry_transient(read, f"fetch {item.key}")  # not the URL: it may hold credentials


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
