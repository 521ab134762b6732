"""Archives in Ray Data, both ways: read an archive as a dataset of images, write a dataset as an archive.

    read_archive:  manifest ─► one row per listed shard ─► read + expand its streams ─► decode on an actor
                   pool holding the codec (one per GPU, else CPU actors) ─► rows of key, image, width, height
    iter_archive:  the same rows, shard after shard, decoded in this process (no Ray)
    write_archive: the user's rows (key + image, or key + file bytes) ─► encode a shard per batch (actor pool)
                   ─► the driver commits each shard as it arrives (ArchiveWriter), as `diffarc encode` does

Only the shards the manifest lists are read (nothing is listed in the bucket), each through the archive's
`ArchiveReader` and checked against its entry, and streams are decoded by `batches.decode_streams`, as
`diffarc decode` decodes them; shards are encoded by `batches.encode_items`, as `diffarc encode` encodes
them, and committed by the same `ArchiveWriter`, which applies the key rule.

Choices:
- An archive that is not complete (an encode still running, or stopped) is read as far as it is committed,
  with a warning: commits are the archive's truth, and what they name is whole (docs/FORMAT.md).
- A shard or stream that cannot be read or decoded stops the read with an ArchiveError naming it, where
  `diffarc decode` reports it and goes on: a dataset has no report to put it in, and a training run that
  silently lost images would not know it.
- Items of a written dataset that cannot be encoded (a row that is not an RGB image, bytes that are no
  image) go to the archive's failure table, as with `diffarc encode`; a key that repeats stops the job.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import ray
import ray.data

from ..codecs import errors
from ..codecs.base import Codec
from ..codecs.errors import ArchiveError, BitstreamError, DiffarcError, ParameterError
from ..codecs.registry import codec_class
from .archive import ArchiveReader, ArchiveWriter, CodecSpec, EncodedItem, Failure, Manifest, ShardEntry, WriterLease
from .batches import codec_spec, decode_streams, encode_items, encoded_item, open_encoder
from .cluster import connect, diffarc_error_in, pool_shape, torch_device
from .images import DEFAULT_MAX_PIXELS, load_picture
from .preflight import check_writable
from .sources import sha256_hex
from .storage import Location

logger = logging.getLogger("diffarc.ray_data")


def read_archive(
    url: str, storage_options: dict | None = None, *, actors: int | None = None, batch_size: int = 8,
    model: str | None = None, max_pixels: int | None = None, trust_hint: bool = False,
) -> ray.data.Dataset:  # fmt: skip
    """The archive's images as a dataset with columns key, image (height × width × 3 uint8), width, height.

    Streams are decoded by an actor pool (Ray Data may fuse the shard reads into it): one actor per GPU,
    each with `num_gpus=1`, where the cluster has GPUs, else CPU actors (from one up to one per CPU, as Ray
    Data scales them); `actors` fixes the count. `model`, `max_pixels` and `trust_hint` are decode's --model,
    --max-pixels and --trust-hint.
    """
    reader = _open(url, storage_options)
    connect()
    entries = [{"shard": json.dumps(asdict(entry))} for entry in reader.shards]
    shards = ray.data.from_items(entries, override_num_blocks=max(1, len(entries)))  # a shard a block: read in parallel
    # What the reads and decodes raise (ArchiveError, BitstreamError, ModelError) reaches the caller as it is,
    # a DiffarcError, rather than wrapped in Ray Data's UserCodeException: this dataset's context only.
    shards.context.raise_original_map_exception = True
    streams = shards.map_batches(_read_streams, batch_size=1, batch_format="numpy", fn_args=(reader,))
    return streams.map_batches(
        ArchiveDecoder, batch_size=batch_size, batch_format="numpy",
        fn_constructor_args=(reader, model, reader.pixel_limit(max_pixels), trust_hint), **_actor_pool(actors),
    )  # fmt: skip


def iter_archive(
    url: str, storage_options: dict | None = None, *, batch_size: int = 8, model: str | None = None,
    max_pixels: int | None = None, device: str = "cpu", trust_hint: bool = False,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The rows of `read_archive`, shard after shard in manifest order, decoded here on `device`."""
    reader = _open(url, storage_options)
    codec = reader.codec(device, model, trust_hint=trust_hint)
    limit = reader.pixel_limit(max_pixels)
    for entry in reader.shards:
        found = reader.streams(entry)  # read whole, checked against the manifest's size and SHA-256
        _raise_failures(found.failures)
        for start in range(0, len(found.keys), batch_size):
            keys, streams = found.keys[start : start + batch_size], found.streams[start : start + batch_size]
            for key, pixels in _decode_or_raise(codec, keys, streams, limit):
                yield {"key": key, "image": pixels, "width": pixels.shape[1], "height": pixels.shape[0]}


def _open(url: str, storage_options: dict | None) -> ArchiveReader:
    reader = ArchiveReader.open(url, storage_options)  # one sentence when it is no archive, or one of a codec we lack
    if not reader.manifest.complete:
        logger.warning("%s is not complete (an encode is running or stopped): reading its %d committed shards",
                       url, len(reader.shards))  # fmt: skip
    return reader


def _raise_failures(failures: list[Failure]) -> None:
    """Any stream that does not parse or decode stops the read, named: a dataset has no report to put it in."""
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ArchiveError(f"{first.key!r} cannot be decoded ({first.stage}: {first.reason}){more}")


def _decode_or_raise(codec: Codec, keys: list[str], streams: list, max_pixels: int) -> list[tuple[str, Any]]:
    failures: list[Failure] = []
    decoded = decode_streams(codec, keys, streams, failures, max_pixels)
    _raise_failures(failures)
    return decoded


def _read_streams(batch: dict[str, np.ndarray], reader: ArchiveReader) -> dict[str, list]:
    """A shard's keys and streams as stored, the file read whole and checked; the decoder parses them."""
    keys, streams = [], []
    for shard in batch["shard"]:
        table = reader.read(ShardEntry(**json.loads(shard)), ["key", "bitstream"], whole=True)
        keys += table.column("key").to_pylist()
        streams += table.column("bitstream").to_pylist()
    return {"key": keys, "stream": streams}


def _image_rows(decoded: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    return {
        "key": [key for key, _ in decoded],
        "image": [pixels for _, pixels in decoded],  # a column of tensors, of one or of varying shapes
        "width": np.array([pixels.shape[1] for _, pixels in decoded], dtype=np.int32),
        "height": np.array([pixels.shape[0] for _, pixels in decoded], dtype=np.int32),
    }


class ArchiveDecoder:
    """An actor of `read_archive`'s pool: the archive's codec, loaded once, decoding batches of streams."""

    def __init__(self, reader: ArchiveReader, model: str | None, max_pixels: int, trust_hint: bool):
        # A codec that cannot be opened (no weights of the fingerprint) is said by the first batch: an error
        # in a task reaches the caller as the DiffarcError it is, one in a constructor as Ray's ActorDiedError.
        self.reader, self.max_pixels = reader, max_pixels
        try:
            self.codec, self.failed = reader.codec(torch_device(), model, trust_hint=trust_hint), None
        except DiffarcError as exc:
            self.codec, self.failed = None, exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.failed is not None:
            raise self.failed
        keys, failures, streams = [], [], []
        for key, stream in zip(batch["key"], batch["stream"]):
            try:
                streams.append(self.reader.parse(bytes(stream)))
                keys.append(str(key))
            except BitstreamError as exc:
                failures.append(Failure(str(key), "parse", str(exc)))
        _raise_failures(failures)
        return _image_rows(_decode_or_raise(self.codec, keys, streams, self.max_pixels))


def _actor_pool(actors: int | None) -> dict[str, Any]:
    """map_batches' pool arguments: one actor per GPU (each `num_gpus=1`), else CPU actors, `actors` of them
    if given, else as many as Ray Data finds CPUs for (so the reading tasks are never starved of CPUs)."""
    shape = pool_shape(actors)
    if shape.gpus_per_actor:
        return {"compute": ray.data.ActorPoolStrategy(size=shape.actors), "num_gpus": shape.gpus_per_actor}
    sizes = {"size": actors} if actors else {"min_size": 1, "max_size": shape.actors}
    pool = ray.data.ActorPoolStrategy(**sizes)
    # The tasks upstream (a dataset's reads) need CPUs too: actors holding every CPU would leave them none and
    # the job would wait for ever (2 actors on 2 CPUs did). The actors share all but one CPU, or half of one.
    cpus = ray.cluster_resources().get("CPU", 1)
    return {"compute": pool, "num_cpus": min(shape.cpus_per_actor, max(cpus - 1, cpus / 2) / shape.actors)}


def write_archive(
    ds: ray.data.Dataset, url: str, codec: str, params: dict | None = None, preset: str | None = None,
    storage_options: dict | None = None, *, shard_size: int = 512, batch_size: int = 8, actors: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS, retry_failed: bool = False, source: str = "a Ray Data dataset",
) -> Manifest:  # fmt: skip
    """Write the rows of `ds` (a `key` column, and `image`: height × width × 3 uint8 arrays, or `bytes`:
    image files) to the archive at `url`, encoded with `codec`; returns the archive's manifest.

    A function, not a `ray.data.Datasink`: a datasink's writes are committed together, once, at the end
    (`on_write_complete`), so a job killed after hours would keep nothing. Here each batch of `shard_size`
    rows is encoded and written as a shard by an actor (`num_gpus=1` each where there are GPUs), and the
    driver commits each shard as its result streams back, through the same `ArchiveWriter` (and writer
    lease) as `diffarc encode`: a killed job keeps every committed shard, and running it again skips the
    keys the archive holds (and, unless `retry_failed`, those in its failure table), so every key is
    archived exactly once. Resuming with another codec, parameters or weights is refused.
    """
    params = codec_class(codec).resolve_params(params or {}, preset)
    codec_class(codec).check_locations(params)
    archive = Location(url, storage_options, follow_links=False)
    check_writable(archive, "the archive")
    try:
        return _write_archive(ds, archive, codec, params, shard_size, batch_size, actors, max_pixels, retry_failed, source)
    except Exception as exc:  # a DiffarcError raised on a worker reaches the caller as itself, not in Ray's wrappers
        found = diffarc_error_in(exc)
        if found is None or found is exc:
            raise
        raise found.with_traceback(None) from None


def _write_archive(
    ds: ray.data.Dataset, archive: Location, codec: str, params: dict, shard_size: int, batch_size: int,
    actors: int | None, max_pixels: int, retry_failed: bool, source: str,
) -> Manifest:  # fmt: skip
    with ExitStack() as held:
        lease = held.enter_context(WriterLease(archive))  # a second writer is refused before any work
        connect()
        # The spec (with the weights' fingerprint) needs the codec loaded: once, in a worker, not in the driver.
        spec = ray.get(ray.remote(codec_spec).remote(codec, params))
        writer = held.enter_context(ArchiveWriter(archive, spec, source, lease))
        skip = writer.done | (set() if retry_failed else set(writer.failures))
        results = ds.map_batches(
            ShardEncoder, batch_size=shard_size, batch_format="numpy",
            fn_constructor_args=(archive, writer.manifest.codec, params, skip, batch_size, max_pixels),
            **_actor_pool(actors),
        )  # fmt: skip
        # No prefetching: it would hold each finished shard back until the next one is done, uncommitted.
        for batch in results.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for entry, keys, failures, error in zip(batch["entry"], batch["keys"], batch["failures"], batch["error"]):
                if error:  # the encoder's DiffarcError, raised here as itself
                    kind, message = json.loads(error)
                    raise getattr(errors, kind, errors.DiffarcError)(message)
                failures = [Failure(**f) for f in json.loads(failures)]
                if entry or failures:
                    writer.commit(ShardEntry(**json.loads(entry)) if entry else None, json.loads(keys), failures)
        return writer.finish()


class ShardEncoder:
    """An actor of `write_archive`'s pool: one codec, loaded once, writing each batch of rows as a shard."""

    def __init__(
        self, archive: Location, spec: CodecSpec, params: dict, skip: set[str], batch_size: int, max_pixels: int
    ):  # fmt: skip
        self.archive, self.spec = archive, spec  # the manifest's spec: shards refer to its id in the spec table
        self.skip, self.batch_size, self.max_pixels = skip, batch_size, max_pixels
        self.failed = None  # said by the first batch (`__call__`)
        try:
            self.codec = open_encoder(spec, params, torch_device())
        except DiffarcError as exc:
            self.failed = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """One result row: the shard's entry, its keys and failures, and (instead, when the job cannot go on)
        the DiffarcError to stop it with, as (class name, message): Ray Data would hand the driver an
        exception raised here wrapped in its own, and write_archive's caller should get the error itself."""
        try:
            return self._encode_shard(batch)
        except DiffarcError as exc:
            return {"entry": [""], "keys": ["[]"], "failures": ["[]"], "error": [json.dumps([type(exc).__name__, str(exc)])]}

    def _encode_shard(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        if self.failed is not None:
            raise self.failed
        if "key" not in batch or not {"image", "bytes"} & batch.keys():
            raise ParameterError(f"rows to archive need a key column and an image or bytes column, not {sorted(batch)}")
        keys = [str(k) for k in batch["key"]]
        repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
        if repeated:  # two rows of one key: archiving either would break "every key exactly once"
            raise ArchiveError(f"the dataset holds the key {repeated[0]!r} more than once")
        failures: list[Failure] = []
        loaded = (item for index, key in enumerate(keys) if key not in self.skip
                  if (item := self._load(key, batch, index, failures)) is not None)  # fmt: skip
        entry, encoded = encode_items(self.codec, loaded, self.batch_size, self.archive, self.spec, failures)
        return {
            "entry": [json.dumps(asdict(entry)) if entry else ""],
            "keys": [json.dumps(encoded)],
            "failures": [json.dumps([asdict(f) for f in failures])],
            "error": [""],
        }

    def _load(self, key: str, batch: dict[str, np.ndarray], index: int, failures: list[Failure]):
        """(the item to encode, without its stream yet; its pixels), or None with the failure recorded.
        Rows of pixels are their own source: their raw bytes are what source_bytes and source_sha256 describe."""
        try:
            if "image" in batch:
                pixels = np.ascontiguousarray(batch["image"][index])
                if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
                    raise ValueError(f"image must be height × width × 3 uint8, not {pixels.shape} {pixels.dtype}")
                if pixels.shape[0] * pixels.shape[1] > self.max_pixels:
                    raise ValueError(f"image has {pixels.shape[0] * pixels.shape[1]} pixels, over {self.max_pixels}")
                source = pixels.tobytes()
                height, width = pixels.shape[:2]
                return EncodedItem(key, b"", width, height, len(source), sha256_hex(source)), pixels, None
            source = bytes(batch["bytes"][index])
            return encoded_item(key, load_picture(source, self.max_pixels), source)
        except Exception as exc:
            failures.append(Failure(key, "load", str(exc)))
            return None
