"""What to encode: the image files under a folder URL, or the URLs in a list file.

A source item's key is its path relative to the folder, or for a list file the URL without its scheme,
credentials (`user:password@`) and signing query (presigned `X-Amz-Signature`, tokens), with '/'
separators. Keys name items everywhere after this (archive rows, failures, decoded files), so each must
name a file below any folder, and no two may name the same one. The listing settles that up front:

- local paths in a list file are normalised (`file:///x.png`, `/x.png` and `//x.png` are one item), and
  the same URL given twice, or signed twice, is one item;
- a key that could not be a file name (`..`, `//`, a backslash, a control character, a name over 255
  bytes, not UTF-8) is refused;
- of two URLs with one key (`s3://x.png` and `/x.png`), the second, in URL order, is refused;
- of keys that decode to one file because they differ only in their extension (`dup.jpg`, `dup.png`),
  or of which one decodes to a file where another needs a folder (`a.jpg`, `a.png/x.png`), all but the
  first are refused (the key rule, `keys.py`).

Refused entries come back with their reasons (`Listing.refused`); encode records them in the failure
table (stage "list") instead of finding out at decode time. Files whose extension is not an image
format's are left out and counted, so a stray README or .DS_Store does not show up as a failure; an
image-named file that is not an image does. URLs keep their credentials for fetching only: nothing
stored or printed holds them (`without_credentials`, `hide_credentials`).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import fsspec

from ..codecs.errors import SourceError
from .keys import DecodedNames, key_problem
from .storage import Location, read_file
from .storage_failures import retry_transient

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".ppm", ".pgm", ".tga",
     ".heic", ".heif", ".hif", ".jxl"}  # fmt: skip  (HEIF and JPEG XL: plugins registered in codecs/parts/imagefile.py)
)
# Query parameters that make a URL a credential: AWS and GCS signatures, Azure SAS, CloudFront, tokens.
# A query holding any of them is left out of the key whole (the rest of a signed query names no image).
CREDENTIAL_QUERY = re.compile(
    r"x-amz-.*|x-goog-.*|signature|sig|awsaccesskeyid|key-pair-id|policy|token|access_token|api_key|apikey|password",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SourceItem:
    key: str
    url: str  # as listed, credentials included: for fetching only, never stored


@dataclass(frozen=True)
class Listing:
    items: list[SourceItem]
    skipped_non_images: int
    # What the listing refused: the name a failure row records it under (its key, or its URL without
    # credentials when its key is another item's) → why.
    refused: dict[str, str] = field(default_factory=dict)

    def beside(self, archived: set[str]) -> Listing:
        """This listing for an archive that already holds `archived`: an item whose decoded file would clash
        with an archived key's (`keys.DecodedNames`) is refused as well."""
        names = DecodedNames()
        for key in sorted(archived):
            names.add(key)
        refused = dict(self.refused)
        items = []
        for item in self.items:
            clash = None if item.key in archived else names.clash(item.key)
            if clash:
                refused[item.key] = clash
            else:
                items.append(item)
        return Listing(items, self.skipped_non_images, refused)


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_sources(src: str, storage_options: dict | None = None) -> Listing:
    location = Location(src, storage_options)
    if location.fs.isfile(location.root):
        items, refused = _list_file(location)
        return _refuse_undecodable(items, 0, refused)
    names = location.list_files()
    if not names and not location.fs.exists(location.root):
        raise SourceError(f"source {without_credentials(src)} does not exist")
    base = src.rstrip("/")
    items = [SourceItem(name, f"{base}/{name}") for name in names if is_image_name(name)]
    return _refuse_undecodable(items, len(names) - len(items), {})


def _list_file(location: Location) -> tuple[list[SourceItem], dict[str, str]]:
    """Items of a list file, one per distinct URL (without credentials), and the URLs whose key is taken."""
    lines = [line.strip() for line in location.read("").decode("utf-8").splitlines()]
    by_identity: dict[str, SourceItem] = {}
    for url in lines:
        if url and not url.startswith("#"):
            identity, key = _identity_and_key(url)
            by_identity.setdefault(identity, SourceItem(key, url))  # listed twice: one item
    items: dict[str, SourceItem] = {}
    owner: dict[str, str] = {}
    refused = {}
    for identity, item in sorted(by_identity.items(), key=lambda pair: pair[0]):
        if item.key in items:
            refused[identity] = f"its key {item.key!r} is already the key of {owner[item.key]}"
        else:
            items[item.key], owner[item.key] = item, identity
    return list(items.values()), refused


def _identity_and_key(url: str) -> tuple[str, str]:
    """What makes two list entries one source (the URL without credentials, local paths normalised), and its key."""
    if "://" not in url or url.startswith("file://"):
        path = urlsplit(url).path if url.startswith("file://") else url
        path = posixpath.normpath(path) if path else path
        if path.startswith("//"):  # normpath keeps a leading "//" (POSIX leaves its meaning open); Linux does not
            path = "/" + path.lstrip("/")
        return path, path.lstrip("/")
    shown = without_credentials(url)
    return shown, shown.split("://", 1)[1]


def without_credentials(url: str) -> str:
    """`url` with no user, password or signing query (and no fragment): safe to store and print."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if any(CREDENTIAL_QUERY.fullmatch(name) for name, _ in parse_qsl(query, keep_blank_values=True)):
        query = ""
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")


def hide_credentials(text: str, url: str) -> str:
    """`text` (an error message about fetching `url`) with every credential in `url` replaced by ***."""
    if "://" not in url:
        return text
    parts = urlsplit(url)
    secrets = [parts.netloc.rpartition("@")[0], parts.password or ""]
    if without_credentials(url).partition("?")[2] != parts.query:  # the query was a credential
        secrets.append(parts.query)
        secrets += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    text = text.replace(url, without_credentials(url))
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _refuse_undecodable(items: list[SourceItem], skipped: int, refused: dict[str, str]) -> Listing:
    kept, names = [], DecodedNames()
    for item in sorted(items, key=lambda i: i.key):
        problem = names.admit(item.key)
        if problem and key_problem(item.key):  # recorded under a name the failure table can hold
            refused[item.key.encode("utf-8", "backslashreplace").decode("utf-8")] = problem
        elif problem:
            refused[item.key] = problem
        else:
            kept.append(item)
    return Listing(kept, skipped, refused)


def fetch(item: SourceItem, storage_options: dict | None = None) -> bytes:
    """The item's bytes; transient storage failures are retried (`storage.retry_transient`), and an attempt
    that gets no answer is abandoned (`storage.call`)."""

    def read() -> bytes:
        fs, path = fsspec.core.url_to_fs(item.url, **(storage_options or {}))
        return read_file(fs, path)

    return retry_transient(read, f"fetch {item.key}")  # not the URL: it may hold credentials


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
