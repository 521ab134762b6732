"""The verify job: is the archive whole and decodable, and — against the originals — how good is it?

Integrity — everything decode and cat rely on — on every shard (in Ray actors): the shard's size and
SHA-256 match the manifest, its row count and schema are right, every column is read within a memory
bound, its keys are sorted, unique and run exactly over the manifest's key range (and each row group's
statistics over its own), its columns hold what a writer writes (a 64-hex-digit source SHA-256, a stored
size that is the stream's, positive sizes, the archive's codec), and every stream parses once against
the spec table (container CRC, which covers the spec), was written by the archive's codec with the
archive's weights, and states the width and height its row does. Across shards (driver): no key twice,
every key one decode can write beside the others (`keys.DecodedNames`, the writer's rule), no key both
encoded and failed, the failure table is the file the manifest names, and embedded weights (models/)
match their listed checksums and, recomputed, the fingerprint they are stored under. None of this needs
the weights loaded, so an archive whose only copy of its weights is damaged is still checked, and
reported NOT INTACT.

Decoding: a checksum proves only that the bytes are the ones written, and an archive from elsewhere may
carry streams that parse but do not decode. So the streams of a deterministic sample of items (chosen by
a hash of the key, so the same fraction picks the same items every run; all of them by default) are
decoded, as decode would — header and cost checks first, a batch at a time, each batch compared with
its originals before the next is decoded — and a stream that fails is an item failure, as is a byte-exact
item whose rebuilt source file has not its row's source_sha256 (what decode would refuse to write).
INTACT therefore means the sampled items decode; streams that cannot be decoded for want of the
weights make the archive NOT INTACT, saying why.

Quality, with `against`: each decoded item is compared with its source image, found the way encode found
it (`sources.list_sources`: a folder URL or a list file of URLs) and loaded by the same loader: PSNR,
MS-SSIM and, when weights are found, LPIPS-squeeze. Thresholds apply to every compared item: one item
below a threshold fails the job. A byte- or pixel-exact item must equal its source's picture in every pixel.

While an encode is writing the archive, what it has committed so far is verified, and the manifest not
yet being complete is no problem (`writing` names the writer); once the writer has stopped, it is one.

`max_pixels` (default: the limit the archive was encoded with) bounds both what a stream may declare
and the originals that are loaded.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..codecs.base import check_pixels
from ..codecs.errors import ArchiveError, BitstreamError, DiffarcError
from ..codecs.registry import codec_class
from .archive import FIDELITIES, SHARD_SCHEMA, ArchiveReader, Failure, ShardEntry, check_embedded_weights, current_writer
from .batches import decode_streams, failure_reason
from .cluster import PROGRESS_GROUP, actor_pool, reported_progress, run_on_pool, torch_device
from .images import load_rgb
from .keys import DecodedNames
from .outputs import exactness_problem, original_failures, promises
from .preflight import check_against
from .sources import SourceItem, fetch, list_sources
from .storage import Location


@dataclass(frozen=True)
class Thresholds:
    min_psnr: float | None = None
    min_ms_ssim: float | None = None
    max_lpips: float | None = None

    def violations(self, row: dict) -> list[str]:
        found = []
        if self.min_psnr is not None and row["psnr"] < self.min_psnr:
            found.append(f"PSNR {row['psnr']:.2f} < {self.min_psnr}")
        if self.min_ms_ssim is not None and row["ms_ssim"] < self.min_ms_ssim:
            found.append(f"MS-SSIM {row['ms_ssim']:.4f} < {self.min_ms_ssim}")
        if self.max_lpips is not None and row.get("lpips") is not None and row["lpips"] > self.max_lpips:
            found.append(f"LPIPS {row['lpips']:.4f} > {self.max_lpips}")
        return found


def in_sample(key: str, fraction: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


@dataclass
class ShardReport:
    path: str
    keys: list[str]
    problems: list[str]
    failures: list[Failure]
    quality: list[dict]
    decoded: int = 0


@dataclass
class VerifyReport:
    shards: int = 0
    items: int = 0
    decoded: int = 0  # streams decoded (the sample)
    writing: dict | None = None  # the encode writing the archive now, if any
    problems: list[str] = field(default_factory=list)  # archive-level: the archive is not intact
    failures: list[Failure] = field(default_factory=list)  # item-level: a stream that does not parse/decode
    quality: list[dict] = field(default_factory=list)
    below_threshold: list[dict] = field(default_factory=list)
    lpips_used: bool = False
    seconds: float = 0.0

    @property
    def intact(self) -> bool:
        return not self.problems and not self.failures

    def summary(self) -> dict:
        def stat(name):
            values = [r[name] for r in self.quality if r.get(name) is not None and math.isfinite(r[name])]
            if not values:
                return None
            return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}

        return {
            "intact": self.intact,
            "shards": self.shards,
            "items": self.items,
            "decoded": self.decoded,
            "writing": self.writing,
            "problems": self.problems,
            "failures": [f.__dict__ for f in self.failures],
            "compared": len(self.quality),
            "psnr": stat("psnr"),
            "ms_ssim": stat("ms_ssim"),
            "lpips": stat("lpips"),
            "lpips_used": self.lpips_used,
            "below_threshold": self.below_threshold,
            "seconds": self.seconds,
        }


class VerifyWorker:
    """A Ray actor checking whole shards; the archive's codec (and LPIPS network) is loaded once, and only
    when there are streams to decode."""

    def __init__(
        self, reader: ArchiveReader, lpips_weights: str | None, storage_options: dict | None, max_pixels: int,
        model: str | None = None, trust_hint: bool = False, batch_size: int = 8,
    ):  # fmt: skip
        self.device = torch_device()
        self.reader = reader
        self.model, self.trust_hint = model, trust_hint  # where to look for the weights, if they are needed
        self.codec = None
        self.lpips = None
        if lpips_weights:
            from ..codecs.parts.metrics import LPIPS  # torch: loaded only where quality is measured

            self.lpips = LPIPS(lpips_weights, self.device)
        self.storage_options = storage_options
        self.max_pixels, self.batch_size = max_pixels, batch_size
        self.items = self.failed = 0  # over this actor's life, for `progress`

    @ray.method(concurrency_group=PROGRESS_GROUP)
    def progress(self) -> tuple[int, int]:
        return self.items, self.failed

    def verify_shard(
        self, entry: ShardEntry, originals: dict[str, SourceItem] | None, fraction: float, against: str | None
    ) -> ShardReport:
        """Check one shard and decode its sampled items, a batch at a time; with `originals` (source items
        of its sampled keys), measure each batch's items too before the next is decoded."""
        report = ShardReport(entry.path, [], [], [], [])
        try:
            found = self.reader.streams(entry, columns=tuple(SHARD_SCHEMA.names), check_index=True)
        except ArchiveError as exc:
            report.problems.append(str(exc))
            return report
        table = found.table
        report.problems += column_problems(table, entry, self.reader.manifest.codec.name)
        promised = promises(table)  # what decode writes for each item, by its fidelity (outputs.py)
        report.keys = table.column("key").to_pylist()
        report.failures += found.failures
        sizes = dict(zip(report.keys, zip(table.column("width").to_pylist(), table.column("height").to_pylist())))
        stream_bytes = dict(zip(report.keys, table.column("bitstream_bytes").to_pylist()))
        del found.table, table  # the streams stay, parsed; the columns are no longer needed
        spec = self.reader.manifest.codec
        cls = codec_class(spec.name)
        sample = []
        for key, (header, payload) in zip(found.keys, found.streams):
            try:
                cls.check_header(header, bytes.fromhex(spec.fingerprint))
                check_pixels(header, self.max_pixels)
                if (header.width, header.height) != sizes[key]:
                    raise BitstreamError(f"stream is {header.width}×{header.height}, row says {sizes[key][0]}×{sizes[key][1]}")
            except BitstreamError as exc:
                report.failures.append(Failure(key, "parse", str(exc)))
                continue
            if in_sample(key, fraction):
                sample.append((key, (header, payload)))
        self.items += len(report.keys) - len(sample)
        self.failed += len(report.failures)
        if not sample:
            return report
        try:
            if self.codec is None:
                self.codec = self.reader.codec(self.device, self.model, trust_hint=self.trust_hint)
        except DiffarcError as exc:  # no weights with the archive's fingerprint: nothing proves the streams decode
            report.problems.append(f"streams not decoded: {exc}")
            return report
        for start in range(0, len(sample), self.batch_size):  # a batch's images are let go before the next
            batch = sample[start : start + self.batch_size]
            before = len(report.failures)
            keys, streams = [key for key, _ in batch], [stream for _, stream in batch]
            decoded = decode_streams(self.codec, keys, streams, report.failures, self.max_pixels)
            report.decoded += len(decoded)
            report.failures += original_failures(self.codec, batch, promised, self.max_pixels)
            if originals is not None:
                report.quality += self._compare(decoded, stream_bytes, originals, against, report.failures, promised)
                release_freed_memory()
            self.items += len(batch)
            self.failed += len(report.failures) - before
        return report

    def _compare(
        self, decoded: list, stream_bytes: dict[str, int], originals: dict[str, SourceItem], against: str,
        failures: list[Failure], promised: dict[str, tuple[str, str]],
    ) -> list[dict]:
        # The metrics run on torch, which a check without originals never loads (a classical codec's
        # verify actor starts without it).
        from ..codecs.parts.metrics import LPIPS_MIN_SIDE, ms_ssim, psnr

        quality = []
        for key, pixels in decoded:
            if key not in originals:
                failures.append(Failure(key, "verify", f"source unreadable: {against} has no {key!r}"))
                continue
            try:
                original = load_rgb(fetch(originals[key], self.storage_options), self.max_pixels)
            except Exception as exc:
                failures.append(Failure(key, "verify", f"source unreadable: {failure_reason(exc)}"))
                continue
            if original.shape != pixels.shape:
                failures.append(Failure(key, "verify", f"source is {original.shape}, decoded is {pixels.shape}"))
                continue
            if problem := exactness_problem(promised[key][0], original, pixels):  # byte- or pixel-exact: every pixel
                failures.append(Failure(key, "verify", problem))
            measured = {
                "key": key,
                "bpp": 8 * stream_bytes[key] / (pixels.shape[0] * pixels.shape[1]),
                "psnr": psnr(original, pixels),
                "ms_ssim": ms_ssim(original, pixels),
                "lpips": None,
            }
            if self.lpips is not None and min(original.shape[:2]) >= LPIPS_MIN_SIDE:
                measured["lpips"] = self.lpips(original, pixels)
            quality.append(measured)
        return quality


def release_freed_memory() -> None:
    """Hand the heap memory freed since to the system (glibc's malloc_trim; elsewhere nothing). Comparing
    images of many sizes (MS-SSIM's and LPIPS's buffers at every scale of every size) leaves the heap
    fragmented: freed, but held by the process, so a worker's memory grew with each new image size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def column_problems(table: pa.Table, entry: ShardEntry, codec: str) -> list[str]:
    """What a shard's columns say that no writer of this archive wrote: a source SHA-256 that is not 64 hex
    digits, a stored size that is not its stream's, an image without pixels, a row of another codec."""
    checks = {
        "source_sha256 is not 64 lowercase hex digits": pc.invert(pc.match_substring_regex(table["source_sha256"], "^[0-9a-f]{64}$")),
        "bitstream_bytes is not the stream's size": pc.not_equal(table["bitstream_bytes"], pc.binary_length(table["bitstream"])),
        "width or height is not positive": pc.or_(pc.less(table["width"], 1), pc.less(table["height"], 1)),
        "source_bytes is negative": pc.less(table["source_bytes"], 0),
        f"codec is not {codec}": pc.not_equal(table["codec"], codec),
        "fidelity is not one diffarc writes": pc.invert(pc.is_in(table["fidelity"], pa.array(FIDELITIES))),
    }  # fmt: skip
    problems = []
    for what, wrong in checks.items():
        count = pc.sum(wrong).as_py() or 0
        if count:
            problems.append(f"{entry.path}: {count} rows whose {what}")
    return problems


def run_verify(
    archive_url: str,
    against: str | None = None,
    fraction: float = 1.0,
    thresholds: Thresholds = Thresholds(),
    lpips_weights: str | None = None,
    actors: int | None = None,
    storage_options: dict | None = None,
    address: str | None = None,
    max_pixels: int | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    model: str | None = None,
    trust_hint: bool = False,
    batch_size: int = 8,
) -> VerifyReport:
    started = time.perf_counter()
    # The writer is looked up before the manifest is read: an encode that finishes in between then shows
    # as complete, never as stopped.
    writer = current_writer(Location(archive_url, storage_options, follow_links=False))
    reader = ArchiveReader.open(archive_url, storage_options)  # fails before Ray starts
    if against:
        check_against(against, storage_options)
    manifest = reader.manifest
    report = VerifyReport(shards=len(manifest.shards), lpips_used=bool(lpips_weights and against))
    if not manifest.complete:
        report.writing = writer
        if report.writing is None:
            report.problems.append("manifest is not marked complete: the encode job stopped before it finished")
    report.problems += check_embedded_weights(reader.location, manifest)
    seen: dict[str, str] = {}
    if manifest.shards:
        sampled = _sampled_originals(against, fraction, storage_options) if against else None
        worker_args = (reader, lpips_weights, storage_options, reader.pixel_limit(max_pixels), model, trust_hint, batch_size)
        total = sum(entry.rows for entry in manifest.shards)
        if on_progress:  # the total, known now: starting Ray and the actors takes seconds
            on_progress(0, total, 0)
        with actor_pool(VerifyWorker, *worker_args, actors=actors, address=address, work=len(manifest.shards)) as pool:
            with reported_progress(pool, on_progress, total):
                shards = run_on_pool(
                    pool,
                    manifest.shards,
                    lambda actor, entry: actor.verify_shard.remote(
                        entry, None if sampled is None else sampled.within(entry), fraction, against
                    ),
                )
                for shard in shards:
                    report.problems += shard.problems
                    report.failures += shard.failures
                    report.quality += shard.quality
                    report.decoded += shard.decoded
                    report.items += len(shard.keys)
                    for key in shard.keys:
                        if key in seen:
                            report.problems.append(f"key {key!r} is in two shards: {seen[key]} and {shard.path}")
                        seen[key] = shard.path
        if on_progress:
            on_progress(report.items, total, len(report.failures))
    report.failures += _check_keys(seen)
    report.problems += _check_failure_table(reader, seen)
    report.problems = list(dict.fromkeys(report.problems))  # a problem every shard meets is said once
    for row in report.quality:
        violations = thresholds.violations(row)
        if violations:
            report.below_threshold.append({"key": row["key"], "violations": violations})
    report.seconds = time.perf_counter() - started
    return report


class _SampledOriginals:
    """The source items of the sampled keys, sorted, so that each shard gets those in its key range."""

    def __init__(self, items: list[SourceItem]):
        self.items = sorted(items, key=lambda item: item.key)
        self.keys = [item.key for item in self.items]

    def within(self, entry: ShardEntry) -> dict[str, SourceItem]:
        start = bisect.bisect_left(self.keys, entry.first_key)
        stop = bisect.bisect_right(self.keys, entry.last_key)
        return {item.key: item for item in self.items[start:stop]}


def _sampled_originals(against: str, fraction: float, storage_options: dict | None) -> _SampledOriginals:
    listing = list_sources(against, storage_options)
    return _SampledOriginals([item for item in listing.items if in_sample(item.key, fraction)])


def _check_keys(keys) -> list[Failure]:
    """Keys decode would refuse or could not write beside the others (`keys.DecodedNames`, the writer's rule;
    the first in key order keeps its name)."""
    names = DecodedNames()
    return [Failure(key, "key", problem) for key in sorted(keys) if (problem := names.admit(key))]


def _check_failure_table(reader: ArchiveReader, encoded: dict[str, str]) -> list[str]:
    try:
        entry, table = reader.failure_table()
    except ArchiveError as exc:
        return [str(exc)]
    if entry is None:
        return []
    keys = table.column("key").to_pylist()
    problems = [f"key {k!r} is both encoded ({encoded[k]}) and in the failure table" for k in keys if k in encoded]
    if len(keys) != entry["rows"]:
        problems.append(f"{entry['path']}: {len(keys)} rows, manifest says {entry['rows']}")
    return problems
