"""Training tasks found through the registry, each run for one step in process (the Ray loop: tests/pipeline/test_training.py)."""

import numpy as np
import pytest
import torch

from diffarc.codecs.errors import ParameterError
from diffarc.codecs.parts import models
from diffarc.codecs.parts.denoisers import DiffusionDenoiser
from diffarc.codecs.parts.models import load_model
from diffarc.codecs.registry import training_task, training_task_names
from diffarc.codecs.task import SettingsError, TrainingTask, TrainSettings

from ..conftest import photo_like, save_tiny_ldm

TRAIN = [photo_like(40, 56, seed) for seed in range(3)]
VALIDATION = [photo_like(48, 48, 9)]


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    return str(save_tiny_ldm(tmp_path_factory.mktemp("ldm")))


def settings(what, **changes):
    values = dict(what=what, data="unused", out="unused", work_dir="unused", batch_size=2, crop=32, config="tiny", lpips_weight=0)
    return TrainSettings(**{**values, **changes})


def test_the_registry_names_each_task_by_its_own_name():
    assert training_task_names() == ["autoencoder", "corrdiff", "corrdiff-latent", "decoder", "diffusion", "glc", "hfd", "hyperprior", "latent-denoise"]
    for name in training_task_names():
        task = training_task(name)
        assert issubclass(task, TrainingTask) and task.name == name
    with pytest.raises(ParameterError, match="unknown training task 'vae'; available: autoencoder"):
        training_task("vae")


@pytest.mark.parametrize(
    "what, changes, setting",
    [
        ("autoencoder", {"crop": 36}, "crop"),
        ("autoencoder", {"lpips_weight": 0.5}, "lpips_weights"),
        ("diffusion", {}, "autoencoder"),
        ("decoder", {}, "model"),
        ("latent-denoise", {"crop": 20, "model": "m"}, "crop"),
        ("latent-denoise", {}, "model"),
        ("hyperprior", {"crop": 96}, "crop"),  # whole hyper-latent positions: multiples of 64
        ("corrdiff-latent", {}, "model"),
        ("corrdiff-latent", {"crop": 48, "model": "m"}, "crop"),  # 3 latent px of each side are not scored
    ],
)
def test_check_names_the_setting_a_task_cannot_run_without(what, changes, setting):
    with pytest.raises(SettingsError) as refused:
        training_task(what).check(settings(what, **changes))
    assert refused.value.setting == setting


def run_one_step(task_class, task_settings, tmp_path):
    """new_model → wrap → loss → backward → validate → progress fields → export, as the loop does."""
    task = task_class(task_settings, TRAIN, VALIDATION, torch.device("cpu"))
    task_class.check(task_settings)
    torch.manual_seed(0)
    model = task.new_model()
    loss, parts = task.loss(task.wrap(model), np.random.default_rng(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        metrics = {**parts, **task.validate(model)}
    shown = [field.format(**metrics) for field in task_class.progress]  # every field the task shows exists
    assert shown and all(isinstance(v, float) for v in metrics.values())
    model.save_pretrained(str(tmp_path / "trained"))
    task_class.export(task_settings, tmp_path / "trained", metrics, tmp_path / "out")
    return metrics


def test_the_autoencoder_task_trains_and_exports_a_vae_folder(tmp_path):
    metrics = run_one_step(training_task("autoencoder"), settings("autoencoder"), tmp_path)
    assert metrics["val_psnr"] > 0 and "l1" in metrics
    assert (tmp_path / "out" / "vae" / "config.json").is_file()


@pytest.mark.parametrize("config, channels", [("small", 16), ("small-8ch", 8), ("wide", 16), ("base", 16)])
def test_the_autoencoder_configs_of_the_compute_ablation_are_accepted(config, channels):
    from diffarc.codecs.ldm.nets import new_autoencoder

    training_task("autoencoder").check(settings("autoencoder", config=config))
    with torch.no_grad():
        latent = new_autoencoder(config).encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert latent.shape == (1, channels, 4, 4)


def test_the_decoder_task_trains_only_the_decoder_so_the_latent_space_stays(ldm, tmp_path):
    from diffusers import AutoencoderKL

    task_class, task_settings = training_task("decoder"), settings("decoder", model=ldm)
    task = task_class(task_settings, TRAIN, VALIDATION, torch.device("cpu"))
    model = task.new_model()
    loss, _ = task.loss(task.wrap(model), np.random.default_rng(0))
    loss.backward()
    assert all(p.grad is None for p in [*model.encoder.parameters(), *model.quant_conv.parameters()])
    assert all(p.grad is not None for p in model.decoder.parameters())
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()  # as the loop's optimizer, over every parameter

    source = load_model(ldm).vae
    model.save_pretrained(str(tmp_path / "trained"))
    task_class.export(task_settings, tmp_path / "trained", {}, tmp_path / "out")
    exported = AutoencoderKL.from_pretrained(str(tmp_path / "out" / "vae"))
    assert exported.config.scaling_factor == source.config.scaling_factor
    x = torch.from_numpy(TRAIN[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latent = source.encode(x).latent_dist.mode()
        assert torch.equal(exported.encode(x).latent_dist.mode(), latent)  # the same latent space
        assert not torch.equal(exported.decode(latent).sample, source.decode(latent).sample)  # a new decoder


def test_the_diffusion_task_trains_on_frozen_latents_and_exports_a_model_folder(ldm, tmp_path):
    task_settings = settings("diffusion", autoencoder=ldm, save_dtype="float16")
    metrics = run_one_step(training_task("diffusion"), task_settings, tmp_path)
    assert {"val_eps_mse", "val_eps_mse_t50", "val_eps_mse_t950"} <= set(metrics)
    models._load_cached.cache_clear()
    exported = load_model(str(tmp_path / "out"))
    assert exported.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    assert exported.unet is not None and exported.scheduler_config["prediction_type"] == "epsilon"


@pytest.mark.parametrize("config, prediction_type", [("taef2-tiny-flow", "flow"), ("taef2-tiny-v", "v_prediction")])
def test_a_taef2_diffusion_config_trains_in_taef2s_own_space_and_exports_a_loadable_model(config, prediction_type, tmp_path, monkeypatch):
    from diffarc.codecs.parts import crops

    monkeypatch.setenv(crops.LATENT_CACHE_ENV, str(tmp_path / "latents"))
    task_settings = settings("diffusion", autoencoder="builtin:taef2", config=config)
    metrics = run_one_step(training_task("diffusion"), task_settings, tmp_path)
    taef2 = load_model("builtin:taef2")
    assert metrics["scaling_factor"] == taef2.scaling_factor == 1.19  # taef2's own, not learnt
    assert {"val_x0_mse", "val_x0_mse_lsnr-4", "val_x0_mse_lsnr+6"} <= set(metrics) and "val_eps_mse" not in metrics
    # Latents were read through the disk cache of taef2's autoencoder alone.
    assert len(list((tmp_path / "latents" / taef2.autoencoder_fingerprint.hex()).glob("*.safetensors"))) == len(TRAIN + VALIDATION)
    exported = load_model(str(tmp_path / "out"))
    assert exported.unet.config.in_channels == 32 and exported.autoencoder_fingerprint == taef2.autoencoder_fingerprint
    assert DiffusionDenoiser.from_model(exported).prediction_type == prediction_type


def test_the_latent_denoise_task_trains_predictors_for_a_frozen_model(ldm, tmp_path):
    metrics = run_one_step(training_task("latent-denoise"), settings("latent-denoise", model=ldm), tmp_path)
    assert all(metrics[f"val_bits_d{d}"] > 0 for d in (1, 2, 4)) and "val_gain_db" in metrics
    assert (tmp_path / "out" / "config.json").is_file()  # the predictors' own folder
    frozen = load_model(ldm)
    assert all(p.grad is None for p in frozen.unet.parameters())  # the backbone took no gradient


def test_the_hyperprior_task_trains_the_codecs_model_and_exports_its_folder(tmp_path):
    from diffarc.codecs.registry import create_codec

    metrics = run_one_step(training_task("hyperprior"), settings("hyperprior", crop=64), tmp_path)
    assert all(metrics[f"val_bpp_d{d}"] > 0 for d in ("0p5", "1", "2", "4")) and "psnr" in metrics
    assert metrics["val_bpp_d0p5"] > metrics["val_bpp_d4"]  # a finer step costs more, even untrained
    codec = create_codec("hyperprior", {"model": str(tmp_path / "out")})  # the exported folder is a codec's model
    assert codec.decode(codec.encode([TRAIN[0]]))[0].shape == TRAIN[0].shape


def test_the_corrdiff_task_trains_the_end_to_end_decoder_and_exports_a_codecs_model(tmp_path):
    from diffarc.codecs.corrdiff.nets import EndToEndDecoder

    metrics = run_one_step(training_task("corrdiff"), settings("corrdiff", batch_size=4, crop=32), tmp_path)
    assert {"mse", "val_gain_s1", "val_gain_s2"} <= set(metrics)
    assert isinstance(EndToEndDecoder.from_pretrained(str(tmp_path / "out")), EndToEndDecoder)


@pytest.mark.parametrize("pooled", [False, True], ids=["crops-own-statistics", "taef2-pooled-statistics"])
def test_the_corrdiff_latent_task_trains_a_restorer_the_codec_then_loads(pooled, tmp_path):
    """On a tiny AutoencoderKL model, whose crops decode with their own GroupNorm statistics, and on
    builtin:taef2, whose crops decode with their whole picture's pooled statistics."""
    from diffarc.codecs.registry import create_codec

    from .test_latent_denoise import save_predictors

    if pooled:
        folder = "builtin:taef2"
    else:
        folder = save_tiny_ldm(tmp_path / "ldm")
        save_predictors(folder / "latent_denoise")
    task = training_task("corrdiff-latent")
    metrics = run_one_step(task, settings("corrdiff-latent", model=str(folder), crop=64), tmp_path)
    assert {"mse", "val_gain_d2p2", "val_gain_d3p8", "val_gain_d5"} <= set(metrics)
    assert all(p.grad is None for p in load_model(str(folder)).vae.parameters())  # the decoder stays frozen
    codec = create_codec("corrdiff-latent", {"model": str(folder), "restorer": str(tmp_path / "out"), "steps": 2})
    assert codec.decode(codec.encode([TRAIN[0]]))[0].shape == TRAIN[0].shape
