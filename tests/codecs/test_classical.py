import dataclasses
import struct

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs.base import DEFAULT_MAX_PIXELS
from diffarc.codecs.container import pack, unpack
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.registry import UnknownCodecError, codec_names, create_codec
from diffarc.codecs.parts.metrics import psnr

from ..conftest import photo_like

SIZES = [(1, 1), (1, 4000), (4000, 1), (33, 17), (96, 128)]


@pytest.mark.parametrize("name", ["jpeg", "webp", "avif"])
def test_any_size_round_trips_in_one_batch(name):
    images = [photo_like(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    codec = create_codec(name)
    decoded = codec.decode(codec.encode(images))
    assert [d.shape for d in decoded] == [i.shape for i in images]
    assert all(d.dtype == np.uint8 for d in decoded)
    assert psnr(images[-1], decoded[-1]) > 25


@pytest.mark.parametrize("name", ["jpeg", "webp", "avif"])
def test_higher_quality_costs_bytes_and_buys_fidelity(name):
    image = photo_like(96, 128, seed=3)
    low, high = create_codec(name, preset="low"), create_codec(name, preset="high")
    low_stream, high_stream = low.encode([image])[0], high.encode([image])[0]
    assert len(low_stream) < len(high_stream)
    assert psnr(image, low.decode([low_stream])[0]) < psnr(image, high.decode([high_stream])[0])


def test_decoder_takes_parameters_from_the_stream():
    image = photo_like(40, 40, seed=1)
    stream = create_codec("jpeg", {"quality": "20"}).encode([image])[0]
    assert unpack(stream)[0].params == {"quality": 20}
    assert create_codec("jpeg", {"quality": 90}).decode([stream])[0].shape == image.shape


def test_bad_parameters_are_refused_clearly():
    with pytest.raises(ValueError, match="quality.*<= 95"):
        create_codec("jpeg", {"quality": 200})
    with pytest.raises(ValueError, match="no parameter 'qualty'"):
        create_codec("jpeg", {"qualty": 50})
    with pytest.raises(ValueError, match="no preset 'ultra'"):
        create_codec("webp", preset="ultra")
    with pytest.raises(UnknownCodecError, match="available: .*jpeg"):
        create_codec("jpeg2000")


def test_codecs_refuse_non_rgb_arrays():
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        create_codec("jpeg").encode([np.zeros((8, 8), np.uint8)])


def test_registry_lists_the_baselines():
    assert {"jpeg", "webp", "avif"} <= set(codec_names())


def with_jpeg_size(stream: bytes, width: int, height: int, header_size: tuple[int, int] | None = None) -> bytes:
    """A jpeg stream whose payload's frame header (SOF0) declares another size, repacked with a valid CRC."""
    header, payload = unpack(stream)
    sof = payload.index(b"\xff\xc0")
    payload = payload[: sof + 5] + struct.pack(">HH", height, width) + payload[sof + 9 :]
    width_, height_ = header_size or (header.width, header.height)
    return pack(dataclasses.replace(header, width=width_, height=height_), payload)


def test_a_payload_whose_size_differs_from_its_header_is_refused_before_decoding():
    codec = create_codec("jpeg")
    stream = codec.encode([photo_like(24, 32, seed=2)])[0]
    with pytest.raises(BitstreamError, match="payload is 64×48, the stream header says 32×24"):
        codec.decode([with_jpeg_size(stream, 64, 48)])


def test_a_payload_declaring_too_many_pixels_is_refused_even_without_pillows_guard(monkeypatch):
    # Another library in the process may switch Pillow's guard off; the codec's own bound still holds,
    # also when the stream header agrees with the payload (a hostile archive can write both).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    codec = create_codec("jpeg")
    stream = codec.encode([photo_like(24, 32, seed=2)])[0]
    huge = with_jpeg_size(stream, 40000, 30000, header_size=(40000, 30000))
    assert 40000 * 30000 > DEFAULT_MAX_PIXELS
    with pytest.raises(BitstreamError, match="40000×30000 = 1200000000 pixels, over the limit"):
        codec.decode([huge])


def test_a_payload_pillow_refuses_to_parse_is_a_bitstream_error(monkeypatch):
    # WebP's header parser applies Pillow's limit itself (codecs/parts/imagefile.py); 2500 pixels
    # stands in for an image over twice Pillow's limit.
    codec = create_codec("webp")
    stream = codec.encode([photo_like(50, 50, seed=2)])[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BitstreamError, match="webp payload does not decode: DecompressionBombError: Image size .2500 pixels. exceeds limit"):
        codec.decode([stream])
