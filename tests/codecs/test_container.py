import struct

import pytest

from diffarc.codecs import container
from diffarc.codecs.container import Header
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.registry import create_codec

HEADER = Header("jpeg", {"quality": 50}, b"\x01" * 32, width=640, height=480)


def test_round_trip_keeps_every_field():
    header, payload = container.unpack(container.pack(HEADER, b"payload bytes"))
    assert header == HEADER
    assert payload == b"payload bytes"


def test_every_single_bit_flip_is_caught():
    stream = container.pack(HEADER, bytes(range(40)))
    for position in range(len(stream)):
        for bit in (0, 7):
            damaged = bytearray(stream)
            damaged[position] ^= 1 << bit
            with pytest.raises(BitstreamError):
                container.unpack(bytes(damaged))


def test_every_truncation_is_caught():
    stream = container.pack(HEADER, b"x" * 25)
    for length in range(len(stream)):
        with pytest.raises(BitstreamError):
            container.unpack(stream[:length])


def test_truncation_names_the_problem():
    stream = container.pack(HEADER, b"x" * 25)
    with pytest.raises(BitstreamError, match="truncated"):
        container.unpack(stream[:-10])


def test_foreign_bytes_are_not_a_diffarc_stream():
    with pytest.raises(BitstreamError, match="not a diffarc bitstream"):
        container.unpack(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def test_newer_format_version_is_refused_by_name():
    stream = bytearray(container.pack(HEADER, b"abc"))
    stream[4] = container.FORMAT_VERSION + 1
    body = bytes(stream[:-4])
    import zlib

    stream[-4:] = struct.pack(">I", zlib.crc32(body))
    with pytest.raises(BitstreamError, match="newer"):
        container.unpack(bytes(stream))


def test_trailing_bytes_are_refused():
    with pytest.raises(BitstreamError, match="unexpected bytes"):
        container.unpack(container.pack(HEADER, b"abc") + b"\0")


def test_codec_refuses_stream_for_other_weights():
    codec = create_codec("jpeg")
    stream = codec.encode([__import__("numpy").zeros((8, 8, 3), "uint8")])[0]
    header, payload = container.unpack(stream)
    forged = container.pack(Header(header.codec, header.params, b"\xab" * 32, header.width, header.height), payload)
    with pytest.raises(BitstreamError, match="fingerprint abab"):
        codec.decode([forged])


def test_codec_refuses_stream_of_another_codec():
    import numpy as np

    stream = create_codec("webp").encode([np.zeros((8, 8, 3), "uint8")])[0]
    with pytest.raises(BitstreamError, match="written by codec 'webp'"):
        create_codec("jpeg").decode([stream])
