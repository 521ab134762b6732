"""The corrdiff codec: a knob from the end-to-end decode to the plain hfd decode, an encoder-side choice
within its PSNR bound, deterministic decodes, and streams bound to both models' weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.corrdiff.correction import LEVELS, strength
from diffarc.codecs.corrdiff.correction import correction_weight
from diffarc.codecs.corrdiff.nets import EndToEndDecoder
from diffarc.codecs.errors import BitstreamError, ModelError, ParameterError
from diffarc.codecs.hfd.codec import HfdCodec
from diffarc.codecs.parts.latents import tensor_to_images
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.registry import create_codec

from ..conftest import decode_in_new_process, photo_like
from .test_hfd import save_detail_decoder


def save_models(folder, seed: int = 0, detail_seed: int = 0) -> str:
    """A tiny end-to-end decoder in `folder`, with a tiny detail decoder in its detail/; both output
    layers are not zero, so each visibly changes the picture."""
    torch.manual_seed(seed + 100)
    decoder = EndToEndDecoder(widths=(16, 16, 32))
    with torch.no_grad():
        decoder.unet.conv_out.weight.normal_(0, 0.02)
    decoder.save_pretrained(str(folder))
    save_detail_decoder(folder / "detail", seed=detail_seed)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("corrdiff"))


@pytest.fixture(scope="module")
def image():
    return photo_like(48, 80, seed=3)  # multiples of the tiny networks' 16: decoded without padding


PARAMS = {"quality": 20, "scale": 2, "steps": 2}


def end_to_end_decode(models: str, stream: bytes) -> np.ndarray:
    """The end-to-end decoder's picture, computed here from the base payload without the codec."""
    header, payload = container.unpack(stream)
    hfd_header = container.Header("hfd", {"scale": header.params["scale"]}, b"", width=header.width, height=header.height)
    base = HfdCodec.base_decoder({}).base_picture(payload[1:], hfd_header)
    decoder = EndToEndDecoder.from_pretrained(models).eval()
    quality, scale = torch.tensor([float(header.params["quality"])]), torch.tensor([float(header.params["scale"])])
    with torch.no_grad():
        return tensor_to_images((base + decoder(base, quality, scale)).clamp(-1, 1), [(header.height, header.width)])[0]


def decode_at(models: str, stream: bytes, perception: float) -> np.ndarray:
    codec = create_codec("corrdiff", {"model": models})
    codec.override({"perception": perception})
    return codec.decode([stream])[0]


def test_perception_0_is_the_end_to_end_decode_and_1_the_plain_hfd_decode(models, image):
    [stream] = create_codec("corrdiff", {"model": models, **PARAMS, "max_psnr_loss": 20}).encode([image])
    end_to_end = end_to_end_decode(models, stream)
    np.testing.assert_array_equal(decode_at(models, stream, 0.0), end_to_end)
    hfd = create_codec("hfd", {"model": f"{models}/detail", **PARAMS})
    [hfd_stream] = hfd.encode([image])
    assert container.unpack(hfd_stream)[1] == container.unpack(stream)[1][1:]  # the same base payload
    plain = decode_at(models, stream, 1.0)
    np.testing.assert_array_equal(plain, hfd.decode([hfd_stream])[0])
    # The two ends differ, and a point between them (strength ½: the encoder chose 0) is neither.
    assert container.unpack(stream)[1][0] == 0
    middle = decode_at(models, stream, 0.25).astype(int)
    assert np.abs(middle - plain).sum() > 0 and np.abs(middle - end_to_end).sum() > 0 and np.abs(plain - end_to_end).sum() > 0


@pytest.mark.parametrize("max_psnr_loss", [0.0, 0.2, 20.0])
def test_the_encoder_sends_the_most_perceptual_level_within_its_psnr_bound(models, image, max_psnr_loss):
    codec = create_codec("corrdiff", {"model": models, **PARAMS, "max_psnr_loss": max_psnr_loss})
    [stream] = codec.encode([image])
    level = container.unpack(stream)[1][0]
    assert 0 <= level < LEVELS
    assert codec.stream_stats(stream) == {"chosen_strength": level / (LEVELS - 1)}
    chosen = codec.decode([stream])[0]  # perception ½ (the stream's): the encoder's choice
    assert psnr(image, chosen) >= psnr(image, decode_at(models, stream, 0.0)) - max_psnr_loss
    if max_psnr_loss == 20.0:  # every level is within 20 dB here: the most perceptual one is sent
        assert level == 0


def test_the_knob_maps_to_strength_through_the_encoders_choice_and_the_schedule_corrects_the_start_more():
    assert strength(0.0, 0.3) == 1.0 and strength(0.5, 0.3) == pytest.approx(0.3) and strength(1.0, 0.3) == 0.0
    assert strength(0.25, 0.3) == pytest.approx(0.65) and strength(0.75, 0.3) == pytest.approx(0.15)
    assert correction_weight(0.5, 1.0) == 1.0 and correction_weight(0.5, 0.0) == 0.5 and correction_weight(0.0, 1.0) == 0.0


def test_perception_is_set_at_decode_time_and_no_other_parameter_is(models, image):
    [stream] = create_codec("corrdiff", {"model": models, **PARAMS}).encode([image])
    decoder = create_codec("corrdiff", {"model": models})
    decoder.override({"perception": "0"})  # a command line's string
    np.testing.assert_array_equal(decoder.decode([stream])[0], end_to_end_decode(models, stream))
    with pytest.raises(ParameterError, match="'quality' that a decoder may set"):
        decoder.override({"quality": 30})
    with pytest.raises(ParameterError, match="must be <= 1.0"):
        decoder.override({"perception": 2})
    with pytest.raises(ParameterError, match="no parameter 'perception'"):
        create_codec("hfd", {"model": f"{models}/detail"}).override({"perception": 0})


def test_decoding_in_a_fresh_process_gives_the_same_pixels(models, image, tmp_path):
    codec = create_codec("corrdiff", {"model": models, **PARAMS})
    [stream] = codec.encode([image])
    np.testing.assert_array_equal(decode_in_new_process(stream, tmp_path, model=models), codec.decode([stream])[0])


@pytest.mark.parametrize("other", ["end-to-end", "detail"])
def test_a_stream_refuses_other_weights_of_either_model(models, image, tmp_path, other):
    [stream] = create_codec("corrdiff", {"model": models, **PARAMS}).encode([image])
    changed = save_models(tmp_path / "other", seed=1 if other == "end-to-end" else 0, detail_seed=1 if other == "detail" else 0)
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec("corrdiff", {"model": changed}).decode([stream])


def test_a_payload_without_a_valid_level_is_a_bitstream_error(models, image):
    codec = create_codec("corrdiff", {"model": models, **PARAMS})
    header, payload = container.unpack(codec.encode([image])[0])
    for damaged in (bytes([LEVELS]) + payload[1:], payload[:1], b""):
        with pytest.raises(BitstreamError, match="level"):
            codec.decode([container.pack(header, damaged)])


def test_steps_0_is_refused():
    with pytest.raises(ParameterError, match="steps >= 1"):
        create_codec("corrdiff", {"steps": 0})


def test_a_folder_without_an_end_to_end_decoder_is_refused_clearly(models):
    with pytest.raises(ModelError, match="holds no EndToEndDecoder; train one with `diffarc train corrdiff`"):
        create_codec("corrdiff", {"model": f"{models}/detail"})  # a detail decoder, not an end-to-end one


# ---------------------------------------------------------------------- on hfd's latent detail decoder


@pytest.fixture(scope="module")
def latent_models(tmp_path_factory):
    """A latent hfd model folder (taef2's vae/, a tiny latent network in hfd/) with a tiny latent end-to-end
    decoder in corrdiff/, its output layer not zero."""
    from .test_hfd_latent import save_latent_model

    folder = tmp_path_factory.mktemp("corrdiff-latent")
    save_latent_model(folder)
    torch.manual_seed(100)
    decoder = EndToEndDecoder(widths=(16, 16, 32), channels=32, space_to_depth=1)
    with torch.no_grad():
        decoder.unet.conv_out.weight.normal_(0, 0.05)
    decoder.save_pretrained(str(folder / "corrdiff"))
    return str(folder)


def test_on_the_latent_decoder_perception_1_is_plain_hfd_and_0_the_end_to_end_latent(latent_models, image, tmp_path):
    codec = create_codec("corrdiff", {"model": latent_models, **PARAMS, "max_psnr_loss": 20})
    [stream] = codec.encode([image])
    hfd = create_codec("hfd", {"model": latent_models, **PARAMS})  # the same folder is hfd's latent model
    plain = decode_at(latent_models, stream, 1.0)
    np.testing.assert_array_equal(plain, hfd.decode(hfd.encode([image]))[0])
    end_to_end = decode_at(latent_models, stream, 0.0)
    assert np.abs(end_to_end.astype(int) - plain).sum() > 0
    np.testing.assert_array_equal(decode_in_new_process(stream, tmp_path, model=latent_models), codec.decode([stream])[0])
    assert set(codec.weights_folders()) == {"vae", "hfd", "corrdiff"}  # one folder: what --embed-model writes


def test_the_latent_task_exports_a_folder_the_codec_loads_whole(latent_models, tmp_path, monkeypatch):
    from diffarc.codecs.registry import training_task
    from diffarc.codecs.task import TrainSettings

    from .test_tasks import run_one_step

    monkeypatch.setenv("DIFFARC_LATENT_CACHE", str(tmp_path / "cache"))
    settings = TrainSettings(what="corrdiff", data="unused", out="unused", work_dir="unused", batch_size=2, crop=32,
                             config="latent-tiny", model=latent_models)  # fmt: skip
    metrics = run_one_step(training_task("corrdiff"), settings, tmp_path)
    assert {"mse", "val_gain_s1", "val_gain_s2"} <= set(metrics)
    codec = create_codec("corrdiff", {"model": str(tmp_path / "out"), **PARAMS})
    assert codec.hfd.fingerprint == create_codec("hfd", {"model": latent_models}).fingerprint  # its detail model, copied
    image = photo_like(40, 56, 1)
    assert codec.decode(codec.encode([image]))[0].shape == image.shape
