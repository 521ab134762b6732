"""Model references, loading, and the weight fingerprints that bitstreams record."""

from __future__ import annotations

import shutil

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffarc.codecs.parts import models
from diffarc.codecs.base import Codec
from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.errors import ModelError
from diffarc.codecs.parts.models import builtin_models, fingerprint_tensors, load_model, schedule_signature

from ..conftest import save_tiny_ldm


def tiny_sd21(folder, seed=0, dtype=torch.float32):
    return save_tiny_ldm(folder, seed, conditional=True, dtype=dtype)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "model-cache"))
    models._load_cached.cache_clear()
    yield
    models._load_cached.cache_clear()


def test_same_weights_saved_twice_give_the_same_fingerprint(tmp_path):
    first = load_model(str(tiny_sd21(tmp_path / "a", seed=0)))
    second = load_model(str(tiny_sd21(tmp_path / "b", seed=0)))
    assert first is not second
    assert len(first.fingerprint) == 32 and first.fingerprint == second.fingerprint


def test_file_names_and_tensor_order_do_not_change_the_fingerprint(tmp_path):
    folder = tiny_sd21(tmp_path / "a")
    model = load_model(str(folder))
    # The same tensors read straight from the files, in reverse order, as if from other shards.
    tensors = {}
    for component in ("unet", "vae"):
        state = load_file(folder / component / "diffusion_pytorch_model.safetensors")
        tensors.update({f"{component}.{name}": state[name] for name in reversed(sorted(state))})
    schedule = schedule_signature(model.scheduler_config)
    assert fingerprint_tensors(tensors, (model.scaling_factor, model.shift_factor), schedule) == model.fingerprint


def test_fp16_saved_weights_cast_to_fp32_give_the_same_fingerprint(tmp_path):
    fp16 = load_model(str(tiny_sd21(tmp_path / "half", dtype=torch.float16)))
    assert next(fp16.vae.parameters()).dtype == torch.float32
    # The fp32 model whose values are exactly the fp16 ones: save fp16, then load and save as fp32.
    as_fp32 = tmp_path / "full"
    for component in ("vae", "unet"):
        getattr(fp16, component).to(torch.float32).save_pretrained(as_fp32 / component)
    shutil.copytree(tmp_path / "half" / "scheduler", as_fp32 / "scheduler")
    assert load_model(str(as_fp32)).fingerprint == fp16.fingerprint
    assert load_model(str(tmp_path / "half"), dtype=torch.float16).fingerprint == fp16.fingerprint


def test_one_changed_value_changes_the_fingerprint(tmp_path):
    folder = tiny_sd21(tmp_path / "a")
    before = load_model(str(folder)).fingerprint
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    save_file(state, weights)
    models._load_cached.cache_clear()
    assert load_model(str(folder)).fingerprint != before


def test_the_noise_schedule_is_part_of_the_fingerprint_but_the_scheduler_class_is_not(tmp_path):
    import json

    folder = tiny_sd21(tmp_path / "a")
    config_file = folder / "scheduler" / "scheduler_config.json"
    original = json.loads(config_file.read_text())
    before = load_model(str(folder)).fingerprint

    def fingerprint_with(**changes):
        config_file.write_text(json.dumps({**original, **changes}))
        models._load_cached.cache_clear()
        return load_model(str(folder)).fingerprint

    assert fingerprint_with(_class_name="DDPMScheduler") == before  # same ᾱ table, another sampler class
    assert fingerprint_with(beta_end=0.02) != before
    assert fingerprint_with(prediction_type="v_prediction") != before


def test_a_pickle_only_component_is_refused_naming_the_file(tmp_path):
    folder = tiny_sd21(tmp_path / "a")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model\.bin is a pickle checkpoint.*safetensors"):
        load_model(str(folder))


def test_a_tiny_sd21_model_loads_from_a_folder_and_runs(tmp_path):
    model = load_model(str(tiny_sd21(tmp_path / "sd")))
    assert type(model.vae).__name__ == "AutoencoderKL" and type(model.unet).__name__ == "UNet2DConditionModel"
    assert model.scheduler_config["_class_name"] == "DDIMScheduler"
    assert load_model(str(tmp_path / "sd")) is model  # loaded once per process
    with torch.no_grad():
        latent = model.vae.encode(torch.zeros(1, 3, 40, 56)).latent_dist.mode()
        assert latent.shape == (1, 4, 5, 7)
        eps = model.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 1, 1024)).sample
    assert eps.shape == (1, 4, 8, 8)
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == 5


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_model_loads_from_an_fsspec_url(tmp_path, scheme):
    local = tiny_sd21(tmp_path / "sd")
    expected = load_model(str(local)).fingerprint
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        for path in local.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"/models/sd/{path.relative_to(local)}", path.read_bytes())
        url = "memory://models/sd"
    else:
        url = f"file://{local}"
    model = load_model(url)
    assert model.fingerprint == expected
    if scheme == "memory":
        assert model.folder.is_relative_to(tmp_path / "model-cache")


def test_unknown_references_and_unreachable_hub_ids_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="no built-in model 'nope'"):
        load_model("builtin:nope")
    with pytest.raises(ModelError, match="not a built-in"):
        load_model(str(tmp_path / "missing" / "deeper" / "x"))
    # The hub client reads HF_HUB_OFFLINE when it is first imported, which an earlier test may have done:
    # set both, or a machine without internet waits out the hub's retries.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="could not load hub model 'someone/not-a-model'.*hub must be reachable"):
        load_model("someone/not-a-model")


class _ModelCodec(Codec):
    """A minimal codec that decodes with a loaded model: what the diffusion codecs do."""

    name = "model-test"
    description = "test only"

    def __init__(self, model, device: str = "cpu"):
        super().__init__(device)
        self.model = model

    @property
    def fingerprint(self) -> bytes:
        return self.model.fingerprint

    def encode_payloads(self, images):
        return [b"" for _ in images]

    def decode_payloads(self, payloads, headers):
        return [np.zeros((h.height, h.width, 3), np.uint8) for h in headers]


def test_a_stream_made_with_one_model_is_refused_by_a_codec_holding_another(tmp_path):
    model_a = load_model(str(tiny_sd21(tmp_path / "a", seed=0)))
    model_b = load_model(str(tiny_sd21(tmp_path / "b", seed=1)))
    image = np.zeros((8, 8, 3), np.uint8)
    stream = _ModelCodec(model_a).encode([image])[0]
    assert _ModelCodec(model_a).decode([stream])[0].shape == (8, 8, 3)
    with pytest.raises(BitstreamError, match=f"fingerprint {model_a.fingerprint.hex()}.*{model_b.fingerprint.hex()}"):
        _ModelCodec(model_b).decode([stream])


def test_builtin_models_are_listed_with_sizes_and_fingerprints(tmp_path, monkeypatch):
    shipped = tmp_path / "builtin"
    tiny_sd21(shipped / "toy")
    monkeypatch.setattr(models, "BUILTIN_DIR", shipped)
    [row] = builtin_models()
    model = load_model("builtin:toy")
    assert row["name"] == "builtin:toy" and row["fingerprint"] == model.fingerprint.hex()
    assert row["parameters"] == model.parameters > 0
    assert row["bytes"] == sum(p.stat().st_size for p in (shipped / "toy").rglob("*") if p.is_file())


def test_the_shipped_builtins_load():
    for row in builtin_models():
        model = load_model(row["name"])
        assert model.vae is not None and len(model.fingerprint) == 32


def test_the_models_command_lists_builtins_as_json(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from diffarc.jobs.models import models as models_command

    tiny_sd21(tmp_path / "builtin" / "toy")
    monkeypatch.setattr(models, "BUILTIN_DIR", tmp_path / "builtin")
    result = CliRunner().invoke(models_command, ["--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)["models"]
    assert row["name"] == "builtin:toy" and row["fingerprint"] == load_model("builtin:toy").fingerprint.hex()
    text = CliRunner().invoke(models_command, [])
    assert "builtin:toy" in text.output and row["fingerprint"] in text.output
