"""The manifest as a log of commits with checkpoints: how a reader finds the newest manifest.

manifest.json points at the log's first commit; a reader reads the checkpoint the pointer names, then the
commits after it up to the first number that does not exist. Commits are the truth and are never
deleted, so a checkpoint that is missing, damaged or half-written is passed over and the log replayed from
its first commit instead. The writer's side is `writer.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging

from ...codecs.errors import ArchiveError
from ..storage import LinkRefused, Location
from .fields import HEADER_FIELDS, Fields, archive_document, manifest_from_json, parse_json, shard_entry, show, unique
from .layout import (
    ARCHIVE_FORMAT_VERSION, LAST_CHECKPOINT, LOG_PART, MANIFEST, SHA256_HEX, checkpoint_path, commit_path, part_path,
)
from .records import Manifest, ShardEntry

logger = logging.getLogger("diffarc.archive")

def log_pointer(first_commit: int) -> bytes:
    """manifest.json of an archive kept as a log: where its first commit is. A diffarc older than the log
    refuses it as a newer format instead of reading an archive it would get wrong."""
    return json.dumps({"format": "diffarc-archive", "format_version": ARCHIVE_FORMAT_VERSION,
                       "log": {"first_commit": first_commit}}).encode()  # fmt: skip


def load_manifest(archive: Location) -> Manifest | None:
    """The archive's manifest as of its newest commit, or None when there is no archive."""
    archive = archive.confined()
    try:
        data = archive.read(MANIFEST)
        return manifest_from(archive, data)[0]
    except FileNotFoundError:
        return None
    except LinkRefused as exc:
        raise ArchiveError(str(exc)) from None


def require_manifest(archive: Location) -> Manifest:
    manifest = load_manifest(archive)
    if manifest is None:
        raise ArchiveError(f"no diffarc archive at {archive.url} ({MANIFEST} not found)")
    return manifest


def manifest_from(archive: Location, data: bytes) -> tuple[Manifest, bool]:
    """The manifest that manifest.json's `data` leads to, and whether the archive is kept as a log."""
    document = archive_document(data)
    if "log" not in document:
        return manifest_from_json(data), False
    first = Fields(document, "").fields("log").count("first_commit", low=1)
    return read_log(archive, first), True


def read_log(archive: Location, first: int) -> Manifest:
    """The manifest as of the newest commit: the newest checkpoint to be trusted, then every commit after it
    up to the first number that does not exist (numbers are consecutive: each commit is created only when
    its predecessor exists). Without a checkpoint, the log is replayed from its first commit."""
    manifest = _newest_checkpoint(archive, first)
    number = first if manifest is None else manifest.commits + 1
    if manifest is None:
        manifest = Manifest(specs=[], source="")  # the first commit sets every field
    paths = {s.path for s in manifest.shards}
    while True:
        try:
            data = archive.read(commit_path(number))
        except FileNotFoundError:
            break
        _apply_commit(manifest, data, number, number == first, paths)
        number += 1
    if number == first:
        raise ArchiveError(f"{commit_path(first)}: the first commit of the log, which {MANIFEST} names, is missing")
    manifest.commits = number - 1
    return manifest


def checkpoint_pointer(archive: Location, first: int) -> dict | None:
    """What _log/_last_checkpoint.json says (commit, bytes, sha256), or None when it says nothing usable."""
    try:
        pointer = json.loads(archive.read(LAST_CHECKPOINT))
    except (FileNotFoundError, ValueError, RecursionError):
        return None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("sha256"), str):
        return None
    if any(type(pointer.get(k)) is not int for k in ("commit", "bytes")) or pointer["commit"] < first:
        return None
    return pointer


def _newest_checkpoint(archive: Location, first: int) -> Manifest | None:
    """The checkpoint the pointer names, if it is exactly the file the pointer describes and says it is of
    that commit; None otherwise (the reader then replays the log: checkpoints only save reading)."""
    for _ in range(2):  # the writer deletes a checkpoint two checkpoints later: one that vanished is looked up again
        pointer = checkpoint_pointer(archive, first)
        if pointer is None:
            return None
        try:
            data = archive.read(checkpoint_path(pointer["commit"]))
        except FileNotFoundError:
            continue
        path = checkpoint_path(pointer["commit"])
        if len(data) != pointer["bytes"] or hashlib.sha256(data).hexdigest() != pointer["sha256"]:
            logger.warning("%s: not the checkpoint its pointer describes; reading the whole log", path)
            return None
        manifest = manifest_from_json(data)
        if manifest.commits != pointer["commit"]:
            raise ArchiveError(f"{path}: manifest field commits is {manifest.commits}, not the number in its name")
        try:
            top = Fields(parse_json(data), "")
            if "shard_parts" in top.value:  # else the checkpoint lists its shards itself (as before parts)
                if manifest.shards:
                    raise top.error("shards", "and shard_parts are both given")
                manifest.shards = _checkpoint_shards(archive, top)
        except FileNotFoundError:
            continue  # deleted since: a newer checkpoint has replaced it
        except ArchiveError as exc:
            logger.warning("%s: %s; reading the whole log", path, exc)
            return None
        return manifest
    return None


def _checkpoint_shards(archive: Location, top: Fields) -> list[ShardEntry]:
    """The shard list a checkpoint names in parts (`shard_parts`), each part checked against the size and
    SHA-256 the checkpoint gives for it, and its entries as a manifest's are."""
    shards: list[ShardEntry] = []
    for f in top.each("shard_parts"):
        start, end, path = f.count("start"), f.count("end"), f.path("path", LOG_PART)
        if start != len(shards) or end <= start or path != part_path(start, end):
            raise f.error("path", f"does not continue the parts before it: {show(path)}")
        data = archive.read(path)
        if len(data) != f.count("bytes") or hashlib.sha256(data).hexdigest() != f.text("sha256", SHA256_HEX):
            raise ArchiveError(f"{path}: not the part its checkpoint describes")
        document = parse_json(data)
        if not isinstance(document, dict) or document.get("format") != "diffarc-archive-shards":
            raise ArchiveError(f"{path}: not a part of a checkpoint's shard list")
        part = Fields(document, f"{path}: ")
        entries = [shard_entry(g) for g in part.each("shards")]
        if part.count("start") != start or len(entries) != end - start:
            raise part.error("shards", f"are not entries {start} to {end} of the list")
        shards += entries
    unique(top, "shards", [e.path for e in shards], "path")
    return shards


def _apply_commit(manifest: Manifest, data: bytes, number: int, first: bool, paths: set[str]) -> None:
    """Commit `number` applied to the manifest replayed so far, every field checked as a manifest's are.
    Errors name the commit's file."""
    try:
        document = parse_json(data)
        if not isinstance(document, dict) or document.get("format") != "diffarc-archive-commit":
            raise ArchiveError("not a diffarc archive commit")
        top = Fields(document, "")
        version = top.count("format_version", low=1)
        if version > ARCHIVE_FORMAT_VERSION:
            raise ArchiveError(f"archive format version {version} is newer than this diffarc reads "
                               f"({ARCHIVE_FORMAT_VERSION}); upgrade diffarc")  # fmt: skip
        if top.count("commit") != number:
            raise top.error("commit", "is not the number in the file's name")
        changes = top.fields("set", optional=True) or Fields({}, "set.")
        for name in changes.value:
            if name not in HEADER_FIELDS:
                raise changes.error(name, "is not a field a commit can set")
        for name, read in HEADER_FIELDS.items():
            if name in changes.value:
                setattr(manifest, name, read(changes))
            elif first:  # the log's first commit says everything
                raise changes.error(name, "is missing")
        for f in top.each("add_shards"):
            entry = shard_entry(f)
            if entry.path in paths:
                raise f.error("path", f"repeats a committed shard's: {show(entry.path)}")
            paths.add(entry.path)
            manifest.shards.append(entry)
        manifest.updated = top.number("time")
    except ArchiveError as exc:
        raise ArchiveError(f"{commit_path(number)}: {exc}") from None
