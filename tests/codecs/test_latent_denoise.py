"""latent-denoise on tiny diffusers models saved by the test, with predictors saved beside them."""

import struct

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.parts.entropy import decode_symbols, symbol_tables
from diffarc.codecs.latent_denoise.codec import PREDICTORS_FOLDER, denoise
from diffarc.codecs.latent_denoise.nets import LatentDenoisePredictors
from diffarc.codecs.parts.latents import decode_latents, tensor_to_images
from diffarc.codecs.errors import ModelError
from diffarc.codecs.registry import create_codec

from ..conftest import decode_in_new_process, LPIPS_WEIGHTS, photo_like, save_tiny_ldm

IMAGES = [photo_like(40, 56, 1), photo_like(17, 9, 2), photo_like(1, 100, 3), photo_like(64, 48, 4)]


def save_predictors(folder, seed=0):
    torch.manual_seed(seed)
    predictors = LatentDenoisePredictors(latent_channels=4, hidden=8, mixtures=2, max_timestep=300)
    with torch.no_grad():  # a t-net that predicts clearly more than 0, so denoising runs
        predictors.t_net[-1].bias.fill_(0.5)
    predictors.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = save_tiny_ldm(tmp_path_factory.mktemp("ldm"))
    save_predictors(folder / PREDICTORS_FOLDER)
    return str(folder)


def side_info(stream: bytes):
    payload = container.unpack(stream)[1]
    return struct.unpack_from("<Hhh", payload)


def test_any_size_round_trips_and_the_decoder_rebuilds_the_latent(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5})
    streams = codec.encode(IMAGES)
    decoded = codec.decode(streams)
    assert [d.shape for d in decoded] == [i.shape for i in IMAGES]
    t, lo, hi = side_info(streams[0])
    assert 0 < t <= 300 and lo <= hi
    # What the codec reports about a stream (the bench prints it) is what the stream holds.
    assert codec.stream_stats(streams[0]) == {"t": t, "denoising_steps": min(4, t), "side_info_bits": 8 * (6 + 4 * 4)}


def test_a_coarser_step_costs_fewer_bits(tiny_model):
    sizes = [len(create_codec("latent-denoise", {"model": tiny_model, "step": s}).encode([IMAGES[3]])[0]) for s in (0.1, 0.5, 2.0)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_timestep_off_is_plain_quantized_latent_decoding(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "off"})
    stream = codec.encode([IMAGES[0]])[0]
    assert side_info(stream)[0] == 0
    denoised = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5}).encode([IMAGES[0]])[0]
    # Same quantized latent either way: only t differs in the stream.
    assert container.unpack(stream)[1][2:] == container.unpack(denoised)[1][2:]
    assert not np.array_equal(codec.decode([stream])[0], codec.decode([denoised])[0])


def test_denoising_runs_the_promised_number_of_unet_calls(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model})
    calls = []
    hook = codec.model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        z = torch.zeros(1, 4, 6, 8)
        for t, steps, expected in [(0, 4, 0), (3, 4, 3), (250, 4, 4), (250, 1, 1)]:
            calls.clear()
            denoise(codec.model, z, t, steps, torch.float32)
            assert len(calls) == expected
    finally:
        hook.remove()


def test_a_stream_decodes_identically_in_another_process(tiny_model, tmp_path):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5})
    stream = codec.encode([IMAGES[3]])[0]
    assert np.array_equal(decode_in_new_process(stream, tmp_path, tiny_model), codec.decode([stream])[0])


def test_streams_need_the_same_model_and_predictors(tiny_model, tmp_path):
    stream = create_codec("latent-denoise", {"model": tiny_model}).encode([IMAGES[0]])[0]
    other = str(save_predictors(tmp_path / "other-predictors", seed=1))
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec("latent-denoise", {"model": tiny_model, "predictors": other}).decode([stream])
    with pytest.raises(ModelError, match="train them with `diffarc train latent-denoise"):
        create_codec("latent-denoise", {"model": str(save_tiny_ldm(tmp_path / "bare"))})


def test_damaged_payloads_are_bitstream_errors(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5})
    stream = codec.encode([IMAGES[0]])[0]
    header, payload = container.unpack(stream)
    for bad in (payload[:5], payload[:-3], struct.pack("<Hhh", 9999, 0, 0) + payload[6:]):
        with pytest.raises(BitstreamError):
            codec.decode([container.pack(header, bad)])


def test_runs_on_a_stable_diffusion_2_1_architecture(tmp_path):
    folder = save_tiny_ldm(tmp_path / "sd", conditional=True)
    save_predictors(folder / PREDICTORS_FOLDER)
    codec = create_codec("latent-denoise", {"model": str(folder), "step": 0.5})
    stream = codec.encode([IMAGES[0]])[0]
    assert side_info(stream)[0] > 0
    assert codec.decode([stream])[0].shape == IMAGES[0].shape


@pytest.mark.skipif(not LPIPS_WEIGHTS.is_file(), reason=f"LPIPS weights not found at {LPIPS_WEIGHTS} (../shared is absent)")
def test_search_keeps_the_candidate_with_the_best_lpips(tiny_model, monkeypatch):
    from diffarc.codecs.parts.metrics import LPIPS

    monkeypatch.setenv("DIFFARC_LPIPS_WEIGHTS", str(LPIPS_WEIGHTS))
    image = photo_like(40, 56, 5)
    search = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "search"})
    chosen = side_info(search.encode([image])[0])[0]
    predicted = side_info(create_codec("latent-denoise", {"model": tiny_model, "step": 0.5}).encode([image])[0])[0]
    # Decode the same stream with each candidate t written in: the chosen one scores best.
    lpips, scores = LPIPS(LPIPS_WEIGHTS), {}
    header, payload = container.unpack(search.encode([image])[0])
    for t in sorted({min(300, round(predicted * f)) for f in (0.0, 0.5, 1.0, 1.5, 2.0)}):
        forced = container.pack(header, struct.pack("<H", t) + payload[2:])
        scores[t] = lpips(image, search.decode([forced])[0])
    assert chosen == min(scores, key=scores.get)


def test_decoding_matches_the_vae_on_the_dequantized_latent_when_t_is_0(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "off"})
    stream = codec.encode([IMAGES[0]])[0]
    # The stream's parts, read by hand as docs/FORMAT.md describes them: t, symbol range, γ, coded symbols.
    payload = container.unpack(stream)[1]
    t, lo, hi = struct.unpack_from("<Hhh", payload)
    shift, scale = np.frombuffer(payload, dtype="<f2", count=8, offset=6).astype(np.float32).reshape(2, 1, 4, 1, 1)
    c, h, w = codec.latent_shape(40, 56)  # padded to 48 × 64 px for the UNet
    tables = symbol_tables(codec.predictors.density, 0.5, lo, hi)
    q = decode_symbols(payload[6 + 16 :], tables, lo, h * w).reshape(1, c, h, w)
    latent = torch.from_numpy((q * scale * 0.5 + shift).astype(np.float32))
    with torch.no_grad():
        expected = tensor_to_images(decode_latents(codec.model, latent), [(40, 56)])[0]
    assert np.array_equal(codec.decode([stream])[0], expected)
