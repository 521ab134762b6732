"""Pre-flight: what can be checked in seconds is checked before Ray starts and before any image is coded.

Without it a job learns that its bucket is missing when the first shard is written, after a whole shard
has been encoded (an hour for a diffusion codec). Each check raises a DiffarcError whose message is one
sentence naming the location and what is wrong with it:

    encode  SRC exists and is reachable, ARCHIVE is reachable (bucket, credentials, endpoint), a probe
            object can be written to it and deleted, and none of its layout entries is a link — all before
            a codec module or pyarrow is imported, so a mistyped path answers at once; then codec, preset
            and parameter values, built-in or local weights references exist, and an existing archive's
            codec name and parameters equal the request (the job then takes the archive's writer lease,
            and only then lists SRC: `list_source`)
    decode  ARCHIVE opens (`ArchiveReader.open`: reachable, a manifest of a codec this diffarc knows);
            DST writable
    verify  ARCHIVE as for decode; the --against folder reachable

What needs the model loaded (its fingerprint against the archive's) is still checked where the model is
loaded. Turning storage exceptions into sentences is storage's (`storage.describe_storage_failure`).
"""

from __future__ import annotations

import json
import uuid
from contextlib import suppress
from pathlib import Path

from ..codecs.errors import SourceError, StorageError
from .sources import Listing, list_sources, without_credentials
from .storage import Location, check_reachable
from .storage_failures import storage_errors

PROBE_PREFIX = ".diffarc-write-probe-"


def check_encode(
    src: str, archive_url: str, codec: str, params: dict, preset: str | None = None,
    storage_options: dict | None = None,
) -> dict:  # fmt: skip
    """Everything an encode job needs that can be checked without Ray or the model; returns the resolved
    codec parameters. The source is listed later (`list_source`), once the job holds the archive: listing
    a large bucket can itself take minutes, and a second writer should hear at once that it must wait."""
    check_source(src, storage_options)
    archive = Location(archive_url, storage_options, follow_links=False)
    check_writable(archive, "the archive")
    from ..codecs.registry import codec_class
    from .archive import CodecSpec, check_layout, codec_mismatch, load_manifest

    check_layout(archive)
    cls = codec_class(codec)
    params = cls.resolve_params(params, preset)
    cls.check_locations(params)
    with storage_errors("read the archive", archive.url):
        existing = load_manifest(archive)
    if existing is not None:
        # Only the stream params are identity (weight locations are not), and the manifest's went through
        # JSON: compare like with like. The fingerprint needs the model loaded, so the actors compare it.
        stream_params = cls.split_params(params)[0]
        requested = CodecSpec(codec, json.loads(json.dumps(stream_params)), existing.codec.fingerprint)
        if requested != existing.codec:
            raise codec_mismatch(archive.url, existing.codec, requested)
    return params


def check_source(src: str, storage_options: dict | None = None) -> None:
    """SRC is reachable and exists (a folder, bucket prefix or list file)."""
    location = Location(src, storage_options)
    check_reachable(location, "read the source")
    with storage_errors("read the source", without_credentials(src)):
        if not location.fs.exists(location.root):
            raise SourceError(f"source {without_credentials(src)} does not exist")


def list_source(src: str, storage_options: dict | None = None) -> Listing:
    with storage_errors("list the source", without_credentials(src)):
        return list_sources(src, storage_options)


def check_against(against: str, storage_options: dict | None = None) -> None:
    """The folder (or list file) of originals `verify --against` compares with is reachable and exists."""
    originals = Location(against, storage_options)
    check_reachable(originals, "read the originals")
    with storage_errors("read the originals", against):
        if not originals.fs.exists(originals.root):
            raise StorageError(f"cannot read the originals {against}: it does not exist")


def check_writable(location: Location, what: str) -> None:
    """Write a small probe object under `location` and delete it: the job's own writes will work too.

    Folders the probe had to create on a local disk are removed again, so that a job which fails later
    in pre-flight leaves nothing behind; the job creates them when it writes.
    """
    action = f"write to {what}"
    check_reachable(location, action)
    created = []
    if location.is_local:
        folder = Path(location.root)
        while not folder.exists():
            created.append(folder)
            folder = folder.parent
    probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    with storage_errors(action, location.url):
        location.write_atomic(probe, b"")
        location.delete(probe)
    for folder in created:  # deepest first; one that is no longer empty is someone else's now
        with suppress(OSError):
            folder.rmdir()
