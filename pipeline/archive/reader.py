"""An archive opened for reading, once: the one way decode, verify, info, cat and read_archive read it.

    reader = ArchiveReader.open(url, storage_options)   reachable, holds a manifest, of a codec diffarc knows
    reader.shards, reader.manifest                      what the driver hands out
    reader.streams(entry, keys)                         a shard's rows with their streams, each parsed and
                                                        checked once (CRC, spec table); those that do not parse
    reader.failure_table()                              the failure table, checked against its SHA-256
    reader.codec(device, model, …)                      the archive's codec, its weights found by fingerprint
    reader.pixel_limit(max_pixels)                      the most pixels a stream may declare

Pickled (sent to an actor), a reader carries its Location and the manifest without the shard list: each
worker is handed the shard entries it reads, so what an actor starts from does not grow with the archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pyarrow as pa

from ...codecs import container
from ...codecs.base import Codec
from ...codecs.errors import ArchiveError, BitstreamError, ParameterError
from ...codecs.parts.imagefile import DEFAULT_MAX_PIXELS
from ..storage import Location, check_reachable
from ..storage_failures import storage_errors
from .log import require_manifest
from .models import local_weights_folder
from .records import Failure, Manifest, ShardEntry
from .shards import read_failure_table, read_failures, read_shard


@dataclass
class ShardStreams:
    """The rows of one shard that were asked for, in key order: the columns read, and for each row whose
    stream parses its (header, payload); rows whose stream does not are failures of stage "parse"."""

    entry: ShardEntry
    table: pa.Table
    keys: list[str] = field(default_factory=list)  # of the rows that parse, with `streams` in step
    streams: list[tuple[container.Header, bytes]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


class ArchiveReader:
    def __init__(self, location: Location, manifest: Manifest):
        self.location = location.confined()
        self.manifest = manifest
        self._specs = {spec.id: spec.stream_spec for spec in manifest.specs}

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, known_codec: bool = True) -> ArchiveReader:
        """The archive at `url`, once it is reachable and holds a manifest (with `known_codec`, of a codec and
        parameters this diffarc can use); otherwise a DiffarcError in one sentence."""
        location = Location(url, storage_options, follow_links=False)
        check_reachable(location, "read the archive")
        with storage_errors("read the archive", location.url):
            manifest = require_manifest(location)
        if not known_codec:
            return cls(location, manifest)
        from ...codecs.registry import codec_class

        try:
            codec_class(manifest.codec.name).resolve_params(manifest.codec.params)
        except ParameterError as exc:  # written by a newer diffarc, or edited by hand
            raise ArchiveError(f"{url} was encoded with settings this diffarc cannot use: {exc}") from None
        return cls(location, manifest)

    def __reduce__(self):
        return (ArchiveReader, (self.location, replace(self.manifest, shards=[])))

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest.shards

    def read(
        self, entry: ShardEntry, columns: list[str] | None = None, keys: list[str] | None = None, whole: bool = False
    ) -> pa.Table:  # fmt: skip
        """Columns of a shard (rows of `keys` only), its size checked, and with `whole` its SHA-256
        (`shards.read_shard`)."""
        return read_shard(self.location, entry, columns, keys, whole=whole)

    def parse(self, stream: bytes) -> tuple[container.Header, bytes]:
        """A shard's stream, parsed and checked once against the spec table (BitstreamError otherwise)."""
        return container.unpack_any(stream, self._specs)

    def streams(
        self, entry: ShardEntry, keys: list[str] | None = None, columns: tuple[str, ...] = ("key", "bitstream"),
        check_index: bool = False,
    ) -> ShardStreams:  # fmt: skip
        """A shard's rows (those of `keys`, or all: then the file is read whole and its SHA-256 checked) and
        their streams, each parsed once against the spec table; ArchiveError when the shard cannot be read."""
        columns = list(dict.fromkeys(["key", "bitstream", *columns]))
        table = read_shard(self.location, entry, columns, keys=keys, whole=keys is None, check_index=check_index)
        found = ShardStreams(entry, table)
        for key, stream in zip(table.column("key").to_pylist(), table.column("bitstream").to_pylist()):
            try:
                found.streams.append(self.parse(stream))
                found.keys.append(key)
            except BitstreamError as exc:
                found.failures.append(Failure(key, "parse", str(exc)))
        return found

    def standalone(self, stream: bytes) -> bytes:
        """The full stream a shard's stream stands for (`cat --stream`), byte for byte the codec's."""
        return container.expand(stream, self._specs)

    def failure_table(self) -> tuple[dict | None, pa.Table | None]:
        """The failure table's manifest entry and rows, checked (`shards.read_failure_table`)."""
        return read_failure_table(self.location, self.manifest)

    def failures(self) -> dict[str, Failure]:
        return read_failures(self.location, self.manifest)

    def pixel_limit(self, max_pixels: int | None = None) -> int:
        """The most pixels a stream of this archive may declare: the caller's, else the archive's own."""
        return max_pixels or self.manifest.max_pixels or DEFAULT_MAX_PIXELS

    def codec(
        self, device: str = "cpu", model: str | None = None, base_only: bool = False, params: dict | None = None,
        trust_hint: bool = False,
    ) -> Codec:  # fmt: skip
        """The archive's codec, with weights that have its fingerprint: from `model` (--model), the archive's
        models/<fingerprint>/, the local model cache, the recorded location (only with `trust_hint`, or when
        it names built-in weights: `registry.open_codec`) or the codec's default, in that order. With
        `base_only`, the decoder of the streams' base layer, which needs no weights (`Codec.base_decoder`).
        `params` (decode --param) set decode-time parameters for every stream (`Codec.override`)."""
        from ...codecs.registry import codec_class, open_codec

        spec = self.manifest.codec
        if base_only:
            codec = codec_class(spec.name).base_decoder(spec.params, device)
        else:
            embedded = self.manifest.embedded_model(spec.fingerprint)
            codec = open_codec(
                spec.name, spec.params, bytes.fromhex(spec.fingerprint), model=model, device=device, hint=spec.hint,
                embedded=local_weights_folder(self.location, embedded) if embedded else None, trust_hint=trust_hint,
            )  # fmt: skip
        codec.override(params or {})
        return codec

    def select(self, keys: list[str] | None = None, prefix: str = "") -> list[tuple[ShardEntry, list[str] | None]]:
        """The shards whose key range can hold the wanted keys (`keys`, or all starting with `prefix`), each
        with the keys to read from it (None: all of them)."""
        selected = []
        for entry in self.manifest.shards:
            if keys is not None:
                wanted = [k for k in keys if entry.first_key <= k <= entry.last_key and k.startswith(prefix)]
                if wanted:
                    selected.append((entry, wanted))
            elif entry.last_key >= prefix and (entry.first_key.startswith(prefix) or entry.first_key <= prefix):
                selected.append((entry, None))
        return selected
