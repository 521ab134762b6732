"""Hostile streams: each is refused with a BitstreamError before any decoding work, in bounded time and memory.

The first tests are the attack's concrete streams (issue 11, item 2). Their decode runs in a child process
under an address-space cap and a timeout, so that a decoder that trusts the header fails the test (an
abort, a MemoryError, a timeout) instead of taking the test run down. The others are one per kind of
exception that benchmarks/fuzz_streams.py found escaping the decoders.
"""

import dataclasses
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from diffarc.codecs.base import MAX_PASSES, Param
from diffarc.codecs.parts.colour import COLOUR_BYTES
from diffarc.codecs.container import pack, unpack
from diffarc.codecs.errors import BitstreamError, ParameterError
from diffarc.codecs.registry import create_codec

from ..conftest import photo_like

# Decodes the stream in argv[1] as a fresh process would (codec and weights from its header), with the
# address space capped at what was in use plus argv[2] MB; prints what happened as one JSON line.
DECODE_ALONE = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.registry import codec_for_header, read_header
stream = open(sys.argv[1], "rb").read()
codec = codec_for_header(read_header(stream))
in_use = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (in_use + int(sys.argv[2]) * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
started = time.process_time()
try:
    codec.decode([stream])
    result = {"outcome": "decoded"}
except BitstreamError as exc:
    result = {"outcome": "refused", "message": str(exc)}
except MemoryError:
    result = {"outcome": "out of memory"}
result["cpu_seconds"] = time.process_time() - started
print(json.dumps(result))
"""


def decode_alone(stream: bytes, folder, memory_mb: int = 1500, timeout: float = 300) -> dict:
    path = folder / "stream.bin"
    path.write_bytes(stream)
    try:
        run = subprocess.run([sys.executable, "-c", DECODE_ALONE, str(path), str(memory_mb)],
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"decoding a {len(stream)}-byte stream ran over {timeout} s")
    assert run.returncode == 0, f"the decoding process died (exit {run.returncode}): {run.stderr[-1500:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def reheader(stream: bytes, **changes) -> bytes:
    """The stream with header fields (width, height, params) changed and its CRC made valid again."""
    header, payload = unpack(stream)
    return pack(dataclasses.replace(header, **changes), payload)


def with_params_text(stream: bytes, text: bytes) -> bytes:
    """The stream with its parameters field replaced by any bytes (no encoder writes these), CRC made valid."""
    codec_end = 6 + stream[5]
    params_end = codec_end + 2 + struct.unpack_from(">H", stream, codec_end)[0]
    body = stream[:codec_end] + struct.pack(">H", len(text)) + text + stream[params_end:-4]
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.fixture(scope="module")
def jpeg_stream():
    return create_codec("jpeg").encode([photo_like(16, 16, seed=1)])[0]


# ------------------------------------------------------------------ the attack's streams (issue 11, item 2)


def test_a_latent_denoise_stream_claiming_2147483647_squared_pixels_is_refused_not_an_abort(tmp_path):
    # Trusted, the header made the range decoder allocate 2^58 bytes and abort the process.
    stream = create_codec("latent-denoise").encode([photo_like(16, 16, seed=1)])[0]
    hostile = reheader(stream, width=2**31 - 1, height=2**31 - 1)
    assert len(hostile) < 500
    result = decode_alone(hostile, tmp_path)
    assert result["outcome"] == "refused", result
    assert "2147483647×2147483647" in result["message"] and "over the limit of 100000000" in result["message"]
    assert result["cpu_seconds"] < 2


def test_a_ddcm_stream_claiming_4096_squared_in_one_whole_latent_tile_is_refused_at_once(tmp_path):
    # tile=0 codes one codebook entry per step for the whole latent: the payload (19 bytes for 20 steps,
    # then the 24-byte colour transform) does not grow with the image, so 241 bytes could claim 4096² and
    # run for minutes. No encoder can write it: its codebook would hold 256 × 16·512·512 values per step.
    stream = create_codec("ddcm", {"tile": 0}).encode([photo_like(64, 64, seed=1)])[0]
    hostile = reheader(stream, width=4096, height=4096)
    assert len(unpack(hostile)[1]) == 19 + COLOUR_BYTES
    result = decode_alone(hostile, tmp_path)
    assert result["outcome"] == "refused", result
    assert "no ddcm encoder writes this stream" in result["message"] and "use tiles" in result["message"]
    assert result["cpu_seconds"] < 2


def test_the_ddcm_encoder_refuses_what_its_decoder_would(tmp_path):
    # One whole-latent tile on a 2100×2100 image: 256 entries of 32·264·264 values per step, over 2^28.
    codec = create_codec("ddcm", {"tile": 0})
    with pytest.raises(ParameterError, match="draws 256×2230272 codebook values per step"):
        codec.encode([np.zeros((2100, 2100, 3), np.uint8)])


def with_jpeg_frame_size(stream: bytes, width: int, height: int) -> bytes:
    """A jpeg stream whose payload's frame header (SOF0) and container header both declare another size."""
    header, payload = unpack(stream)
    sof = payload.index(b"\xff\xc0")
    payload = payload[: sof + 5] + struct.pack(">HH", height, width) + payload[sof + 9 :]
    return pack(dataclasses.replace(header, width=width, height=height), payload)


def test_a_small_jpeg_payload_claiming_13000_squared_is_refused_before_any_pixel_is_decoded(tmp_path, jpeg_stream):
    hostile = with_jpeg_frame_size(jpeg_stream, 13000, 13000)
    assert len(unpack(hostile)[1]) < 800
    result = decode_alone(hostile, tmp_path)
    assert result["outcome"] == "refused", result
    assert "13000×13000 = 169000000 pixels, over the limit of 100000000" in result["message"]
    # The caller's limit, not Pillow's or a codec constant, decides: under a higher one it is a real image size.
    codec = create_codec("jpeg")
    with pytest.raises(BitstreamError, match="over the limit of 1000"):
        codec.decode([with_jpeg_frame_size(jpeg_stream, 40, 30)], max_pixels=1000)


# ------------------------------------------------------------------ what the fuzzer found


@pytest.mark.parametrize("text", [b"[]", b"null", b"42", b'"quality"', b"true"])
def test_parameters_that_are_not_a_json_object_are_refused(jpeg_stream, text):  # was a TypeError
    with pytest.raises(BitstreamError, match="parameters are a JSON .*, not an object"):
        create_codec("jpeg").decode([with_params_text(jpeg_stream, text)])


def test_deeply_nested_parameters_are_refused(jpeg_stream):  # was a RecursionError
    text = b'{"quality":' + b"[" * 30000 + b"]" * 30000 + b"}"
    with pytest.raises(BitstreamError, match="not valid JSON .nested too deeply"):
        create_codec("jpeg").decode([with_params_text(jpeg_stream, text)])


@pytest.mark.parametrize("value", [b"1e999", b"-1e999", b"NaN", b"Infinity"])
def test_parameters_beyond_any_number_are_refused(jpeg_stream, value):  # 1e999 was an OverflowError
    with pytest.raises(BitstreamError, match="quality|not a number JSON allows"):
        create_codec("jpeg").decode([with_params_text(jpeg_stream, b'{"quality":' + value + b"}")])


def test_a_float_parameter_refuses_values_no_bound_catches():
    # NaN compares false with every bound, so it used to pass as a quantization step.
    step = Param("step", float, 1.0, "", minimum=0.01, maximum=64)
    for value in (float("nan"), float("inf"), "nan", 1e999):
        with pytest.raises(ParameterError, match="needs a float"):
            step.parse(value)
    with pytest.raises(ParameterError, match="needs a int"):
        Param("steps", int, 4, "").parse(float("inf"))


def test_an_avif_payload_libavif_refuses_is_a_bitstream_error():  # was a RuntimeError
    codec = create_codec("avif")
    stream = codec.encode([photo_like(16, 16, seed=1)])[0]
    header, payload = unpack(stream)
    damaged = pack(header, payload[:81] + b"\0" + payload[82:])  # an item offset: "Missing or empty image item"
    with pytest.raises(BitstreamError, match="avif payload does not decode: RuntimeError"):
        codec.decode([damaged])


@pytest.fixture(scope="module")
def ddcm():
    return create_codec("ddcm", {"steps": 3})


@pytest.fixture(scope="module")
def ddcm_stream(ddcm):
    return ddcm.encode([photo_like(48, 64, seed=1)])[0]


def test_a_stream_for_another_precision_is_refused_not_a_dtype_error(ddcm, ddcm_stream):  # was a RuntimeError
    bf16 = reheader(ddcm_stream, params={**unpack(ddcm_stream)[0].params, "precision": "bf16"})
    with pytest.raises(BitstreamError, match="needs ddcm built with precision=bf16; this decoder was built with precision=fp32"):
        ddcm.decode([bf16])


@pytest.mark.parametrize("size", [(23, 0), (0, 16), (0, 0)])
def test_an_image_without_pixels_is_refused(ddcm, ddcm_stream, size):  # was a RuntimeError from the UNet
    with pytest.raises(BitstreamError, match="has no pixels"):
        ddcm.decode([reheader(ddcm_stream, width=size[0], height=size[1])])


def test_settings_no_encoder_accepts_are_refused(ddcm, ddcm_stream):
    params = unpack(ddcm_stream)[0].params
    with pytest.raises(BitstreamError, match="codebook size must be a power of two"):
        ddcm.decode([reheader(ddcm_stream, params={**params, "codebook": 48})])
    with pytest.raises(BitstreamError, match="turbo needs atoms <= codebook"):
        ddcm.decode([reheader(ddcm_stream, params={**params, "selection": "turbo", "atoms": 32, "codebook": 16})])


def test_padding_a_small_image_to_huge_tiles_is_refused_under_the_limit(ddcm, ddcm_stream):  # was a hang
    # tile=128 latent pixels pads a 64×48 image to 1024×1024: a million pixels of UNet and VAE work.
    params = {**unpack(ddcm_stream)[0].params, "tile": 128}
    stream = reheader(ddcm_stream, params=params)
    assert ddcm.decode_cost(unpack(stream)[0], unpack(stream)[1]).pixels == 1024 * 1024
    with pytest.raises(BitstreamError, match="as 1048576 pixels .padding included., over 4× the limit of 16384"):
        ddcm.decode([stream], max_pixels=128 * 128)


def with_payload_for(codec, stream: bytes, **params) -> bytes:
    """The stream with other parameters and a zero payload of the length they need (a valid-looking forgery)."""
    header, _ = unpack(stream)
    header = dataclasses.replace(header, params={**header.params, **params})
    bits = codec.payload_bits(header.height, header.width, codec.resolve_params(header.params))
    return pack(header, bytes(-(-bits // 8) + COLOUR_BYTES))


@pytest.mark.parametrize(
    "params",
    [{"steps": 1000}, {"selection": "mp", "atoms": 512, "tile": 1}, {"selection": "turbo", "atoms": 512, "codebook": 65536}],
)
def test_a_stream_asking_for_more_work_than_the_limit_allows_is_refused(ddcm, ddcm_stream, params):  # were hangs
    stream = with_payload_for(ddcm, ddcm_stream, **params)
    cost = ddcm.decode_cost(*unpack(stream))
    assert cost.passes > MAX_PASSES
    with pytest.raises(BitstreamError, match=f"over the {MAX_PASSES} passes over 16384 pixels the limit allows"):
        ddcm.decode([stream], max_pixels=128 * 128)


def test_a_ddcm_payload_of_the_wrong_length_is_refused_before_sampling(ddcm, ddcm_stream):
    header, payload = unpack(ddcm_stream)
    with pytest.raises(BitstreamError, match="ddcm payload is 3 bytes; its parameters need 2"):
        ddcm.read(pack(header, payload + b"\0"))


@pytest.fixture(scope="module")
def latent_denoise():
    return create_codec("latent-denoise")


def test_a_latent_denoise_stream_claiming_more_symbols_than_its_words_hold_is_refused(latent_denoise):
    stream = latent_denoise.encode([photo_like(16, 16, seed=1)])[0]
    with pytest.raises(BitstreamError, match=r"words cannot hold \d+×\d+ symbols, which need at least \d+ bits"):
        latent_denoise.decode([reheader(stream, width=640, height=480)])
    assert latent_denoise.decode([stream])[0].shape == (16, 16, 3)


def test_latent_denoise_side_information_is_checked_before_decoding(latent_denoise):
    stream = latent_denoise.encode([photo_like(16, 16, seed=1)])[0]
    header, payload = unpack(stream)
    with pytest.raises(BitstreamError, match="t 65535, beyond the predictors' 999"):
        latent_denoise.read(pack(header, b"\xff\xff" + payload[2:]))
    side = 2 + 4 * 16  # t, 16 fp16 shifts and 16 fp16 scales: the last scale ends here
    infinite_scale = payload[: side - 2] + struct.pack("<e", float("inf")) + payload[side:]
    with pytest.raises(BitstreamError, match="non-positive or infinite scale"):
        latent_denoise.read(pack(header, infinite_scale))
