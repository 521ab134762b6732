"""Codec names → classes: listing, lazy imports, unknown names, parameters, and decoding from a header."""

import subprocess
import sys

import pytest

from diffarc.codecs.classical import JpegCodec, WebpCodec
from diffarc.codecs.errors import UnknownCodecError
from diffarc.codecs.registry import codec_class, codec_for_header, codec_names, create_codec, read_header

from ..conftest import photo_like


def test_every_codec_is_listed_by_name():
    assert codec_names() == ["avif", "corrdiff", "corrdiff-latent", "ddcm", "glc", "hfd", "hyperprior", "jpeg", "jxl", "latent-denoise", "webp"]
    assert codec_class("jpeg") is JpegCodec and codec_class("webp").name == "webp"


def test_codecs_are_imported_only_when_asked_for():
    script = (
        "import sys\n"
        "from diffarc.codecs.registry import codec_names, create_codec\n"
        "codec_names(); create_codec('jpeg')\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'diffarc.codecs.ddcm') if m in sys.modules))\n"
        "from diffarc.codecs.registry import codec_class\n"
        "codec_class('ddcm')\n"
        "print('diffarc.codecs.ddcm' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_an_unknown_codec_names_the_known_ones():
    with pytest.raises(UnknownCodecError, match="unknown codec 'jpegxl'; available: avif, corrdiff, corrdiff-latent, ddcm, glc, hfd, hyperprior, jpeg"):
        codec_class("jpegxl")
    with pytest.raises(UnknownCodecError):
        create_codec("jpegxl")


def test_create_codec_overlays_defaults_preset_and_params():
    assert create_codec("webp").config == {"quality": 75, "method": 4}
    assert create_codec("webp", preset="high").config == {"quality": 85, "method": 4}
    assert create_codec("webp", {"method": "2"}, preset="high").config == {"quality": 85, "method": 2}
    assert create_codec("webp", {"quality": 10}, preset="high").config["quality"] == 10  # explicit wins


def test_codec_for_header_rebuilds_the_encoder_from_its_stream():
    image = photo_like(24, 32, seed=5)
    stream = create_codec("webp", {"quality": 33, "method": 1}).encode([image])[0]
    codec = codec_for_header(read_header(stream))
    assert isinstance(codec, WebpCodec) and codec.config == {"quality": 33, "method": 1}
    assert codec.decode([stream])[0].shape == image.shape
