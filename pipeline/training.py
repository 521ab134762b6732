"""The generic training loop, on Ray Train or in this process: data, checkpoints, resume, learning rate, progress, export.

    images (any fsspec folder) ──list_sources / fetch / load_rgb──► train split │ held-out split (5 %, by key hash)
    task = registry.training_task(settings.what)       what is trained and how: codecs/<family>/task.py
    each step: batch from rng(seed, step, rank) ──► task.loss ──► AdamW, grad-norm clip 1, LR warm-down
    every --report-seconds: task.validate ──► one progress line (the task names its fields)
    every --checkpoint-minutes: checkpoint = {model/ (save_pretrained), optimizer.pt, progress.json}
    end (--steps reached, or --minutes spent): the last checkpoint goes to task.export, into a staging
    folder renamed to --out

The loop runs on Ray Train's workers (RayTrainRun: data parallel, any cluster) or, with --in-process, in
the calling process without Ray (InProcessRun: one device; for a machine where Ray is not installed, such
as a lent GPU box, or a quick run). Both write the same checkpoints into the same folder.

Choices:
- Resume: re-running with the same --work-dir continues from the newest checkpoint there (Ray Train's
  own restore when it has one, else the newest checkpoint folder found on disk). The data order is a
  function of the step number, so a resumed run sees the batches it would have seen.
- Checkpoints hold weights as safetensors; the optimizer state is a torch file read back with
  `weights_only=True` (no arbitrary unpickling), and only from the run's own work dir.
- The output folder appears whole or not at all: it is written beside --out and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..codecs.errors import ImageLoadError, SourceError
from ..codecs.parts.crops import LATENT_CACHE_ENV
from ..codecs.registry import training_task, weights_folder
from ..codecs.task import SettingsError, TrainingTask, TrainSettings, load_trained
from .images import load_rgb
from .sources import fetch, list_sources

VALIDATION_PERCENT = 5
CHECKPOINTS_KEPT = 2  # per run folder, by either kind of run
WARMDOWN_FRACTION = 0.25  # the learning rate falls linearly to 10 % over the last quarter of --steps


def learning_rate(base: float, step: int, total: int) -> float:
    """Constant, then a linear warm-down: the last steps at a small rate settle the weights (where a constant rate keeps them jittering)."""
    start = total * (1 - WARMDOWN_FRACTION)
    if step < start:
        return base
    return base * (1 - 0.9 * min(1.0, (step - start) / max(total - start, 1)))


# ---------------------------------------------------------------- data


def is_validation_key(key: str) -> bool:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < VALIDATION_PERCENT


def say(message: str) -> None:
    """One line of the job's output, from a training worker. Not print(): Ray Train turns a worker's print
    into a log record and also copies it to the worker's stdout, so every line reached the user twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def load_training_images(settings: TrainSettings) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, validation) images; at least one image is held out, even from a tiny folder."""
    items = list_sources(settings.data, settings.storage_options or None).items
    if settings.max_images:
        items = items[: settings.max_images]
    train, validation = [], []
    for item in items:
        try:
            image = load_rgb(fetch(item, settings.storage_options or None), settings.max_pixels)
        except ImageLoadError as exc:
            say(f"skipping {item.key}: {exc}")
            continue
        (validation if is_validation_key(item.key) else train).append(image)
    if not validation and len(train) > 1:
        validation.append(train.pop())
    if not train:
        raise SourceError(f"no training images under {settings.data}")
    return train, validation


# ---------------------------------------------------------------- checkpoints


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (highest step) under a run's folder, or None."""
    best, best_step = None, -1
    for progress in run_dir.glob("checkpoint_*/progress.json"):
        try:
            step = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written when the run was killed
        if (progress.parent / "model").is_dir() and step > best_step:
            best, best_step = progress.parent, step
    return best


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / "progress.json").read_text())["step"]


def save_checkpoint(folder: Path, model, optimizer, step: int, metrics: dict) -> None:
    model.save_pretrained(str(folder / "model"), safe_serialization=True)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    # Written last: a checkpoint without progress.json is incomplete and never resumed from.
    (folder / "progress.json").write_text(json.dumps({"step": step, "metrics": metrics}))


def load_checkpoint(folder: Path, model_class, optimizer_factory) -> tuple[Any, Any, int]:
    model = load_trained(model_class, folder / "model")
    optimizer = optimizer_factory(model)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return model, optimizer, json.loads((folder / "progress.json").read_text())["step"]


# ---------------------------------------------------------------- the per-worker loop


def initial_weights_file(reference: str) -> Path:
    """The one safetensors file of an --init folder; SettingsError otherwise, naming the sub-folders that
    would do (a model's folder, e.g. builtin:taef2, holds each part's weights in a folder of its own)."""
    folder = weights_folder(reference)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    if len(files) != 1:
        parts = sorted(p.name for p in folder.iterdir() if len(list(p.glob("*.safetensors"))) == 1) if folder else []
        hint = f"; its parts are in {', '.join(f'{part}/' for part in parts)}: name one of them" if parts else ""
        raise SettingsError("init", f"--init {reference} must be a folder holding one .safetensors weights file{hint}")
    return files[0]


def check_settings(settings: TrainSettings) -> None:
    """SettingsError for settings a run cannot start with, before the data is read and its latents are
    cached (which can take minutes) and before Ray starts."""
    training_task(settings.what).check(settings)
    if settings.init:
        initial_weights_file(settings.init)


def load_initial_weights(model: torch.nn.Module, reference: str) -> None:
    """Load a trained model's weights (a save_pretrained folder) into a new model of the same architecture,
    to fine-tune it; every tensor must match by name and shape (SettingsError otherwise)."""
    weights = load_file(str(initial_weights_file(reference)))
    expected = model.state_dict()
    mismatched = sorted(set(expected) ^ set(weights)) + [k for k in expected if k in weights and expected[k].shape != weights[k].shape]
    if mismatched:
        raise SettingsError("init", f"--init {reference} does not fit the --config architecture (first mismatch: {mismatched[0]})")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})


class RayTrainRun:
    """What the loop asks of Ray Train: the worker's device, rank and world size, the checkpoint Ray Train
    restored, data parallelism, and checkpoints reported to it (it keeps the newest two)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        self._train, self._train_torch = ray.train, ray.train.torch
        self.device = ray.train.torch.get_device()
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def restored(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._train_torch.prepare_model(model, move_to_device=False)

    def checkpoint(self, metrics: dict, write) -> None:
        """`write(folder)` fills a checkpoint folder; only rank 0 writes one, every rank reports."""
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                write(Path(tmp))
                self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(tmp))
            else:
                self._train.report(metrics)


class InProcessRun:
    """The same loop in the calling process, without Ray (`--in-process`): one worker on one device, its
    checkpoints written straight into the run's folder, where a later run of either kind finds them."""

    rank, world = 0, 1
    prefix = "checkpoint_step_"  # then the step, zero-padded: names sort as steps do

    def __init__(self, run_dir: Path, gpu: bool):
        if gpu and not torch.cuda.is_available():
            raise SettingsError("gpu", "--gpu was given, but torch sees no GPU in this process")
        self.device = torch.device("cuda" if gpu else "cpu")
        self.run_dir = run_dir

    def restored(self) -> Path | None:
        return None  # the driver found the newest checkpoint on disk already

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def checkpoint(self, metrics: dict, write) -> None:
        # Written under a name the resume search skips, then renamed: a kill leaves no half checkpoint behind it.
        final = self.run_dir / f"{self.prefix}{metrics['step']:09d}"
        staging = self.run_dir / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        write(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        # Its own folders only, earlier in-process runs' too: Ray Train prunes its own, and keeps a record of them.
        for old in sorted(self.run_dir.glob(self.prefix + "*"))[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)


def _ray_worker_loop(config: dict) -> None:
    train_loop(config, RayTrainRun())


def train_loop(config: dict, run: RayTrainRun | InProcessRun) -> None:
    settings = TrainSettings(**config["settings"])
    if not settings.gpu and config["threads"]:
        torch.set_num_threads(config["threads"])
    if config["latent_cache"]:
        os.environ[LATENT_CACHE_ENV] = config["latent_cache"]
    device, rank, world = run.device, run.rank, run.world
    log = say if rank == 0 else (lambda message: None)

    train_images, validation_images = load_training_images(settings)
    log(f"{settings.what}: {len(train_images)} training images, {len(validation_images)} held out")
    task = training_task(settings.what)(settings, train_images, validation_images, device)

    # Ray Train's own restore and the newest folder on disk can disagree when a kill fell between writing
    # a checkpoint and recording it; the one further along wins.
    candidates = [Path(config["resume_from"])] if config["resume_from"] else []
    if (restored := run.restored()) is not None:
        candidates.append(restored)
    resume = max(candidates, key=checkpoint_step, default=None)
    optimizer_factory = lambda m: torch.optim.AdamW(m.parameters(), lr=settings.lr, weight_decay=0.0)  # noqa: E731
    if resume is not None:
        model, optimizer, step = load_checkpoint(resume, task.model_class, optimizer_factory)
        log(f"resumed from step {step} ({resume})")
    else:
        torch.manual_seed(settings.seed)
        model, step = task.new_model(), 0
        if settings.init:
            load_initial_weights(model, settings.init)
            log(f"started from the weights of {settings.init}")
        optimizer = optimizer_factory(model)
    model.to(device)
    # Optimizer state tensors must follow the parameters to the device.
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(device)
    trained = run.prepare(task.wrap(model))

    started = last_report = last_checkpoint = time.monotonic()
    images_since = 0
    metrics: dict[str, Any] = {}
    while step < settings.steps:
        # The batch depends only on (seed, step, rank): a resumed run sees the same data.
        rng = np.random.default_rng([settings.seed, step, rank])
        model.train()
        loss, parts = task.loss(trained, rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings.lr, step, settings.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        images_since += settings.batch_size * world

        now = time.monotonic()
        # --minutes ends the run early at this step, checkpointed and exported like a finished one.
        last = step == settings.steps or (settings.minutes is not None and now - started >= settings.minutes * 60)
        report_due = now - last_report >= settings.report_seconds or last
        checkpoint_due = now - last_checkpoint >= settings.checkpoint_minutes * 60 or last
        if report_due or checkpoint_due:
            model.eval()
            with torch.no_grad():
                validation = task.validate(model)
            metrics = {"step": step, "loss": float(loss.detach()), **parts, **validation,
                       "images_per_s": images_since / max(now - last_report, 1e-9)}  # fmt: skip
            log(format_progress(settings, task, metrics))
            last_report, images_since = now, 0
        if checkpoint_due:
            run.checkpoint(metrics, lambda folder: save_checkpoint(folder, model, optimizer, step, metrics))
            log(f"checkpoint at step {step}")
            last_checkpoint = time.monotonic()
        if last:
            break
    if not metrics:  # resumed a finished run: nothing left to train
        if rank == 0:
            model.eval()
            with torch.no_grad():
                metrics = {"step": step, **task.validate(model)}
        run.checkpoint(metrics, lambda folder: save_checkpoint(folder, model, optimizer, step, metrics))


def format_progress(settings: TrainSettings, task: TrainingTask, metrics: dict) -> str:
    """One line: step, loss, the task's own fields (`task.progress`), throughput."""
    shown = [f"step {metrics['step']}/{settings.steps}", f"loss {metrics['loss']:.4f}"]
    shown += [field.format(**metrics) for field in task.progress]
    shown.append(f"{metrics['images_per_s']:.1f} img/s")
    return f"[{settings.what}] " + ", ".join(shown)


# ---------------------------------------------------------------- the driver


def run_training(settings: TrainSettings, address: str | None = None) -> dict:
    """Train (or resume) and write the diffusers model folder to `settings.out`: on Ray Train, or in this
    process without Ray when `settings.in_process` (a machine without Ray, one GPU or a quick run).

    Returns the final metrics. The run's checkpoints live in `<work_dir>/<what>/`, where a run of either
    kind resumes from the other's. Settings the task cannot run with raise SettingsError before anything starts.
    """
    task = training_task(settings.what)
    check_settings(settings)
    work_dir = Path(settings.work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    settings.work_dir = str(work_dir)
    # Ray's workers do not run in this directory: relative local paths are made absolute here.
    for name in ("data", "init", "model", "autoencoder", "lpips_weights"):
        value = getattr(settings, name)
        if value and "://" not in value and not value.startswith("builtin:") and Path(value).expanduser().exists():
            setattr(settings, name, str(Path(value).expanduser().resolve()))
    run_dir = work_dir / settings.what
    resume = find_resume_checkpoint(run_dir)
    config = {
        "settings": asdict(settings),
        "resume_from": str(resume) if resume else None,
        "threads": None,  # in this process: torch's own choice
        # Workers on a joined cluster do not share this process's environment.
        "latent_cache": os.environ.get(LATENT_CACHE_ENV),
    }
    if settings.in_process:
        run_dir.mkdir(exist_ok=True)
        train_loop(config, InProcessRun(run_dir, settings.gpu))
        finished = find_resume_checkpoint(run_dir)
        return _export_checkpoint(settings, task, finished)
    return _train_on_ray(settings, task, config, address)


def _train_on_ray(settings: TrainSettings, task: type[TrainingTask], config: dict, address: str | None) -> dict:
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .cluster import connect

    connect(address, worker_output=True)  # the progress lines are the rank-0 worker's
    cpus = int(ray.cluster_resources().get("CPU", 1))
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={**config, "threads": max(1, cpus // settings.workers)},
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=settings.what, storage_path=settings.work_dir, checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see {Path(settings.work_dir) / settings.what}")
    with result.checkpoint.as_directory() as folder:
        return _export_checkpoint(settings, task, Path(folder))


def _export_checkpoint(settings: TrainSettings, task: type[TrainingTask], checkpoint: Path) -> dict:
    metrics = json.loads((checkpoint / "progress.json").read_text())["metrics"]
    export_model(settings, task, checkpoint / "model", metrics)
    return metrics


def export_model(settings: TrainSettings, task: type[TrainingTask], trained: Path, metrics: dict) -> None:
    """The task writes its output into a staging folder beside --out, with training.json; then it is renamed into place."""
    out = Path(settings.out).expanduser()
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    task.export(settings, trained, metrics, staging)
    (staging / "training.json").write_text(
        json.dumps({"settings": {**asdict(settings), "storage_options": "(not recorded)"}, "metrics": metrics}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
