"""Building a decoder from a stream: weights are named by fingerprint and found, never trusted by path."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffarc.codecs import container
from diffarc.codecs.errors import ModelError
from diffarc.codecs.latent_denoise.codec import PREDICTORS_FOLDER
from diffarc.codecs.parts import models
from diffarc.codecs.registry import codec_for_header, create_codec, open_codec

from ..conftest import photo_like, save_tiny_ldm
from .test_latent_denoise import save_predictors

DDCM = {"steps": 3, "codebook": 4, "tile": 2}
IMAGE = photo_like(24, 32, 1)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "model-cache"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    model = save_tiny_ldm(root / "model")
    save_predictors(model / PREDICTORS_FOLDER)
    other = save_tiny_ldm(root / "other", seed=1)
    save_predictors(other / PREDICTORS_FOLDER, seed=1)
    return {"model": model, "copy": Path(shutil.copytree(model, root / "elsewhere")), "other": other}


def test_a_stream_records_what_the_weights_are_not_where(weights):
    here = create_codec("ddcm", {"model": str(weights["model"]), **DDCM}).encode([IMAGE])[0]
    there = create_codec("ddcm", {"model": str(weights["copy"]), **DDCM}).encode([IMAGE])[0]
    assert here == there
    header = container.unpack(here)[0]
    assert "model" not in header.params and header.params["steps"] == 3 and len(header.fingerprint) == 32


def test_the_same_weights_under_any_path_decode_and_other_weights_are_refused(weights):
    codec = create_codec("ddcm", {"model": str(weights["model"]), **DDCM})
    stream = codec.encode([IMAGE])[0]
    header = container.unpack(stream)[0]
    moved = codec_for_header(header, model=str(weights["copy"]))
    assert np.array_equal(moved.decode([stream])[0], codec.decode([stream])[0])
    with pytest.raises(ModelError) as refused:
        codec_for_header(header, model=str(weights["other"]))
    message = str(refused.value)
    # One sentence naming the fingerprint needed and every place looked at, with what was found there.
    assert f"fingerprint {header.fingerprint.hex()}" in message
    assert f"--model {weights['other']} (weights " in message
    assert "model-cache" in message and "(absent)" in message
    assert "the default model=builtin:taef2 (weights " in message


def test_the_model_cache_is_keyed_by_fingerprint(weights, tmp_path):
    codec = create_codec("ddcm", {"model": str(weights["model"]), **DDCM})
    stream = codec.encode([IMAGE])[0]
    cached = models.cached_weights_folder(codec.fingerprint.hex())
    assert cached.parent == tmp_path / "model-cache"
    shutil.copytree(weights["model"], cached)
    found = codec_for_header(container.unpack(stream)[0])  # no --model, no hint: the cache has them
    assert found.model.folder == cached
    assert np.array_equal(found.decode([stream])[0], codec.decode([stream])[0])


def test_a_stream_written_with_its_model_in_its_params_still_decodes_but_is_not_trusted_with_it(weights):
    codec = create_codec("ddcm", {"model": str(weights["model"]), **DDCM})
    header, payload = container.unpack(codec.encode([IMAGE])[0])
    # Before locations were kept out of streams, the model reference was one of the parameters. A stream
    # may come from anyone: what it says about where to look is not looked at (issue 24).
    old = container.pack(container.Header("ddcm", codec.config, header.fingerprint, header.width, header.height), payload)
    assert container.unpack(old)[0].params["model"] == str(weights["model"])
    with pytest.raises(ModelError, match=f"model={weights['model']}, was not looked at"):
        codec_for_header(container.unpack(old)[0])
    found = codec_for_header(container.unpack(old)[0], model=str(weights["model"]))
    assert np.array_equal(found.decode([old])[0], codec.decode([old])[0])


def test_latent_denoise_weights_are_the_model_and_its_predictors(weights, tmp_path):
    codec = create_codec("latent-denoise", {"model": str(weights["model"]), "step": 0.5})
    assert codec.weights_folders() == {"": weights["model"], PREDICTORS_FOLDER: weights["model"] / PREDICTORS_FOLDER}
    assert codec.stream_params.keys() == {"step", "timestep", "t_scale", "steps", "renoise", "colour", "precision"}
    assert codec.locations == {"model": str(weights["model"]), "unet": "", "predictors": ""}
    stream = codec.encode([IMAGE])[0]
    header = container.unpack(stream)[0]
    assert codec_for_header(header, model=str(weights["copy"])).fingerprint == header.fingerprint
    # Same model, other predictors: the fingerprint covers both, so these are other weights.
    mixed = tmp_path / "mixed"
    shutil.copytree(weights["model"], mixed)
    shutil.rmtree(mixed / PREDICTORS_FOLDER)
    shutil.copytree(weights["other"] / PREDICTORS_FOLDER, mixed / PREDICTORS_FOLDER)
    with pytest.raises(ModelError, match=f"--model {mixed} \\(weights "):
        codec_for_header(header, model=str(mixed))
    # A hint (as an archive records it) can name the predictors apart from the model; the user trusts it.
    found = open_codec("latent-denoise", header.params, header.fingerprint, trust_hint=True,
                       hint={"model": str(mixed), "predictors": str(weights["model"] / PREDICTORS_FOLDER)})
    assert found.fingerprint == header.fingerprint


def test_codecs_without_weights_need_no_lookup():
    stream = create_codec("jpeg", {"quality": 40}).encode([IMAGE])[0]
    assert codec_for_header(container.unpack(stream)[0]).config["quality"] == 40
