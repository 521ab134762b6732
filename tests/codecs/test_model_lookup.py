"""Building a decoder from a stream: weights are named by fingerprint and found, never trusted by path."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError, ModelError
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
    assert "the default model=builtin:ldm-small (weights " in message


def test_the_model_cache_is_keyed_by_fingerprint(weights, tmp_path):
    codec = create_codec("ddcm", {"model": str(weights["model"]), **DDCM})
    stream = codec.encode([IMAGE])[0]
    cached = models.cached_weights_folder(codec.fingerprint.hex())
    assert cached.parent == tmp_path / "model-cache"
    shutil.copytree(weights["model"], cached)
    found = codec_for_header(container.unpack(stream)[0])  # no --model, no hint: the cache has them
    assert found.model.folder == cached
    assert np.array_equal(found.decode([stream])[0], codec.decode([stream])[0])


def test_a_stream_written_with_its_model_in_its_params_still_decodes(weights):
    codec = create_codec("ddcm", {"model": str(weights["model"]), **DDCM})
    header, payload = container.unpack(codec.encode([IMAGE])[0])
    # Before locations were kept out of streams, the model reference was one of the parameters.
    old = container.pack(container.Header("ddcm", codec.config, header.fingerprint, header.width, header.height), payload)
    assert container.unpack(old)[0].params["model"] == str(weights["model"])
    assert np.array_equal(codec_for_header(container.unpack(old)[0]).decode([old])[0], codec.decode([old])[0])


def test_latent_denoise_weights_are_the_model_and_its_predictors(weights, tmp_path):
    codec = create_codec("latent-denoise", {"model": str(weights["model"]), "step": 0.5})
    assert codec.weights_folders() == {"": weights["model"], PREDICTORS_FOLDER: weights["model"] / PREDICTORS_FOLDER}
    assert codec.stream_params.keys() == {"step", "timestep", "steps", "precision"}
    assert codec.locations == {"model": str(weights["model"]), "predictors": ""}
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
    # A hint (as an archive records it) can name the predictors apart from the model.
    found = open_codec("latent-denoise", header.params, header.fingerprint,
                       hint={"model": str(mixed), "predictors": str(weights["model"] / PREDICTORS_FOLDER)})
    assert found.fingerprint == header.fingerprint


def test_codecs_without_weights_need_no_lookup():
    stream = create_codec("jpeg", {"quality": 40}).encode([IMAGE])[0]
    assert codec_for_header(container.unpack(stream)[0]).config["quality"] == 40


# 16 × 16 streams of builtin:ldm-small's codecs written before its decoder was fine-tuned (issue 13).
STREAMS_OF_THE_OLD_DECODER = {
    "ddcm": bytes.fromhex(
        "4446415201046464636d006d7b2261746f6d73223a312c22636f6465626f6f6b223a3235362c22636f65665f62697473223a322c2270726563697369"
        "6f6e223a2266703332222c2273656564223a302c2273656c656374696f6e223a226172676d6178222c227374657073223a32302c2274696c65223a38"
        "7d20c61e02a66fb54a7fa48608520d36979d2670605926122aac4e650012711572790000001000000010000000131756f2c98d500f4004d518f78901"
        "521f8e7f2de7029f8e"
    ),
    "latent-denoise": bytes.fromhex(
        "44464152010e6c6174656e742d64656e6f697365003a7b22707265636973696f6e223a2266703332222c2273746570223a312e302c22737465707322"
        "3a342c2274696d6573746570223a226f6666227d20805cb92041cdeffe42fd6e4e982f6312489cb58517bfacdf201fc4f42d16b83200000010000000"
        "10000000760000852a1436b1b207ab9db74a382738b02b9e2f6c399aa7c8371e2f0a370e2ed0b5553e873f69401c40cb40d13f833ea23c353f813dbf"
        "3e973e823d40407c3d893effff0200ffff0100040000008110d8b2d9d70300e930324e5180b9a6b214114d9557f11d517bbfc14014e3277a1c805a59"
        "e3f65422c8328f"
    ),
    "corrdiff-latent": bytes.fromhex(
        "44464152010f636f7272646966662d6c6174656e7400637b226d61785f70736e725f6c6f7373223a302e332c2270657263657074696f6e223a302e35"
        "2c22707265636973696f6e223a2266703332222c2273746570223a312e302c227374657073223a342c2274696d6573746570223a2270726564696374"
        "227d20b968222cc87ca6463375609ecd2525d39be8b91ae4ed1adce5617ccce0a12132000000100000001000000077008d00852a1436b1b207ab9db7"
        "4a382738b02b9e2f6c399aa7c8371e2f0a370e2ed0b5553e873f69401c40cb40d13f833ea23c353f813dbf3e973e823d40407c3d893effff0200ffff"
        "0100040000008110d8b2d9d70300e930324e5180b9a6b214114d9557f11d517bbfc14014e3277a1c805a59e3f654f65e41f6"
    ),
}


@pytest.mark.parametrize("name", sorted(STREAMS_OF_THE_OLD_DECODER))
def test_streams_of_retired_builtin_weights_are_refused_saying_why_and_what_decodes_them(name):
    stream = STREAMS_OF_THE_OLD_DECODER[name]
    with pytest.raises(BitstreamError, match="before its decoder was fine-tuned .* pass --model a folder of those weights"):
        create_codec(name).decode([stream])
    header = container.unpack(stream)[0]
    with pytest.raises(ModelError, match="no model weights with fingerprint .* before its decoder was fine-tuned"):
        open_codec(name, header.params, header.fingerprint)
