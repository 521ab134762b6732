"""The archive: Parquet shards of bitstreams, a failure table, and a manifest kept as a log of commits.

    ARCHIVE/
      manifest.json                       where a reader starts: the log's pointer (or, in archives written
                                          before the log, the whole manifest); written once
      _log/<20 digits>.json               one small file per commit: what it changed and the shards it added
      _log/<20 digits>.checkpoint.json    every CHECKPOINT_EVERY commits (and at the end), the whole manifest
                                          but its shard list, which it names in parts:
      _log/shards-<12 digits>-<12 digits>.json  the shard list's entries [start, end): immutable parts
      _log/_last_checkpoint.json          the newest checkpoint's number, size and SHA-256
      shards/part-<uuid>.parquet          one row per image, keys sorted; listed by a commit once committed
      failures/failures-<n>-<hex>.parquet every item that could not be encoded, with stage and reason
      models/<fingerprint>/               the weights the streams need, when encoded with --embed-model
      writer.lock                         held by the one encode writing the archive (pipeline/lease.py)

A commit costs one small file whatever the archive's size: commit N is created only if no file of its number
exists (S3: If-None-Match: *, local disk: a hard link), so two writers can never both win a number, and the
loser stops without writing anything more. A shard (or a model folder) is written whole before a commit names
it, so a crash leaves either the previous commit (and orphan files nobody trusts, removed when the job finishes)
or the new one. One writer at a time also holds the archive's lease. A reader reads the checkpoint the pointer
names, then the commits after it up to the first number that does not exist; commits are the truth and are
never deleted, so a checkpoint that is missing, damaged or half-written is passed over and the log replayed
from its first commit instead.

An archive may come from anywhere: a manifest, checkpoint or commit has the type and range of every field
checked and every path confined to its folder before anything is read, and `read_shard` checks a shard against
its manifest entry (size, and SHA-256 when it reads it whole, row count, schema, no nulls) before trusting it.

Shards hold streams in the container's compact framing: the codec, parameters and fingerprint they
share are listed once, in the manifest's spec table, and `Manifest.expand` turns a stream read from a
shard back into the full, standalone stream the codec wrote. Archives written before the table
(format version 1) hold full streams, which `expand` returns as they are.
docs/FORMAT.md documents all of this for readers outside diffarc.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..codecs import container
from ..codecs.errors import ArchiveError, ModelError
from .keys import DecodedNames
from .lease import WriterLease
from .storage import LinkRefused, Location, WriteConflict, relative_path_problem, retry_transient

logger = logging.getLogger("diffarc.archive")

# 3: the manifest as a log of commits with checkpoints. 2: streams in compact framing, the spec table,
# models/. Version 1 and 2 archives (one whole manifest.json) are read as they are, and resuming one
# starts its log (see ArchiveWriter).
ARCHIVE_FORMAT_VERSION = 3
MANIFEST = "manifest.json"
LOG_DIR = "_log"
LAST_CHECKPOINT = f"{LOG_DIR}/_last_checkpoint.json"
# A checkpoint is written once per this many commits; a reader reads at most this many small commit files
# after it.
CHECKPOINT_EVERY = 100
# A checkpoint's shard list is cut into parts at multiples of PART_SHARDS · 2^k (`shard_parts`). A part, once
# whole, never changes, so a checkpoint rewrites only the parts that grew: about PART_SHARDS entries, plus
# one merged part each time the count crosses a boundary. Every entry is written O(log shards) times in a
# job, instead of once per checkpoint (O(shards²) bytes for a job), and a reader reads O(log shards) parts.
PART_SHARDS = 128
LOG_COMMIT = re.compile(r"_log/(\d{20})\.json")
LOG_PART = re.compile(r"_log/shards-(\d{12})-(\d{12})\.json")
SHARD_DIR = "shards"
FAILURE_DIR = "failures"
MODEL_DIR = "models"
DEFAULT_ROW_GROUP_BYTES = 8 << 20

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("bitstream", pa.binary()),
        ("bitstream_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_bytes", pa.int64()),
        ("source_sha256", pa.string()),
        ("codec", pa.string()),
    ]
)
FAILURE_SCHEMA = pa.schema([("key", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
# What a manifest may name: one file directly in its folder, with a name diffarc could have written.
SHARD_PATH = re.compile(r"shards/[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
FAILURE_PATH = re.compile(r"failures/[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
# The names this diffarc gives the files it writes: orphan cleanup deletes nothing else.
WRITTEN_SHARD = re.compile(r"shards/part-[0-9a-f]{32}\.parquet")
WRITTEN_FAILURES = re.compile(r"failures/failures-\d{6,}-[0-9a-f]{8}\.parquet")
WRITTEN_WEIGHTS = re.compile(r"models/([0-9a-f]+)/(?:[A-Za-z0-9_.-]+/)*[A-Za-z0-9_.-]+\.(?:json|safetensors)")
# What an archive holds at its top: none of it may be a link (`check_layout`).
LAYOUT = ("manifest.json", "_log", "shards", "failures", "models", "writer.lock")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FINGERPRINT_HEX = re.compile(r"(?:[0-9a-f]{2}){0,255}")  # the container's fingerprint is at most 255 bytes
CODEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
INT64_MAX = 2**63 - 1


def check_layout(archive: Location) -> None:
    """Refuse (ArchiveError) an archive whose top-level entries include a symbolic link: a writer that
    followed one would write or delete outside the archive."""
    for name in LAYOUT:
        try:
            archive.confined().path(name)
        except LinkRefused as exc:
            raise ArchiveError(str(exc)) from None


def commit_path(number: int) -> str:
    return f"{LOG_DIR}/{number:020d}.json"


def checkpoint_path(number: int) -> str:
    return f"{LOG_DIR}/{number:020d}.checkpoint.json"


def part_path(start: int, end: int) -> str:
    return f"{LOG_DIR}/shards-{start:012d}-{end:012d}.json"


def shard_parts(count: int, block: int = PART_SHARDS) -> list[tuple[int, int]]:
    """[start, end) ranges cutting a shard list of `count` entries into checkpoint parts: the largest runs
    of `block` · 2^k entries aligned to their own size, then what is left (fewer than `block` entries).
    The same count always gives the same parts, and a part of a shorter list either reappears whole in a
    longer one or is merged into a bigger block there."""
    blocks, parts, start = count // block, [], 0
    for k in reversed(range(blocks.bit_length())):
        if blocks >> k & 1:
            end = start + block * (1 << k)
            parts.append((start, end))
            start = end
    if start < count:
        parts.append((start, count))
    return parts


def part_document(start: int, shards: list[ShardEntry]) -> bytes:
    return json.dumps({"format": "diffarc-archive-shards", "format_version": ARCHIVE_FORMAT_VERSION,
                       "start": start, "shards": [asdict(s) for s in shards]}).encode("utf-8")  # fmt: skip


def codec_mismatch(url: str, existing: CodecSpec, requested: CodecSpec) -> ArchiveError:
    """The refusal to mix two codecs in one archive, in words that name only what differs."""
    differ = sorted(k for k in existing.params.keys() | requested.params.keys()
                    if existing.params.get(k) != requested.params.get(k)) if existing.name == requested.name else []

    def describe(spec: CodecSpec) -> str:
        words = [spec.name] + [f"{k}={spec.params[k]}" for k in differ if k in spec.params]
        if existing.name == requested.name and not differ:  # the same settings: the weights differ
            words.append(f"model weights {spec.fingerprint[:16] or '(none)'}")
        return " ".join(words)

    return ArchiveError(
        f"{url} was encoded with {describe(existing)}; this job asks for {describe(requested)}: "
        "resume with the same codec, parameters and weights, or write a new archive"
    )


@functools.cache  # importlib.metadata scans the installed packages: ~20 ms, once per commit otherwise
def tool_version() -> str:
    return version("diffarc")


@dataclass(frozen=True)
class CodecSpec:
    """What an archive's streams were encoded with; resuming must ask for exactly the same.

    `params` are the stream params (no weight locations) and `fingerprint` names the weights. `id` is
    what compact streams refer to; `hint` is where the weights were found when encoding — a location,
    not identity, so neither takes part in comparing specs.
    """

    name: str
    params: dict
    fingerprint: str = ""  # hex
    id: int = field(default=1, compare=False)
    hint: dict = field(default_factory=dict, compare=False)

    @property
    def stream_spec(self) -> container.Spec:
        return container.Spec(self.name, self.params, bytes.fromhex(self.fingerprint))


def legacy_spec(document: dict) -> CodecSpec:
    """The spec of a format-1 manifest's "codec", whose params still held the weights' locations."""
    from ..codecs.errors import UnknownCodecError
    from ..codecs.registry import codec_class

    try:
        params, hint = codec_class(document["name"]).split_params(document["params"])
    except UnknownCodecError:
        params, hint = document["params"], {}
    return CodecSpec(document["name"], params, document.get("fingerprint", ""), id=1, hint=hint)


@dataclass
class EmbeddedModel:
    """Weights stored in the archive, under models/<fingerprint>/: every file with its size and SHA-256."""

    fingerprint: str  # hex
    files: list[dict]  # {"path" (relative to the folder), "bytes", "sha256"}

    @property
    def folder(self) -> str:
        return f"{MODEL_DIR}/{self.fingerprint}"

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)


@dataclass(frozen=True)
class EncodedItem:
    key: str
    bitstream: bytes
    width: int
    height: int
    source_bytes: int
    source_sha256: str


@dataclass(frozen=True)
class Failure:
    key: str
    stage: str  # list | fetch | load | encode (encode); parse | decode | write | select (decode); verify
    reason: str


@dataclass
class ShardEntry:
    path: str
    rows: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str
    source_bytes: int
    bitstream_bytes: int
    pixels: int
    largest_pixels: int = 0  # of its largest image; 0 in entries written before it was recorded


@dataclass
class Manifest:
    specs: list[CodecSpec]  # the spec table; the last is what new shards are written with
    source: str
    shards: list[ShardEntry] = field(default_factory=list)
    failures: dict | None = None  # {"path", "rows", "bytes", "sha256"} of the current failure table
    models: list[EmbeddedModel] = field(default_factory=list)
    complete: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    commits: int = 0
    # The pixels of the largest image committed (archives written before shard entries recorded it: the
    # largest --max-pixels an encode of it used): no item is larger, so decode and verify refuse streams
    # that claim more. None in archives written before either, or holding no image.
    max_pixels: int | None = None

    @property
    def codec(self) -> CodecSpec:
        """The spec this archive is encoded with (one per archive: resuming with another is refused)."""
        return self.specs[-1]

    def expand(self, stream: bytes) -> bytes:
        """The full, standalone stream for a stream read from one of this archive's shards."""
        return container.expand(stream, {spec.id: spec.stream_spec for spec in self.specs})

    def embedded_model(self, fingerprint: str) -> EmbeddedModel | None:
        return next((m for m in self.models if m.fingerprint == fingerprint), None)

    @property
    def totals(self) -> dict:
        return {
            "items": sum(s.rows for s in self.shards),
            "failed": self.failures["rows"] if self.failures else 0,
            "shards": len(self.shards),
            "source_bytes": sum(s.source_bytes for s in self.shards),
            "bitstream_bytes": sum(s.bitstream_bytes for s in self.shards),
            "archive_bytes": sum(s.bytes for s in self.shards),
            "model_bytes": sum(m.bytes for m in self.models),
            "pixels": sum(s.pixels for s in self.shards),
        }

    def header(self) -> dict:
        """Every field but the shard list and the counters, as JSON values: what a commit may set."""
        return {
            "specs": [asdict(s) for s in self.specs],
            "source": self.source,
            "complete": self.complete,
            "created": self.created,
            "max_pixels": self.max_pixels,
            "failures": self.failures,
            "models": [asdict(m) for m in self.models],
        }

    def to_json(self, shard_parts: list[dict] | None = None) -> bytes:
        """The whole manifest (before the log, all of manifest.json); with `shard_parts`, a checkpoint of the
        log, which names the parts its shard list is written in instead of listing it."""
        document = {
            "format": "diffarc-archive",
            "format_version": ARCHIVE_FORMAT_VERSION,
            "tool_version": tool_version(),
            **self.header(),
            "updated": self.updated,
            "commits": self.commits,
            "totals": self.totals,
        }
        if shard_parts is None:
            document["shards"] = [asdict(s) for s in self.shards]
        else:
            document["shard_parts"] = shard_parts
        return json.dumps(document).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """A whole manifest read from bytes that may be hostile: every field's type and range is checked and
        every path confined to its folder, and a refusal is one ArchiveError naming the field."""
        document = _archive_document(data)
        if "log" in document:
            raise ArchiveError("manifest is the pointer to a commit log, not a whole manifest")
        top = _Fields(document, "")
        if top.count("format_version", low=1) == 1:
            codec = top.fields("codec")
            header = {"specs": [legacy_spec({"name": codec.text("name", CODEC_NAME), "params": codec.object("params"),
                                             "fingerprint": codec.text("fingerprint", FINGERPRINT_HEX, default="")})],
                      "models": []}  # fmt: skip
            header.update((name, read(top)) for name, read in HEADER_FIELDS.items() if name not in header)
        else:
            header = {name: read(top) for name, read in HEADER_FIELDS.items()}
        shards = [_shard_entry(f) for f in top.each("shards")]
        _unique(top, "shards", [e.path for e in shards], "path")
        return cls(**header, shards=shards, updated=top.number("updated"), commits=top.count("commits"))


def _archive_document(data: bytes) -> dict:
    """manifest.json (or a checkpoint) as JSON, once it says it is one of a version this diffarc reads."""
    document = _parse_json(data)
    if not isinstance(document, dict) or document.get("format") != "diffarc-archive":
        raise ArchiveError("not a diffarc archive manifest")
    version = _Fields(document, "").count("format_version", low=1)
    if version > ARCHIVE_FORMAT_VERSION:
        raise ArchiveError(
            f"archive format version {version} is newer than this diffarc reads ({ARCHIVE_FORMAT_VERSION}); "
            "upgrade diffarc"
        )
    return document


def _parse_json(data: bytes):
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:40]} is out of range")
        return value

    try:
        return json.loads(data, parse_constant=refuse_constant, parse_float=finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ArchiveError(f"manifest is not valid JSON: {exc}") from None


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """One JSON object of a manifest, read field by field with its type and range checked."""

    def __init__(self, value, where: str):
        self.value, self.where = value, where

    def error(self, name: str, why: str) -> ArchiveError:
        return ArchiveError(f"manifest field {self.where}{name} {why}")

    def _get(self, name: str, optional: bool):
        value = self.value.get(name)
        if value is None and not optional:
            raise self.error(name, "is missing")
        return value

    def count(self, name: str, low: int = 0, optional: bool = False) -> int | None:
        value = self._get(name, optional)
        if value is None:
            return None
        if type(value) is not int or not low <= value <= INT64_MAX:  # bool is an int: not a count
            raise self.error(name, f"must be a whole number from {low} to 2^63-1, not {_show(value)}")
        return value

    def number(self, name: str) -> float:
        value = self._get(name, False)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.error(name, f"must be a number, not {_show(value)}")
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name, False)
        if type(value) is not bool:
            raise self.error(name, f"must be true or false, not {_show(value)}")
        return value

    def text(self, name: str, pattern: re.Pattern | None = None, default: str | None = None) -> str:
        value = self._get(name, default is not None)
        if value is None:
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            raise self.error(name, f"is not a valid value: {_show(value)}")
        return value

    def path(self, name: str, pattern: re.Pattern | None = None) -> str:
        """A path relative to the archive (or to one of its folders) that cannot leave it."""
        value = self.text(name)
        problem = relative_path_problem(value)
        if problem or (pattern is not None and not pattern.fullmatch(value)):
            raise self.error(name, f"is not a path inside the archive: {_show(value)}")
        return value

    def object(self, name: str, default: dict | None = None) -> dict:
        value = self._get(name, default is not None)
        if value is None:
            return default
        if not isinstance(value, dict):
            raise self.error(name, f"must be an object, not {_show(value)}")
        return value

    def fields(self, name: str, optional: bool = False) -> _Fields | None:
        value = self._get(name, optional)
        if value is None:
            return None
        return _Fields(self.object(name), f"{self.where}{name}.")

    def each(self, name: str) -> list[_Fields]:
        """The objects of a list field (a missing list is empty)."""
        value = self.value.get(name, [])
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, not {_show(value)}")
        where = f"{self.where}{name}"
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ArchiveError(f"manifest field {where}[{index}] must be an object, not {_show(item)}")
        return [_Fields(item, f"{where}[{index}].") for index, item in enumerate(value)]


def _unique(top: _Fields, name: str, values: list, what: str) -> None:
    seen = set()
    for index, value in enumerate(values):
        if value in seen:
            raise top.error(f"{name}[{index}].{what}", f"repeats an earlier entry's: {_show(value)}")
        seen.add(value)


def _spec(f: _Fields) -> CodecSpec:
    spec_id = f.count("id", low=1)
    if spec_id > 0xFFFF:  # a compact stream's spec id is two bytes
        raise f.error("id", f"must be at most 65535, not {spec_id}")
    return CodecSpec(f.text("name", CODEC_NAME), f.object("params"), f.text("fingerprint", FINGERPRINT_HEX, default=""),
                     id=spec_id, hint=f.object("hint", default={}))  # fmt: skip


def _shard_entry(f: _Fields) -> ShardEntry:
    entry = ShardEntry(
        path=f.path("path", SHARD_PATH), rows=f.count("rows", low=1), bytes=f.count("bytes", low=1),
        sha256=f.text("sha256", SHA256_HEX), first_key=f.text("first_key"), last_key=f.text("last_key"),
        source_bytes=f.count("source_bytes"), bitstream_bytes=f.count("bitstream_bytes"), pixels=f.count("pixels"),
        largest_pixels=f.count("largest_pixels", optional=True) or 0,
    )  # fmt: skip
    if entry.first_key > entry.last_key:
        raise f.error("first_key", f"comes after last_key {_show(entry.last_key)}")
    return entry


def _embedded_model(f: _Fields) -> EmbeddedModel:
    fingerprint = f.text("fingerprint", FINGERPRINT_HEX)
    if not fingerprint:
        raise f.error("fingerprint", "is empty")
    files = [{"path": g.path("path"), "bytes": g.count("bytes"), "sha256": g.text("sha256", SHA256_HEX)}
             for g in f.each("files")]  # fmt: skip
    return EmbeddedModel(fingerprint, files)


def _specs(top: _Fields) -> list[CodecSpec]:
    specs = [_spec(f) for f in top.each("specs")]
    if not specs:
        raise top.error("specs", "is empty")
    _unique(top, "specs", [s.id for s in specs], "id")
    return specs


def _models(top: _Fields) -> list[EmbeddedModel]:
    models = [_embedded_model(f) for f in top.each("models")]
    _unique(top, "models", [m.fingerprint for m in models], "fingerprint")
    return models


def _failure_table(top: _Fields) -> dict | None:
    f = top.fields("failures", optional=True)
    if f is None:
        return None
    return {"path": f.path("path", FAILURE_PATH), "rows": f.count("rows"), "bytes": f.count("bytes"),
            "sha256": f.text("sha256", SHA256_HEX)}  # fmt: skip


# How each field of `Manifest.header` is read: from a whole manifest, or from a commit's "set".
HEADER_FIELDS = {
    "specs": _specs,
    "source": lambda top: top.text("source"),
    "complete": lambda top: top.flag("complete"),
    "created": lambda top: top.number("created"),
    "max_pixels": lambda top: top.count("max_pixels", low=1, optional=True),
    "failures": _failure_table,
    "models": _models,
}


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
        return _manifest_from(archive, data)[0]
    except FileNotFoundError:
        return None
    except LinkRefused as exc:
        raise ArchiveError(str(exc)) from None


def require_manifest(archive: Location) -> Manifest:
    manifest = load_manifest(archive)
    if manifest is None:
        raise ArchiveError(f"no diffarc archive at {archive.url} ({MANIFEST} not found)")
    return manifest


def _manifest_from(archive: Location, data: bytes) -> tuple[Manifest, bool]:
    """The manifest that manifest.json's `data` leads to, and whether the archive is kept as a log."""
    document = _archive_document(data)
    if "log" not in document:
        return Manifest.from_json(data), False
    first = _Fields(document, "").fields("log").count("first_commit", low=1)
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


def _checkpoint_pointer(archive: Location, first: int) -> dict | None:
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
        pointer = _checkpoint_pointer(archive, first)
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
        manifest = Manifest.from_json(data)
        if manifest.commits != pointer["commit"]:
            raise ArchiveError(f"{path}: manifest field commits is {manifest.commits}, not the number in its name")
        try:
            top = _Fields(_parse_json(data), "")
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


def _checkpoint_shards(archive: Location, top: _Fields) -> list[ShardEntry]:
    """The shard list a checkpoint names in parts (`shard_parts`), each part checked against the size and
    SHA-256 the checkpoint gives for it, and its entries as a manifest's are."""
    shards: list[ShardEntry] = []
    for f in top.each("shard_parts"):
        start, end, path = f.count("start"), f.count("end"), f.path("path", LOG_PART)
        if start != len(shards) or end <= start or path != part_path(start, end):
            raise f.error("path", f"does not continue the parts before it: {_show(path)}")
        data = archive.read(path)
        if len(data) != f.count("bytes") or hashlib.sha256(data).hexdigest() != f.text("sha256", SHA256_HEX):
            raise ArchiveError(f"{path}: not the part its checkpoint describes")
        document = _parse_json(data)
        if not isinstance(document, dict) or document.get("format") != "diffarc-archive-shards":
            raise ArchiveError(f"{path}: not a part of a checkpoint's shard list")
        part = _Fields(document, f"{path}: ")
        entries = [_shard_entry(g) for g in part.each("shards")]
        if part.count("start") != start or len(entries) != end - start:
            raise part.error("shards", f"are not entries {start} to {end} of the list")
        shards += entries
    _unique(top, "shards", [e.path for e in shards], "path")
    return shards


def _apply_commit(manifest: Manifest, data: bytes, number: int, first: bool, paths: set[str]) -> None:
    """Commit `number` applied to the manifest replayed so far, every field checked as a manifest's are.
    Errors name the commit's file."""
    try:
        document = _parse_json(data)
        if not isinstance(document, dict) or document.get("format") != "diffarc-archive-commit":
            raise ArchiveError("not a diffarc archive commit")
        top = _Fields(document, "")
        version = top.count("format_version", low=1)
        if version > ARCHIVE_FORMAT_VERSION:
            raise ArchiveError(f"archive format version {version} is newer than this diffarc reads "
                               f"({ARCHIVE_FORMAT_VERSION}); upgrade diffarc")  # fmt: skip
        if top.count("commit") != number:
            raise top.error("commit", "is not the number in the file's name")
        changes = top.fields("set", optional=True) or _Fields({}, "set.")
        for name in changes.value:
            if name not in HEADER_FIELDS:
                raise changes.error(name, "is not a field a commit can set")
        for name, read in HEADER_FIELDS.items():
            if name in changes.value:
                setattr(manifest, name, read(changes))
            elif first:  # the log's first commit says everything
                raise changes.error(name, "is missing")
        for f in top.each("add_shards"):
            entry = _shard_entry(f)
            if entry.path in paths:
                raise f.error("path", f"repeats a committed shard's: {_show(entry.path)}")
            paths.add(entry.path)
            manifest.shards.append(entry)
        manifest.updated = top.number("time")
    except ArchiveError as exc:
        raise ArchiveError(f"{commit_path(number)}: {exc}") from None


def shard_metadata(codec: CodecSpec) -> dict[bytes, bytes]:
    return {
        b"diffarc.archive_format_version": str(ARCHIVE_FORMAT_VERSION).encode(),
        b"diffarc.tool_version": tool_version().encode(),
        b"diffarc.codec": json.dumps(asdict(codec), sort_keys=True).encode(),
    }


def write_shard(
    archive: Location, items: list[EncodedItem], codec: CodecSpec, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
) -> ShardEntry:
    """Write one shard under a fresh name and describe it for the manifest (which the caller commits).

    Streams are stored in compact framing, referring to `codec` by its id in the spec table.
    """
    items = sorted(items, key=lambda item: item.key)  # sorted keys make row-group statistics a key index
    spec = codec.stream_spec
    streams = [container.compact(i.bitstream, codec.id, spec) for i in items]
    table = pa.table(
        {
            "key": [i.key for i in items],
            "bitstream": streams,
            "bitstream_bytes": [len(s) for s in streams],
            "width": [i.width for i in items],
            "height": [i.height for i in items],
            "source_bytes": [i.source_bytes for i in items],
            "source_sha256": [i.source_sha256 for i in items],
            "codec": [codec.name] * len(items),
        },
        schema=SHARD_SCHEMA.with_metadata(shard_metadata(codec)),
    )
    return _store_shard(archive, table, row_group_bytes)


def _store_shard(archive: Location, table: pa.Table, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> ShardEntry:
    """A table of shard rows, sorted by key, written as a shard under a fresh name, and its entry."""
    buffer = io.BytesIO()
    # Bitstreams are already compressed: recompressing them costs CPU and saves nothing.
    compression = {name: ("NONE" if name == "bitstream" else "ZSTD") for name in SHARD_SCHEMA.names}
    sizes = table.column("bitstream_bytes").to_pylist()
    with pq.ParquetWriter(buffer, table.schema, compression=compression, use_dictionary=["codec"]) as writer:
        for start, stop in _row_groups(sizes, row_group_bytes):
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    data = buffer.getvalue()
    path = f"{SHARD_DIR}/part-{uuid.uuid4().hex}.parquet"
    archive.write_atomic(path, data)
    keys = table.column("key")
    widths, heights = (table.column(name).to_numpy().astype("int64") for name in ("width", "height"))
    return ShardEntry(
        path=path,
        rows=table.num_rows,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        first_key=keys[0].as_py(),
        last_key=keys[-1].as_py(),
        source_bytes=int(pc.sum(table.column("source_bytes")).as_py()),
        bitstream_bytes=sum(sizes),
        pixels=int((widths * heights).sum()),
        largest_pixels=int((widths * heights).max()),
    )


def shard_without(archive: Location, entry: ShardEntry, keys: set[str]) -> ShardEntry | None:
    """The uncommitted shard of `entry` written again without the rows of `keys` (None when none is left),
    the file before deleted: how a writer keeps out what the key rule refuses once the shard exists."""
    table = read_shard(archive, entry, whole=True)
    kept = table.filter(pc.invert(pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string()))))
    replaced = _store_shard(archive, kept) if kept.num_rows else None
    archive.delete(entry.path)
    return replaced


def _row_groups(sizes: list[int], limit: int):
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def read_shard(
    archive: Location, entry: ShardEntry, columns: list[str] | None = None, keys: list[str] | None = None,
    whole: bool = False, check_index: bool = False,
) -> pa.Table:
    """Rows of one shard, once the file has been checked against its manifest entry; with `keys`, only
    the row groups whose key range can hold them are read.

    A shard is refused, in an ArchiveError naming it, when it is missing, its size is not the entry's, its
    footer does not describe a shard of this format with the entry's row count, a column read holds a
    null, or a column would take more memory read than a shard of its rows can honestly need
    (`_bounded_read`). With `whole` the file is read in one piece and its SHA-256 checked too (decode and
    verify, which read every row anyway); reading a few columns or keys checks the size only, and the
    streams' CRCs catch damage inside them. With `check_index` (verify) its keys must also be sorted,
    unique, the entry's first and last, and each row group's key statistics those of its rows: what cat
    and a key selection find rows by.
    """

    def read() -> pa.Table:
        if whole:
            data = archive.read(entry.path)
            if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ArchiveError(f"{entry.path}: size or SHA-256 differs from the manifest (damaged or replaced)")
            return _read_shard_rows(lambda: pa.BufferReader(data), entry, columns, keys, check_index)
        with archive.fs.open(archive.path(entry.path), "rb") as handle:
            if handle.size != entry.bytes:
                raise ArchiveError(
                    f"{entry.path}: {handle.size} bytes, the manifest says {entry.bytes} (truncated or replaced)"
                )
            return _read_shard_rows(lambda: handle, entry, columns, keys, check_index)

    archive = archive.confined()
    try:  # transient storage failures are retried; what the file itself says is final
        return retry_transient(read, f"read {archive.url}/{entry.path}")
    except FileNotFoundError:
        raise ArchiveError(f"{entry.path}: listed in the manifest but missing") from None
    except LinkRefused as exc:
        raise ArchiveError(f"{entry.path}: {exc}") from None
    except pa.ArrowException as exc:
        raise ArchiveError(f"{entry.path}: not a readable Parquet file ({exc})") from None


# The most bytes one value of a column may take once read. A shard of a few kB can ask, through a
# dictionary-encoded or compressed column, for gigabytes (one 16 MiB string in every row): each column's
# size read is bounded before it is expanded. Bitstreams are stored uncompressed, so their bound is the
# file's size (with room for other writers' compression).
SHARD_VALUE_BYTES = {"key": 1024, "source_sha256": 64, "codec": 255, "bitstream_bytes": 8, "width": 4,
                     "height": 4, "source_bytes": 8}  # fmt: skip
FAILURE_VALUE_BYTES = {"key": 1024, "stage": 64, "reason": 64 << 10}


def _read_shard_rows(
    open_source, entry: ShardEntry, columns: list[str] | None, keys: list[str] | None, check_index: bool
) -> pa.Table:
    parquet = pq.ParquetFile(open_source(), pre_buffer=False)
    if not SHARD_SCHEMA.equals(parquet.schema_arrow.remove_metadata()):
        raise ArchiveError(f"{entry.path}: schema differs from the archive format")
    if parquet.metadata.num_rows != entry.rows:
        raise ArchiveError(f"{entry.path}: {parquet.metadata.num_rows} rows, manifest says {entry.rows}")
    limits = {name: entry.rows * size for name, size in SHARD_VALUE_BYTES.items()}
    limits["bitstream"] = 4 * entry.bytes + (1 << 20)
    table = _bounded_read(open_source, parquet, columns, keys, limits, entry.path)
    for name in table.column_names:
        if table.column(name).null_count:
            raise ArchiveError(f"{entry.path}: column {name} holds nulls")
    if check_index:
        _check_key_index(parquet.metadata, table.column("key").to_pylist(), entry)
    return table


def _check_key_index(metadata: pq.FileMetaData, keys: list[str], entry: ShardEntry) -> None:
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise ArchiveError(f"{entry.path}: keys are not sorted and unique, which finding a key by its range needs")
    if keys and (keys[0], keys[-1]) != (entry.first_key, entry.last_key):
        raise ArchiveError(f"{entry.path}: keys run from {keys[0]!r} to {keys[-1]!r}, the manifest says "
                           f"{entry.first_key!r} to {entry.last_key!r}")  # fmt: skip
    column, start = metadata.schema.names.index("key"), 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        stats = group.column(column).statistics
        rows = keys[start : start + group.num_rows]
        start += group.num_rows
        if stats is not None and stats.has_min_max and rows and (stats.min, stats.max) != (rows[0], rows[-1]):
            raise ArchiveError(f"{entry.path}: row group {index}'s key statistics are not its keys' range")


def read_parquet(source, columns: list[str] | None = None, keys: list[str] | None = None, limits=None) -> pa.Table:
    """A Parquet file (a file object or pyarrow buffer) read on the calling thread, nothing left behind.

    pyarrow's default readers hand reads and column decoding to its I/O and CPU thread pools. A pool
    thread can finish after the call has returned while still holding a buffer owned by a Python object
    (the fsspec file, the bytes); releasing it needs the interpreter, and if the process is exiting by
    then, the thread dies inside a C++ destructor and the process aborts ("terminate called without an
    active exception", exit 134) after the command has printed its result. So: no pre-buffering, no
    threads. With `keys`, row groups are chosen from the key column's min/max statistics (shards are
    sorted by key, so a key lies in one row group) and the rows are then filtered to exactly those keys.
    With `limits` (column → bytes), a column that would take more once read is refused (`_bounded_read`).
    """
    if isinstance(source, (bytes, pa.Buffer)):
        open_source = lambda: pa.BufferReader(source)  # noqa: E731
    else:
        open_source = lambda: source  # noqa: E731
    return _bounded_read(open_source, pq.ParquetFile(open_source(), pre_buffer=False), columns, keys, limits, "")


def _bounded_read(
    open_source, parquet: pq.ParquetFile, columns: list[str] | None, keys: list[str] | None,
    limits: dict[str, int] | None, name: str,
) -> pa.Table:  # fmt: skip
    """`_read_rows`, each column (of those `limits` bounds) refused unless it takes at most its limit read.

    The footer's sizes are checked first; string and binary columns are then read as dictionaries (a
    dictionary-encoded column stays as small as its file), their expanded size reckoned, and expanded
    only within the limit. (Page headers can still claim more than the footer says: each page is then
    bounded by what its own header claims, not by these limits.)
    """
    if not limits:
        return _read_rows(parquet, columns, keys)
    metadata, schema = parquet.metadata, parquet.schema_arrow
    wanted = columns or schema.names
    sizes = dict.fromkeys(wanted, 0)
    dictionary_coded = set()
    for group in range(metadata.num_row_groups):
        for index in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(index)
            column = chunk.path_in_schema
            if column in sizes:
                sizes[column] += chunk.total_uncompressed_size
                if any("DICTIONARY" in encoding for encoding in chunk.encodings):
                    dictionary_coded.add(column)
    for column, size in sizes.items():
        if column in limits and size > limits[column] + (1 << 16):
            raise ArchiveError(f"{name}: column {column} would take {size} bytes read, over the {limits[column]} "
                               "its rows can need")  # fmt: skip
    binary = [c for c in wanted if pa.types.is_string(schema.field(c).type) or pa.types.is_binary(schema.field(c).type)]
    as_dictionary = [c for c in binary if c != "bitstream" or c in dictionary_coded]
    if as_dictionary:
        parquet = pq.ParquetFile(open_source(), pre_buffer=False, read_dictionary=as_dictionary)
    table = _read_rows(parquet, columns, keys)
    for column in as_dictionary:
        expanded = sum(_expanded_bytes(chunk) for chunk in table.column(column).chunks)
        if column in limits and expanded > limits[column]:
            raise ArchiveError(f"{name}: column {column} would take {expanded} bytes read, over the {limits[column]} "
                               "its rows can need")  # fmt: skip
    return table.cast(pa.schema([schema.field(c) for c in table.column_names])) if as_dictionary else table


def _expanded_bytes(array: pa.Array) -> int:
    """What a string or binary array takes once its dictionary is expanded (as the data, offsets aside)."""
    if not pa.types.is_dictionary(array.type):
        return int(pc.sum(pc.binary_length(array)).as_py() or 0)
    lengths = pc.binary_length(array.dictionary)
    return int(pc.sum(pc.take(lengths, array.indices)).as_py() or 0)


def _read_rows(parquet: pq.ParquetFile, columns: list[str] | None, keys: list[str] | None) -> pa.Table:
    groups = list(range(parquet.num_row_groups))
    wanted = columns
    if keys is not None:
        groups = _row_groups_holding(parquet.metadata, sorted(keys))
        wanted = None if columns is None else list(dict.fromkeys([*columns, "key"]))
    if groups:
        table = parquet.read_row_groups(groups, columns=wanted, use_threads=False)
    else:
        table = parquet.schema_arrow.empty_table().select(wanted or parquet.schema_arrow.names)
    if keys is not None:
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(keys, pa.string())))
        table = table.select(columns or table.column_names)
    return table


def _row_groups_holding(metadata: pq.FileMetaData, keys: list[str]) -> list[int]:
    """Row groups whose key statistics admit one of the sorted `keys` (all groups lacking statistics)."""
    column = metadata.schema.names.index("key")
    groups = []
    for index in range(metadata.num_row_groups):
        stats = metadata.row_group(index).column(column).statistics
        if stats is None or not stats.has_min_max:
            groups.append(index)
            continue
        first = bisect.bisect_left(keys, stats.min)
        if first < len(keys) and keys[first] <= stats.max:
            groups.append(index)
    return groups


def embed_weights(archive: Location, codec) -> EmbeddedModel:
    """Copy the weights `codec` loaded into models/<fingerprint>/, each file whole (only what the loaders
    read: `models.weights_files`). The caller commits the manifest that names the folder only after this
    returns, so no manifest ever names a partial folder."""
    from ..codecs.parts.models import weights_files

    fingerprint = codec.fingerprint.hex()
    files = []
    for subfolder, source in codec.weights_folders().items():
        if source is None:
            raise ModelError(
                f"{codec.name} weights {codec.locations} are not in a local folder (a hub id?); "
                "download them to a folder to embed them"
            )
        for relative in weights_files(Path(source)):
            path = f"{subfolder}/{relative}" if subfolder else relative
            data = (Path(source) / relative).read_bytes()
            archive.write_atomic(f"{MODEL_DIR}/{fingerprint}/{path}", data)
            files.append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return EmbeddedModel(fingerprint, sorted(files, key=lambda f: f["path"]))


def local_weights_folder(archive: Location, model: EmbeddedModel) -> str:
    """A local folder holding an embedded model: the archive's own on local disk; for a remote archive,
    the model cache's folder for its fingerprint, fetched once."""
    archive = archive.confined()
    if archive.is_local:
        try:
            folder = archive.path(model.folder)
        except LinkRefused as exc:
            raise ArchiveError(str(exc)) from None
        for parent, folders, files in os.walk(folder):  # the loaders read any file in it: none may be a link
            for name in folders + files:
                if os.path.islink(os.path.join(parent, name)):
                    relative = os.path.relpath(os.path.join(parent, name), archive.root)
                    raise ArchiveError(f"{relative} in {archive.url} is a symbolic link; diffarc loads no weights "
                                       "through a link inside an archive")  # fmt: skip
        return folder
    from ..codecs.parts.models import cached_weights_folder, copy_folder

    files = [f["path"] for f in model.files]
    return str(copy_folder(archive.fs, archive.path(model.folder), files, cached_weights_folder(model.fingerprint)))


def check_embedded_weights(archive: Location, manifest: Manifest) -> list[str]:
    """Problems with the archive's embedded weights: files missing or changed since they were listed, and
    weights whose fingerprint, recomputed from the files, is not the one their folder is named by.

    The files are read once: hashed, and written to a scratch folder that the fingerprint is recomputed
    from — a path no model cache has seen, so the figure comes from these bytes, not from a earlier load.
    """
    from ..codecs.registry import codec_class, create_codec

    archive = archive.confined()
    problems = []
    for model in manifest.models:
        spec = next((s for s in manifest.specs if s.fingerprint == model.fingerprint), None)
        if spec is None:
            problems.append(f"{model.folder}: no codec spec of this archive uses these weights")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            damaged = False
            for file in model.files:
                path = f"{model.folder}/{file['path']}"
                try:
                    data = archive.read(path)
                except FileNotFoundError:
                    problems.append(f"{path}: listed in the manifest but missing")
                    damaged = True
                    continue
                except LinkRefused as exc:
                    problems.append(str(exc))
                    damaged = True
                    continue
                if len(data) != file["bytes"] or hashlib.sha256(data).hexdigest() != file["sha256"]:
                    problems.append(f"{path}: size or SHA-256 differs from the manifest (damaged or replaced)")
                    damaged = True
                (Path(scratch) / file["path"]).parent.mkdir(parents=True, exist_ok=True)
                (Path(scratch) / file["path"]).write_bytes(data)
            if damaged:
                continue
            try:
                codec = create_codec(spec.name, {**spec.params, **codec_class(spec.name).locations_in(scratch)})
                found = codec.fingerprint.hex()
            except Exception as exc:  # weights that no longer load are as broken as weights that differ
                problems.append(f"{model.folder}: weights do not load ({type(exc).__name__}: {exc})")
                continue
        if found != model.fingerprint:
            problems.append(f"{model.folder}: the weights' fingerprint is {found}, not the one the folder is named by")
    return problems


def write_failures(archive: Location, failures: dict[str, Failure], sequence: int) -> dict | None:
    """The failure table as a new file, named by commit number and a random suffix so that no writer can
    replace a table that a committed manifest names."""
    if not failures:
        return None
    rows = sorted(failures.values(), key=lambda f: f.key)
    table = pa.Table.from_pylist([asdict(f) for f in rows], schema=FAILURE_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="ZSTD")
    data = buffer.getvalue()
    path = f"{FAILURE_DIR}/failures-{sequence:06d}-{uuid.uuid4().hex[:8]}.parquet"
    archive.write_atomic(path, data)
    return {"path": path, "rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_failure_table(archive: Location, manifest: Manifest) -> tuple[dict | None, bytes]:
    """The failure table's manifest entry and bytes.

    A running encode writes a new table at each commit and deletes the one before, so a reader holding an
    older manifest may find its table gone: it is then read through the manifest that replaced it.
    """
    entry = manifest.failures
    archive = archive.confined()
    for _ in range(10):
        if not entry:
            return None, b""
        try:
            return entry, archive.read(entry["path"])
        except LinkRefused as exc:
            raise ArchiveError(str(exc)) from None
        except FileNotFoundError:
            newer = load_manifest(archive)
            if newer is None or newer.failures == entry:
                break
            entry = newer.failures
    raise ArchiveError(f"{entry['path']}: failure table listed in the manifest but missing")


def failure_limits(entry: dict) -> dict[str, int]:
    """The memory bound of each column of a failure table (`_bounded_read`), from its entry's row count."""
    return {name: entry["rows"] * size for name, size in FAILURE_VALUE_BYTES.items()}


def read_failures(archive: Location, manifest: Manifest) -> dict[str, Failure]:
    entry, data = read_failure_table(archive, manifest)
    if entry is None:
        return {}
    try:
        table = read_parquet(data, limits=failure_limits(entry))
    except pa.ArrowException as exc:
        raise ArchiveError(f"{entry['path']}: not a readable Parquet file ({exc})") from None
    if not FAILURE_SCHEMA.equals(table.schema.remove_metadata()) or any(c.null_count for c in table.columns):
        raise ArchiveError(f"{entry['path']}: not a failure table of this archive format")
    return {row["key"]: Failure(**row) for row in table.to_pylist()}


class ArchiveWriter:
    """Commits shards and failures of one encode job to an archive's log, one small conditional file each.

    It holds the archive's writer lease (`lease`, or one it takes itself) until `finish` or `close`, and
    creates commit N only if no commit N exists: a writer that lost a race for a number (one whose lease
    failed it) stops with an ArchiveError and writes nothing more, and the commit that won stands.
    Every `checkpoint_every` commits, and at `finish`, it writes a checkpoint: the whole manifest, its
    shard list in immutable parts (`shard_parts`), of which it writes only those that are new.

    Opening an existing archive resumes it: the keys it already holds are `done`, its failures are
    known, and a request for a different codec, parameters or weights is refused rather than mixed in.
    The same weights found under another path are the same weights: the job goes on, and the spec's
    hint records where they are now. An archive without a log (format 1 or 2, one whole manifest.json)
    gets one at its first commit: that commit holds the whole manifest, and only then is manifest.json
    replaced — conditionally, by the pointer to the log — so a run killed in between leaves the old archive
    as it was.
    """

    def __init__(
        self, archive: Location, codec: CodecSpec, source: str, lease: WriterLease | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY, part_shards: int = PART_SHARDS,
    ):  # fmt: skip
        self.archive = archive = archive.confined()
        check_layout(archive)  # before the lease: writer.lock may be the link
        self.checkpoint_every, self.part_shards = checkpoint_every, part_shards
        self._own_lease = lease is None
        self.lease = lease or WriterLease(archive)
        try:
            self._open(codec, source)
        except BaseException:
            self.close()
            raise

    def _open(self, codec: CodecSpec, source: str) -> None:
        try:
            data, self._manifest_version = self.archive.read_versioned(MANIFEST)
            existing, self._in_log = _manifest_from(self.archive, data)
        except FileNotFoundError:
            existing, self._manifest_version, self._in_log = None, None, False
        if existing is not None and existing.codec != codec:
            raise codec_mismatch(self.archive.url, existing.codec, codec)
        # What the log already says: the next commit writes only what differs from it.
        self._logged_header = existing.header() if self._in_log else {}
        self._logged_shards = len(existing.shards) if self._in_log else 0
        # This log's checkpoints, oldest first, with the parts each names; two are kept.
        self._checkpoints: dict[int, set[str]] = {}
        self._parts_written: dict[str, dict] = {}  # this run's parts: path → its entry in a checkpoint
        self._stale_commits: list[str] = []
        if self._in_log:
            pointer = _checkpoint_pointer(self.archive, 1)
            if pointer:
                self._checkpoints[pointer["commit"]] = self._parts_named_by(pointer["commit"])
        if existing is not None:
            existing.specs[-1] = replace(existing.codec, hint=codec.hint)
        self.manifest = existing or Manifest(specs=[replace(codec, id=1)], source=source)
        if not self._in_log:
            # Commits a killed run wrote before manifest.json named its log: nobody trusts them, and the log
            # starts after them rather than reusing their numbers.
            self._stale_commits = [p for p in self.archive.list_files(LOG_DIR) if LOG_COMMIT.fullmatch(p)]
            numbers = [int(LOG_COMMIT.fullmatch(p).group(1)) for p in self._stale_commits]
            self.manifest.commits = max([self.manifest.commits, *numbers])
        self.failures = read_failures(self.archive, self.manifest)
        self._failures_changed = False
        self.done: set[str] = set()

        def keys_of(entry: ShardEntry) -> list[str]:
            return read_shard(self.archive, entry, columns=["key"]).column("key").to_pylist()

        with ThreadPoolExecutor(8) as pool:  # on an object store each read mostly waits on the network
            for keys in pool.map(keys_of, self.manifest.shards):
                self.done.update(keys)
        self.names = DecodedNames()  # the key rule's record of what the archive's keys decode to
        for key in sorted(self.done):
            self.names.add(key)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop writing; the lease is given back if this writer took it."""
        if self._own_lease:
            self.lease.release()

    def commit(self, entry: ShardEntry | None, keys: list[str], failures: list[Failure]) -> None:
        """Make one finished unit of work (a shard and/or its failed items) part of the archive.

        Keys the key rule refuses (`keys.DecodedNames`: unsafe, or clashing once decoded with a key the
        archive holds) are taken out of the shard, which is written again without them, and go to the
        failure table (stage "list"): no writer stores what decode cannot give back."""
        overlap = self.done.intersection(keys)
        if overlap:  # a key in two shards would break "exactly once"; never commit that
            raise ArchiveError(f"shard {entry.path if entry else ''} repeats committed keys, e.g. {sorted(overlap)[0]}")
        refused = {key: problem for key in sorted(keys) if (problem := self.names.admit(key))}
        if refused:
            entry = shard_without(self.archive, entry, set(refused)) if entry else None
            keys = [key for key in keys if key not in refused]
            failures = [*failures, *(Failure(key, "list", problem) for key, problem in refused.items())]
        if entry is not None:
            self.manifest.shards.append(entry)
            self.done.update(keys)
            # The limit decode and verify apply is what the streams need, not what the encoder allowed.
            self.manifest.max_pixels = max(self.manifest.max_pixels or 0, entry.largest_pixels) or None
        for key in keys:
            if self.failures.pop(key, None) is not None:  # a retried item that now succeeded
                self._failures_changed = True
        for failure in failures:
            self.failures[failure.key] = failure
            self._failures_changed = True
        self._commit()

    def record_refusals(self, refused: dict[str, str]) -> None:
        """Make the failure table's "list" rows this run's listing refusals (`Listing.refused`): new ones
        added, and those the listing no longer refuses (renamed, gone) dropped, so a plain re-run encodes
        them. Keys already encoded are left alone (archived before a listing rule existed)."""
        wanted = {key: Failure(key, "list", reason) for key, reason in refused.items() if key not in self.done}
        current = {key: f for key, f in self.failures.items() if f.stage == "list"}
        if wanted == current:
            return
        for key in current.keys() - wanted.keys():
            del self.failures[key]
        self.failures.update(wanted)
        self._failures_changed = True
        self._commit()

    def add_model(self, model: EmbeddedModel) -> None:
        """List embedded weights whose files are all written (see `embed_weights`)."""
        self.manifest.models = [m for m in self.manifest.models if m.fingerprint != model.fingerprint] + [model]
        self._commit()

    def finish(self) -> Manifest:
        self.manifest.complete = True
        self._commit()
        self._remove_orphans()
        self.close()
        return self.manifest

    def _commit(self) -> None:
        """One commit file: the header fields that changed and the shards added since the last commit. The
        failure table, O(failures), is rewritten only by a commit that changes it."""
        self.lease.check()
        number = self.manifest.commits + 1
        previous = self.manifest.failures
        if self._failures_changed:
            self.manifest.failures = write_failures(self.archive, self.failures, number)
        self.manifest.updated = time.time()
        header = self.manifest.header()
        record = {
            "format": "diffarc-archive-commit", "format_version": ARCHIVE_FORMAT_VERSION,
            "tool_version": tool_version(), "commit": number, "time": self.manifest.updated,
            "set": {k: v for k, v in header.items() if k not in self._logged_header or self._logged_header[k] != v},
            "add_shards": [asdict(s) for s in self.manifest.shards[self._logged_shards:]],
        }  # fmt: skip
        try:
            self._write_once(commit_path(number), json.dumps(record).encode("utf-8"), None)
            if not self._in_log:  # the first commit of the log; the archive's manifest.json names it from now on
                self._write_once(MANIFEST, log_pointer(number), self._manifest_version)
                self._in_log = True
        except WriteConflict:
            raise ArchiveError(
                f"{self.archive.url}: another writer committed since this job read the archive (commit {number} "
                "exists, or the manifest changed); this job stopped without overwriting anything (nothing either "
                "job committed is lost): run encode again to resume"
            ) from None
        self.manifest.commits = number
        self._logged_header, self._logged_shards = header, len(self.manifest.shards)
        self._failures_changed = False
        if number % self.checkpoint_every == 0 or self.manifest.complete:
            self._checkpoint()
        if previous and previous["path"] != (self.manifest.failures or {}).get("path"):
            self.archive.delete(previous["path"])

    def _write_once(self, relative: str, data: bytes, expected: str | None) -> None:
        """`write_versioned`, where a conflict with exactly these bytes is this writer's own write: a write
        whose answer was lost (a connection cut after the store had it) is retried, and then finds itself."""
        try:
            self.archive.write_versioned(relative, data, expected)
        except WriteConflict:
            try:
                if self.archive.read(relative) == data:
                    return
            except FileNotFoundError:
                pass
            raise

    def _checkpoint(self) -> None:
        """The whole manifest as of the last commit, its shard list in parts, all written before the pointer
        names them. The checkpoint before stays (with its parts) for readers that read the older pointer;
        older ones, and parts only they named, are deleted."""
        number = self.manifest.commits
        parts = []
        for start, end in shard_parts(len(self.manifest.shards), self.part_shards):
            path = part_path(start, end)
            if path not in self._parts_written:  # a part is immutable: once written by this run, it stays
                data = part_document(start, self.manifest.shards[start:end])
                self.archive.write_atomic(path, data)
                self._parts_written[path] = {"path": path, "start": start, "end": end, "bytes": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
            parts.append(self._parts_written[path])
        data = self.manifest.to_json(shard_parts=parts)
        self.archive.write_atomic(checkpoint_path(number), data)
        pointer = {"commit": number, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.archive.write_atomic(LAST_CHECKPOINT, json.dumps(pointer).encode())
        self._checkpoints.pop(number, None)
        self._checkpoints[number] = {part["path"] for part in parts}
        while len(self._checkpoints) > 2:
            oldest = next(iter(self._checkpoints))
            named = self._checkpoints.pop(oldest)
            self.archive.delete(checkpoint_path(oldest))
            for path in named - set().union(*self._checkpoints.values()):
                self.archive.delete(path)
                self._parts_written.pop(path, None)

    def _parts_named_by(self, number: int) -> set[str]:
        """The part files checkpoint `number` (written by an earlier run) names; none if it cannot be read."""
        try:
            document = _parse_json(self.archive.read(checkpoint_path(number)))
        except (FileNotFoundError, ArchiveError):
            return set()
        named = document.get("shard_parts") if isinstance(document, dict) else None
        return {p["path"] for p in named or [] if isinstance(p, dict) and LOG_PART.fullmatch(str(p.get("path")))}

    def _remove_orphans(self) -> None:
        """Shards, failure tables or model files from a killed run that no manifest lists: nobody trusts them.
        Only regular files inside the archive (its listing follows no link) with the names this diffarc
        gives what it writes are removed: model files only in the folder of one of the archive's own
        fingerprints."""
        for path in self._stale_commits:  # before the log's first commit: no pointer leads to them
            self.archive.delete(path)
        named = set().union(*self._checkpoints.values())
        for path in self.archive.list_files(LOG_DIR):
            if LOG_PART.fullmatch(path) and path not in named:  # parts of checkpoints a killed run left
                self.archive.delete(path)
        listed = {s.path for s in self.manifest.shards}
        if self.manifest.failures:
            listed.add(self.manifest.failures["path"])
        for directory, pattern in ((SHARD_DIR, WRITTEN_SHARD), (FAILURE_DIR, WRITTEN_FAILURES)):
            for path in self.archive.list_files(directory):
                if path not in listed and pattern.fullmatch(path):
                    self.archive.delete(path)
        model_files = {f"{m.folder}/{f['path']}" for m in self.manifest.models for f in m.files}
        ours = {spec.fingerprint for spec in self.manifest.specs if spec.fingerprint}
        for path in self.archive.list_files(MODEL_DIR):
            written = WRITTEN_WEIGHTS.fullmatch(path)
            if path not in model_files and written and written.group(1) in ours:
                self.archive.delete(path)
