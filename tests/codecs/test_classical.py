import numpy as np
import pytest

from diffarc.codecs.container import unpack
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
