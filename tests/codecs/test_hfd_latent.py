"""hfd's latent detail decoder: the AVIF base through taef2's latent, a flow there, and taef2's decoder back;
deterministic, any size, bound to its weights, trained by `diffarc train hfd --config latent-*`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.hfd import codec as hfd_codec
from diffarc.codecs.hfd.detail import LATENT_FOLDER, LatentDetail, low_pass
from diffarc.codecs.hfd.nets import DetailDecoder
from diffarc.codecs.hfd.task import CONFIGS
from diffarc.codecs.parts.models import BUILTIN_DIR
from diffarc.codecs.registry import create_codec, open_codec

from ..conftest import decode_in_new_process, photo_like

TAEF2_VAE = BUILTIN_DIR / "taef2" / "vae"


def save_latent_model(folder, seed: int = 0):
    """A model folder as the codec loads it: taef2's vae/ (copied) and a tiny latent network in hfd/ whose
    output layer is not zero, so that it visibly changes the picture."""
    shutil.copytree(TAEF2_VAE, folder / "vae")
    torch.manual_seed(seed)
    network = DetailDecoder(**CONFIGS["latent-tiny"])
    with torch.no_grad():
        network.unet.conv_out.weight.normal_(0, 0.05)
    network.save_pretrained(str(folder / LATENT_FOLDER))
    return str(folder)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_latent_model(tmp_path_factory.mktemp("hfd-latent"))


@pytest.fixture(scope="module")
def image():
    return photo_like(48, 80, seed=3)


def test_steps_0_is_the_avif_picture_and_the_latent_decoder_refines_it(weights, image):
    codec = create_codec("hfd", {"model": weights, "quality": 20})
    assert isinstance(codec.decoder, LatentDetail)
    [stream] = codec.encode([image])
    steps_0 = create_codec("hfd", {"model": weights, "quality": 20, "steps": 0})
    base = steps_0.decode(steps_0.encode([image]))[0]
    avif = create_codec("avif", {"quality": 20})
    np.testing.assert_array_equal(base, avif.decode(avif.encode([image]))[0])
    detailed = codec.decode([stream])[0].astype(int)
    assert np.abs(detailed - base).max() > 0
    assert np.abs(detailed - base).mean() < 20


def test_the_low_frequencies_are_the_bases():
    """What the decoded latent adds is high-pass: a blur of the picture equals a blur of the base, nearly."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(low_pass(torch.full_like(x, 0.3), 2.0), torch.full_like(x, 0.3))  # a flat picture stays
    assert low_pass(x, 2.0).std() < 0.2 * x.std()  # noise is removed


def test_the_base_layer_decodes_without_any_weights(weights, image):
    [stream] = create_codec("hfd", {"model": weights}).encode([image])
    base_only = hfd_codec.HfdCodec.base_decoder(container.unpack(stream)[0].params)
    avif = create_codec("avif", {"quality": 20})
    np.testing.assert_array_equal(base_only.decode([stream])[0], avif.decode(avif.encode([image]))[0])


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), pytest.param((1, 4000), marks=pytest.mark.slow),
                                   pytest.param((4000, 1), marks=pytest.mark.slow)])  # fmt: skip
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_any_size_decodes_to_its_own_size(weights, shape, scale):
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    codec = create_codec("hfd", {"model": weights, "scale": scale, "quality": 30})
    assert codec.decode(codec.encode([pixels]))[0].shape == pixels.shape


def test_decoding_in_a_fresh_process_gives_the_same_pixels(weights, image, tmp_path):
    codec = create_codec("hfd", {"model": weights, "steps": 3, "seed": 7})
    [stream] = codec.encode([image])
    np.testing.assert_array_equal(decode_in_new_process(stream, tmp_path, model=weights), codec.decode([stream])[0])


def test_other_weights_are_refused_and_other_parts_of_the_folder_change_nothing(weights, image, tmp_path):
    [stream] = create_codec("hfd", {"model": weights}).encode([image])
    other = create_codec("hfd", {"model": save_latent_model(tmp_path / "other", seed=1)})
    with pytest.raises(BitstreamError, match="fingerprint"):
        other.decode([stream])
    # A UNet trained into the autoencoder's folder (another codec's part) is not part of these streams' identity.
    from diffusers import UNet2DModel

    shutil.copytree(weights, tmp_path / "with-unet")
    UNet2DModel(in_channels=32, out_channels=32, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(
        str(tmp_path / "with-unet" / "unet")
    )
    same = create_codec("hfd", {"model": str(tmp_path / "with-unet")})
    assert same.fingerprint == create_codec("hfd", {"model": weights}).fingerprint


def test_large_images_decode_in_tiles_without_seams_at_the_tile_borders(weights, monkeypatch):
    monkeypatch.setattr(hfd_codec, "TILE_PIXELS", 64 * 64)
    monkeypatch.setattr(hfd_codec, "TILE", 64)
    monkeypatch.setattr(hfd_codec, "OVERLAP", 16)
    image = photo_like(100, 150, 4)
    codec = create_codec("hfd", {"model": weights, "quality": 20})
    [stream] = codec.encode([image])
    tiled = codec.decode([stream])[0].astype(float)
    base = hfd_codec.HfdCodec.base_decoder(container.unpack(stream)[0].params).decode([stream])[0].astype(float)
    detail = np.abs(tiled - base).mean(axis=2)
    assert detail.mean() > 0
    assert detail[:, 40:70].mean() < 2 * detail.mean() + 1  # tiles start every 48 px


def test_streams_of_the_pixel_decoder_find_it_without_a_hint():
    """A stream written with builtin:hfd-small names only its fingerprint; the lookup still finds those weights."""
    image = photo_like(32, 48, 5)
    old = create_codec("hfd", {"model": "builtin:hfd-small", "quality": 10})
    [stream] = old.encode([image])
    header = container.unpack(stream)[0]
    found = open_codec("hfd", header.params, header.fingerprint)
    np.testing.assert_array_equal(found.decode([stream])[0], old.decode([stream])[0])
