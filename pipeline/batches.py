"""A job's codec calls, in batches: the one shard encoder, the one stream decoder, and what either does
when a codec call on a batch raises: find the bad item, record it, go on.

Codecs work on batches (a GPU is only busy with several images at once), but one image a codec cannot
handle (too wide for WebP, a payload that does not decode) must cost that image alone, never its batch,
its shard or the job. `encode_items` (`diffarc encode`, `write_archive`) and `decode_streams` (decode,
verify, cat, read_archive) both feed their batches through `map_batch`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from ..codecs import container
from ..codecs.base import Codec
from ..codecs.container import Header
from ..codecs.errors import ArchiveError, BitstreamError
from ..codecs.registry import codec_class, create_codec
from ..codecs.parts.imagefile import Picture
from .archive import BYTE_EXACT, LOSSY, PIXEL_EXACT, CodecSpec, EncodedItem, Failure, ShardEntry, write_shard
from .sources import sha256_hex
from .storage import Location

Item = TypeVar("Item")
Result = TypeVar("Result")


def failure_reason(exc: BaseException) -> str:
    """The reason written to a failure table: the exception's class, so that it can be searched for, and its text."""
    return f"{type(exc).__name__}: {exc}"


def map_batch(
    items: Sequence[Item],
    function: Callable[[list[Item]], list[Result]],
    record_failure: Callable[[Item, str], None],
) -> list[tuple[Item, Result]]:
    """(item, result) pairs of `function` over the batch, in order, leaving out the items that fail.

    The whole batch is tried first. When that raises, each item is tried alone, and an item that fails
    alone is passed to `record_failure` with its reason. A batch of one that fails is recorded at once:
    trying it alone again would fail the same way. One bad item therefore costs one extra pass over
    its batch; the exception never reaches the caller.
    """
    items = list(items)
    if not items:
        return []
    try:
        return list(zip(items, function(items), strict=True))
    except Exception as exc:
        if len(items) == 1:
            record_failure(items[0], failure_reason(exc))
            return []
    done = []
    for item in items:
        try:
            done.append((item, function([item])[0]))
        except Exception as exc:
            record_failure(item, failure_reason(exc))
    return done


def encoded_item(key: str, picture: Picture, data: bytes, sha256: str | None = None) -> tuple[EncodedItem, Any, bytes]:
    """What `encode_items` takes for a loaded file: the row to write (its stream still empty), saying
    what was loaded and how, the pixels to encode, and the file (a lossless codec keeps it)."""
    height, width = picture.pixels.shape[:2]
    item = EncodedItem(key, b"", width, height, len(data), sha256 or sha256_hex(data), picture.format,
                       picture.profile or "", picture.converted)  # fmt: skip
    return item, picture.pixels, data


def encode_items(
    codec: Codec, loaded: Iterable[tuple[EncodedItem, Any, bytes | None]], batch_size: int, archive: Location,
    spec: CodecSpec, failures: list[Failure],
) -> tuple[ShardEntry | None, list[str]]:  # fmt: skip
    """The one shard encoder: encode `loaded` (items whose stream is still empty, each with its H×W×3 uint8
    pixels and its source file, None for rows given as pixels) in batches of `batch_size`, an image the
    codec fails on recorded in `failures` (stage "encode"), and write what was encoded as one shard
    referring to `spec`, the archive's (its id in the spec table). A `lossless` codec is given the source
    files to keep, and each row records the fidelity its stream gives (`fidelity`). Returns the shard's
    entry (None when nothing was encoded) and its keys; the caller's writer commits them
    (`ArchiveWriter.commit`, which applies the key rule)."""
    encoded: list[EncodedItem] = []

    def encode_batch(items: list[tuple[EncodedItem, Any, bytes | None]]) -> list[bytes]:
        originals = [original for _, _, original in items] if codec.lossless else None
        return codec.encode([pixels for _, pixels, _ in items], originals=originals)

    def encode(batch: list[tuple[EncodedItem, Any, bytes | None]]) -> None:
        pairs = map_batch(batch, encode_batch, lambda item, why: failures.append(Failure(item[0].key, "encode", why)))
        encoded.extend(replace(item, bitstream=s, fidelity=fidelity(codec, s)) for (item, _, _), s in pairs)

    batch: list[tuple[EncodedItem, Any, bytes | None]] = []
    for item in loaded:  # an iterator: images are loaded (on threads, ahead) while a batch is encoded
        batch.append(item)
        if len(batch) == batch_size:
            encode(batch)
            batch = []
    encode(batch)
    entry = write_shard(archive, encoded, spec) if encoded else None
    return entry, [item.key for item in encoded]


def fidelity(codec: Codec, stream: bytes) -> str:
    """What a stream the codec has just written gives back: the source file itself, its picture, or less."""
    if not codec.lossless:
        return LOSSY
    return BYTE_EXACT if codec.keeps_original(container.unpack(stream)[1]) else PIXEL_EXACT


def codec_spec(name: str, params: dict) -> CodecSpec:
    """What an archive records about a codec (the weights' fingerprint), from the codec loaded once: jobs run
    this as a Ray task, so that encode actors whose encoder needs no weights never load them."""
    return CodecSpec.of(create_codec(name, params))


def open_encoder(spec: CodecSpec, params: dict, device: str) -> Codec:
    """The codec an encode worker writes `spec`'s streams with (`Codec.encoder`: hfd's AVIF base loads no
    network); ArchiveError when the weights it loaded are not the ones the archive records."""
    codec = codec_class(spec.name).encoder(params, bytes.fromhex(spec.fingerprint), device)
    if codec.fingerprint.hex() != spec.fingerprint:  # the weights changed since the spec was made
        raise ArchiveError(f"the {spec.name} weights on this worker are not the ones the archive records")
    return codec


def decode_streams(
    codec: Codec, keys: list[str], streams: list[tuple[Header, bytes]], failures: list[Failure], max_pixels: int
) -> list[tuple[str, Any]]:  # fmt: skip
    """(key, pixels) for each stream (parsed once, by `ArchiveReader.streams`) that decodes; the rest become
    failures naming the problem. A stream is refused before any decoding when this codec, with its
    weights, cannot decode it within `max_pixels` (`Codec.check`: an archive from elsewhere may be
    hostile); the others are decoded as one batch, which `map_batch` splits to find a stream the codec
    fails on."""
    checked = []
    for key, (header, payload) in zip(keys, streams, strict=True):
        try:
            codec.check(header, payload, max_pixels)
            checked.append((key, (header, payload)))
        except BitstreamError as exc:
            failures.append(Failure(key, "parse", str(exc)))
    with one_decode_thread(codec):
        decoded = map_batch(
            checked,
            lambda batch: codec.decode_checked([stream for _, stream in batch]),
            lambda item, reason: failures.append(Failure(item[0], "decode", reason)),
        )
    return [(key, pixels) for (key, _), pixels in decoded]


@contextmanager
def one_decode_thread(codec: Codec) -> Iterator[None]:
    """Torch on one thread while `codec` decodes on the CPU, as in decode's actors (one core each). A network
    decoder sums in an order that depends on the thread count (±1 in a few values per million), so cat,
    iter_archive and read_archive, which decode here too, give `diffarc decode`'s pixels whatever thread
    count their process has. The process's count is restored afterwards."""
    torch = sys.modules.get("torch")  # a codec that decodes with torch has imported it
    if torch is None or str(codec.device) != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
