"""Codec names → codec classes, and training-task names → training tasks (`diffarc train WHAT`).

A new codec is one file (or one folder) in this package and one line here; a model it trains is a
`task.TrainingTask` in that folder's task.py and one more line. Classes are imported on first use so
that listing codecs or tasks, or using a classical codec, does not load torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

from .base import Codec
from .container import Header, unpack
from .errors import ParameterError, UnknownCodecError

if TYPE_CHECKING:
    from .task import TrainingTask

_CODECS = {
    "jpeg": "diffarc.codecs.classical:JpegCodec",
    "webp": "diffarc.codecs.classical:WebpCodec",
    "avif": "diffarc.codecs.classical:AvifCodec",
    "ddcm": "diffarc.codecs.ddcm:DdcmCodec",
    "latent-denoise": "diffarc.codecs.latent_denoise.codec:LatentDenoiseCodec",
}

_TRAINING_TASKS = {
    "autoencoder": "diffarc.codecs.ldm.task:AutoencoderTask",
    "diffusion": "diffarc.codecs.ldm.task:DiffusionTask",
    "latent-denoise": "diffarc.codecs.latent_denoise.task:PredictorsTask",
}

# The codec `encode` uses when none is named: the best one that runs anywhere without weights.
DEFAULT_CODEC = "avif"


def codec_names() -> list[str]:
    return sorted(_CODECS)


def codec_class(name: str) -> type[Codec]:
    return _load(_CODECS, name, "codec", UnknownCodecError)


def training_task_names() -> list[str]:
    return sorted(_TRAINING_TASKS)


def training_task(name: str) -> type[TrainingTask]:
    return _load(_TRAINING_TASKS, name, "training task", ParameterError)


def _load(table: dict[str, str], name: str, kind: str, error: type[Exception]):
    if name not in table:
        raise error(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def create_codec(
    name: str, params: Mapping[str, Any] | None = None, preset: str | None = None, device: str = "cpu"
) -> Codec:
    cls = codec_class(name)
    return cls(device=device, **cls.resolve_params(params or {}, preset))


def codec_for_header(header: Header, device: str = "cpu") -> Codec:
    """The codec that decodes a stream with this header."""
    return create_codec(header.codec, header.params, device=device)


def read_header(stream: bytes) -> Header:
    return unpack(stream)[0]
