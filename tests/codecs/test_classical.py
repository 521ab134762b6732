import dataclasses
import io
import struct

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs.base import DEFAULT_MAX_PIXELS
from diffarc.codecs.container import pack, unpack
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.registry import UnknownCodecError, codec_names, create_codec
from diffarc.codecs.parts.metrics import psnr
from diffarc.pipeline.bench.specs import parse_codec_spec
from diffarc.pipeline.images import load_picture

from ..colour_spaces import ADOBE_RGB

from ..conftest import photo_like

SIZES = [(1, 1), (1, 4000), (4000, 1), (33, 17), (96, 128)]


@pytest.mark.parametrize("name", ["jpeg", "webp", "avif", "jxl"])
def test_any_size_round_trips_in_one_batch(name):
    images = [photo_like(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    codec = create_codec(name)
    decoded = codec.decode(codec.encode(images))
    assert [d.shape for d in decoded] == [i.shape for i in images]
    assert all(d.dtype == np.uint8 for d in decoded)
    assert psnr(images[-1], decoded[-1]) > 25


@pytest.mark.parametrize("name", ["jpeg", "webp", "avif", "jxl"])
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
    assert {"jpeg", "webp", "avif", "jxl"} <= set(codec_names())


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


def jpeg_file(pixels: np.ndarray, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_jxl_distance_is_a_bench_curve():
    curve = parse_codec_spec("jxl:effort=5,distance=0.5..4/3")
    assert [p.params for p in curve.points] == [
        {"distance": d, "effort": 5, "lossless": 0} for d in (0.5, 2.25, 4.0)
    ]
    codec = create_codec("jxl", {"distance": 0.5})
    image = photo_like(40, 56, seed=4)
    assert unpack(codec.encode([image])[0])[1][:2] == b"\xff\x0a"  # the payload is a plain .jxl file


def test_jxl_lossless_gives_the_pixels_back_exactly():
    codec = create_codec("jxl", {"lossless": 1})
    images = [np.random.default_rng(5).integers(0, 256, (33, 17, 3), dtype=np.uint8), photo_like(40, 56, seed=5)]
    assert codec.lossless and not create_codec("jxl").lossless
    streams = codec.encode(images, originals=[None, None])
    assert all(np.array_equal(d, i) for d, i in zip(codec.decode(streams), images))
    assert [codec.original(s) for s in streams] == [None, None]


def rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90° clockwise when shown
    return exif.tobytes()


JPEG_SOURCES = {
    "baseline": {"quality": 90},
    "progressive": {"quality": 90, "progressive": True},
    "4:4:4 with restart markers": {"quality": 75, "subsampling": 0, "restart_marker_blocks": 2},
    "EXIF-rotated": {"quality": 90, "exif": rotated()},
    "Adobe RGB": {"quality": 90, "icc_profile": ADOBE_RGB.icc()},
}


@pytest.mark.parametrize("options", JPEG_SOURCES.values(), ids=JPEG_SOURCES.keys())
def test_jxl_lossless_keeps_a_jpeg_source_byte_for_byte(options):
    jpeg = jpeg_file(photo_like(48, 64, seed=6), **options)
    picture = load_picture(jpeg).pixels  # what the pipeline hands the codec beside the file
    codec = create_codec("jxl", {"lossless": 1})
    stream = codec.encode([picture], originals=[jpeg])[0]
    assert codec.original(stream) == jpeg
    assert np.array_equal(codec.decode([stream])[0], picture)  # and the picture the loader made of it
    assert unpack(stream)[0].params["lossless"] == 1


def test_jxl_lossless_codes_the_pixels_when_a_jpeg_cannot_be_kept():
    image = photo_like(48, 64, seed=7)
    cmyk = jpeg_file(np.dstack([image, image[:, :, :1]]), "CMYK", quality=90)  # libjxl recompresses no CMYK JPEG
    other = jpeg_file(photo_like(48, 64, seed=8), quality=90)  # a file that is not this picture
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    codec = create_codec("jxl", {"lossless": 1})
    pictures = [load_picture(cmyk).pixels, image, image]
    streams = codec.encode(pictures, originals=[cmyk, other, png.getvalue()])
    assert [codec.original(s) for s in streams] == [None, None, None]
    assert all(np.array_equal(d, p) for d, p in zip(codec.decode(streams), pictures))


def test_lossy_codecs_code_the_pixels_whatever_file_they_are_given():
    image = photo_like(48, 64, seed=9)
    jpeg = jpeg_file(image, quality=90)
    for name in ("jxl", "avif"):
        codec = create_codec(name)
        stream = codec.encode([image], originals=[jpeg])[0]
        assert stream == codec.encode([image])[0] and codec.original(stream) is None


def repacked(stream: bytes, payload: bytes, width: int | None = None) -> bytes:
    header, _ = unpack(stream)
    return pack(dataclasses.replace(header, width=width or header.width), payload)


def test_a_jxl_payload_is_refused_before_decoding_unless_it_is_the_headers_size():
    codec = create_codec("jxl", {"lossless": 1})
    image = photo_like(24, 32, seed=10)
    stream = codec.encode([image])[0]
    with pytest.raises(BitstreamError, match="jxl payload is 32×24, the stream header says 33×24"):
        codec.decode([repacked(stream, unpack(stream)[1], width=33)])
    # A codestream declaring 200000×150000 pixels, with nothing after its size: refused from the size.
    bits = (0b10 << 1) | ((150_000 - 1) << 3) | (0b10 << 24) | ((200_000 - 1) << 26)
    with pytest.raises(BitstreamError, match="jxl payload is 200000×150000"):
        codec.decode([repacked(stream, b"\xff\x0a" + bits.to_bytes(6, "little"))])
    with pytest.raises(BitstreamError, match="jxl payload does not decode"):
        codec.decode([repacked(stream, unpack(stream)[1][:-40])])


def test_a_kept_jpeg_that_does_not_reconstruct_is_a_bitstream_error():
    jpeg = jpeg_file(photo_like(24, 32, seed=11), quality=90)
    codec = create_codec("jxl", {"lossless": 1})
    stream = codec.encode([load_picture(jpeg).pixels], originals=[jpeg])[0]
    payload = unpack(stream)[1]
    damaged = repacked(stream, payload[:-10])  # the reconstruction data whole, the codestream cut short
    with pytest.raises(BitstreamError, match="jxl payload"):
        codec.decode([damaged])
    with pytest.raises(BitstreamError, match="jxl payload"):
        codec.original(damaged)
