"""The hfd codec: an AVIF base any decoder opens, a detail decoder on top, deterministic and size-agnostic."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError, ModelError, ParameterError
from diffarc.codecs.hfd import codec as hfd_codec
from diffarc.codecs.hfd.nets import DetailDecoder, noisy_state, sample_residual
from diffarc.codecs.registry import create_codec

from ..conftest import decode_in_new_process, photo_like


def save_detail_decoder(folder, seed: int = 0, objective: str = "flow"):
    """A tiny detail decoder whose output layer is not zero, so that it visibly changes the base."""
    torch.manual_seed(seed)
    decoder = DetailDecoder(widths=(16, 16, 32), objective=objective)
    with torch.no_grad():
        decoder.unet.conv_out.weight.normal_(0, 0.02)
    decoder.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_detail_decoder(tmp_path_factory.mktemp("hfd"))


@pytest.fixture(scope="module")
def image():
    return photo_like(48, 80, seed=3)


def test_the_payload_is_a_plain_avif_file_that_pillow_opens_and_steps_0_is_that_picture(weights, image):
    codec = create_codec("hfd", {"model": weights, "quality": 20})
    [stream] = codec.encode([image])
    _, payload = container.unpack(stream)
    with Image.open(io.BytesIO(payload)) as opened:
        assert opened.format == "AVIF"
        avif = np.asarray(opened.convert("RGB"))
    assert avif.shape == image.shape
    base = create_codec("hfd", {"model": weights, "quality": 20, "steps": 0})
    np.testing.assert_array_equal(base.decode(base.encode([image]))[0], avif)
    # The detail decoder changes the picture (its weights are not zero), and stays close to the base.
    detailed = codec.decode([stream])[0].astype(int)
    assert np.abs(detailed - avif).max() > 0
    assert np.abs(detailed - avif).mean() < 20


def test_the_base_layer_decodes_without_any_weights(weights, image, tmp_path):
    [stream] = create_codec("hfd", {"model": weights}).encode([image])
    header, payload = container.unpack(stream)
    base_only = hfd_codec.HfdCodec.base_decoder(header.params)
    with Image.open(io.BytesIO(payload)) as opened:
        np.testing.assert_array_equal(base_only.decode([stream])[0], np.asarray(opened.convert("RGB")))
    # Streams of any weights are accepted, since no weights are used.
    [other] = create_codec("hfd", {"model": save_detail_decoder(tmp_path / "other", seed=1)}).encode([image])
    assert base_only.decode([other])[0].shape == image.shape


def test_an_avif_base_encoder_writes_the_codecs_streams_without_loading_the_detail_decoder(weights, image):
    codec = create_codec("hfd", {"model": weights, "quality": 20})
    encoder = hfd_codec.HfdCodec.encoder(codec.config, codec.fingerprint)
    assert encoder.weights_folders() == {} and not hasattr(encoder, "decoder")  # nothing loaded
    assert encoder.encode([image]) == codec.encode([image])  # the same bytes, the same fingerprint
    with pytest.raises(ModelError, match="does not decode"):
        encoder.decode(codec.encode([image]))


@pytest.mark.parametrize("scale", [2, 4])
def test_a_scaled_base_is_the_downscaled_avif_codec_upsampled(weights, image, scale):
    hfd = create_codec("hfd", {"model": weights, "quality": 30, "scale": scale, "steps": 0})
    avif = create_codec("avif", {"quality": 30, "scale": scale})
    [hfd_stream], [avif_stream] = hfd.encode([image]), avif.encode([image])
    assert container.unpack(hfd_stream)[1] == container.unpack(avif_stream)[1]
    np.testing.assert_array_equal(hfd.decode([hfd_stream])[0], avif.decode([avif_stream])[0])
    assert len(container.unpack(avif_stream)[1]) < len(container.unpack(create_codec("avif", {"quality": 30}).encode([image])[0])[1])


@pytest.mark.parametrize("shape", [(1, 1), (1, 4000), (4000, 1), (17, 33)])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_any_size_decodes_to_its_own_size(weights, shape, scale):
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    codec = create_codec("hfd", {"model": weights, "scale": scale, "quality": 40})
    assert codec.decode(codec.encode([pixels]))[0].shape == pixels.shape


def test_a_batch_of_mixed_sizes_decodes_each_as_alone(weights):
    images = [photo_like(32, 48, 1), photo_like(50, 20, 2)]
    codec = create_codec("hfd", {"model": weights})
    streams = codec.encode(images)
    together = codec.decode(streams)
    for stream, decoded in zip(streams, together):
        np.testing.assert_array_equal(codec.decode([stream])[0], decoded)


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
    # The tiles start every 48 px: columns at a blend border are no further from the base than the rest.
    assert detail.mean() > 0
    assert detail[:, 40:70].mean() < 2 * detail.mean() + 1


def test_decoding_in_a_fresh_process_gives_the_same_pixels(weights, image, tmp_path):
    codec = create_codec("hfd", {"model": weights, "steps": 3, "seed": 7})
    [stream] = codec.encode([image])
    np.testing.assert_array_equal(decode_in_new_process(stream, tmp_path, model=weights), codec.decode([stream])[0])


def test_other_weights_are_refused(weights, image, tmp_path):
    [stream] = create_codec("hfd", {"model": weights}).encode([image])
    other = create_codec("hfd", {"model": save_detail_decoder(tmp_path / "other", seed=1)})
    with pytest.raises(BitstreamError, match="fingerprint"):
        other.decode([stream])


def test_a_folder_without_a_detail_decoder_is_refused_clearly(tmp_path):
    with pytest.raises(ModelError, match="train hfd"):
        create_codec("hfd", {"model": str(tmp_path)})


def test_a_payload_that_is_not_the_declared_avif_is_a_bitstream_error(weights, image):
    codec = create_codec("hfd", {"model": weights})
    [stream] = codec.encode([image])
    header, payload = container.unpack(stream)
    wrong_size = container.pack(container.Header("hfd", header.params, header.fingerprint, width=81, height=48), payload)
    with pytest.raises(BitstreamError, match="80×48"):
        codec.decode([wrong_size])
    damaged = container.pack(header, payload[: len(payload) // 2])
    with pytest.raises(BitstreamError):
        codec.decode([damaged])


@pytest.mark.parametrize("objective", ["flow", "diffusion"])
def test_one_step_returns_the_first_estimate_and_detail_blends_toward_the_last(tmp_path, objective):
    decoder = DetailDecoder.from_pretrained(save_detail_decoder(tmp_path, objective=objective)).eval()
    base = torch.zeros(1, 3, 32, 32)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q, s = torch.tensor([10.0]), torch.tensor([1.0])
    one = sample_residual(decoder, base, q, s, noise, steps=1, detail=1.0)
    start = noisy_state(decoder, torch.zeros_like(noise), noise, torch.ones(1))
    torch.testing.assert_close(one, decoder(start if objective == "flow" else noise, base, q, s, torch.ones(1)))
    full = sample_residual(decoder, base, q, s, noise, steps=4, detail=1.0)
    half = sample_residual(decoder, base, q, s, noise, steps=4, detail=0.5)
    none = sample_residual(decoder, base, q, s, noise, steps=4, detail=0.0)
    torch.testing.assert_close(none, one)
    torch.testing.assert_close(half, (one + full) / 2)


def test_the_builtin_detail_decoder_restores_more_than_it_invents():
    """The shipped weights: at 1 step and detail 0 (the restoration), a smooth picture's base gets no
    worse, and the default setting stays within 1.5 dB of the base."""
    image = photo_like(128, 192, 5)

    def psnr(params):
        codec = create_codec("hfd", {"quality": 10, **params})
        decoded = codec.decode(codec.encode([image]))[0]
        return 10 * np.log10(255**2 / np.mean((decoded.astype(float) - image) ** 2))

    base = psnr({"steps": 0})
    assert psnr({"steps": 1, "detail": 0.0}) > base - 0.1
    assert psnr({}) > base - 1.5
    # The hyperprior base's built-in decoder (the default model for that base) holds to the same bounds.
    base = psnr({"base": "hyperprior", "steps": 0})
    assert psnr({"base": "hyperprior", "steps": 1, "detail": 0.0}) > base - 0.1
    assert psnr({"base": "hyperprior"}) > base - 1.5


# ---------------------------------------------------------------------- the learned (hyperprior) base


def save_hyperprior_detail_decoder(folder, seed: int = 0):
    """A tiny detail decoder folder for hyperprior bases: the decoder, and its base model in hyperprior/."""
    from diffarc.codecs.hyperprior.nets import HyperpriorModel
    from diffarc.codecs.hyperprior.task import MODEL_CONFIGS

    save_detail_decoder(folder, seed)
    torch.manual_seed(seed)
    HyperpriorModel(**MODEL_CONFIGS["tiny"]).save_pretrained(str(folder / "hyperprior"))
    return str(folder)


@pytest.fixture(scope="module")
def hyperprior_weights(tmp_path_factory):
    return save_hyperprior_detail_decoder(tmp_path_factory.mktemp("hfd-hyperprior"))


def test_a_hyperprior_base_at_steps_0_is_the_hyperprior_codecs_picture(hyperprior_weights, image):
    params = {"model": hyperprior_weights, "base": "hyperprior", "base_step": 1.5}
    codec = create_codec("hfd", {**params, "steps": 0})
    [stream] = codec.encode([image])
    hyperprior = create_codec("hyperprior", {"model": f"{hyperprior_weights}/hyperprior"})
    payload, picture = hyperprior.encode_picture(image, 1.5)
    assert container.unpack(stream)[1] == payload
    np.testing.assert_array_equal(codec.decode([stream])[0], picture)
    detailed = create_codec("hfd", params)
    assert np.abs(detailed.decode(detailed.encode([image]))[0].astype(int) - picture).max() > 0


def test_a_hyperprior_base_decodes_the_same_in_a_fresh_process(hyperprior_weights, image, tmp_path):
    codec = create_codec("hfd", {"model": hyperprior_weights, "base": "hyperprior", "steps": 2, "seed": 3})
    [stream] = codec.encode([image])
    np.testing.assert_array_equal(decode_in_new_process(stream, tmp_path, model=hyperprior_weights), codec.decode([stream])[0])


def test_a_decoder_is_used_only_with_the_base_it_was_trained_on(weights, hyperprior_weights):
    with pytest.raises(ModelError, match="trained on avif bases, not hyperprior"):
        create_codec("hfd", {"model": weights, "base": "hyperprior"})
    with pytest.raises(ModelError, match="trained on hyperprior bases, not avif"):
        create_codec("hfd", {"model": hyperprior_weights})


def test_the_fingerprint_covers_the_hyperprior_model_too(hyperprior_weights, image, tmp_path):
    """Same detail decoder, other base model: the stream is refused."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(hyperprior_weights, other)
    shutil.rmtree(other / "hyperprior")
    save_hyperprior_detail_decoder(tmp_path / "seed1", seed=1)
    shutil.copytree(tmp_path / "seed1" / "hyperprior", other / "hyperprior")
    [stream] = create_codec("hfd", {"model": hyperprior_weights, "base": "hyperprior"}).encode([image])
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec("hfd", {"model": str(other), "base": "hyperprior"}).decode([stream])


def test_a_hyperprior_base_has_no_reduced_scale_and_no_weightless_decode(hyperprior_weights, image):
    with pytest.raises(ParameterError, match="scale must be 1"):
        create_codec("hfd", {"model": hyperprior_weights, "base": "hyperprior", "scale": 2})
    [stream] = create_codec("hfd", {"model": hyperprior_weights, "base": "hyperprior"}).encode([image])
    with pytest.raises(ParameterError, match="hyperprior base needs its model"):
        hfd_codec.HfdCodec.base_decoder(container.unpack(stream)[0].params)
