"""The archive: Parquet shards of bitstreams, a failure table, and a manifest committed last.

    ARCHIVE/
      manifest.json                 the only thing a reader trusts; rewritten atomically at each commit
      shards/part-<uuid>.parquet    one row per image, keys sorted; listed in the manifest once committed
      failures/failures-<n>.parquet every item that could not be encoded, with stage and reason
      models/<fingerprint>/         the weights the streams need, when encoded with --embed-model

A shard (or a model folder) is written whole before the manifest names it, so a crash leaves either the
previous manifest (and orphan files nobody trusts, removed when the job finishes) or the new one.

Shards hold streams in the container's compact framing: the codec, parameters and fingerprint they
share are listed once, in the manifest's spec table, and `Manifest.expand` turns a stream read from a
shard back into the full, standalone stream the codec wrote. Archives written before the table
(format version 1) hold full streams, which `expand` returns as they are.
docs/FORMAT.md documents all of this for readers outside diffarc.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..codecs import container
from ..codecs.errors import ArchiveError, ModelError
from .storage import Location, retry_transient

# 2: streams in compact framing, the spec table, models/. Version 1 archives (full streams, one "codec"
# whose params still held weight locations) are read, and resumed, as they are.
ARCHIVE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
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
    specs: list[CodecSpec]  # the spec table; the last is what new shards are written with
    source: str
    shards: list[ShardEntry] = field(default_factory=list)
    failures: dict | None = None  # {"path", "rows", "bytes", "sha256"} of the current failure table
    models: list[EmbeddedModel] = field(default_factory=list)
    complete: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    commits: int = 0
    # The largest --max-pixels any encode run of this archive used: no item is larger, so decode and
    # verify refuse streams that claim more. None in archives written before it was recorded.
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

    def to_json(self) -> bytes:
        document = {
            "format": "diffarc-archive",
            "format_version": ARCHIVE_FORMAT_VERSION,
            "tool_version": tool_version(),
            "specs": [asdict(s) for s in self.specs],
            "source": self.source,
            "complete": self.complete,
            "created": self.created,
            "updated": self.updated,
            "commits": self.commits,
            "max_pixels": self.max_pixels,
            "totals": self.totals,
            "shards": [asdict(s) for s in self.shards],
            "failures": self.failures,
            "models": [asdict(m) for m in self.models],
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
            if document["format_version"] == 1:
                specs, models = [legacy_spec(document["codec"])], []
            else:
                specs = [CodecSpec(**s) for s in document["specs"]]
                models = [EmbeddedModel(**m) for m in document["models"]]
            return cls(
                specs=specs,
                source=document["source"],
                shards=[ShardEntry(**s) for s in document["shards"]],
                failures=document["failures"],
                models=models,
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
    buffer = io.BytesIO()
    # Bitstreams are already compressed: recompressing them costs CPU and saves nothing.
    compression = {name: ("NONE" if name == "bitstream" else "ZSTD") for name in SHARD_SCHEMA.names}
    with pq.ParquetWriter(buffer, table.schema, compression=compression, use_dictionary=["codec"]) as writer:
        for start, stop in _row_groups([len(s) for s in streams], row_group_bytes):
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
        bitstream_bytes=sum(len(s) for s in streams),
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

    def read() -> pa.Table:
        with archive.fs.open(archive.path(entry.path), "rb") as handle:
            return read_parquet(handle, columns, keys)

    return retry_transient(read, f"read {archive.url}/{entry.path}")


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
    if archive.is_local:
        return archive.path(model.folder)
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
    The same weights found under another path are the same weights: the job goes on, and the spec's
    hint records where they are now.
    """

    def __init__(self, archive: Location, codec: CodecSpec, source: str, max_pixels: int | None = None):
        self.archive = archive
        existing = load_manifest(archive)
        if existing is not None and existing.codec != codec:
            raise codec_mismatch(archive.url, existing.codec, codec)
        if existing is not None:
            existing.specs[-1] = replace(existing.codec, hint=codec.hint)
        self.manifest = existing or Manifest(specs=[replace(codec, id=1)], source=source)
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

    def add_model(self, model: EmbeddedModel) -> None:
        """List embedded weights whose files are all written (see `embed_weights`)."""
        self.manifest.models = [m for m in self.manifest.models if m.fingerprint != model.fingerprint] + [model]
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
        """Shards, failure tables or model files from a killed run that no manifest lists: nobody trusts them."""
        listed = {s.path for s in self.manifest.shards}
        if self.manifest.failures:
            listed.add(self.manifest.failures["path"])
        for directory in (SHARD_DIR, FAILURE_DIR):
            for path in self.archive.list_files(directory):
                if path not in listed and path.endswith(".parquet"):
                    self.archive.delete(path)
        model_files = {f"{m.folder}/{f['path']}" for m in self.manifest.models for f in m.files}
        for path in self.archive.list_files(MODEL_DIR):
            if path not in model_files:
                self.archive.delete(path)
