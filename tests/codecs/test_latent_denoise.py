"""latent-denoise on tiny diffusers models saved by the test, with predictors saved beside them."""

import dataclasses
import struct

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.latent_denoise.codec import CODED, PREDICTORS_FOLDER, denoise, start_timestep
from diffarc.codecs.latent_denoise.nets import LatentDenoisePredictors
from diffarc.codecs.parts.colour import COLOUR_BYTES, apply_colour
from diffarc.codecs.parts.latent_codecs import MeanScaleHyperpriorLatentCodec
from diffarc.codecs.parts.denoisers import DiffusionDenoiser
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.parts.latents import decode_latents, encode_latents, images_to_tensor, tensor_to_images
from diffarc.codecs.errors import ModelError
from diffarc.codecs.registry import create_codec, open_codec

from ..conftest import decode_in_new_process, LPIPS_WEIGHTS, photo_like, save_tiny_ldm

IMAGES = [photo_like(40, 56, 1), photo_like(17, 9, 2), photo_like(1, 100, 3), photo_like(64, 48, 4)]


def save_predictors(folder, seed=0):
    torch.manual_seed(seed)
    predictors = LatentDenoisePredictors(latent_channels=4, hidden=8, hyper_channels=2, mixtures=2, max_timestep=300)
    with torch.no_grad():  # a t-net that predicts clearly more than 0, so denoising runs
        predictors.t_net[-1].bias.fill_(0.5)
        # A hyper-synthesis whose means and scales vary with ζ, as a trained one's do (it starts constant).
        torch.nn.init.normal_(predictors.hyper_synthesis[-1].weight, std=0.2)
    predictors.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = save_tiny_ldm(tmp_path_factory.mktemp("ldm"))
    save_predictors(folder / PREDICTORS_FOLDER)
    return str(folder)


def side_info(stream: bytes):
    """(t, y's lowest symbol, y's highest symbol) of a stream of 4-channel latents."""
    payload = container.unpack(stream)[1]
    return struct.unpack_from("<H", payload) + struct.unpack_from("<hh", payload, 2 + 4 * 4)


def test_any_size_round_trips_and_the_decoder_rebuilds_the_latent(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "predict"})
    streams = codec.encode(IMAGES)
    decoded = codec.decode(streams)
    assert [d.shape for d in decoded] == [i.shape for i in IMAGES]
    t, lo, hi = side_info(streams[0])
    assert 0 < t <= 300 and lo <= hi
    # What the codec reports about a stream (the bench prints it) is what the stream holds.
    z_bytes = CODED.unpack_from(container.unpack(streams[0])[1], 2 + 4 * 4)[2]
    side_bytes = 2 + 4 * 4 + 12 + z_bytes + COLOUR_BYTES
    start = start_timestep(codec.denoiser.alphas_cumprod, t, codec.config["renoise"])
    assert codec.stream_stats(streams[0]) == {"t": t, "denoising_steps": min(8, start), "side_info_bits": 8 * side_bytes}


def test_a_coarser_step_costs_fewer_bits(tiny_model):
    sizes = [len(create_codec("latent-denoise", {"model": tiny_model, "step": s}).encode([IMAGES[3]])[0]) for s in (0.1, 0.5, 2.0)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_timestep_off_is_plain_quantized_latent_decoding(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "off"})
    stream = codec.encode([IMAGES[0]])[0]
    assert side_info(stream)[0] == 0
    denoised = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "predict"}).encode([IMAGES[0]])[0]
    # Same quantized latent either way: only t differs in the stream (and the colour transform fitted to each picture).
    assert container.unpack(stream)[1][2:-COLOUR_BYTES] == container.unpack(denoised)[1][2:-COLOUR_BYTES]
    assert not np.array_equal(codec.decode([stream])[0], codec.decode([denoised])[0])


def test_denoising_runs_the_promised_number_of_unet_calls(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model})
    calls = []
    hook = codec.model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        z = torch.zeros(1, 4, 6, 8)
        for t, steps, expected in [(0, 4, 0), (3, 4, 3), (250, 4, 4), (250, 1, 1)]:
            calls.clear()
            denoise(DiffusionDenoiser.from_model(codec.model), z, t, steps)
            assert len(calls) == expected
    finally:
        hook.remove()


def test_renoise_starts_later_with_seeded_noise_and_streams_without_it_decode_as_they_did(tiny_model):
    params = {"model": tiny_model, "step": 0.5, "timestep": "predict", "steps": 4}
    plain, renoised = (create_codec("latent-denoise", {**params, "renoise": r}) for r in (0.0, 1.0))
    [stream] = renoised.encode([IMAGES[0]])
    header, payload = container.unpack(stream)
    t = side_info(stream)[0]
    table = renoised.denoiser.alphas_cumprod
    start = start_timestep(table, t, 1.0)  # twice t's noise variance (1 − ᾱ)/ᾱ
    noise_variance = lambda step: (1 - float(table[step])) / float(table[step])  # noqa: E731
    assert start > t and noise_variance(start - 1) < 2 * noise_variance(t) < noise_variance(start + 1)
    assert renoised.decode_cost(header, payload).passes == min(4, start) + 1
    again = create_codec("latent-denoise", {**params, "renoise": 1.0})
    assert np.array_equal(again.decode([stream])[0], renoised.decode([stream])[0])  # seeded: the same pixels
    # A stream that names no renoise (written before it) decodes with none, as it did.
    older = dataclasses.replace(header, params={k: v for k, v in header.params.items() if k != "renoise"})
    [no_noise] = plain.encode([IMAGES[0]])
    assert container.unpack(no_noise)[0].params["renoise"] == 0.0
    assert np.array_equal(plain.decode([container.pack(older, container.unpack(no_noise)[1])])[0], plain.decode([no_noise])[0])
    assert not np.array_equal(renoised.decode([container.pack(header, container.unpack(no_noise)[1])])[0], plain.decode([no_noise])[0])


def test_the_encoder_sends_t_scale_times_the_predicted_t(tiny_model):
    """The t-net is trained for the denoised latent's MSE; the encoder sends a multiple of its prediction
    (½ by default: MODELS.md), and search ignores the multiple."""
    params = {"model": tiny_model, "step": 0.5, "timestep": "predict", "colour": "off"}
    full, half, none = (create_codec("latent-denoise", {**params, "t_scale": s}) for s in (1.0, 0.5, 0.0))
    assert half.config["t_scale"] == create_codec("latent-denoise", {"model": tiny_model}).config["t_scale"]
    predicted = side_info(full.encode([IMAGES[0]])[0])[0]
    assert predicted > 10
    assert abs(side_info(half.encode([IMAGES[0]])[0])[0] - predicted / 2) <= 1
    assert side_info(none.encode([IMAGES[0]])[0])[0] == 0
    # A stream made before t_scale decodes as it did: the decoder reads only the sent t.
    [stream] = half.encode([IMAGES[0]])
    header, payload = container.unpack(stream)
    older = dataclasses.replace(header, params={k: v for k, v in header.params.items() if k != "t_scale"})
    assert np.array_equal(half.decode([container.pack(older, payload)])[0], half.decode([stream])[0])


def test_a_stream_decodes_identically_in_another_process(tiny_model, tmp_path):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "predict"})
    stream = codec.encode([IMAGES[3]])[0]
    assert np.array_equal(decode_in_new_process(stream, tmp_path, tiny_model), codec.decode([stream])[0])


@pytest.mark.slow
def test_a_rectified_flow_model_denoises_from_the_sent_t_at_any_size_and_in_another_process(tmp_path):
    folder = save_tiny_ldm(tmp_path / "flow", flow=True)
    save_predictors(folder / PREDICTORS_FOLDER)
    codec = create_codec("latent-denoise", {"model": str(folder), "step": 0.5, "timestep": "predict"})
    streams = codec.encode(IMAGES)
    assert [d.shape for d in codec.decode(streams)] == [i.shape for i in IMAGES]
    assert side_info(streams[3])[0] > 0
    assert np.array_equal(decode_in_new_process(streams[3], tmp_path, str(folder)), codec.decode([streams[3]])[0])


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
    z_bytes = CODED.unpack_from(payload, 2 + 4 * 4)[2]
    too_long = payload[:26] + struct.pack("<I", z_bytes + 10**6) + payload[30:]
    for bad in (payload[:5], payload[:29], payload[:-3], struct.pack("<H", 9999) + payload[2:], too_long):
        with pytest.raises(BitstreamError):
            codec.decode([container.pack(header, bad)])


def test_runs_on_a_stable_diffusion_2_1_architecture(tmp_path):
    folder = save_tiny_ldm(tmp_path / "sd", conditional=True)
    save_predictors(folder / PREDICTORS_FOLDER)
    codec = create_codec("latent-denoise", {"model": str(folder), "step": 0.5, "timestep": "predict"})
    stream = codec.encode([IMAGES[0]])[0]
    assert side_info(stream)[0] > 0
    assert codec.decode([stream])[0].shape == IMAGES[0].shape


@pytest.mark.skipif(not LPIPS_WEIGHTS.is_file(), reason=f"LPIPS weights not found at {LPIPS_WEIGHTS} (../shared is absent)")
def test_search_keeps_the_candidate_with_the_best_lpips(tiny_model, monkeypatch):
    from diffarc.codecs.parts.metrics import LPIPS

    monkeypatch.setenv("DIFFARC_LPIPS_WEIGHTS", str(LPIPS_WEIGHTS))
    image = photo_like(40, 56, 5)
    # Without a colour transform, which the encoder fits after choosing t.
    search = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "search", "colour": "off"})
    chosen = side_info(search.encode([image])[0])[0]
    predicting = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "predict", "t_scale": 1.0})
    predicted = side_info(predicting.encode([image])[0])[0]
    # Decode the same stream with each candidate t written in: the chosen one scores best.
    lpips, scores = LPIPS(LPIPS_WEIGHTS), {}
    header, payload = container.unpack(search.encode([image])[0])
    for t in sorted({min(300, round(predicted * f)) for f in (0.0, 0.5, 1.0, 1.5, 2.0)}):
        forced = container.pack(header, struct.pack("<H", t) + payload[2:])
        scores[t] = lpips(image, search.decode([forced])[0])
    assert chosen == min(scores, key=scores.get)


def test_decoding_matches_the_vae_on_the_dequantized_latent_when_t_is_0(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "timestep": "off", "colour": "off"})
    stream = codec.encode([IMAGES[0]])[0]
    # The stream's parts, read by hand as docs/FORMAT.md describes them: t, γ, the hyperprior's strings.
    payload = container.unpack(stream)[1]
    (t,) = struct.unpack_from("<H", payload)
    shift, scale = np.frombuffer(payload, dtype="<f2", count=8, offset=2).astype(np.float32).reshape(2, 1, 4, 1, 1)
    y_range, z_range, z_bytes = struct.unpack_from("<4s4sI", payload, 18)
    c, h, w = codec.latent_shape(40, 56)  # padded to 48 × 64 px for the UNet
    p = codec.predictors
    hyperprior = MeanScaleHyperpriorLatentCodec(p.hyper_analysis, p.hyper_synthesis, p.z_density, 4)
    strings = [[y_range], [payload[30 + z_bytes :]], [z_range], [payload[30 : 30 + z_bytes]]]
    y_hat = hyperprior.decompress(strings, (h, w), 0.5)["y_hat"]
    assert t == 0 and y_hat.shape == (1, c, h, w)
    latent = y_hat * torch.from_numpy(scale) + torch.from_numpy(shift)
    with torch.no_grad():
        expected = tensor_to_images(decode_latents(codec.model, latent), [(40, 56)])[0]
    assert np.array_equal(codec.decode([stream])[0], expected)


def test_the_hyperprior_codes_within_one_percent_of_its_ideal_code_length(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.25})
    image = photo_like(256, 320, 6)
    stream = codec.encode([image])[0]
    payload = container.unpack(stream)[1]
    coded_bits = 8 * (len(payload) - 30 - COLOUR_BYTES)  # ζ's and y's words
    # The same y the encoder coded: γ-normalised with the fp16 shift and scale the stream carries.
    with torch.no_grad():
        z = encode_latents(codec.model, images_to_tensor([image], (256, 320), "cpu", torch.float32)).float()
    shift, scale = (torch.from_numpy(v.astype(np.float32)).view(1, 4, 1, 1) for v in np.frombuffer(payload, "<f2", 8, 2).reshape(2, 4))
    (ideal,) = codec.latent_codec.ideal_bits((z - shift) / scale, 0.25)
    assert ideal > 2000  # enough symbols that a few words of coder overhead are under 1 %
    assert ideal <= coded_bits <= 1.01 * ideal


def test_the_colour_transform_is_fitted_to_the_decoders_picture_and_applied_last(tiny_model):
    image = photo_like(48, 64, 7)
    params = {"model": tiny_model, "step": 0.5, "timestep": "predict"}
    [plain] = create_codec("latent-denoise", {**params, "colour": "off"}).encode([image])
    codec = create_codec("latent-denoise", params)  # colour=affine: the default
    [corrected] = codec.encode([image])
    latent_part, colour = container.unpack(corrected)[1][:-COLOUR_BYTES], container.unpack(corrected)[1][-COLOUR_BYTES:]
    assert latent_part == container.unpack(plain)[1]  # the same latent and t, then 24 bytes
    before, after = codec.decode([plain])[0], codec.decode([corrected])[0]
    np.testing.assert_array_equal(after, apply_colour(before, colour))
    assert psnr(image, after) > psnr(image, before)  # least squares on this very picture


def test_streams_from_before_the_colour_transform_decode_as_they_did(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5, "colour": "off"})
    [stream] = codec.encode([IMAGES[0]])
    header, payload = container.unpack(stream)
    older = dataclasses.replace(header, params={k: v for k, v in header.params.items() if k != "colour"})
    np.testing.assert_array_equal(codec.decode([container.pack(older, payload)])[0], codec.decode([stream])[0])


def test_a_damaged_colour_transform_is_refused(tiny_model):
    codec = create_codec("latent-denoise", {"model": tiny_model, "step": 0.5})
    header, payload = container.unpack(codec.encode([IMAGES[0]])[0])
    not_a_number = payload[:-2] + np.array([np.nan], dtype="<f2").tobytes()
    with pytest.raises(BitstreamError, match="colour transform holds a non-finite value"):
        codec.decode([container.pack(header, not_a_number)])
    with pytest.raises(BitstreamError, match="too short for its colour transform"):
        codec.decode([container.pack(header, payload[:10])])


# A 16 × 16 stream of builtin:ldm-small written before the hyperprior, by its per-channel entropy model.
OLD_BUILTIN_STREAM = bytes.fromhex(
    "44464152010e6c6174656e742d64656e6f697365003e7b22707265636973696f6e223a2266703332222c2273746570223a312e302c22737465707322"
    "3a342c2274696d6573746570223a2270726564696374227d20823d583da226a3a79f7ccd0f7b22b9ac652d20ffd6d29e84aab1bd99f1b656b7000000"
    "100000001000000072a900feff0200603651b04cb645b812b1d1beaa3de1b50a3c14ba7eb74a3a69377a3985badc3a803f35402e3c30405440ca3f04"
    "41df3d193f0f40b3417b3d103d403dd440db3e13f1c4c76598a732ffac22ed692b262d44340fdf0b0b0058ab39fb3c4eeea3a5c68ea7c01336125a51fd7fadddad6cc2"
)


def test_streams_of_the_retired_predictors_are_refused_saying_why():
    with pytest.raises(BitstreamError, match="per-channel entropy model the mean-scale hyperprior replaced"):
        create_codec("latent-denoise").decode([OLD_BUILTIN_STREAM])
    header = container.unpack(OLD_BUILTIN_STREAM)[0]  # as `diffarc decode` looks for the weights
    with pytest.raises(ModelError, match="no model weights with fingerprint 823d583d.*hyperprior replaced; decode it with"):
        open_codec("latent-denoise", header.params, header.fingerprint)


def test_predictors_of_the_per_channel_entropy_model_are_refused_saying_why(tiny_model, tmp_path):
    folder = save_predictors(tmp_path / "old")
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"hyper_channels": 2,', ""))
    with pytest.raises(ModelError, match="per-channel entropy model, replaced by the mean-scale hyperprior; retrain"):
        create_codec("latent-denoise", {"model": tiny_model, "predictors": str(folder)})
