"""The corrdiff-latent codec: latent-denoise's sampler corrected by an end-to-end latent restorer. Its knob
runs from the end-to-end decode to latent-denoise's own decode; the encoder's level keeps its PSNR bound;
decodes repeat in a fresh process; a stream is bound to the restorer's weights and latent-denoise's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.corrdiff.correction import LEVELS, CorrectedDenoiser
from diffarc.codecs.corrdiff.latent import RESTORER_FOLDER
from diffarc.codecs.corrdiff.latent_task import quantize
from diffarc.codecs.corrdiff.restorer import LatentRestorer
from diffarc.codecs.errors import BitstreamError, ModelError, ParameterError
from diffarc.codecs.latent_denoise.codec import PREDICTORS_FOLDER
from diffarc.codecs.parts.denoisers import DiffusionDenoiser
from diffarc.codecs.parts.latents import decode_latents, encode_latents, images_to_tensor, tensor_to_images
from diffarc.codecs.parts.colour import COLOUR_BYTES, apply_colour
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.registry import create_codec

from ..conftest import decode_in_new_process, photo_like, save_tiny_ldm
from .test_latent_denoise import save_predictors

PARAMS = {"step": 0.5, "steps": 3, "colour": "off"}  # the knob's end points, then the colour transform on its own


def save_restorer(folder, seed: int = 0) -> None:
    """A tiny restorer whose output layer is not zero, so it visibly moves the latent."""
    torch.manual_seed(seed)
    restorer = LatentRestorer(latent_channels=4, width=8, blocks=1)
    with torch.no_grad():
        restorer.body[-1].weight.normal_(0, 0.3)
    restorer.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_tiny_ldm(tmp_path_factory.mktemp("ldm"))
    save_predictors(folder / PREDICTORS_FOLDER)
    save_restorer(folder / RESTORER_FOLDER)
    return str(folder)


@pytest.fixture(scope="module")
def image():
    return photo_like(40, 56, seed=3)


def decode_at(model: str, stream: bytes, perception: float) -> np.ndarray:
    codec = create_codec("corrdiff-latent", {"model": model})
    codec.override({"perception": perception})
    return codec.decode([stream])[0]


def end_to_end_decode(model: str, stream: bytes) -> np.ndarray:
    """VAE(restorer(ẑ, Δ·s)), computed here from latent-denoise's own reading of the inner payload."""
    header, payload = container.unpack(stream)
    latent = create_codec("latent-denoise", {"model": model, **PARAMS, "timestep": "predict"})
    inner_header = container.Header("latent-denoise", latent.stream_params, b"", width=header.width, height=header.height)
    z_hat, _, channel_step = latent.dequantized(payload[1:], inner_header)
    restorer = LatentRestorer.from_pretrained(f"{model}/{RESTORER_FOLDER}").eval()
    with torch.no_grad():
        pixels = decode_latents(latent.model, restorer(z_hat, channel_step))
    return tensor_to_images(pixels, [(header.height, header.width)])[0]


def test_perception_0_is_the_end_to_end_decode_and_1_latent_denoises_own_decode(model, image):
    [stream] = create_codec("corrdiff-latent", {"model": model, **PARAMS, "max_psnr_loss": 20}).encode([image])
    latent = create_codec("latent-denoise", {"model": model, **PARAMS, "timestep": "predict"})
    [plain_stream] = latent.encode([image])
    assert container.unpack(plain_stream)[1] == container.unpack(stream)[1][1:]  # the same inner payload
    assert container.unpack(stream)[1][0] == 0  # every level is within 20 dB: the most perceptual one
    end_to_end, plain = decode_at(model, stream, 0.0), decode_at(model, stream, 1.0)
    np.testing.assert_array_equal(end_to_end, end_to_end_decode(model, stream))
    np.testing.assert_array_equal(plain, latent.decode([plain_stream])[0])
    middle = decode_at(model, stream, 0.25).astype(int)
    assert np.abs(middle - plain).sum() > 0 and np.abs(middle - end_to_end).sum() > 0 and np.abs(plain - end_to_end).sum() > 0


@pytest.mark.parametrize("max_psnr_loss", [0.0, 20.0])
def test_the_encoder_sends_the_most_perceptual_level_within_its_psnr_bound(model, image, max_psnr_loss):
    codec = create_codec("corrdiff-latent", {"model": model, **PARAMS, "max_psnr_loss": max_psnr_loss})
    [stream] = codec.encode([image])
    level = container.unpack(stream)[1][0]
    assert codec.stream_stats(stream)["chosen_strength"] == level / (LEVELS - 1)
    assert codec.stream_stats(stream)["t"] > 0  # timestep=predict: there is a sampler to correct
    assert psnr(image, codec.decode([stream])[0]) >= psnr(image, decode_at(model, stream, 0.0)) - max_psnr_loss


@pytest.mark.parametrize("estimate", ["unet", "latent"])
def test_without_a_restorer_the_end_to_end_decode_is_the_unets_estimate_or_the_latent_codecs_own(model, image, tmp_path, estimate):
    """A model folder without corrdiff_latent/ (builtin:taef2): perception 0 is VAE(x̂0) of one UNet call at
    the predicted t (`estimate=unet`), or latent-denoise's t = 0 decode VAE(ẑ) (`latent`, and every stream
    made before `estimate` existed); 1 is latent-denoise's decode from the sent t. The stream is bound to
    latent-denoise's weights alone."""
    import dataclasses
    import shutil

    bare = str(shutil.copytree(model, tmp_path / "bare", ignore=shutil.ignore_patterns(RESTORER_FOLDER)))
    codec = create_codec("corrdiff-latent", {"model": bare, **PARAMS, "estimate": estimate, "max_psnr_loss": 20})
    latent = create_codec("latent-denoise", {"model": bare, **PARAMS})
    assert codec.restorer is None and codec.fingerprint == latent.fingerprint
    assert RESTORER_FOLDER not in codec.weights_folders()
    [stream] = codec.encode([image])
    header, payload = container.unpack(stream)
    [plain_stream] = latent.encode([image])
    plain_header, plain_payload = container.unpack(plain_stream)
    assert plain_payload == payload[1:]
    z_hat, t, _ = latent.dequantized(plain_payload, plain_header)
    if estimate == "unet":
        predicted = round(t / latent.config["t_scale"])
        denoiser = DiffusionDenoiser.from_model(latent.model)
        with torch.inference_mode():
            x0 = denoiser(denoiser.alpha_bar(predicted) ** 0.5 * z_hat, predicted)[0]
        assert 0 < t < predicted and not torch.equal(x0, z_hat)
        end_to_end = latent.pixels(x0, latent.config, image.shape[:2])
    else:
        end_to_end = latent.decode([container.pack(plain_header, b"\0\0" + plain_payload[2:])])[0]  # t = 0
    np.testing.assert_array_equal(decode_at(bare, stream, 0.0), end_to_end)
    np.testing.assert_array_equal(decode_at(bare, stream, 1.0), latent.decode([plain_stream])[0])
    unet_calls = latent.decode_cost(plain_header, plain_payload).passes
    assert codec.decode_cost(header, payload).passes == unet_calls + (estimate == "unet")
    if estimate == "latent":  # a stream from before the parameter names none and decodes as `latent` does
        older = dataclasses.replace(header, params={k: v for k, v in header.params.items() if k != "estimate"})
        np.testing.assert_array_equal(decode_at(bare, container.pack(older, payload), 0.0), end_to_end)
    with pytest.raises(BitstreamError, match="fingerprint"):  # a stream of the model with its restorer
        codec.decode(create_codec("corrdiff-latent", {"model": model, **PARAMS}).encode([image]))


def test_the_corrected_denoiser_keeps_the_networks_pair_at_weight_0_and_returns_the_estimate_at_1(model):
    latent = create_codec("latent-denoise", {"model": model})
    denoiser = DiffusionDenoiser.from_model(latent.model)
    x, estimate = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 4, 6, 8)
    x0, eps = denoiser(x, 200)
    same = CorrectedDenoiser(denoiser, estimate, 0.0)(x, 200)
    assert torch.equal(same[0], x0) and torch.equal(same[1], eps)
    corrected_x0, corrected_eps = CorrectedDenoiser(denoiser, estimate, 1.0)(x, 200)
    assert torch.equal(corrected_x0, estimate)
    alpha_bar = denoiser.alpha_bar(200)  # ε̂ is the one that, with x̂0 = ẑ_e, gives back x_t
    torch.testing.assert_close(alpha_bar**0.5 * corrected_x0 + (1 - alpha_bar) ** 0.5 * corrected_eps, x)


def test_decoding_in_a_fresh_process_gives_the_same_pixels(model, image, tmp_path):
    codec = create_codec("corrdiff-latent", {"model": model, **PARAMS})
    [stream] = codec.encode([image])
    np.testing.assert_array_equal(decode_in_new_process(stream, tmp_path, model=model), codec.decode([stream])[0])


def test_the_colour_transform_follows_the_payload_and_is_applied_to_the_picture_at_any_perception(model, image):
    [plain] = create_codec("corrdiff-latent", {"model": model, **PARAMS}).encode([image])
    [corrected] = create_codec("corrdiff-latent", {"model": model, **PARAMS, "colour": "affine"}).encode([image])
    payload = container.unpack(corrected)[1]
    assert payload[:-COLOUR_BYTES] == container.unpack(plain)[1]  # the same level and latent, then 24 bytes
    for perception in (0.0, 0.5, 1.0):
        expected = apply_colour(decode_at(model, plain, perception), payload[-COLOUR_BYTES:])
        np.testing.assert_array_equal(decode_at(model, corrected, perception), expected)


@pytest.mark.parametrize("other", ["restorer", "predictors"])
def test_a_stream_refuses_other_weights_of_the_restorer_or_of_latent_denoise(model, image, tmp_path, other):
    [stream] = create_codec("corrdiff-latent", {"model": model, **PARAMS}).encode([image])
    changed = tmp_path / "other"
    save_restorer(changed, seed=1) if other == "restorer" else save_predictors(changed, seed=1)
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec("corrdiff-latent", {"model": model, other: str(changed)}).decode([stream])


def test_a_payload_without_a_valid_level_is_a_bitstream_error(model, image):
    codec = create_codec("corrdiff-latent", {"model": model, **PARAMS})
    header, payload = container.unpack(codec.encode([image])[0])
    for damaged in (bytes([LEVELS]) + payload[1:], payload[:1], b""):
        with pytest.raises(BitstreamError, match="level"):
            codec.decode([container.pack(header, damaged)])


def test_a_restorer_named_but_absent_names_the_training_command(model, tmp_path):
    with pytest.raises(ModelError, match="train one with `diffarc train corrdiff-latent"):
        create_codec("corrdiff-latent", {"model": model, "restorer": str(tmp_path)})  # a folder without one


def test_search_is_not_a_timestep_it_offers():
    with pytest.raises(ParameterError, match="timestep"):
        create_codec("corrdiff-latent", {"timestep": "search"})


def test_training_quantizes_as_the_codec_does(model):
    """The task's float32 quantizer gives the latent the codec's decoder reads, to float rounding."""
    image = photo_like(64, 96, seed=5)  # whole hyper-latent positions, as the task's crops are
    codec = create_codec("latent-denoise", {"model": model, "step": 0.7})
    [stream] = codec.encode([image])
    header, payload = container.unpack(stream)
    z_hat, _, channel_step = codec.dequantized(payload, header)
    x = images_to_tensor([image], (64, 96), "cpu", torch.float32)
    with torch.no_grad():
        trained_z_hat, trained_step = quantize(codec.predictors, encode_latents(codec.model, x), torch.tensor([0.7]))
    torch.testing.assert_close(trained_step, channel_step)
    assert (trained_z_hat - z_hat).abs().max() < 1e-3


def test_embedded_weights_hold_the_restorer_and_decode_without_the_original_folder(model, image, tmp_path):
    """What `encode --embed-model` copies (models/<fingerprint>/) is a whole model for this codec: decode
    loads it as the archive's decoder does, with every location taken from that one folder."""
    import shutil

    from diffarc.codecs.registry import codec_class
    from diffarc.pipeline.archive import embed_weights
    from diffarc.pipeline.storage import Location

    own = shutil.copytree(model, tmp_path / "own")
    codec = create_codec("corrdiff-latent", {"model": str(own), **PARAMS})
    [stream] = codec.encode([image])
    embedded = embed_weights(Location(str(tmp_path / "arc")), codec)
    assert any(f["path"].startswith(f"{RESTORER_FOLDER}/") for f in embedded.files)
    expected = codec.decode([stream])[0]
    shutil.rmtree(own)
    folder = tmp_path / "arc" / "models" / embedded.fingerprint
    header = container.unpack(stream)[0]
    again = create_codec("corrdiff-latent", {**header.params, **codec_class("corrdiff-latent").locations_in(str(folder))})
    assert again.fingerprint == codec.fingerprint
    np.testing.assert_array_equal(again.decode([stream])[0], expected)


@pytest.mark.parametrize(
    "model, step, margin",
    # Δ 0.9: 0.15 bpp with builtin:ldm-small; Δ 5: taef2's 0.15bpp preset.
    [("builtin:ldm-small", 0.9, 0.1), ("builtin:taef2", 5.0, 0.3)],
)
def test_the_shipped_restorer_decodes_a_photo_closer_than_latent_denoise_and_the_knob_spans_the_two(kodak, model, step, margin):
    """A shipped restorer (trained on ../shared/data/train, never Kodak) on a whole Kodak image (whole: the
    decoder's normalisation makes a crop another picture, latent_task.py): the end-to-end decode is closer
    in PSNR than latent-denoise's own decodes, with t predicted (its default) or not."""
    from PIL import Image

    image = np.asarray(Image.open(kodak / "kodim23.png").convert("RGB"))
    settings = {"model": model, "colour": "off", "step": step}  # colour off: the restorer's own gain
    codec = create_codec("corrdiff-latent", settings)
    assert codec.restorer is not None
    [stream] = codec.encode([image])
    end_to_end, plain = decode_at(model, stream, 0.0), decode_at(model, stream, 1.0)
    assert psnr(image, end_to_end) > psnr(image, plain) + margin
    off = create_codec("latent-denoise", {**settings, "timestep": "off"})  # the same latent, decoded by the VAE alone
    assert psnr(image, end_to_end) > psnr(image, off.decode(off.encode([image]))[0]) + margin
