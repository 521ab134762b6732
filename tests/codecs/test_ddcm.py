"""DDCM on tiny diffusers models saved by the test: the path a user with real weights takes."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.parts.colour import COLOUR_BYTES, apply_colour
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.registry import create_codec

from ..conftest import decode_in_new_process, photo_like, save_tiny_ldm


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_ldm(tmp_path_factory.mktemp("ldm")))


IMAGES = [photo_like(40, 56, 1), photo_like(17, 9, 2), photo_like(1, 100, 3), photo_like(40, 56, 4)]


@pytest.mark.parametrize(
    "params",
    [
        {"steps": 6, "codebook": 16, "tile": 2},
        {"steps": 5, "codebook": 8, "tile": 0},
        {"steps": 5, "codebook": 16, "tile": 2, "selection": "mp", "atoms": 3, "coef_bits": 2},
        {"steps": 5, "codebook": 32, "tile": 2, "selection": "turbo", "atoms": 4},
    ],
)
def test_decoder_replays_the_encoders_trajectory(tiny_model, params):
    codec = create_codec("ddcm", {"model": tiny_model, **params})
    streams = codec.encode(IMAGES)
    decoded = codec.decode(streams)
    assert [d.shape for d in decoded] == [i.shape for i in IMAGES]
    for image, stream in zip(IMAGES, streams):
        header, payload = container.unpack(stream)
        assert len(payload) == math.ceil(codec.payload_bits(*image.shape[:2], codec.config) / 8) + COLOUR_BYTES
    # The decoder, replaying a stream alone, ends on the latent the encoder ended on.
    same_size = [IMAGES[0], IMAGES[3]]
    payloads, encoder_final = codec.encode_group(same_size, codec.latent_shape(40, 56, codec.config))
    header = container.unpack(streams[0])[0]
    for payload, final in zip(payloads, encoder_final):  # the choices' bits: the transform comes after
        assert torch.allclose(codec.decode_latent(payload, header), final.unsqueeze(0), atol=1e-3)


def test_the_colour_transform_follows_the_choices_and_streams_from_before_it_decode_as_they_did(tiny_model):
    params = {"model": tiny_model, "steps": 5, "codebook": 16, "tile": 2}
    image = IMAGES[0]
    [plain] = create_codec("ddcm", {**params, "colour": "off"}).encode([image])
    codec = create_codec("ddcm", params)  # colour=affine: the default
    [corrected] = codec.encode([image])
    header, payload = container.unpack(corrected)
    assert payload[:-COLOUR_BYTES] == container.unpack(plain)[1]  # the same choices, then 24 bytes
    before, after = codec.decode([plain])[0], codec.decode([corrected])[0]
    np.testing.assert_array_equal(after, apply_colour(before, payload[-COLOUR_BYTES:]))
    assert psnr(image, after) > psnr(image, before)
    plain_header, plain_payload = container.unpack(plain)
    older = dataclasses.replace(plain_header, params={k: v for k, v in plain_header.params.items() if k != "colour"})
    np.testing.assert_array_equal(codec.decode([container.pack(older, plain_payload)])[0], before)


def test_rate_follows_the_documented_formula(tiny_model):
    codec = create_codec("ddcm", {"model": tiny_model, "steps": 11, "codebook": 64, "tile": 2})
    # 40×56 pads to 48×64 (UNet needs latents divisible by 2, tiles of 2): latent 6×8 → 3×4 tiles
    assert codec.payload_bits(40, 56, codec.config) == 10 * 12 * 6
    turbo = create_codec("ddcm", {"model": tiny_model, "steps": 3, "codebook": 32, "tile": 2, "selection": "turbo", "atoms": 4})
    assert turbo.payload_bits(40, 56, turbo.config) == 2 * 12 * (math.ceil(math.log2(math.comb(32, 4))) + 4)


def test_a_stream_decodes_identically_in_another_process(tiny_model, tmp_path):
    codec = create_codec("ddcm", {"model": tiny_model, "steps": 5, "codebook": 16, "tile": 2})
    stream = codec.encode([IMAGES[0]])[0]
    assert np.array_equal(decode_in_new_process(stream, tmp_path, tiny_model), codec.decode([stream])[0])


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory):
    return str(save_tiny_ldm(tmp_path_factory.mktemp("flow"), flow=True))


@pytest.mark.slow
def test_a_rectified_flow_model_codes_through_the_same_sampler_and_decodes_in_another_process(flow_model, tiny_model, tmp_path):
    codec = create_codec("ddcm", {"model": flow_model, "steps": 5, "codebook": 16, "tile": 2})
    stream = codec.encode([IMAGES[0]])[0]
    payload = container.unpack(stream)[1][:-COLOUR_BYTES]
    final = codec.encode_group([IMAGES[0]], codec.latent_shape(40, 56, codec.config))[1]
    assert torch.allclose(codec.decode_latent(payload, container.unpack(stream)[0]), final, atol=1e-3)
    assert np.array_equal(decode_in_new_process(stream, tmp_path, flow_model), codec.decode([stream])[0])
    # The same UNet weights under a DDIM schedule are other weights to a stream.
    assert codec.fingerprint != create_codec("ddcm", {"model": tiny_model}).fingerprint


def test_stream_for_other_weights_is_refused(tiny_model, tmp_path):
    other = str(save_tiny_ldm(tmp_path / "other", seed=1))
    stream = create_codec("ddcm", {"model": tiny_model, "steps": 3, "codebook": 4}).encode([IMAGES[1]])[0]
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec("ddcm", {"model": other}).decode([stream])


def test_runs_on_a_stable_diffusion_2_1_architecture(tmp_path):
    model = str(save_tiny_ldm(tmp_path / "sd", conditional=True))
    codec = create_codec("ddcm", {"model": model, "steps": 4, "codebook": 16, "tile": 2})
    assert codec.decode(codec.encode([IMAGES[0]]))[0].shape == IMAGES[0].shape


def test_bad_parameters_are_refused(tiny_model):
    with pytest.raises(ValueError, match="power of two"):
        create_codec("ddcm", {"model": tiny_model, "codebook": 100})
    with pytest.raises(ValueError, match="atoms <= codebook"):
        create_codec("ddcm", {"model": tiny_model, "codebook": 4, "selection": "turbo", "atoms": 8})


def test_a_turbo_combination_rank_beyond_c_k_m_is_a_bitstream_error(tiny_model):
    """C(32, 4) = 35960 needs a 16-bit field; a damaged field can hold up to 65535."""
    codec = create_codec("ddcm", {"model": tiny_model, "steps": 3, "codebook": 32, "tile": 2, "selection": "turbo", "atoms": 4})
    header, payload = container.unpack(codec.encode([IMAGES[0]])[0])
    with pytest.raises(BitstreamError, match="out of range"):
        codec.decode([container.pack(header, b"\xff" * len(payload))])
