import struct
import zlib

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


# ---------------------------------------------------------------- compact framing (streams inside archives)

SPEC = HEADER.spec


def test_compact_round_trip_gives_back_the_exact_full_stream():
    full = container.pack(HEADER, b"payload bytes")
    compact = container.compact(full, 7, SPEC)
    assert container.expand(compact, {7: SPEC}) == full
    assert container.expand(full, {}) == full  # full streams (old archives) pass through as they are


def test_compact_framing_costs_at_most_24_bytes():
    for payload in (b"", b"x" * 1000):
        compact = container.compact(container.pack(HEADER, payload), 0xFFFF, SPEC)
        assert len(compact) - len(payload) == container.COMPACT_OVERHEAD <= 24
    ddcm = Header("ddcm", {"steps": 12, "codebook": 256, "tile": 8, "atoms": 1, "coef_bits": 2, "selection": "argmax",
                           "seed": 0, "precision": "fp32"}, b"\x02" * 32, 768, 512)
    assert len(container.pack(ddcm, b"")) - container.COMPACT_OVERHEAD >= 150  # what each archive stream saves


@pytest.mark.parametrize(
    "other",
    [
        container.Spec("jpeg", {"quality": 51}, SPEC.fingerprint),  # other parameters
        container.Spec("jpeg", SPEC.params, b"\x02" * 32),  # other weights
        container.Spec("webp", SPEC.params, SPEC.fingerprint),  # another codec
    ],
)
def test_a_compact_stream_read_with_another_spec_table_is_refused(other):
    compact = container.compact(container.pack(HEADER, b"payload"), 1, SPEC)
    with pytest.raises(BitstreamError, match="CRC mismatch"):
        container.expand(compact, {1: other})


def test_a_compact_stream_naming_an_unlisted_spec_is_refused():
    compact = container.compact(container.pack(HEADER, b"payload"), 3, SPEC)
    with pytest.raises(BitstreamError, match="spec 3, which this archive's spec table does not list"):
        container.expand(compact, {1: SPEC})


def test_every_bit_flip_and_truncation_of_a_compact_stream_is_caught():
    compact = container.compact(container.pack(HEADER, bytes(range(40))), 1, SPEC)
    # Ids one bit away from 1 name other specs: the CRC, which covers the spec, still catches the flip.
    table = {1: SPEC, 0: container.Spec("jpeg", {"quality": 49}), 257: container.Spec("avif", {})}
    for position in range(len(compact)):
        for bit in (0, 7):
            damaged = bytearray(compact)
            damaged[position] ^= 1 << bit
            with pytest.raises(BitstreamError):
                container.expand(bytes(damaged), table)
    for length in range(len(compact)):
        with pytest.raises(BitstreamError):
            container.expand(compact[:length], {1: SPEC})


def test_compacting_checks_the_stream_is_of_the_spec():
    with pytest.raises(BitstreamError, match="spec 1 is webp"):
        container.compact(container.pack(HEADER, b"x"), 1, container.Spec("webp", {}, b""))


def test_a_compact_stream_alone_says_it_needs_its_archive():
    compact = container.compact(container.pack(HEADER, b"x"), 1, SPEC)
    with pytest.raises(BitstreamError, match="compact archive stream.*--stream"):
        container.unpack(compact)


@pytest.mark.parametrize("codec", ["", "\xff", "x" * 300])
def test_a_spec_table_entry_that_cannot_frame_a_stream_is_a_bitstream_error(codec):
    # A hostile manifest's spec table; expanding used to raise ValueError or UnicodeEncodeError (found by the fuzzer).
    spec = container.Spec("jpeg", {"quality": 50})
    stream = container.compact(container.pack(Header("jpeg", {"quality": 50}, width=4, height=4), b"x"), 0, spec)
    with pytest.raises(BitstreamError, match="codec spec 0 cannot frame a stream"):
        container.expand(stream, {0: container.Spec(codec, {"quality": 50})})


@pytest.mark.parametrize(
    "text, reason",
    [(b"[1]", "a JSON list, not an object"), (b"\xff", "not text"), (b"{" * 5000, "not valid JSON"),
     (b'{"quality":NaN}', "NaN is not a number JSON allows")],
)  # fmt: skip
def test_header_parameters_must_be_a_json_object_of_numbers_json_allows(text, reason):
    stream = container.pack(HEADER, b"x")
    codec_end = 6 + stream[5]
    params_end = codec_end + 2 + struct.unpack_from(">H", stream, codec_end)[0]
    body = stream[:codec_end] + struct.pack(">H", len(text)) + text + stream[params_end:-4]
    with pytest.raises(BitstreamError, match=reason):
        container.unpack(body + struct.pack(">I", zlib.crc32(body)))
