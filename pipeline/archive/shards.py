"""The archive's Parquet files: shards (one row per image, keys sorted, streams in compact framing) and the
failure table, written whole under fresh names and read only once checked against their manifest entry."""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import uuid
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...codecs import container
from ...codecs.errors import ArchiveError
from ..storage import LinkRefused, Location
from ..storage_failures import retry_transient
from .layout import (
    ARCHIVE_FORMAT_VERSION, DEFAULT_ROW_GROUP_BYTES, FAILURE_DIR, FAILURE_SCHEMA, FIDELITY_UNKNOWN, SHARD_DIR,
    SHARD_SCHEMA, SHARD_SCHEMA_BEFORE_FIDELITY, tool_version,
)
from .log import load_manifest
from .records import CodecSpec, EncodedItem, Failure, Manifest, ShardEntry

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
            "source_format": [i.source_format for i in items],
            "source_profile": [i.source_profile[:MAX_PROFILE_CHARS] for i in items],
            "colour_converted": [i.colour_converted for i in items],
            "fidelity": [i.fidelity for i in items],
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
    dictionary = ["codec", "source_format", "source_profile", "fidelity"]  # a few values each, repeated
    with pq.ParquetWriter(buffer, table.schema, compression=compression, use_dictionary=dictionary) as writer:
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
MAX_PROFILE_CHARS = 255  # of a profile's description kept in a row (a hostile file's may be any length)
SHARD_VALUE_BYTES = {"key": 1024, "source_sha256": 64, "codec": 255, "bitstream_bytes": 8, "width": 4,
                     "height": 4, "source_bytes": 8, "source_format": 64, "source_profile": 4 * MAX_PROFILE_CHARS,
                     "colour_converted": 1, "fidelity": 16}  # fmt: skip
FAILURE_VALUE_BYTES = {"key": 1024, "stage": 64, "reason": 64 << 10}


def _read_shard_rows(
    open_source, entry: ShardEntry, columns: list[str] | None, keys: list[str] | None, check_index: bool
) -> pa.Table:
    parquet = pq.ParquetFile(open_source(), pre_buffer=False)
    schema = parquet.schema_arrow.remove_metadata()
    older = SHARD_SCHEMA_BEFORE_FIDELITY.equals(schema)  # written before rows recorded their fidelity
    if not SHARD_SCHEMA.equals(schema) and not older:
        raise ArchiveError(f"{entry.path}: schema differs from the archive format")
    if parquet.metadata.num_rows != entry.rows:
        raise ArchiveError(f"{entry.path}: {parquet.metadata.num_rows} rows, manifest says {entry.rows}")
    limits = {name: entry.rows * size for name, size in SHARD_VALUE_BYTES.items()}
    limits["bitstream"] = 4 * entry.bytes + (1 << 20)
    wanted = columns or SHARD_SCHEMA.names
    present = [name for name in wanted if name in schema.names] if older else columns
    table = _bounded_read(open_source, parquet, present, keys, limits, entry.path)
    if older:  # what such a shard's rows promise: nothing beyond their pixels, approximately
        for name in (n for n in wanted if n not in schema.names):
            field = SHARD_SCHEMA.field(name)
            table = table.append_column(field, pa.array([FIDELITY_UNKNOWN[name]] * table.num_rows, field.type))
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


def read_failure_table(archive: Location, manifest: Manifest) -> tuple[dict | None, pa.Table | None]:
    """The failure table's manifest entry and rows ((None, None) without one), once the file is the one the
    manifest names (size, SHA-256), a failure table of this format, and every column read within a memory
    bound; ArchiveError otherwise.

    A running encode writes a new table at each commit and deletes the one before, so a reader holding an
    older manifest may find its table gone: it is then read through the manifest that replaced it.
    """
    entry = manifest.failures
    archive = archive.confined()
    for _ in range(10):
        if not entry:
            return None, None
        try:
            data = archive.read(entry["path"])
            break
        except LinkRefused as exc:
            raise ArchiveError(str(exc)) from None
        except FileNotFoundError:
            newer = load_manifest(archive)
            if newer is None or newer.failures == entry:
                raise ArchiveError(f"{entry['path']}: failure table listed in the manifest but missing") from None
            entry = newer.failures
    else:
        raise ArchiveError(f"{entry['path']}: failure table listed in the manifest but missing")
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ArchiveError(f"{entry['path']}: failure table's size or SHA-256 differs from the manifest")
    try:
        table = read_parquet(data, limits={name: entry["rows"] * size for name, size in FAILURE_VALUE_BYTES.items()})
    except pa.ArrowException as exc:
        raise ArchiveError(f"{entry['path']}: not a readable Parquet file ({exc})") from None
    if not FAILURE_SCHEMA.equals(table.schema.remove_metadata()) or any(c.null_count for c in table.columns):
        raise ArchiveError(f"{entry['path']}: not a failure table of this archive format")
    return entry, table


def read_failures(archive: Location, manifest: Manifest) -> dict[str, Failure]:
    """The failure table's rows by key (`read_failure_table`)."""
    _, table = read_failure_table(archive, manifest)
    return {} if table is None else {row["key"]: Failure(**row) for row in table.to_pylist()}
