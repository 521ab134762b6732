"""The decode job (archive → image files, on Ray actors) and `cat` (one image, in this process).

Each actor holds one codec and decodes whole shards, reading only the rows asked for. A stream that is
damaged or was written for other weights is reported and skipped; the others are still decoded. A shard
that is missing, truncated or damaged (its size or SHA-256 is not the manifest's) is reported as an
archive problem and skipped whole; the other shards are still decoded.
Before any decoding the driver reads the selected shards' keys, so that two keys that would write one
path (`dup.jpg` and `dup.png` both decode to `dup.png`; `a.jpg` decodes to the file `a.png` that
`a.png/x.png` needs as a folder) never do: the first, in key order, is written, and the others fail
naming it (`keys.DecodedNames`).
The codec's weights are found by fingerprint (`codec_for_archive`): --model, then the archive's own
models/ folder, the local cache, the location recorded when encoding (only with --trust-hint: it comes
with the archive) and the built-in weights.
Outputs are written atomically, and an output that already exists is skipped, so a killed decode is
resumed by running it again. The driver lists the destination once for that (one LIST per 1000 files on
S3), rather than each worker asking after each file (a request per image).
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from ..codecs.base import Codec
from ..codecs.container import Header
from ..codecs.errors import BitstreamError
from ..codecs.registry import codec_class, open_codec
from ..codecs.errors import ArchiveError, ParameterError
from .archive import Failure, Manifest, ShardEntry, local_weights_folder, read_shard, require_manifest
from .batches import failure_reason, map_batch
from .cluster import actor_pool, run_on_pool, torch_device
from .images import DEFAULT_MAX_PIXELS
from .preflight import check_decode, check_reachable
from .keys import OUTPUT_EXTENSIONS, DecodedNames, UnsafeKeyError, key_problem, output_name
from .storage import Location

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "bmp": "BMP"}


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, OUTPUT_FORMATS[image_format])
    return buffer.getvalue()


def decode_streams(codec: Codec, keys: list[str], streams: list[bytes], failures: list[Failure], max_pixels: int):
    """(key, pixels) for each stream that decodes; the rest become failures naming the problem.

    A stream is refused before any decoding when it does not parse or claims more than `max_pixels`
    pixels (an archive from elsewhere may be hostile); the others are decoded as one batch, which
    `map_batch` splits to find a stream the codec fails on.
    """
    readable = []
    for key, stream in zip(keys, streams):
        try:
            read_within(codec, stream, max_pixels)
            readable.append((key, stream))
        except BitstreamError as exc:
            failures.append(Failure(key, "parse", str(exc)))
    decoded = map_batch(
        readable,
        lambda batch: codec.decode([stream for _, stream in batch], max_pixels),
        lambda pair, reason: failures.append(Failure(pair[0], "decode", reason)),
    )
    return [(key, pixels) for (key, _), pixels in decoded]


def read_within(codec: Codec, stream: bytes, max_pixels: int) -> Header:
    """The stream's header, if `codec` can decode it within `max_pixels` (`Codec.check_cost`)."""
    return codec.read(stream, max_pixels)[0]


def pixel_limit(manifest: Manifest, max_pixels: int | None) -> int:
    """The most pixels a stream of this archive may declare: the caller's, else the encoder's limit."""
    return max_pixels or manifest.max_pixels or DEFAULT_MAX_PIXELS


def codec_for_archive(
    archive: Location, manifest: Manifest, device: str = "cpu", model: str | None = None, base_only: bool = False,
    params: dict | None = None, trust_hint: bool = False,
) -> Codec:  # fmt: skip
    """The archive's codec, with weights that have its fingerprint: from `model` (--model), the archive's
    models/<fingerprint>/, the local model cache, the recorded location (only with `trust_hint`, or when it
    names built-in weights: `registry.open_codec`) or the codec's default, in that order. With
    `base_only`, the decoder of the streams' base layer, which needs no weights (`Codec.base_decoder`).
    `params` (decode --param) set decode-time parameters for every stream (`Codec.override`)."""
    spec = manifest.codec
    if base_only:
        codec = codec_class(spec.name).base_decoder(spec.params, device)
        codec.override(params or {})
        return codec
    embedded = manifest.embedded_model(spec.fingerprint)
    codec = open_codec(
        spec.name,
        spec.params,
        bytes.fromhex(spec.fingerprint),
        model=model,
        embedded=local_weights_folder(archive, embedded) if embedded else None,
        hint=spec.hint,
        device=device,
        trust_hint=trust_hint,
    )
    codec.override(params or {})
    return codec


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
        self, archive: Location, manifest: Manifest, model: str | None, max_pixels: int, base_only: bool, params: dict,
        trust_hint: bool = False,
    ):  # fmt: skip
        self.manifest = manifest
        self.codec = codec_for_archive(archive, manifest, torch_device(), model, base_only, params, trust_hint)
        self.max_pixels = max_pixels

    def decode_shard(
        self, archive: Location, task: DecodeTask, dst: Location, image_format: str, overwrite: bool, batch_size: int
    ) -> DecodeResult:
        try:  # read whole, checked against the manifest's size and SHA-256, unless a few keys are wanted
            columns = ["key", "bitstream"]
            table = read_shard(archive, task.entry, columns, keys=task.keys, whole=task.keys is None).to_pylist()
        except ArchiveError as exc:
            return DecodeResult(0, 0, [], [str(exc)])
        failures: list[Failure] = []
        todo = []
        skipped = 0
        for row in table:
            if not row["key"].startswith(task.prefix):
                continue
            try:
                name = output_name(row["key"], image_format)
            except UnsafeKeyError as exc:
                failures.append(Failure(row["key"], "write", str(exc)))
                continue
            if row["key"] in task.taken:
                failures.append(Failure(row["key"], "write", f"{task.taken[row['key']]}; not written"))
                continue
            if not overwrite and row["key"] in task.present:
                skipped += 1
                continue
            try:
                todo.append((row["key"], name, self.manifest.expand(row["bitstream"])))
            except BitstreamError as exc:
                failures.append(Failure(row["key"], "parse", str(exc)))
        decoded = 0
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            names = {key: name for key, name, _ in batch}
            keys, streams = [k for k, _, _ in batch], [s for _, _, s in batch]
            for key, pixels in decode_streams(self.codec, keys, streams, failures, self.max_pixels):
                try:
                    dst.write_atomic(names[key], encode_image(pixels, image_format))
                    decoded += 1
                except Exception as exc:
                    failures.append(Failure(key, "write", failure_reason(exc)))
        return DecodeResult(decoded, skipped, failures)


def select_shards(manifest: Manifest, keys: list[str] | None, prefix: str) -> list[DecodeTask]:
    """Shards whose key range can hold the wanted keys, each with the keys it should read."""
    tasks = []
    for entry in manifest.shards:
        if keys is not None:
            wanted = [k for k in keys if entry.first_key <= k <= entry.last_key and k.startswith(prefix)]
            if wanted:
                tasks.append(DecodeTask(entry, wanted, prefix))
        elif entry.last_key >= prefix and (entry.first_key.startswith(prefix) or entry.first_key <= prefix):
            tasks.append(DecodeTask(entry, None, prefix))
    return tasks


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
    decode-time parameters (corrdiff's perception) for every stream."""
    started = time.perf_counter()
    if image_format not in OUTPUT_FORMATS:
        raise ParameterError(f"unknown output format {image_format!r}; choose from {sorted(OUTPUT_FORMATS)}")
    archive = Location(archive_url, storage_options, follow_links=False)
    dst = Location(dst_url, storage_options)
    manifest = check_decode(archive, dst)  # fails before Ray starts
    if base_only:
        codec_class(manifest.codec.name).base_decoder(manifest.codec.params)  # a codec without one: say so now
    params = codec_class(manifest.codec.name).check_overrides(params or {})  # a parameter it lacks: say so now
    summary = DecodeSummary(0, 0)
    existing = set() if overwrite else set(dst.list_files())
    tasks, found = claim_outputs(archive, select_shards(manifest, keys, prefix), image_format, existing, summary)
    if tasks:
        limit = pixel_limit(manifest, max_pixels)
        total = sum(task.entry.rows for task in tasks) if keys is None and not prefix else None
        worker_args = (archive, manifest, model, limit, base_only, params, trust_hint)
        with actor_pool(DecodeWorker, *worker_args, actors=actors, address=address) as pool:
            for result in run_on_pool(
                pool,
                tasks,
                lambda actor, task: actor.decode_shard.remote(archive, task, dst, image_format, overwrite, batch_size),
            ):
                summary.decoded += result.decoded
                summary.skipped_existing += result.skipped
                summary.failures += result.failures
                summary.problems += result.problems
                if on_progress:
                    done = summary.decoded + summary.skipped_existing + len(summary.failures)
                    on_progress(done, total, len(summary.failures))
    if keys is not None:
        summary.failures += [Failure(k, "select", "key not in archive") for k in sorted(set(keys) - found)]
    summary.seconds = time.perf_counter() - started
    return summary


def claim_outputs(
    archive: Location, tasks: list[DecodeTask], image_format: str, existing: set[str], summary: DecodeSummary
) -> tuple[list[DecodeTask], set[str]]:
    """The tasks whose shards' keys can be read, each with `taken` and `present` set, and every key found.

    Each output path is claimed by the first key, in key order, that decodes to it; a later key that would
    write the same file, or need a folder where a file is (or the reverse), is marked taken with how it
    clashes. A key whose file is among the `existing` output names is marked
    present. A shard whose keys cannot be read is an archive problem (in
    `summary`), and its task is dropped. Keys are read a few shards at a time: on an object store each
    read waits on the network.
    """

    def keys_of(task: DecodeTask) -> list[str] | ArchiveError:
        try:
            found = read_shard(archive, task.entry, columns=["key"], keys=task.keys).column("key").to_pylist()
        except ArchiveError as exc:
            return exc
        return [k for k in found if k.startswith(task.prefix)]

    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(keys_of, tasks))
    kept, found, occurrences = [], set(), []
    for task, keys in zip(tasks, read):
        if isinstance(keys, ArchiveError):
            summary.problems.append(str(keys))
            continue
        kept.append(task)
        found.update(keys)
        occurrences += [(key, len(kept) - 1) for key in keys]
    names = DecodedNames([OUTPUT_EXTENSIONS[image_format]])
    for key, index in sorted(occurrences):
        if key_problem(key):
            continue  # refused where it is decoded, with its reason
        clash = names.admit(key)
        if clash:
            kept[index].taken[key] = clash
        elif output_name(key, image_format) in existing:
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
    """One image, decoded here — or, with `stream`, its standalone stream (full framing: codec,
    parameters, fingerprint), decodable without the archive. The manifest's key ranges and the shard's
    row-group statistics mean only the row group holding the key is read. `max_pixels` defaults to the
    archive's own limit; `params` set decode-time parameters, as for decode."""
    archive = Location(archive_url, storage_options, follow_links=False)
    check_reachable(archive, "read the archive")
    manifest = require_manifest(archive)
    for task in select_shards(manifest, [key], ""):
        rows = read_shard(archive, task.entry, columns=["key", "bitstream"], keys=[key]).to_pylist()
        if rows:
            full = manifest.expand(rows[0]["bitstream"])
            if stream:
                return full
            codec = codec_for_archive(archive, manifest, model=model, params=params, trust_hint=trust_hint)
            return encode_image(codec.decode([full], pixel_limit(manifest, max_pixels))[0], image_format)
    raise ArchiveError(f"key {key!r} is not in the archive {archive_url}")
