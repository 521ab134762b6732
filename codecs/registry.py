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
    "jxl": "diffarc.codecs.jxl:JxlCodec",
    "ddcm": "diffarc.codecs.ddcm:DdcmCodec",
    "latent-denoise": "diffarc.codecs.latent_denoise.codec:LatentDenoiseCodec",
    "hfd": "diffarc.codecs.hfd.codec:HfdCodec",
    "hyperprior": "diffarc.codecs.hyperprior.codec:HyperpriorCodec",
    "corrdiff": "diffarc.codecs.corrdiff.codec:CorrDiffCodec",
    "corrdiff-latent": "diffarc.codecs.corrdiff.latent:LatentCorrDiffCodec",
    "glc": "diffarc.codecs.glc.codec:GlcCodec",
}

_TRAINING_TASKS = {
    "autoencoder": "diffarc.codecs.ldm.task:AutoencoderTask",
    "decoder": "diffarc.codecs.ldm.task:DecoderTask",
    "diffusion": "diffarc.codecs.ldm.task:DiffusionTask",
    "latent-denoise": "diffarc.codecs.latent_denoise.task:PredictorsTask",
    "hfd": "diffarc.codecs.hfd.task:DetailDecoderTask",
    "hyperprior": "diffarc.codecs.hyperprior.task:HyperpriorTask",
    "corrdiff": "diffarc.codecs.corrdiff.task:EndToEndDecoderTask",
    "corrdiff-latent": "diffarc.codecs.corrdiff.latent_task:LatentRestorerTask",
    "glc": "diffarc.codecs.glc.task:GlcTask",
}

# The codec `encode` uses when none is named: hfd, whose detail decoder ships with the package; on Kodak
# it costs AVIF's bytes and 0.1–0.25 dB of PSNR for 24–34 % lower LPIPS (MODELS.md), and its base
# decodes with any AVIF decoder should the weights ever be lost.
DEFAULT_CODEC = "hfd"


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


def codec_for_header(header: Header, device: str = "cpu", model: str | None = None) -> Codec:
    """The codec that decodes a stream with this header, its weights found as `open_codec` says. A
    standalone stream's own word on where its weights are (location params of streams written before they
    were kept out) is never trusted: it may come from anyone."""
    return open_codec(header.codec, header.params, header.fingerprint, model=model, device=device)


def open_codec(
    name: str,
    params: Mapping[str, Any],
    fingerprint: bytes,
    model: str | None = None,
    embedded: str | None = None,
    hint: Mapping[str, Any] | None = None,
    device: str = "cpu",
    trust_hint: bool = False,
) -> Codec:
    """A decoder for streams of this codec, parameters and weights' fingerprint.

    The weights are looked for, in order, in: `model` (the user's --model override), `embedded` (an
    archive's own models/<fingerprint>/ folder), the local cache folder for the fingerprint, `hint`
    (location params recorded when encoding; location params in `params` — streams written before they
    were kept out — count as a hint too), the codec's defaults, and its other built-in weights
    (`Codec.builtin_weights`). A folder
    candidate is one laid out as `Codec.weights_folders` describes. The first candidate whose weights
    have the fingerprint wins; when none has, ModelError lists every candidate and what was found there.

    A hint comes from the archive or stream, which may be hostile: a URL would be fetched, a folder listed.
    So it is looked at only with `trust_hint` (the user's --trust-hint), or when it names nothing but
    weights this package ships (`builtin:NAME`), where looking reads nothing else.
    """
    from .errors import ModelError

    cls = codec_class(name)
    stream_params, recorded = cls.split_params(params)
    if not any(p.location for p in cls.params):  # no weights: nothing to look for
        codec = create_codec(name, stream_params, device=device)
        if codec.fingerprint != fingerprint:
            raise ModelError(f"{name} streams carry no weights, but this one names fingerprint {fingerprint.hex()}")
        return codec
    candidates: list[tuple[str, dict | None]] = []  # (where, location params); None: nothing there
    if model:
        candidates.append((f"--model {model}", cls.locations_in(model)))
    if embedded:
        candidates.append((f"the archive's {embedded}", cls.locations_in(embedded)))
    cached = cached_weights(fingerprint)
    candidates.append((f"the model cache {cached}", cls.locations_in(str(cached)) if cached.is_dir() else None))
    hint = {**recorded, **(hint or {})}
    untrusted = bool(hint) and not (trust_hint or _shipped(hint))
    if hint and not untrusted:
        candidates.append((f"the recorded location {_show(hint)}", hint))
    defaults = {p.name: p.default for p in cls.params if p.location}
    candidates.append((f"the default {_show(defaults)}", defaults))
    # Other built-in weights the codec names, e.g. a former default (builtin:ldm-small before issue 22), whose streams still decode.
    for reference, params in cls.builtin_weights().items():
        if located := {k: v for k, v in params.items() if k in defaults}:
            candidates.append((f"the built-in {reference}", {**defaults, **located}))
    tried: list[str] = []
    seen: list[dict] = []
    for origin, locations in candidates:
        if locations is None:
            tried.append(f"{origin} (absent)")
            continue
        if locations in seen:
            continue
        seen.append(locations)
        try:
            codec = create_codec(name, {**stream_params, **locations}, device=device)
        except Exception as exc:  # a missing folder, a foreign layout, damaged weights: say so, try the next
            tried.append(f"{origin} ({type(exc).__name__}: {exc})")
            continue
        if codec.fingerprint == fingerprint:
            return codec
        tried.append(f"{origin} (weights {codec.fingerprint.hex()[:12]}…)")
    from .base import retired_weights

    advice = retired_weights(fingerprint) or "Pass --model FOLDER with those weights."
    if untrusted:
        advice += (f" The location recorded when encoding, {_show(hint)}, was not looked at: it came with the data, "
                   "not from you (pass it as --model, or --trust-hint to try it).")  # fmt: skip
    raise ModelError(
        f"no model weights with fingerprint {fingerprint.hex()} found for {name}; tried {'; '.join(tried)}. {advice}"
    )


def cached_weights(fingerprint: bytes):
    """The local model cache's folder for weights of this fingerprint (it may not exist): the third place
    `open_codec` looks, and where an archive's embedded weights are copied to from a remote archive."""
    from .parts.models import cached_weights_folder

    return cached_weights_folder(fingerprint.hex())


def cache_weights(fingerprint: bytes, fs, root: str, files) -> Any:
    """Copy weights files (relative to `root` on the fsspec filesystem `fs`: an archive's models/ folder on an
    object store) into the local model cache's folder for `fingerprint`, whole or not at all, once; returns it."""
    from .parts.models import copy_folder

    return copy_folder(fs, root, files, cached_weights(fingerprint))


def weights_folder(reference: str):
    """The local folder a weights reference (builtin:NAME, folder, fsspec URL) names, a remote one copied
    into the cache once; None for a hub id."""
    from .parts.models import resolve_folder

    return resolve_folder(reference)


def _shipped(locations: Mapping[str, Any]) -> bool:
    """Whether every location is empty (the codec's default) or `builtin:NAME` of a folder this package ships."""
    from .parts.models import BUILTIN_DIR

    shipped = {f"builtin:{p.name}" for p in BUILTIN_DIR.iterdir() if p.is_dir()} if BUILTIN_DIR.is_dir() else set()
    return all(value in ("", None) or value in shipped for value in locations.values())


def _show(locations: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in locations.items() if v) or "(none)"


def read_header(stream: bytes) -> Header:
    return unpack(stream)[0]


def builtin_codec_weights() -> list[dict[str, Any]]:
    """The shipped weights that belong to one codec rather than being a latent diffusion model (hfd's
    detail decoder): one row per built-in folder a codec's default points at, as `builtin_models` rows.
    A part inside a model's folder (taef2's former UNet, glc's former transforms) is in that model's row."""
    from .parts.models import BUILTIN_DIR, folder_bytes, parameter_count

    rows = []
    for name in codec_names():
        for reference, params in codec_class(name).builtin_weights().items():
            folder = BUILTIN_DIR / reference.split(":", 1)[1]
            if folder.is_dir() and not (folder / "vae").is_dir() and not (folder.parent / "vae").is_dir():
                rows.append({
                    "name": reference, "path": str(folder), "parameters": parameter_count(folder),
                    "bytes": folder_bytes(folder), "fingerprint": create_codec(name, params).fingerprint.hex(),
                    "components": [name],
                })  # fmt: skip
    return rows
