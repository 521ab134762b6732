"""The bitstream container every codec's output is wrapped in, in its two framings.

A stream names everything its decoder needs, so an archive can be decoded years later by a tool that
knows nothing else about it, and so that damage or a mismatch is caught before any pixel is produced.

Full framing (standalone; what `Codec.encode` returns):

    offset  size  field
    0       4     magic b"DFAR"
    4       1     format version (FORMAT_VERSION)
    5       1     codec id length n (bytes, ASCII)
    6       n     codec id
    .       2     params length p (big-endian)
    .       p     codec parameters: canonical JSON (UTF-8, sorted keys, no spaces)
    .       1     model fingerprint length f (0 for codecs without weights, 32 for SHA-256)
    .       f     model fingerprint
    .       4     original width  (big-endian uint32)
    .       4     original height (big-endian uint32)
    .       4     payload length L (big-endian uint32)
    .       L     payload: the codec's own bytes
    .       4     CRC-32 (zlib) of every byte above

Compact framing (inside an archive), 19 bytes around the payload:

    0       4     magic b"DFAR"
    4       1     COMPACT | format version of the full stream it stands for (0x81)
    5       2     spec id: an entry of the archive's codec spec table (big-endian uint16)
    7       4     original width
    11      4     original height
    15      L     payload (L: the stream's length − 19)
    15+L    4     CRC-32 of the full stream it stands for

The codec id, parameters and fingerprint — a `Spec`, the same for every stream of one encode — are
listed once in the archive's manifest instead of in every stream (they cost ~190 bytes for ddcm, a fifth
of a 0.02 bpp Kodak stream). Expanding rebuilds the full stream from the spec and checks that its CRC is
the one carried, so the check covers the spec: a stream read with another archive's spec table, for
other weights or with damage fails it. Compacting and expanding are exact inverses: a stream leaves an
archive (`diffarc cat --stream`) byte for byte as the codec wrote it.

The byte layouts are documented for people in docs/FORMAT.md; keep the two in step.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Mapping

from .errors import BitstreamError

MAGIC = b"DFAR"
FORMAT_VERSION = 1
COMPACT = 0x80  # high bit of the version byte: compact framing, expanded with an archive's spec table
COMPACT_FRAMING = struct.Struct(">4sBHII")  # magic, COMPACT | version, spec id, width, height
COMPACT_OVERHEAD = COMPACT_FRAMING.size + 4  # the framing plus the CRC: 19 bytes
MAX_SPEC_ID = 0xFFFF


@dataclass(frozen=True)
class Spec:
    """What every stream of one encode shares: codec, parameters and weights' fingerprint."""

    codec: str
    params: dict = field(default_factory=dict)
    fingerprint: bytes = b""


@dataclass(frozen=True)
class Header:
    codec: str
    params: dict = field(default_factory=dict)
    fingerprint: bytes = b""
    width: int = 0
    height: int = 0

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    @property
    def spec(self) -> Spec:
        return Spec(self.codec, self.params, self.fingerprint)


def pack(header: Header, payload: bytes) -> bytes:
    body = _full_body(header.spec, header.width, header.height, payload)
    return body + struct.pack(">I", zlib.crc32(body))


def _full_body(spec: Spec, width: int, height: int, payload: bytes) -> bytes:
    """A full stream without its CRC."""
    codec = spec.codec.encode("ascii")
    params = canonical_json(spec.params)
    if not 0 < len(codec) < 256:
        raise ValueError(f"codec id must be 1-255 ASCII bytes, got {spec.codec!r}")
    if len(params) >= 1 << 16:
        raise ValueError("codec parameters do not fit the 64 KiB header field")
    if len(spec.fingerprint) >= 256:
        raise ValueError("model fingerprint longer than 255 bytes")
    return b"".join(
        [
            MAGIC,
            struct.pack(">BB", FORMAT_VERSION, len(codec)),
            codec,
            struct.pack(">H", len(params)),
            params,
            struct.pack(">B", len(spec.fingerprint)),
            spec.fingerprint,
            struct.pack(">III", width, height, len(payload)),
            payload,
        ]
    )


def unpack(stream: bytes) -> tuple[Header, bytes]:
    """Parse and check a full stream; raises BitstreamError naming what is wrong."""
    stream = bytes(stream)
    version = _version(stream)
    if version & COMPACT:
        raise BitstreamError(
            "this is a compact archive stream: it needs its archive's codec spec table "
            "(`diffarc cat ARCHIVE KEY --stream` exports it as a standalone stream)"
        )
    reader = _Reader(stream)
    reader.take(5)
    codec = reader.take(reader.uint(1))
    params = reader.take(reader.uint(2))
    fingerprint = reader.take(reader.uint(1))
    width, height, payload_len = reader.uint(4), reader.uint(4), reader.uint(4)
    payload = reader.take(payload_len)
    crc = reader.uint(4)
    if reader.remaining:
        raise BitstreamError(f"{reader.remaining} unexpected bytes after the end of the bitstream")
    if zlib.crc32(stream[:-4]) != crc:
        raise BitstreamError("bitstream is damaged (CRC mismatch)")
    header = Header(codec=_text(codec, "ascii", "codec id"), params=parse_params(params), fingerprint=fingerprint,
                    width=width, height=height)  # fmt: skip
    return header, payload


def parse_params(text: bytes) -> dict:
    """A header's parameters: a JSON object, as `canonical_json` writes it. What no encoder writes (and
    only a forged CRC lets through) is a BitstreamError: NaN or Infinity, nesting, another JSON value."""
    try:
        params = json.loads(_text(text, "utf-8", "parameters"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BitstreamError(f"bitstream header is malformed: its parameters are not valid JSON ({what})") from None
    if not isinstance(params, dict):
        raise BitstreamError(f"bitstream header is malformed: its parameters are a JSON {type(params).__name__}, not an object")
    return params


def _refuse_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a number JSON allows", name, 0)


def _text(data: bytes, encoding: str, what: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise BitstreamError(f"bitstream header is malformed: its {what} is not text ({exc})") from None


def compact(stream: bytes, spec_id: int, spec: Spec) -> bytes:
    """The compact framing of a full stream, whose codec, parameters and fingerprint must be `spec`."""
    header, payload = unpack(stream)
    if header.spec != spec:
        raise BitstreamError(f"stream is {describe(header.spec)}; spec {spec_id} is {describe(spec)}")
    if not 0 <= spec_id <= MAX_SPEC_ID:
        raise ValueError(f"spec id must be 0-{MAX_SPEC_ID}, got {spec_id}")
    framing = COMPACT_FRAMING.pack(MAGIC, COMPACT | FORMAT_VERSION, spec_id, header.width, header.height)
    return framing + payload + bytes(stream)[-4:]


def expand(stream: bytes, specs: Mapping[int, Spec]) -> bytes:
    """The full stream a compact one stands for, checked; a full stream is checked and returned as it is."""
    stream = bytes(stream)
    if not _version(stream) & COMPACT:
        unpack(stream)
        return stream
    return _compact_body(stream, specs)[0] + stream[-4:]


def unpack_any(stream: bytes, specs: Mapping[int, Spec]) -> tuple[Header, bytes]:
    """The header and payload of a stream of either framing, parsed and checked once: a compact stream
    against the entry of `specs` it names (its CRC covers the spec), without building the full stream."""
    stream = bytes(stream)
    if not _version(stream) & COMPACT:
        return unpack(stream)
    _, spec, width, height = _compact_body(stream, specs)
    return Header(spec.codec, spec.params, spec.fingerprint, width, height), stream[COMPACT_FRAMING.size : -4]


def _compact_body(stream: bytes, specs: Mapping[int, Spec]) -> tuple[bytes, Spec, int, int]:
    """(the full stream but its CRC, the spec, width, height) of a compact stream whose CRC matches."""
    if len(stream) < COMPACT_OVERHEAD:
        raise BitstreamError(f"compact bitstream is truncated ({len(stream)} bytes; needs at least {COMPACT_OVERHEAD})")
    _, _, spec_id, width, height = COMPACT_FRAMING.unpack_from(stream)
    if spec_id not in specs:
        raise BitstreamError(
            f"compact stream refers to codec spec {spec_id}, which this archive's spec table does not list "
            f"(it lists {sorted(specs) or 'none'})"
        )
    try:
        body = _full_body(specs[spec_id], width, height, stream[COMPACT_FRAMING.size : -4])
    except (ValueError, TypeError, RecursionError) as exc:  # a spec table no encoder writes (a hostile manifest)
        raise BitstreamError(f"codec spec {spec_id} cannot frame a stream: {exc}") from None
    if struct.pack(">I", zlib.crc32(body)) != stream[-4:]:
        raise BitstreamError(
            f"compact stream does not match codec spec {spec_id} ({describe(specs[spec_id])}): it is damaged "
            "or was written for another spec or other weights (CRC mismatch)"
        )
    return body, specs[spec_id], width, height


def describe(spec: Spec) -> str:
    weights = f", weights {spec.fingerprint.hex()[:12]}…" if spec.fingerprint else ""
    return f"{spec.codec} {canonical_json(spec.params).decode()}{weights}"


def canonical_json(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _version(stream: bytes) -> int:
    """The version byte of a stream of either framing, after checking the magic and the version."""
    if len(stream) < 4 or stream[:4] != MAGIC:
        raise BitstreamError("not a diffarc bitstream (bad magic)")
    if len(stream) < 5:
        raise BitstreamError(f"bitstream is truncated ({len(stream)} bytes)")
    version = stream[4] & ~COMPACT
    if version > FORMAT_VERSION:
        raise BitstreamError(
            f"bitstream format version {version} is newer than this diffarc reads ({FORMAT_VERSION}); upgrade diffarc"
        )
    if version < 1:
        raise BitstreamError(f"bitstream format version {version} is not a valid version")
    return stream[4]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise BitstreamError(
                f"bitstream is truncated ({len(self.data)} bytes; needs at least {self.pos + n + 4})"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")
