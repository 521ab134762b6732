"""The archive: Parquet shards of bitstreams, a failure table, and a manifest committed last.

    ARCHIVE/
      manifest.json                 the only thing a reader trusts; rewritten atomically at each commit
      shards/part-<uuid>.parquet    one row per image, keys sorted; listed in the manifest once committed
      failures/failures-<n>.parquet every item that could not be encoded, with stage and reason

A shard is written whole under a fresh name before the manifest names it, so a crash leaves either the
previous manifest (and an orphan file nobody trusts, removed when the job finishes) or the new one.
docs/FORMAT.md documents all of this for readers outside diffarc.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib.metadata import version

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..codecs.errors import ArchiveError
from .storage import Location

ARCHIVE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FAILURE_DIR = "failures"
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


def tool_version() -> str:
    return version("diffarc")


@dataclass(frozen=True)
class CodecSpec:
    """What a whole archive was encoded with; resuming must ask for exactly the same."""

    name: str
    params: dict
    fingerprint: str = ""  # hex


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
    stage: str  # fetch | load | encode | parse | decode | write | verify
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


@dataclass
class Manifest:
    codec: CodecSpec
    source: str
    shards: list[ShardEntry] = field(default_factory=list)
    failures: dict | None = None  # {"path", "rows", "bytes", "sha256"} of the current failure table
    complete: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    commits: int = 0
    # The largest --max-pixels any encode run of this archive used: no item is larger, so decode and
    # verify refuse streams that claim more. None in archives written before it was recorded.
    max_pixels: int | None = None

    @property
    def totals(self) -> dict:
        return {
            "items": sum(s.rows for s in self.shards),
            "failed": self.failures["rows"] if self.failures else 0,
            "shards": len(self.shards),
            "source_bytes": sum(s.source_bytes for s in self.shards),
            "bitstream_bytes": sum(s.bitstream_bytes for s in self.shards),
            "archive_bytes": sum(s.bytes for s in self.shards),
            "pixels": sum(s.pixels for s in self.shards),
        }

    def to_json(self) -> bytes:
        document = {
            "format": "diffarc-archive",
            "format_version": ARCHIVE_FORMAT_VERSION,
            "tool_version": tool_version(),
            "codec": asdict(self.codec),
            "source": self.source,
            "complete": self.complete,
            "created": self.created,
            "updated": self.updated,
            "commits": self.commits,
            "max_pixels": self.max_pixels,
            "totals": self.totals,
            "shards": [asdict(s) for s in self.shards],
            "failures": self.failures,
        }
        return json.dumps(document, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArchiveError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != "diffarc-archive":
            raise ArchiveError("not a diffarc archive manifest")
        if document.get("format_version", 0) > ARCHIVE_FORMAT_VERSION:
            raise ArchiveError(
                f"archive format version {document['format_version']} is newer than this diffarc reads "
                f"({ARCHIVE_FORMAT_VERSION}); upgrade diffarc"
            )
        try:
            return cls(
                codec=CodecSpec(**document["codec"]),
                source=document["source"],
                shards=[ShardEntry(**s) for s in document["shards"]],
                failures=document["failures"],
                complete=document["complete"],
                created=document["created"],
                updated=document["updated"],
                commits=document["commits"],
                max_pixels=document.get("max_pixels"),
            )
        except (KeyError, TypeError) as exc:
            raise ArchiveError(f"manifest is missing or has a malformed field: {exc}") from None


def load_manifest(archive: Location) -> Manifest | None:
    if not archive.exists(MANIFEST):
        return None
    return Manifest.from_json(archive.read(MANIFEST))


def require_manifest(archive: Location) -> Manifest:
    manifest = load_manifest(archive)
    if manifest is None:
        raise ArchiveError(f"no diffarc archive at {archive.url} ({MANIFEST} not found)")
    return manifest


def commit_manifest(archive: Location, manifest: Manifest) -> None:
    manifest.updated = time.time()
    manifest.commits += 1
    archive.write_atomic(MANIFEST, manifest.to_json())


def shard_metadata(codec: CodecSpec) -> dict[bytes, bytes]:
    return {
        b"diffarc.archive_format_version": str(ARCHIVE_FORMAT_VERSION).encode(),
        b"diffarc.tool_version": tool_version().encode(),
        b"diffarc.codec": json.dumps(asdict(codec), sort_keys=True).encode(),
    }


def write_shard(
    archive: Location, items: list[EncodedItem], codec: CodecSpec, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
) -> ShardEntry:
    """Write one shard under a fresh name and describe it for the manifest (which the caller commits)."""
    items = sorted(items, key=lambda item: item.key)  # sorted keys make row-group statistics a key index
    table = pa.table(
        {
            "key": [i.key for i in items],
            "bitstream": [i.bitstream for i in items],
            "bitstream_bytes": [len(i.bitstream) for i in items],
            "width": [i.width for i in items],
            "height": [i.height for i in items],
            "source_bytes": [i.source_bytes for i in items],
            "source_sha256": [i.source_sha256 for i in items],
            "codec": [codec.name] * len(items),
        },
        schema=SHARD_SCHEMA.with_metadata(shard_metadata(codec)),
    )
    buffer = io.BytesIO()
    # Bitstreams are already compressed: recompressing them costs CPU and saves nothing.
    compression = {name: ("NONE" if name == "bitstream" else "ZSTD") for name in SHARD_SCHEMA.names}
    with pq.ParquetWriter(buffer, table.schema, compression=compression, use_dictionary=["codec"]) as writer:
        for start, stop in _row_groups([len(i.bitstream) for i in items], row_group_bytes):
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    data = buffer.getvalue()
    path = f"{SHARD_DIR}/part-{uuid.uuid4().hex}.parquet"
    archive.write_atomic(path, data)
    return ShardEntry(
        path=path,
        rows=len(items),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        first_key=items[0].key,
        last_key=items[-1].key,
        source_bytes=sum(i.source_bytes for i in items),
        bitstream_bytes=sum(len(i.bitstream) for i in items),
        pixels=sum(i.width * i.height for i in items),
    )


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
    archive: Location, entry: ShardEntry, columns: list[str] | None = None, keys: list[str] | None = None
) -> pa.Table:
    """Rows of one shard; with `keys`, only the row groups whose key range can hold them are read."""
    with archive.fs.open(archive.path(entry.path), "rb") as handle:
        return read_parquet(handle, columns, keys)


def read_parquet(source, columns: list[str] | None = None, keys: list[str] | None = None) -> pa.Table:
    """A Parquet file (a file object or pyarrow buffer) read on the calling thread, nothing left behind.

    pyarrow's default readers hand reads and column decoding to its I/O and CPU thread pools. A pool
    thread can finish after the call has returned while still holding a buffer owned by a Python object
    (the fsspec file, the bytes); releasing it needs the interpreter, and if the process is exiting by
    then, the thread dies inside a C++ destructor and the process aborts ("terminate called without an
    active exception", exit 134) after the command has printed its result. So: no pre-buffering, no
    threads. With `keys`, row groups are chosen from the key column's min/max statistics (shards are
    sorted by key, so a key lies in one row group) and the rows are then filtered to exactly those keys.
    """
    parquet = pq.ParquetFile(source, pre_buffer=False)
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


def write_failures(archive: Location, failures: dict[str, Failure], sequence: int) -> dict | None:
    if not failures:
        return None
    rows = sorted(failures.values(), key=lambda f: f.key)
    table = pa.Table.from_pylist([asdict(f) for f in rows], schema=FAILURE_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="ZSTD")
    data = buffer.getvalue()
    path = f"{FAILURE_DIR}/failures-{sequence:06d}.parquet"
    archive.write_atomic(path, data)
    return {"path": path, "rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_failures(archive: Location, manifest: Manifest) -> dict[str, Failure]:
    if not manifest.failures:
        return {}
    table = read_parquet(pa.BufferReader(archive.read(manifest.failures["path"])))
    return {row["key"]: Failure(**row) for row in table.to_pylist()}


class ArchiveWriter:
    """Commits shards and failures of one encode job to an archive, one atomic manifest write each.

    Opening an existing archive resumes it: the keys it already holds are `done`, its failures are
    known, and a request for a different codec, parameters or weights is refused rather than mixed in.
    """

    def __init__(self, archive: Location, codec: CodecSpec, source: str, max_pixels: int | None = None):
        self.archive = archive
        existing = load_manifest(archive)
        if existing is not None and existing.codec != codec:
            raise ArchiveError(
                f"{archive.url} was encoded with {existing.codec}; this job asks for {codec}. "
                "Resume with the same codec and parameters, or write a new archive."
            )
        self.manifest = existing or Manifest(codec=codec, source=source)
        if max_pixels is not None:
            self.manifest.max_pixels = max(max_pixels, self.manifest.max_pixels or 0)
        self.failures = read_failures(archive, self.manifest)
        self.done: set[str] = set()
        for entry in self.manifest.shards:
            self.done.update(read_shard(archive, entry, columns=["key"]).column("key").to_pylist())

    def commit(self, entry: ShardEntry | None, keys: list[str], failures: list[Failure]) -> None:
        """Make one finished unit of work (a shard and/or its failed items) part of the archive."""
        overlap = self.done.intersection(keys)
        if overlap:  # a key in two shards would break "exactly once"; never commit that
            raise ArchiveError(f"shard {entry.path if entry else ''} repeats committed keys, e.g. {sorted(overlap)[0]}")
        if entry is not None:
            self.manifest.shards.append(entry)
            self.done.update(keys)
        for key in keys:
            self.failures.pop(key, None)  # a retried item that now succeeded
        for failure in failures:
            self.failures[failure.key] = failure
        self._commit()

    def finish(self) -> Manifest:
        self.manifest.complete = True
        self._commit()
        self._remove_orphans()
        return self.manifest

    def _commit(self) -> None:
        previous = self.manifest.failures
        self.manifest.failures = write_failures(self.archive, self.failures, self.manifest.commits + 1)
        commit_manifest(self.archive, self.manifest)
        if previous and previous["path"] != (self.manifest.failures or {}).get("path"):
            self.archive.delete(previous["path"])

    def _remove_orphans(self) -> None:
        """Shards or failure tables from a killed run that no manifest lists: nobody trusts them."""
        listed = {s.path for s in self.manifest.shards}
        if self.manifest.failures:
            listed.add(self.manifest.failures["path"])
        for directory in (SHARD_DIR, FAILURE_DIR):
            for path in self.archive.list_files(directory):
                if path not in listed and path.endswith(".parquet"):
                    self.archive.delete(path)
