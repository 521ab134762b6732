"""builtin:taef2's latent diffusion model (unet/ + scheduler/ beside taef2's vae/) and the latent codecs that
default to it: listed beside builtin:ldm-small, each codec round-trips a Kodak crop at any size and decodes
it to the same pixels in a fresh process, and refuses other weights and damaged streams."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.parts.denoisers import DiffusionDenoiser
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.parts.models import DEFAULT_MODEL, builtin_models, load_model
from diffarc.codecs.registry import codec_for_header, create_codec, read_header

from ..conftest import decode_in_new_process

# Small settings: a few UNet calls on a small crop. ddcm's tiles of 4 latent px fit a 40 × 56 crop.
CODECS = {
    "ddcm": {"steps": 4, "codebook": 64, "tile": 4},
    "latent-denoise": {"step": 3.0, "timestep": "predict", "steps": 2},
    "corrdiff-latent": {"step": 3.0, "steps": 2},
}


@pytest.fixture(scope="module")
def crop(kodak) -> np.ndarray:
    return np.asarray(Image.open(kodak / "kodim23.png").convert("RGB"))[200:240, 300:356]  # 40 × 56: pads to 48 × 64


def test_the_default_model_is_taef2s_and_both_latent_diffusion_models_are_listed():
    assert DEFAULT_MODEL == "builtin:taef2"
    model = load_model(DEFAULT_MODEL)
    assert model.unet.config.in_channels == model.vae.config.latent_channels == 32
    assert DiffusionDenoiser.from_model(model).prediction_type in ("flow", "v_prediction")
    rows = {row["name"]: row for row in builtin_models()}
    assert {"builtin:taef2", "builtin:ldm-small"} <= set(rows)
    assert {"vae", "unet", "latent_denoise"} <= set(rows["builtin:taef2"]["components"])
    # The autoencoder's own fingerprint (what glc, hfd and the latent cache key on) ignores the UNet.
    assert model.autoencoder_fingerprint != model.fingerprint
    assert model.autoencoder_fingerprint.hex() == "1666fc7730c83ae14c6778f77898aa89463c91d3af8432b0c99dbde43e968047"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_kodak_crop_round_trips_and_decodes_the_same_in_a_fresh_process(name, crop, tmp_path):
    codec = create_codec(name, CODECS[name])
    assert codec.locations["model"] == DEFAULT_MODEL
    [stream] = codec.encode([crop])
    decoded = codec.decode([stream])[0]
    assert decoded.shape == crop.shape and psnr(crop, decoded) > 15
    assert np.array_equal(decode_in_new_process(stream, tmp_path), decoded)  # found from the stream alone


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CODECS))
def test_other_weights_and_damaged_payloads_are_refused(name, crop):
    [stream] = create_codec(name, CODECS[name]).encode([crop])
    header, payload = container.unpack(stream)
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec(name, {**CODECS[name], "model": "builtin:ldm-small"}).decode([stream])
    decoder = codec_for_header(read_header(stream))
    for damaged in (payload[:3], payload[:-5]):
        with pytest.raises(BitstreamError):
            decoder.decode([container.pack(header, damaged)])


def test_a_unet_parameter_replaces_the_models_unet_and_is_the_one_an_archive_embeds():
    """builtin:taef2's first UNet is kept in unet-2026-12-06/: `unet` loads it beside taef2's vae/, under
    another fingerprint, and `encode --embed-model` copies it as the embedded model's unet/."""
    from diffarc.codecs.parts.models import BUILTIN_DIR

    former = create_codec("ddcm", {**CODECS["ddcm"], "unet": "builtin:taef2/unet-2026-12-06"})
    current = create_codec("ddcm", CODECS["ddcm"])
    assert former.fingerprint != current.fingerprint
    files = former.weights_files()
    assert files["unet/diffusion_pytorch_model.safetensors"] == BUILTIN_DIR / "taef2/unet-2026-12-06/diffusion_pytorch_model.safetensors"
    assert files["vae/taef2_decoder.safetensors"] == BUILTIN_DIR / "taef2/vae/taef2_decoder.safetensors"
    assert current.weights_files()["unet/diffusion_pytorch_model.safetensors"] == BUILTIN_DIR / "taef2/unet/diffusion_pytorch_model.safetensors"
