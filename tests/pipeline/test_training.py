"""Training the built-in models on a real local Ray Train, and in one process without Ray: a tiny config, a
few steps (kill/resume: test_training_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffarc.codecs.parts import models
from diffarc.codecs.parts.models import load_model
from diffarc.codecs.task import SettingsError, TrainSettings
from diffarc.pipeline.training import is_validation_key, load_initial_weights, run_training

from ..conftest import photo_like, save_tiny_ldm

pytestmark = pytest.mark.slow


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(6):
        Image.fromarray(photo_like(40 + 8 * seed, 56, seed)).save(folder / f"{seed}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_the_validation_split_is_a_stable_function_of_the_key():
    keys = [f"img{i:04d}.jpg" for i in range(2000)]
    held_out = [k for k in keys if is_validation_key(k)]
    assert 60 < len(held_out) < 140  # about 5 %
    assert held_out == [k for k in keys if is_validation_key(k)]


def test_tiny_autoencoder_then_diffusion_write_loadable_diffusers_folders(ray_cluster, images, tmp_path):
    common = dict(data=str(images), steps=3, batch_size=2, crop=32, config="tiny", checkpoint_minutes=60, report_seconds=0)
    metrics = run_training(
        TrainSettings(what="autoencoder", out=str(tmp_path / "ae"), work_dir=str(tmp_path / "work"), lpips_weight=0, **common)
    )
    assert metrics["step"] == 3 and metrics["val_psnr"] > 0
    assert sorted(p.name for p in (tmp_path / "ae" / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    models._load_cached.cache_clear()
    metrics = run_training(
        TrainSettings(what="diffusion", out=str(tmp_path / "ldm"), work_dir=str(tmp_path / "work"),
                      autoencoder=str(tmp_path / "ae"), save_dtype="float16", **common)  # fmt: skip
    )
    assert set(metrics) >= {"val_eps_mse", "val_eps_mse_t50", "val_eps_mse_t950", "scaling_factor"}
    model = load_model(str(tmp_path / "ldm"))
    assert model.unet is not None and model.scheduler_config["prediction_type"] == "epsilon"
    assert model.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    assert next(model.unet.parameters()).dtype.is_floating_point
    # The fp16 folder holds the same autoencoder as the fp32 one, up to fp16 rounding, with its scaling.
    assert model.vae.config.latent_channels == load_model(str(tmp_path / "ae")).vae.config.latent_channels


def test_latent_denoise_predictors_train_for_a_stable_diffusion_architecture_and_serve_the_codec(ray_cluster, images, tmp_path):
    """The path of a user with real SD 2.1 weights: train the predictors for the frozen model, then encode."""
    from diffarc.codecs.latent_denoise.codec import PREDICTORS_FOLDER
    from diffarc.codecs.registry import create_codec

    sd = save_tiny_ldm(tmp_path / "sd", conditional=True)
    metrics = run_training(
        TrainSettings(what="latent-denoise", data=str(images), out=str(sd / PREDICTORS_FOLDER), work_dir=str(tmp_path / "work"),
                      model=str(sd), steps=3, batch_size=2, crop=32, config="tiny", checkpoint_minutes=60, report_seconds=0)
    )  # fmt: skip
    assert metrics["step"] == 3 and {"val_bits_d1", "val_gain_db_d2", "val_t_d4"} <= set(metrics)
    assert all(metrics[f"val_bits_d{d}"] > 0 for d in (1, 2, 4))
    codec = create_codec("latent-denoise", {"model": str(sd), "step": 1.0})
    image = photo_like(40, 56, 7)
    assert codec.decode(codec.encode([image]))[0].shape == image.shape


def test_the_hyperprior_codec_trains_on_ray_and_its_output_is_the_codecs_model(ray_cluster, images, tmp_path):
    from diffarc.codecs.registry import create_codec

    metrics = run_training(
        TrainSettings(what="hyperprior", data=str(images), out=str(tmp_path / "hp"), work_dir=str(tmp_path / "work"),
                      steps=3, batch_size=2, crop=64, config="tiny", checkpoint_minutes=60, report_seconds=0)
    )  # fmt: skip
    assert metrics["step"] == 3 and {"val_bpp_d1", "val_psnr_d0p5"} <= set(metrics)
    codec = create_codec("hyperprior", {"model": str(tmp_path / "hp"), "step": 0.5})
    image = photo_like(40, 56, 7)
    assert codec.decode(codec.encode([image]))[0].shape == image.shape


def test_hfd_fine_tunes_for_the_hyperprior_base_from_init_weights_given_by_relative_paths(ray_cluster, images, tmp_path, monkeypatch):
    """--init loads a decoder's weights (lr 0: they come out unchanged); the output keeps its base model in
    hyperprior/ and the codec decodes with it. Paths are relative to the caller's directory, not the workers'."""
    import torch
    from safetensors.torch import load_file

    from diffarc.codecs.hfd.nets import DetailDecoder
    from diffarc.codecs.hyperprior.nets import HyperpriorModel
    from diffarc.codecs.hyperprior.task import MODEL_CONFIGS
    from diffarc.codecs.registry import create_codec

    torch.manual_seed(5)
    DetailDecoder(widths=(16, 16, 32)).save_pretrained(str(tmp_path / "init"))
    HyperpriorModel(**MODEL_CONFIGS["tiny"]).save_pretrained(str(tmp_path / "hp"))
    monkeypatch.chdir(tmp_path)
    settings = dict(what="hfd", data="images", out="out", work_dir="work", steps=2, batch_size=2, crop=32, lr=0.0,
                    config="tiny-hyperprior", model="hp", init="init", checkpoint_minutes=60, report_seconds=0)  # fmt: skip
    run_training(TrainSettings(**settings))
    trained, initial = load_file("out/diffusion_pytorch_model.safetensors"), load_file("init/diffusion_pytorch_model.safetensors")
    assert trained.keys() == initial.keys() and all(torch.equal(trained[k], initial[k]) for k in trained)
    assert Path("out/hyperprior/config.json").is_file()
    codec = create_codec("hfd", {"model": str(tmp_path / "out"), "base": "hyperprior"})
    image = photo_like(40, 56, 7)
    assert codec.decode(codec.encode([image]))[0].shape == image.shape

    # Weights of another architecture are refused (checked where the worker loads them, without a second run).
    DetailDecoder(widths=(16, 32, 32)).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(SettingsError, match="does not fit the --config architecture"):
        load_initial_weights(DetailDecoder(widths=(16, 16, 32)), "other")


# Makes a Python process behave as if the named top-level packages were not installed: any import of them
# raises ImportError. A lent GPU box has none of them, and Ray's and imagecodecs' wheels are too large to
# carry there (infra/lent-gpu/README.md).
NOT_ON_A_GPU_BOX = "ray,imagecodecs,s3fs"
WITHOUT_PACKAGES = """
import os, sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in os.environ["NOT_INSTALLED"].split(","):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, _NotInstalled())
"""


def _train_without_ray(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(WITHOUT_PACKAGES)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "NOT_INSTALLED": NOT_ON_A_GPU_BOX, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "diffarc.jobs.cli", "train", "hyperprior", "--in-process", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_in_process_training_needs_no_ray_and_trains_as_ray_train_does(ray_cluster, images, tmp_path):
    """The same run (seed, data, steps) in a process where Ray cannot be imported and on Ray Train gives the
    same held-out figures; a Ray Train run resumes the in-process run's checkpoint, and back."""
    common = ["--data", str(images), "--steps", "3", "--batch-size", "2", "--crop", "64", "--config", "tiny",
              "--checkpoint-minutes", "60", "--report-seconds", "0"]  # fmt: skip
    alone = _train_without_ray(tmp_path, *common, "--out", str(tmp_path / "alone"), "--work-dir", str(tmp_path / "w1"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "wrote" in alone.stdout and "step 3" in alone.stdout
    written = json.loads((tmp_path / "alone" / "training.json").read_text())["metrics"]

    settings = dict(what="hyperprior", data=str(images), steps=3, batch_size=2, crop=64, config="tiny",
                    checkpoint_minutes=60, report_seconds=0)  # fmt: skip
    on_ray = run_training(TrainSettings(out=str(tmp_path / "ray"), work_dir=str(tmp_path / "w2"), **settings))
    validation = sorted(k for k in on_ray if k.startswith("val_"))
    assert validation and all(on_ray[k] == pytest.approx(written[k], rel=1e-4) for k in validation)

    # Ray Train goes on from the in-process checkpoint (step 3 → 4), then the in-process run from Ray's (→ 5).
    resumed = run_training(TrainSettings(out=str(tmp_path / "more"), work_dir=str(tmp_path / "w1"), **{**settings, "steps": 4}))
    assert resumed["step"] == 4
    again = _train_without_ray(tmp_path, *common[:2], "--steps", "5", *common[4:], "--out", str(tmp_path / "last"),
                               "--work-dir", str(tmp_path / "w1"))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout + again.stderr and "step 5" in again.stdout


def test_every_training_task_and_the_avif_base_load_without_ray_and_imagecodecs(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(WITHOUT_PACKAGES)
    probe = (
        "from diffarc.codecs.registry import training_task, training_task_names, create_codec\n"
        "import diffarc.pipeline.training, numpy\n"
        "tasks = [training_task(name) for name in training_task_names()]\n"
        "avif = create_codec('avif', {})\n"
        "print(len(tasks), avif.decode(avif.encode([numpy.zeros((8, 8, 3), numpy.uint8)]))[0].shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NOT_INSTALLED": NOT_ON_A_GPU_BOX}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    from diffarc.codecs.registry import training_task_names

    assert done.stdout.split() == [str(len(training_task_names())), "(8,", "8,", "3)"]


def test_minutes_end_a_run_early_checkpointed_and_exported(images, tmp_path):
    settings = TrainSettings(what="hyperprior", data=str(images), out=str(tmp_path / "out"), work_dir=str(tmp_path / "w"),
                             steps=100_000, batch_size=2, crop=64, config="tiny", checkpoint_minutes=60, report_seconds=60,
                             in_process=True, minutes=0.001)  # fmt: skip
    metrics = run_training(settings)
    assert 1 <= metrics["step"] < 100_000
    assert json.loads((tmp_path / "out" / "training.json").read_text())["metrics"]["step"] == metrics["step"]
    steps = lambda: [json.loads((c / "progress.json").read_text())["step"] for c in sorted((tmp_path / "w" / "hyperprior").iterdir())]  # noqa: E731
    assert steps() == [metrics["step"]]
    # Two more runs go on from it; the folder keeps the newest two checkpoints, whichever run wrote them.
    second = run_training(settings).get("step")
    third = run_training(settings).get("step")
    assert metrics["step"] < second < third and steps() == [second, third]


def test_in_process_training_refuses_several_workers_and_a_cluster(tmp_path):
    from click.testing import CliRunner

    from diffarc.jobs.train import train

    base = ["hyperprior", "--in-process", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")]
    result = CliRunner().invoke(train, base + ["--workers", "2"])
    assert result.exit_code == 2 and "--workers must be 1" in result.output
    result = CliRunner().invoke(train, base + ["--address", "127.0.0.1:6379"])
    assert result.exit_code == 2 and "no cluster --address" in result.output


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["diffusion"], "--autoencoder"),
        (["latent-denoise"], "--model"),
        (["autoencoder", "--crop", "36"], "multiple of 8"),
        (["autoencoder"], "--lpips-weights"),
        (["diffusion", "--autoencoder", "builtin:taef2", "--init", "builtin:taef2"], "latent_denoise/, unet/"),
    ],
)
def test_train_refuses_incomplete_settings_before_starting_ray(tmp_path, monkeypatch, args, complaint):
    from click.testing import CliRunner

    from diffarc.jobs.train import train

    monkeypatch.delenv("DIFFARC_LPIPS_WEIGHTS", raising=False)
    result = CliRunner().invoke(train, args + ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 2 and complaint in result.output


def test_a_progress_line_shows_the_fields_its_task_names():
    from diffarc.codecs.registry import training_task
    from diffarc.pipeline.training import format_progress

    metrics = {"step": 7, "loss": 0.25, "images_per_s": 3.0, "bits": 0.5, "val_gain_db": 1.234,
               **{f"val_bits_d{d}": d / 10 for d in (1, 2, 4)}, **{f"val_t_d{d}": 100.0 * d for d in (1, 2, 4)}}  # fmt: skip
    settings = TrainSettings(what="latent-denoise", data="d", out="o", work_dir="w", steps=10)
    assert format_progress(settings, training_task("latent-denoise"), metrics) == (
        "[latent-denoise] step 7/10, loss 0.2500, bits 0.500, val bits/value at Δ 1|2|4 0.100|0.200|0.400, "
        "denoising gain 1.23 dB, t 100|200|400, 3.0 img/s"
    )
    assert "val PSNR 21.50 dB" in format_progress(settings, training_task("autoencoder"), {**metrics, "val_psnr": 21.5})


def test_training_images_over_max_pixels_are_skipped(tmp_path):
    from diffarc.pipeline.training import load_training_images

    for index, size in enumerate([(20, 20), (24, 20), (80, 80)]):
        Image.fromarray(photo_like(*size, seed=index)).save(tmp_path / f"{index}.png")
    settings = TrainSettings(what="autoencoder", data=str(tmp_path), out="o", work_dir="w", max_pixels=1000)
    train, validation = load_training_images(settings)
    assert sorted(image.shape for image in train + validation) == [(20, 20, 3), (24, 20, 3)]
