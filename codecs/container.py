"""The bitstream container every codec's output is wrapped in.

A stream names everything its decoder needs, so an archive can be decoded years later by a tool that
knows nothing else about it, and so that damage or a mismatch is caught before any pixel is produced.

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

The byte layout is documented for people in docs/FORMAT.md; keep the two in step.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

from .errors import BitstreamError

MAGIC = b"DFAR"
FORMAT_VERSION = 1


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


def pack(header: Header, payload: bytes) -> bytes:
    codec = header.codec.encode("ascii")
    params = canonical_json(header.params)
    if not 0 < len(codec) < 256:
        raise ValueError(f"codec id must be 1-255 ASCII bytes, got {header.codec!r}")
    if len(params) >= 1 << 16:
        raise ValueError("codec parameters do not fit the 64 KiB header field")
    if len(header.fingerprint) >= 256:
        raise ValueError("model fingerprint longer than 255 bytes")
    body = b"".join(
        [
            MAGIC,
            struct.pack(">BB", FORMAT_VERSION, len(codec)),
            codec,
            struct.pack(">H", len(params)),
            params,
            struct.pack(">B", len(header.fingerprint)),
            header.fingerprint,
            struct.pack(">III", header.width, header.height, len(payload)),
            payload,
        ]
    )
    return body + struct.pack(">I", zlib.crc32(body))


def unpack(stream: bytes) -> tuple[Header, bytes]:
    """Parse and check a stream; raises BitstreamError naming what is wrong."""
    stream = bytes(stream)
    if len(stream) < 4 or stream[:4] != MAGIC:
        raise BitstreamError("not a diffarc bitstream (bad magic)")
    reader = _Reader(stream)
    reader.take(4)
    version = reader.uint(1)
    if version > FORMAT_VERSION:
        raise BitstreamError(
            f"bitstream format version {version} is newer than this diffarc reads ({FORMAT_VERSION}); upgrade diffarc"
        )
    if version < 1:
        raise BitstreamError(f"bitstream format version {version} is not a valid version")
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
    try:
        header = Header(
            codec=codec.decode("ascii"),
            params=json.loads(params.decode("utf-8")),
            fingerprint=fingerprint,
            width=width,
            height=height,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # only reachable with a forged CRC
        raise BitstreamError(f"bitstream header is malformed: {exc}") from None
    return header, payload


def canonical_json(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


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
