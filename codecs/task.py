"""Training tasks: what one trainable model gives the generic training loop, and the settings both read.

    pipeline/training.py (the Ray Train loop)               a TrainingTask (codecs/<family>/task.py)
    ───────────────────────────────────────────             ──────────────────────────────────────────
    driver: before starting Ray ──────────────────────────► check(settings)          refuse bad settings
    worker: images, split train / held out ───────────────► Task(settings, train, validation, device)
            new run: seeded ──────────────────────────────► new_model()              a diffusers ModelMixin
                     (--init: its weights loaded into it, so the architecture must match)
            resume: load_trained(model_class, checkpoint)
            data-parallel wrapping ───────────────────────► wrap(model)              the module run forward
            each step, rng seeded by (seed, step, rank) ──► loss(wrapped, rng)       (loss, shown parts)
            each report ──────────────────────────────────► validate(model)          metrics; `progress`
                                                                                     says which are shown
    driver: end, from the last checkpoint ────────────────► export(settings, trained, metrics, folder)

The loop owns the optimizer (AdamW), learning-rate warm-down, gradient clipping, checkpoints, resume,
progress lines and the atomic write of the output folder; a task owns its model, the views of the data
it trains on, its objective, its metrics and what it writes. A task module imports nothing from
pipeline/; it is found by name through `registry.training_task`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ParameterError
from .parts.imagefile import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # torch is imported where a task runs, not where `diffarc train` checks its options
    import numpy as np
    import torch


@dataclass
class TrainSettings:
    """Everything a training run needs; `diffarc train` fills it, the loop and the task read it."""

    what: str  # the training task's registry name, e.g. "autoencoder", "diffusion", "latent-denoise"
    data: str
    out: str
    work_dir: str
    steps: int = 2000
    batch_size: int = 8
    crop: int = 256
    lr: float = 2e-4
    workers: int = 1
    gpu: bool = False
    in_process: bool = False  # train in the calling process without Ray (one worker)
    minutes: float | None = None  # stop (checkpointed and exported) after this many minutes of training
    checkpoint_minutes: float = 5.0
    report_seconds: float = 30.0
    config: str = "small"  # the model size: a key of the task's configs (tiny, small, base)
    autoencoder: str | None = None  # a model reference of the frozen autoencoder (diffusion)
    model: str | None = None  # a frozen model the task builds on: latent-denoise's latent diffusion model, hfd's learned base
    init: str | None = None  # a new run starts from these weights (a model reference) instead of a fresh model
    lpips_weights: str | None = None
    lpips_weight: float = 0.5
    save_dtype: str = "float32"
    storage_options: dict = field(default_factory=dict)
    seed: int = 0
    max_images: int | None = None  # use only the first N images (smoke tests)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger training images are skipped, as encode would skip them

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the exported weights are written in."""
        import torch

        return {"float32": torch.float32, "float16": torch.float16}[self.save_dtype]


class SettingsError(ParameterError):
    """A training setting a task cannot run with; `setting` names the TrainSettings field."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting

    def __reduce__(self):  # raised in a Ray worker, it is pickled back to the driver
        return type(self), (self.setting, str(self))


class TrainingTask(ABC):
    """One trainable model: its construction, objective, validation and export (see the module docstring)."""

    name: ClassVar[str]
    model_class: ClassVar[type]  # a diffusers ModelMixin: checkpoints are its save_pretrained folders
    # Format strings over the metrics (loss parts and validation), shown in order on each progress line.
    progress: ClassVar[tuple[str, ...]] = ()
    # Settings the task cannot run without (a frozen model it builds on), each with the reason shown when missing.
    required: ClassVar[dict[str, str]] = {}
    crop_multiple: ClassVar[int] = 8  # the latent autoencoders downsample 8×
    configs: ClassVar[tuple[str, ...]] = ("tiny", "small", "base")  # what --config may name
    export_folder: ClassVar[str] = ""  # where the default `export` writes the weights, inside the output

    @classmethod
    def check(cls, settings: TrainSettings) -> None:
        """Raise SettingsError for settings this task cannot run with, before any work starts."""
        if settings.config not in cls.configs:
            raise SettingsError("config", f"{cls.name} configs are {', '.join(cls.configs)}; got {settings.config!r}")
        if settings.in_process and settings.workers != 1:
            raise SettingsError("workers", "--in-process trains one worker in this process; --workers must be 1")
        if settings.crop % cls.crop_multiple:
            raise SettingsError("crop", f"the training crop {settings.crop} must be a multiple of {cls.crop_multiple}")
        for setting, reason in cls.required.items():
            if not getattr(settings, setting):
                raise SettingsError(setting, reason)

    def __init__(self, settings: TrainSettings, train: list[np.ndarray], validation: list[np.ndarray], device):
        self.settings, self.device = settings, device

    @abstractmethod
    def new_model(self) -> torch.nn.Module:
        """A freshly initialised model (the loop seeds torch first)."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward `loss` runs, prepared for data parallelism by the loop."""
        return model

    @abstractmethod
    def loss(self, wrapped: torch.nn.Module, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one batch drawn with `rng`, and named float parts of it to report."""

    @abstractmethod
    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Held-out metrics (floats); the loop calls it in eval mode without gradients."""

    @classmethod
    def export(cls, settings: TrainSettings, trained: Path, metrics: dict, folder: Path) -> None:
        """Write the trained model (a save_pretrained folder) as the run's output, into `folder`."""
        save_trained(cls.model_class, trained, settings.weights_dtype, folder / cls.export_folder)


def load_trained(model_class: type, folder: Path, dtype=None):
    """A save_pretrained folder's model in `dtype` (default float32), cast as it loads (casting afterwards
    makes diffusers warn); low_cpu_mem_usage off: the default wants `accelerate`, and only warns without it."""
    return model_class.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False, torch_dtype=dtype)


def save_trained(model_class: type, trained: Path, dtype, target: Path) -> None:
    """Write a checkpoint's model (a save_pretrained folder) to `target` in `dtype`: a run's export."""
    load_trained(model_class, trained, dtype).save_pretrained(str(target))
