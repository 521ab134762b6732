"""What an archive records: the spec of its streams, its shards, failures and embedded weights, and the
manifest that lists them (kept as the log in `log.py`, each field read back by `fields.py`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from ...codecs import container
from ...codecs.errors import ArchiveError
from .layout import ARCHIVE_FORMAT_VERSION, LOSSY, MODEL_DIR, tool_version

def part_document(start: int, shards: list[ShardEntry]) -> bytes:
    return json.dumps({"format": "diffarc-archive-shards", "format_version": ARCHIVE_FORMAT_VERSION,
                       "start": start, "shards": [asdict(s) for s in shards]}).encode("utf-8")  # fmt: skip


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

    @classmethod
    def of(cls, codec) -> CodecSpec:
        """What an archive records about the codec its streams are written with (ArchiveWriter compares it)."""
        return cls(codec.name, codec.stream_params, codec.fingerprint.hex(), hint=codec.hint)

    @property
    def stream_spec(self) -> container.Spec:
        return container.Spec(self.name, self.params, bytes.fromhex(self.fingerprint))


def legacy_spec(document: dict) -> CodecSpec:
    """The spec of a format-1 manifest's "codec", whose params still held the weights' locations."""
    from ...codecs.errors import UnknownCodecError
    from ...codecs.registry import codec_class

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
    source_format: str = ""  # as Pillow names it ("JPEG", "HEIF", …); "" for rows given as pixels
    source_profile: str = ""  # the embedded ICC profile's description; "" without one
    colour_converted: bool = False  # the pixels were converted from that profile to sRGB
    fidelity: str = LOSSY  # BYTE_EXACT (the source file comes back), PIXEL_EXACT (its picture does) or LOSSY


@dataclass(frozen=True)
class Failure:
    key: str
    stage: str  # list | fetch | load | encode (encode); parse | decode | write | select (decode); verify
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
    largest_pixels: int = 0  # of its largest image; 0 in entries written before it was recorded


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
    # The pixels of the largest image committed (archives written before shard entries recorded it: the
    # largest --max-pixels an encode of it used): no item is larger, so decode and verify refuse streams
    # that claim more. None in archives written before either, or holding no image.
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

    def header(self) -> dict:
        """Every field but the shard list and the counters, as JSON values: what a commit may set."""
        return {
            "specs": [asdict(s) for s in self.specs],
            "source": self.source,
            "complete": self.complete,
            "created": self.created,
            "max_pixels": self.max_pixels,
            "failures": self.failures,
            "models": [asdict(m) for m in self.models],
        }

    def to_json(self, shard_parts: list[dict] | None = None) -> bytes:
        """The whole manifest (before the log, all of manifest.json); with `shard_parts`, a checkpoint of the
        log, which names the parts its shard list is written in instead of listing it."""
        document = {
            "format": "diffarc-archive",
            "format_version": ARCHIVE_FORMAT_VERSION,
            "tool_version": tool_version(),
            **self.header(),
            "updated": self.updated,
            "commits": self.commits,
            "totals": self.totals,
        }
        if shard_parts is None:
            document["shards"] = [asdict(s) for s in self.shards]
        else:
            document["shard_parts"] = shard_parts
        return json.dumps(document).encode("utf-8")
