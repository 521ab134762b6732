"""Pre-flight: what can be checked in seconds is checked before Ray starts and before any image is coded.

Without it a job learns that its bucket is missing when the first shard is written, after a whole shard
has been encoded (an hour for a diffusion codec). Each check raises a DiffarcError whose message is one
sentence naming the location and what is wrong with it:

    encode  codec, preset and parameter values; a built-in or local `model` reference exists; ARCHIVE
            reachable (bucket, credentials, endpoint); an existing archive's codec name and parameters
            equal the request; a probe object can be written to ARCHIVE and deleted; SRC is reachable
            (the job then takes the archive's writer lease, and only then lists SRC: `list_source`)
    decode  ARCHIVE reachable and holds a manifest of a codec this diffarc knows; DST writable
    verify  ARCHIVE as for decode; the --against folder reachable

What needs the model loaded (its fingerprint against the archive's) is still checked where the model is
loaded. `describe_storage_failure` is the one place where fsspec's, s3fs's and botocore's exceptions
become words; the command line uses it too, for a storage failure that happens later in a job.
"""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..codecs.errors import ArchiveError, DiffarcError, ParameterError, StorageError
from ..codecs.registry import codec_class
from .archive import CodecSpec, Manifest, check_layout, codec_mismatch, load_manifest, require_manifest
from .sources import Listing, list_sources, without_credentials
from .storage import Location

if TYPE_CHECKING:
    from .encode import EncodeOptions

PROBE_PREFIX = ".diffarc-write-probe-"


def check_encode(src: str, archive_url: str, options: EncodeOptions, storage_options: dict | None = None) -> dict:
    """Everything an encode job needs that can be checked without Ray or the model; returns the resolved
    codec parameters. The source is listed later (`list_source`), once the job holds the archive: listing
    a large bucket can itself take minutes, and a second writer should hear at once that it must wait."""
    params = codec_class(options.codec).resolve_params(options.params, options.preset)
    check_model_reference(params)
    check_reachable(Location(src, storage_options), "read the source")
    archive = Location(archive_url, storage_options, follow_links=False)
    check_writable(archive, "the archive")
    check_layout(archive)
    with storage_errors("read the archive", archive.url):
        existing = load_manifest(archive)
    if existing is not None:
        # Only the stream params are identity (weight locations are not), and the manifest's went through
        # JSON: compare like with like. The fingerprint needs the model loaded, so the actors compare it.
        stream_params = codec_class(options.codec).split_params(params)[0]
        requested = CodecSpec(options.codec, json.loads(json.dumps(stream_params)), existing.codec.fingerprint)
        if requested != existing.codec:
            raise codec_mismatch(archive.url, existing.codec, requested)
    return params


def list_source(src: str, storage_options: dict | None = None) -> Listing:
    with storage_errors("list the source", without_credentials(src)):
        return list_sources(src, storage_options)


def check_decode(archive: Location, dst: Location) -> Manifest:
    """The archive's manifest, once the archive is readable and DST writable."""
    manifest = check_archive(archive)
    check_writable(dst, "the destination")
    return manifest


def check_verify(archive: Location, against: str | None, storage_options: dict | None = None) -> Manifest:
    """The archive's manifest, once the archive and the folder of originals are readable."""
    manifest = check_archive(archive)
    if against:
        originals = Location(against, storage_options)
        check_reachable(originals, "read the originals")
        with storage_errors("read the originals", against):
            if not originals.fs.exists(originals.root):
                raise StorageError(f"cannot read the originals {against}: it does not exist")
    return manifest


def check_archive(archive: Location) -> Manifest:
    """The manifest of a reachable archive whose codec and parameters this diffarc can use."""
    check_reachable(archive, "read the archive")
    with storage_errors("read the archive", archive.url):
        manifest = require_manifest(archive)
    try:
        codec_class(manifest.codec.name).resolve_params(manifest.codec.params)
    except ParameterError as exc:  # written by a newer diffarc, or edited by hand
        raise ArchiveError(f"{archive.url} was encoded with settings this diffarc cannot use: {exc}") from None
    return manifest


def check_model_reference(params: dict) -> None:
    """A built-in or local-folder `model` parameter (the diffusion codecs' weights) must exist.

    URLs and hub ids are left to the actors: resolving them here would download the model.
    """
    reference = params.get("model")
    if not isinstance(reference, str) or "://" in reference:
        return
    from ..codecs.parts.models import resolve_folder

    resolve_folder(reference)


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
