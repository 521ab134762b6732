"""The decode job (archive → image files, on Ray actors) and `cat` (one image, in this process).

    driver: ArchiveReader.open ─► select shards ─► read their keys, claim each output path ─► run_on_pool
    actor:  reader.streams(shard) (read whole, SHA-256 checked, each stream parsed once) ─► output_files
            in batches ─► write each file to DST atomically

What an item decodes to is what its row promises (`outputs.py`): a byte-exact item (the lossless mode's
JPEGs) is its source file again, under its own key, written only once its SHA-256 is the source's; any
other item is its picture, as an sRGB-tagged PNG or the format asked for.

A stream that is damaged or was written for other weights is reported and skipped; the others are still
decoded. A shard that is missing, truncated or damaged (its size or SHA-256 is not the manifest's) is
reported as an archive problem and skipped whole; the other shards are still decoded.
Before any decoding the driver reads the selected shards' keys, so that two keys that would write one
path (`dup.jpg` and `dup.png` both decode to `dup.png`; `a.jpg` decodes to the file `a.png` that
`a.png/x.png` needs as a folder) never do: the first, in key order, is written, and the others fail
naming it (`keys.DecodedNames`). The codec's weights are found by fingerprint (`ArchiveReader.codec`).
Outputs are written atomically, and an output that already exists is skipped, so a killed decode is
resumed by running it again. The driver lists the destination once for that (one LIST per 1000 files on
S3), rather than each worker asking after each file (a request per image).

`cat` and the actors decode alike: one codec, its default threads, `output_files` over streams parsed
once, so `cat` and `decode` give the same files, and `iter_archive` and `read_archive` the same pixels.
"""

from __future__ import annotations

import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import ray

from ..codecs.errors import ArchiveError, BitstreamError, ParameterError
from .archive import BYTE_EXACT, ArchiveReader, Failure, ShardEntry
from .batches import failure_reason
from .cluster import PROGRESS_GROUP, actor_pool, reported_progress, run_on_pool, torch_device
from .keys import OUTPUT_EXTENSIONS, DecodedNames, UnsafeKeyError, key_problem
from .outputs import OUTPUT_FORMATS, decoded_name, output_files, promises
from .preflight import check_writable
from .storage import Location

OUTPUT_COLUMNS = ("key", "bitstream", "source_sha256", "fidelity")  # what the file an item decodes to depends on

@dataclass
class DecodeTask:
    entry: ShardEntry
    keys: list[str] | None
    prefix: str
    # key → how it clashes with an earlier key's output (`keys.DecodedNames`): such keys are not written.
    taken: dict[str, str] = field(default_factory=dict)
    # keys whose output file exists already: skipped unless overwriting.
    present: set[str] = field(default_factory=set)


@dataclass
class DecodeResult:
    decoded: int
    skipped: int
    failures: list[Failure]
    problems: list[str] = field(default_factory=list)  # the shard itself could not be read


@dataclass
class DecodeSummary:
    decoded: int
    skipped_existing: int
    failures: list[Failure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # archive-level: shards that could not be read
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds else 0.0


class DecodeWorker:
    """A Ray actor: one codec, decoding shards of an archive to files under DST."""

    def __init__(
        self, reader: ArchiveReader, model: str | None, max_pixels: int, base_only: bool, params: dict,
        trust_hint: bool = False,
    ):  # fmt: skip
        self.reader = reader
        self.codec = reader.codec(torch_device(), model, base_only, params, trust_hint)
        self.max_pixels = max_pixels
        self.items = self.failed = 0  # over this actor's life, for `progress`

    @ray.method(concurrency_group=PROGRESS_GROUP)
    def progress(self) -> tuple[int, int]:
        return self.items, self.failed

    def decode_shard(
        self, task: DecodeTask, dst: Location, image_format: str, overwrite: bool, batch_size: int
    ) -> DecodeResult:
        try:  # read whole, checked against the manifest's size and SHA-256, unless a few keys are wanted
            found = self.reader.streams(task.entry, task.keys, columns=OUTPUT_COLUMNS)
        except ArchiveError as exc:
            return DecodeResult(0, 0, [], [str(exc)])
        promised = promises(found.table)
        failures = [f for f in found.failures if f.key.startswith(task.prefix)]
        todo, skipped = [], 0
        for key, stream in zip(found.keys, found.streams):
            if not key.startswith(task.prefix):
                continue
            try:
                name = decoded_name(key, image_format, promised[key][0])
            except UnsafeKeyError as exc:
                failures.append(Failure(key, "write", str(exc)))
            else:
                if key in task.taken:
                    failures.append(Failure(key, "write", f"{task.taken[key]}; not written"))
                elif not overwrite and key in task.present:
                    skipped += 1
                else:
                    todo.append((key, name, stream))
        self.items += skipped + len(failures)
        self.failed += len(failures)
        decoded = 0
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            before = len(failures)
            names = {key: name for key, name, _ in batch}
            streams = [stream for _, _, stream in batch]
            files = output_files(self.codec, list(names), streams, promised, failures, self.max_pixels, image_format)
            for key, data in files:
                try:
                    dst.write_atomic(names[key], data)
                    decoded += 1
                except Exception as exc:
                    failures.append(Failure(key, "write", failure_reason(exc)))
            self.items += len(batch)
            self.failed += len(failures) - before
        return DecodeResult(decoded, skipped, failures)


def run_decode(
    archive_url: str,
    dst_url: str,
    keys: list[str] | None = None,
    prefix: str = "",
    image_format: str = "png",
    overwrite: bool = False,
    actors: int | None = None,
    batch_size: int = 8,
    storage_options: dict | None = None,
    address: str | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    model: str | None = None,
    max_pixels: int | None = None,
    base_only: bool = False,
    params: dict | None = None,
    trust_hint: bool = False,
) -> DecodeSummary:
    """Decode the selected keys to files under `dst_url`; `max_pixels` defaults to the archive's own limit;
    `base_only` decodes only the streams' base layer, without model weights (hfd); `params` set the codec's
    decode-time parameters (corrdiff's perception) for every stream. `on_progress(done, total, failed)`
    is told about every second how many items the actors have done."""
    started = time.perf_counter()
    if image_format not in OUTPUT_FORMATS:
        raise ParameterError(f"unknown output format {image_format!r}; choose from {sorted(OUTPUT_FORMATS)}")
    reader = ArchiveReader.open(archive_url, storage_options)  # fails before Ray starts
    dst = Location(dst_url, storage_options)
    check_writable(dst, "the destination")
    from ..codecs.registry import codec_class

    spec = reader.manifest.codec
    if base_only:
        codec_class(spec.name).base_decoder(spec.params)  # a codec without one: say so now
    params = codec_class(spec.name).check_overrides(params or {})  # a parameter it lacks: say so now
    summary = DecodeSummary(0, 0)
    existing = set() if overwrite else set(dst.list_files())
    tasks, found = claim_outputs(reader, keys, prefix, image_format, existing, summary)
    if tasks:
        total = len(found)
        if on_progress:  # the total, known now: starting Ray and the actors takes seconds
            on_progress(0, total, 0)
        worker_args = (reader, model, reader.pixel_limit(max_pixels), base_only, params, trust_hint)
        with actor_pool(DecodeWorker, *worker_args, actors=actors, address=address, work=len(tasks)) as pool:
            with reported_progress(pool, on_progress, total):
                for result in run_on_pool(
                    pool, tasks, lambda actor, task: actor.decode_shard.remote(task, dst, image_format, overwrite, batch_size)
                ):
                    summary.decoded += result.decoded
                    summary.skipped_existing += result.skipped
                    summary.failures += result.failures
                    summary.problems += result.problems
        if on_progress:
            on_progress(summary.decoded + summary.skipped_existing + len(summary.failures), total, len(summary.failures))
    if keys is not None:
        summary.failures += [Failure(k, "select", "key not in archive") for k in sorted(set(keys) - found)]
    summary.seconds = time.perf_counter() - started
    return summary


def claim_outputs(
    reader: ArchiveReader, keys: list[str] | None, prefix: str, image_format: str, existing: set[str],
    summary: DecodeSummary,
) -> tuple[list[DecodeTask], set[str]]:  # fmt: skip
    """A task for each selected shard whose keys can be read, with `taken` and `present` set, and every
    key found.

    Each output path is claimed by the first key, in key order, that decodes to it; a later key that would
    write the same file, or need a folder where a file is (or the reverse), is marked taken with how it
    clashes. A key whose file is among the `existing` output names is marked present. A shard whose keys
    cannot be read is an archive problem (in `summary`), and its task is dropped. Keys are read a few
    shards at a time: on an object store each read waits on the network.
    """
    tasks = [DecodeTask(entry, wanted, prefix) for entry, wanted in reader.select(keys, prefix)]

    def keys_of(task: DecodeTask) -> dict[str, str] | ArchiveError:
        """key → fidelity (which says the file it decodes to: `decoded_name`) of the task's keys."""
        try:
            found = reader.read(task.entry, ["key", "fidelity"], keys=task.keys)
        except ArchiveError as exc:
            return exc
        pairs = zip(found.column("key").to_pylist(), found.column("fidelity").to_pylist())
        return {key: fidelity for key, fidelity in pairs if key.startswith(task.prefix)}

    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(keys_of, tasks))
    kept, found, occurrences, fidelity = [], set(), [], {}
    for task, shard_keys in zip(tasks, read):
        if isinstance(shard_keys, ArchiveError):
            summary.problems.append(str(shard_keys))
            continue
        kept.append(task)
        found.update(shard_keys)
        fidelity.update(shard_keys)
        occurrences += [(key, len(kept) - 1) for key in shard_keys]
    # A byte-exact item's file keeps its key's own extension: a folder of that name is a clash too.
    kept_extensions = {posixpath.splitext(key)[1] for key, kept_as in fidelity.items() if kept_as == BYTE_EXACT}
    names = DecodedNames([OUTPUT_EXTENSIONS[image_format], *sorted(kept_extensions)])
    for key, index in sorted(occurrences):
        if key_problem(key):
            continue  # refused where it is decoded, with its reason
        clash = names.admit(key)
        if clash:
            kept[index].taken[key] = clash
        elif decoded_name(key, image_format, fidelity[key]) in existing:
            kept[index].present.add(key)
    return kept, found


def cat_item(
    archive_url: str,
    key: str,
    image_format: str = "png",
    storage_options: dict | None = None,
    model: str | None = None,
    stream: bool = False,
    max_pixels: int | None = None,
    params: dict | None = None,
    trust_hint: bool = False,
) -> bytes:
    """One image, decoded here (a byte-exact item: its source file) — or, with `stream`, its standalone stream (full framing: codec,
    parameters, fingerprint), decodable without the archive. The manifest's key ranges and the shard's
    row-group statistics mean only the row group holding the key is read. `max_pixels` defaults to the
    archive's own limit; `params` set decode-time parameters, as for decode."""
    reader = ArchiveReader.open(archive_url, storage_options)
    for entry, wanted in reader.select([key]):
        if stream:
            rows = reader.read(entry, ["key", "bitstream"], keys=wanted).column("bitstream").to_pylist()
            if rows:
                return reader.standalone(rows[0])
            continue
        found = reader.streams(entry, wanted, columns=OUTPUT_COLUMNS)
        failures = found.failures
        if found.keys:
            codec = reader.codec(model=model, params=params, trust_hint=trust_hint)
            limit, promised = reader.pixel_limit(max_pixels), promises(found.table)
            for _, data in output_files(codec, found.keys, found.streams, promised, failures, limit, image_format):
                return data
        if failures:
            raise BitstreamError(f"the stream of {key!r} does not decode ({failures[0].stage}: {failures[0].reason})")
    raise ArchiveError(f"key {key!r} is not in the archive {archive_url}")
