"""The encode job: source collection → archive, on a pool of Ray actors that each hold the codec.

    driver: list sources ─► skip keys the archive holds ─► chunk into shards ─► run_on_pool
    actor:  fetch images (thread pool, ahead of the codec) ─► load ─► codec.encode in batches
            ─► write the shard (Parquet) ─► return its manifest entry, keys and failures
    driver: commit each returned shard to the manifest as it arrives

Fetching runs on threads inside the actor while the codec works on the previous batch (image decoding
too, for a GPU or where the pool leaves cores free), and the next shard is already queued on the actor,
so the codec (and its GPU) does not wait. Shards shrink towards the end of the job, so the actors finish
together. Memory is bounded per actor by the shard size, not by the collection.

The codec is loaded once first, in a Ray task, for the spec the archive records (its weights'
fingerprint); the actors then load only what their encoder needs: hfd's AVIF base and the classical
codecs take no GPU and load no network. With `embed_model`, a task copies the codec's weights into the
archive's models/ folder, and the driver commits a manifest naming them before any shard: the archive
then decodes anywhere.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray

from ..codecs.base import Codec
from ..codecs.registry import codec_class, create_codec
from .archive import ArchiveWriter, CodecSpec, EmbeddedModel, EncodedItem, Failure, ShardEntry, WriterLease, embed_weights
from .batches import codec_spec, encode_items, encoded_item, failure_reason, open_encoder
from .cluster import IN_FLIGHT_PER_ACTOR, actor_pool, connect, describe_worker, pool_shape, run_on_pool, torch_device
from .images import DEFAULT_MAX_PIXELS, Picture, load_picture
from .preflight import check_encode, list_source
from .sources import SourceItem, fetch, hide_credentials, sha256_hex, without_credentials
from .storage import Location
from .storage_failures import is_transient


@dataclass
class EncodeOptions:
    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    shard_size: int = 512  # items per shard
    batch_size: int = 8  # images per codec call
    actors: int | None = None  # default: one per GPU, else one per CPU
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_failed: bool = False
    fetch_threads: int = 8
    embed_model: bool = False  # copy the weights into ARCHIVE/models/<fingerprint>/


@dataclass
class ShardResult:
    entry: ShardEntry | None
    keys: list[str]
    failures: list[Failure]
    seconds: float
    worker: dict
    deferred: list[str] = field(default_factory=list)  # keys storage kept failing for: the next run's


@dataclass
class EncodeSummary:
    archive: str
    listed: int
    skipped_non_images: int
    already_done: int
    refused: int  # listed entries whose keys could not be archived (in the failure table, stage "list")
    encoded: int
    failed: int
    seconds: float
    source_bytes: int
    bitstream_bytes: int
    workers: list[dict]
    totals: dict
    deferred: int = 0  # items left for the next run: their storage kept failing transiently


    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Deferred:
    """An item whose fetch kept failing transiently: not its fault, so not recorded; the next run tries it."""

    key: str


@dataclass(frozen=True)
class Fetched:
    item: SourceItem
    data: bytes
    sha256: str


@dataclass(frozen=True)
class LoadedImage:
    item: SourceItem
    picture: Picture
    data: bytes  # the source file: a lossless codec keeps it (`encode_items`)
    source_sha256: str


class EncodeWorker:
    """A Ray actor: one codec, loaded once (only what its encoder needs), encoding whole shards of the
    archive's `spec`."""

    def __init__(
        self, spec: CodecSpec, params: dict, storage_options: dict | None, max_pixels: int, fetch_threads: int,
        spare_cores: bool = False,
    ):  # fmt: skip
        self.device = torch_device()
        self.spec = spec  # the spec table's entry: shards refer to its id
        self.codec: Codec = open_encoder(spec, params, self.device)
        self.storage_options = storage_options
        self.max_pixels = max_pixels
        self.fetcher = ThreadPoolExecutor(fetch_threads)
        # A GPU must never wait for pixels, so threads decode images ahead of it; so they do where the pool
        # leaves cores free (`spare_cores`). Otherwise a CPU actor has one core, which its codec already keeps
        # busy: decoding on other threads would only add thread switches (5-15 % more CPU per image, measured
        # for jpeg on Kodak), so fetches still run ahead and each image is decoded in its turn.
        self.decode_ahead = self.device != "cpu" or spare_cores

    def encode_shard(self, archive: Location, items: list[SourceItem], batch_size: int) -> ShardResult:
        """Fetch, load and encode `items` as one shard whose streams refer to the archive's spec."""
        started = time.perf_counter()
        failures: list[Failure] = []
        deferred: list[str] = []
        loaded = self._load_ahead(items, batch_size, failures, deferred)
        entry, keys = encode_items(self.codec, loaded, batch_size, archive, self.spec, failures)
        # The weights folders the actor's codec holds: none for an encoder that needs no weights.
        worker = {**describe_worker(self.device), "weights": [str(f) for f in self.codec.weights_folders().values()]}
        return ShardResult(entry, keys, failures, time.perf_counter() - started, worker, deferred)

    def _load_ahead(
        self, items: list[SourceItem], depth: int, failures: list[Failure], deferred: list[str]
    ) -> Iterator[tuple[EncodedItem, Any, bytes]]:
        """Loaded images in order (each an item still without its stream, its pixels and its file), with up to
        2·depth fetches (and, for a GPU, image decodes) running ahead."""
        pending = []
        for item in items:
            pending.append(self.fetcher.submit(self._load if self.decode_ahead else self._fetch, item))
            if len(pending) > 2 * depth:
                yield from self._collect(pending.pop(0), failures, deferred)
        for future in pending:
            yield from self._collect(future, failures, deferred)

    def _collect(self, future, failures: list[Failure], deferred: list[str]) -> Iterator[tuple[EncodedItem, Any, bytes]]:
        result = future.result()
        if isinstance(result, Fetched):
            result = self._decode(result)
        if isinstance(result, Failure):
            failures.append(result)
        elif isinstance(result, Deferred):
            deferred.append(result.key)
        else:
            yield encoded_item(result.item.key, result.picture, result.data, result.source_sha256)

    def _load(self, item: SourceItem) -> LoadedImage | Failure | Deferred:
        fetched = self._fetch(item)
        return self._decode(fetched) if isinstance(fetched, Fetched) else fetched

    def _fetch(self, item: SourceItem) -> Fetched | Failure | Deferred:
        try:
            data = fetch(item, self.storage_options)  # transient failures already retried
        except Exception as exc:  # any storage error: record it (if it is the item's), keep the job going
            if is_transient(exc):
                return Deferred(item.key)
            return Failure(item.key, "fetch", hide_credentials(failure_reason(exc), item.url))
        return Fetched(item, data, sha256_hex(data))

    def _decode(self, fetched: Fetched) -> LoadedImage | Failure:
        try:
            picture = load_picture(fetched.data, self.max_pixels)
        except Exception as exc:
            return Failure(fetched.item.key, "load", str(exc))
        return LoadedImage(fetched.item, picture, fetched.data, fetched.sha256)


def embed_codec_weights(archive: Location, codec: str, params: dict) -> EmbeddedModel:
    """The codec's weights copied into the archive's models/ folder (run as a Ray task, beside the actors)."""
    return embed_weights(archive, create_codec(codec, params))


SHORTEST_TAIL_SHARD = 32  # items: below this, a shard's fixed costs (a task, a file, a commit) start to show


def cut_into_shards(items: list[SourceItem], actors: int, shard_size: int) -> Iterator[list[SourceItem]]:
    """`items` in consecutive shards of at most `shard_size`, shorter towards the end, so the actors finish together.

    Shards are cut in rounds of one per actor, each round when `run_on_pool` asks for it, of an equal part
    of what is left for every place in the actors' queues: while much is left, shards are `shard_size`
    long; then they halve each round (never below SHORTEST_TAIL_SHARD), so that no actor sits idle at the
    end while another works through a whole shard (with 512 jpeg images a shard, up to 6 s of one core).
    A round that would leave less than a round of SHORTEST_TAIL_SHARD shares what is left equally: a job
    smaller than a shard per actor gives each actor one equal part.
    """
    start = 0
    while start < len(items):
        left = len(items) - start
        size = min(shard_size, max(SHORTEST_TAIL_SHARD, -(-left // (actors * IN_FLIGHT_PER_ACTOR))))
        if left - actors * size < actors * SHORTEST_TAIL_SHARD:  # this round and a few: one round
            size = min(shard_size, -(-left // actors))
        for _ in range(actors):
            if start < len(items):
                yield items[start : start + size]
                start += size


def run_encode(
    src: str,
    archive_url: str,
    options: EncodeOptions,
    storage_options: dict | None = None,
    address: str | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> EncodeSummary:
    """Encode every image under `src` not yet in the archive; returns when all are committed.

    The job holds the archive's writer lease from before it lists `src` or starts Ray until it has
    finished: a second encode into the same archive is refused at once, naming this one.
    """
    started = time.perf_counter()
    params = check_encode(src, archive_url, options.codec, options.params, options.preset, storage_options)
    archive = Location(archive_url, storage_options, follow_links=False)  # checked: fails before Ray starts
    encoded = failed = deferred = source_bytes = bitstream_bytes = 0
    workers: dict[tuple[str, int], dict] = {}
    with ExitStack() as held:
        lease = held.enter_context(WriterLease(archive))  # a second writer is refused here, before listing or Ray
        listing = list_source(src, storage_options)
        connect(address)
        writer = ArchiveWriter(
            archive, ray.get(ray.remote(codec_spec).remote(options.codec, params)), without_credentials(src), lease
        )
        spec = writer.manifest.codec  # the spec table's entry: shards refer to its id
        listing = listing.beside(writer.done)
        writer.record_refusals(listing.refused)
        if options.embed_model and spec.fingerprint and not writer.manifest.embedded_model(spec.fingerprint):
            writer.add_model(ray.get(ray.remote(embed_codec_weights).remote(archive, options.codec, params)))
        if options.retry_failed:
            todo = [item for item in listing.items if item.key in writer.failures]
        else:
            # A recorded fetch failure may have been the storage's (before fetches were retried, every one
            # was recorded): fetching again is cheap, so a plain run does. The image's own failures
            # (load, encode) wait for --retry-failed.
            settled = {key for key, failure in writer.failures.items() if failure.stage != "fetch"}
            todo = [i for i in listing.items if i.key not in writer.done and i.key not in settled]
        if on_progress:
            on_progress(0, len(todo), 0)
        if todo:
            for result in _encode_on_actors(todo, archive, spec, params, options, storage_options, address, held):
                writer.commit(result.entry, result.keys, result.failures)
                encoded += len(result.keys)
                failed += len(result.failures)
                deferred += len(result.deferred)
                if result.entry:
                    source_bytes += result.entry.source_bytes
                    bitstream_bytes += result.entry.bitstream_bytes
                workers[result.worker["node"], result.worker["pid"]] = result.worker  # pids repeat across nodes
                if on_progress:
                    on_progress(encoded + failed + deferred, len(todo), failed)
        # Items left for the next run keep the archive incomplete: it is not yet what was asked for.
        manifest = writer.manifest if deferred else writer.finish()
    return EncodeSummary(
        archive=archive_url,
        listed=len(listing.items),
        skipped_non_images=listing.skipped_non_images,
        already_done=len(listing.items) - len(todo),
        refused=len(listing.refused),
        encoded=encoded,
        failed=failed,
        seconds=time.perf_counter() - started,
        source_bytes=source_bytes,
        bitstream_bytes=bitstream_bytes,
        workers=list(workers.values()),
        totals=manifest.totals,
        deferred=deferred,
    )


def _encode_on_actors(
    todo: list[SourceItem], archive: Location, spec: CodecSpec, params: dict, options: EncodeOptions,
    storage_options: dict | None, address: str | None, held: ExitStack,
) -> Iterator[ShardResult]:
    """Encode `todo` in shards on a pool of EncodeWorkers (alive as long as `held`), yielding each shard's
    result as it comes. Each item could be a shard of its own: no more actors than items."""
    # An encoder that runs no network (hfd's AVIF base, the classical codecs) takes no GPU.
    gpus = codec_class(options.codec).encoder_needs(params).gpu
    shape = pool_shape(options.actors, gpus, work=len(todo))
    spare_cores = ray.cluster_resources().get("CPU", 0) > shape.actors * shape.cpus_per_actor
    worker_args = (spec, params, storage_options, options.max_pixels, options.fetch_threads, spare_cores)
    actors = held.enter_context(
        actor_pool(EncodeWorker, *worker_args, actors=options.actors, address=address, gpus=gpus, work=len(todo))
    )
    shards = cut_into_shards(todo, len(actors), options.shard_size)
    yield from run_on_pool(actors, shards, lambda actor, items: actor.encode_shard.remote(archive, items, options.batch_size))
