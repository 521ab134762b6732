"""The one place that turns a model reference into loaded models, and fingerprints them.

    reference ──resolve_folder──► local diffusers folder ──load──► LatentDiffusionModel (cached per process)
                                   vae/  unet/  scheduler/          vae, unet, scheduler config, fingerprint

A reference is one of:
- `builtin:<name>`: a model shipped in this package, `codecs/builtin/<name>/` (trained by `diffarc train`);
- a local folder;
- an fsspec URL of a folder (`s3://…`, `gs://…`, `memory://…`, `file://…`): copied once into
  `$DIFFARC_MODEL_CACHE` (default `~/.cache/diffarc/models/`) under a hash of the URL, then loaded from there;
- `owner/name`: a Hugging Face hub id, through diffusers' `from_pretrained`; works only where the hub can be
  reached. Stable Diffusion 2.1's upstream ids were removed in 2025; any mirror with the same layout works,
  as a hub id, a bucket or a local folder.

The folder layout is diffusers' pipeline layout: `vae/` (AutoencoderKL or AutoencoderTiny), optionally
`unet/` (UNet2DModel or UNet2DConditionModel) and `scheduler/` (a scheduler config). Weights load only
from safetensors: a component whose weights are only pickle files (`.bin`, `.ckpt`, `.pt`, `.pth`) is
refused, since unpickling a file can run arbitrary code.

The fingerprint that bitstreams record is SHA-256 over every tensor of every component, sorted by
`component.tensor` name, each as (name, shape, float32 little-endian values), followed by the VAE's
latent scaling factor and shift (they change what a latent means), and then the noise schedule the
sampler uses — the prediction type and the ᾱ_t table (float64) derived from the scheduler config — so
a model with other betas or another prediction type is another model to a bitstream. It does not depend
on file names, on sharding, on the scheduler's class or its sampling-only options, or on the dtype the
weights were stored in or cast to at load (fp16 values are exact in float32).

Streams and archives name weights by fingerprint only; a reference is where they were found. To decode,
candidate folders are tried in order (`registry.open_codec`) and the first whose weights have the needed
fingerprint is used. One of them is the local cache keyed by fingerprint,
`$DIFFARC_MODEL_CACHE/<fingerprint hex>/`, where copies of weights fetched from remote archives land;
like every candidate, what it holds is checked, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import ModelError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
MODEL_CACHE_ENV = "DIFFARC_MODEL_CACHE"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

# Only these diffusers classes are instantiated from a folder's config: a config cannot name arbitrary code.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "Taef2Autoencoder")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
COMPONENTS = ("vae", "unet")
# The `model` parameter of every codec that decodes with a latent diffusion model: a location, not identity.
DEFAULT_MODEL = "builtin:taef2"
# Built-in models that were the default before: streams name weights by fingerprint, so theirs are still
# looked for there (`Codec.builtin_weights`, registry.open_codec).
FORMER_DEFAULT_MODELS: tuple[str, ...] = ("builtin:ldm-small",)  # until issue 22
# UNets the default model had before its unet/: their streams are found the same way, with the codecs'
# `unet` parameter naming the folder. builtin:taef2's first UNet, 318 steps (2026-12-06), kept when it was
# trained longer.
FORMER_UNETS: tuple[str, ...] = ("builtin:taef2/unet-2026-12-06",)


def builtin_model_weights() -> dict[str, dict[str, str]]:
    """`Codec.builtin_weights` of a codec whose `model` parameter defaults to DEFAULT_MODEL: the default, each
    former default with the `model` that loads it, and each former UNet with the `unet` that loads it."""
    return {
        DEFAULT_MODEL: {},
        **{reference: {"model": reference} for reference in FORMER_DEFAULT_MODELS},
        **{reference: {"unet": reference} for reference in FORMER_UNETS},
    }


MODEL_PARAM_HELP = "diffusers latent diffusion model: builtin:NAME, folder, URL or hub id"
UNET_PARAM_HELP = "the model's diffusion UNet from another folder (builtin:NAME/SUB, folder or URL); default: its unet/"

# The arithmetic a codec's `precision` parameter names; weights are cast to it at load.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LatentDiffusionModel:
    """A latent autoencoder, optionally a diffusion UNet on its latents, and its scheduler config."""

    reference: str
    vae: torch.nn.Module
    unet: torch.nn.Module | None
    scheduler_config: dict | None
    fingerprint: bytes
    folder: Path | None = None
    # The UNet's folder when it is not the model's own unet/ (the codecs' `unet` parameter).
    unet_folder: Path | None = None
    extras: dict = field(default_factory=dict)
    # The autoencoder's alone (vae + latent scaling): what codecs that use no UNet, and the latent cache,
    # key on, so that training a UNet into the same folder changes nothing for them.
    autoencoder_fingerprint: bytes = b""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.get("scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.get("shift_factor", 0.0) or 0.0)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for m in self.modules().values() for p in m.parameters())

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: m for name, m in (("vae", self.vae), ("unet", self.unet)) if m is not None}

    def weights_folders(self) -> dict[str, Path | None]:
        """Where the weights came from, laid out as one model folder (`Codec.weights_folders`)."""
        return {"": self.folder, **({"unet": self.unet_folder} if self.unet_folder is not None else {})}

    def make_scheduler(self):
        """A fresh scheduler object (schedulers are stateful: one per sampling loop)."""
        if self.scheduler_config is None:
            raise ModelError(f"model {self.reference} has no scheduler/ config")
        return _scheduler_class(self.scheduler_config).from_config(self.scheduler_config)


# ---------------------------------------------------------------- fingerprints


def fingerprint(modules: Mapping[str, torch.nn.Module], scaling: Iterable[float] = (), schedule: bytes = b"") -> bytes:
    """SHA-256 of the weights of named modules; see the module docstring for exactly what is hashed."""
    tensors = {
        f"{component}.{name}": tensor
        for component, module in modules.items()
        for name, tensor in module.state_dict().items()
    }
    return fingerprint_tensors(tensors, scaling, schedule)


def schedule_signature(scheduler_config: dict | None) -> bytes:
    """What a sampler takes from the scheduler: its prediction type and ᾱ_t table, as bytes to hash."""
    if scheduler_config is None:
        return b""
    from .denoisers import noise_schedule  # a flow scheduler's σ grid, as the ᾱ table its samplers use

    alphas_cumprod, prediction_type = noise_schedule(_scheduler_class(scheduler_config).from_config(scheduler_config))
    prediction = prediction_type.encode("utf-8")
    table = alphas_cumprod.numpy().astype("<f8").tobytes()
    return struct.pack("<I", len(prediction)) + prediction + table


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor], scaling: Iterable[float] = (), schedule: bytes = b"") -> bytes:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        encoded = name.encode("utf-8")
        digest.update(struct.pack("<I", len(encoded)) + encoded)
        digest.update(struct.pack(f"<I{tensor.dim()}q", tensor.dim(), *tensor.shape))
        # numpy's '<f4' is little-endian whatever the host's byte order.
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    for value in scaling:
        digest.update(struct.pack("<d", float(value)))
    digest.update(schedule)
    return digest.digest()


# ---------------------------------------------------------------- references → local folders


def resolve_folder(reference: str) -> Path | None:
    """The local folder a reference names (copying a remote folder into the cache), or None for a hub id."""
    if reference.startswith("builtin:"):
        name = reference.split(":", 1)[1]
        folder = BUILTIN_DIR / name
        if not name or not folder.is_dir():  # any shipped folder: latent diffusion models and other codecs' weights
            shipped = sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()) if BUILTIN_DIR.is_dir() else []
            raise ModelError(f"no built-in model {name!r}; built-ins: {', '.join(shipped) or '(none shipped)'}")
        return folder
    if "://" in reference:
        if reference.startswith("file://"):
            return _existing_folder(Path(reference[len("file://"):]), reference)
        return _cached_copy(reference)
    path = Path(reference).expanduser()
    if path.exists():
        return _existing_folder(path, reference)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", reference):
        return None  # a hub id
    raise ModelError(
        f"model {reference!r} is not a built-in (builtin:<name>), an existing folder, an fsspec URL, or a "
        "hub id (owner/name)"
    )


def _existing_folder(path: Path, reference: str) -> Path:
    if not path.is_dir():
        raise ModelError(f"model {reference!r} is not a folder")
    return path


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "diffarc" / "models")


def cached_weights_folder(fingerprint_hex: str) -> Path:
    """Where the local cache keeps weights with this fingerprint; it may not exist."""
    return model_cache_dir() / fingerprint_hex


def canonical_reference(reference: str) -> str:
    """An existing local folder as its absolute path, so that it names the same folder from anywhere."""
    if reference and not reference.startswith("builtin:") and "://" not in reference:
        path = Path(reference).expanduser()
        if path.exists():
            return str(path.resolve())
    return reference


def weights_files(folder: Path) -> list[str]:
    """The files of a weights folder that the loaders read (relative, sorted): `*.json` and safetensors
    without a variant suffix, at its top and in vae/, unet/, scheduler/. Text encoders, pickles and fp16
    variants (`*.fp16.safetensors`) are not read, so `encode --embed-model` leaves them behind."""
    found = []
    for directory in (folder, *(folder / c for c in (*COMPONENTS, "scheduler"))):
        if directory.is_dir():
            for path in directory.iterdir():
                variant = path.name.endswith(".safetensors") and "." in path.name[: -len(".safetensors")]
                if path.is_file() and path.suffix in (".json", ".safetensors") and not variant:
                    found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def copy_folder(fs, root: str, files: Iterable[str], target: Path) -> Path:
    """Copy `files` (relative to `root` on filesystem `fs`) into the local folder `target`, whole or not
    at all: they are staged beside it and renamed into place, so a crash leaves no partial folder."""
    if target.is_dir():
        return target
    staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        for relative in files:
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{relative}", str(local))
        staging.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same copy first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _cached_copy(url: str) -> Path:
    """Copy a remote model folder once, into the cache under a hash of its URL."""
    import fsspec

    target = model_cache_dir() / hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
    if target.is_dir():
        return target
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ModelError(f"model URL {url} is not a folder")
    return copy_folder(fs, root, [remote[len(root):].lstrip("/") for remote in fs.find(root)], target)


# ---------------------------------------------------------------- loading


def _diffusers_class(name: str, allowed: tuple[str, ...], where: Path):
    import diffusers

    if name not in allowed:
        raise ModelError(f"{where}/config.json names class {name!r}; diffarc loads only {', '.join(allowed)}")
    return getattr(diffusers, name)


def _scheduler_class(config: dict):
    import diffusers

    name = config.get("_class_name", "")
    if not name.endswith("Scheduler") or not hasattr(diffusers, name):
        raise ModelError(f"scheduler config names unknown class {name!r}")
    return getattr(diffusers, name)


def check_safetensors(component_dir: Path) -> None:
    """Refuse a component whose weights exist only as pickle files."""
    files = [p for p in component_dir.iterdir() if p.is_file()]
    if any(p.name.endswith(".safetensors") for p in files):
        return
    pickles = sorted(p.name for p in files if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(
            f"{component_dir / pickles[0]} is a pickle checkpoint; diffarc does not load pickle files (they can "
            "run code when opened). Convert it to safetensors (e.g. load it where you trust it and call "
            "save_pretrained(..., safe_serialization=True))."
        )
    raise ModelError(f"{component_dir} holds no weights (*.safetensors)")


def part_folder(model_reference: str, explicit: str, inside: str, param: str) -> Path:
    """The folder of a part trained for a model (latent-denoise's predictors, corrdiff-latent's restorer):
    `explicit` when given, else the sub-folder `inside` of the model's own folder. ModelError when neither
    names a folder (a hub id has no sub-folders: the part must then be named with `param`=FOLDER)."""
    folder = resolve_folder(explicit or model_reference)
    if folder is None:
        named = f"{param} {explicit!r}" if explicit else f"model {model_reference!r}"
        raise ModelError(f"{named} is not a folder or an fsspec URL of one; pass {param}=FOLDER")
    return folder if explicit else folder / inside


def load_codec_model(reference: str, model_class: type, device: str, how_to_train: str) -> tuple[Any, Path]:
    """(model in float32 eval mode without gradients, folder) of a codec's own one-model folder (config.json
    naming `model_class` + safetensors); ModelError saying `how_to_train` when the folder holds no such model."""
    folder = resolve_folder(reference)
    config = folder / "config.json" if folder is not None else None
    if config is None or not config.is_file() or json.loads(config.read_text()).get("_class_name") != model_class.__name__:
        raise ModelError(f"{reference!r} holds no {model_class.__name__}; {how_to_train}")
    check_safetensors(folder)
    model = model_class.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False, torch_dtype=torch.float32)
    model.to(device).eval().requires_grad_(False)
    return model, folder


def _load_component(folder: Path, component: str, allowed: tuple[str, ...], dtype: torch.dtype):
    directory = folder / component
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{directory} has no config.json")
    check_safetensors(directory)
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    if class_name == "Taef2Autoencoder" and "Taef2Autoencoder" in allowed:  # our own module, not a diffusers class
        from .taef2 import Taef2Autoencoder

        return Taef2Autoencoder.from_folder(directory, dtype)
    cls = _diffusers_class(class_name, allowed, directory)
    # low_cpu_mem_usage=False: the default path wants `accelerate`, and only warns without it.
    return cls.from_pretrained(str(directory), use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False)


def _load_from_folder(reference: str, folder: Path, dtype: torch.dtype, load_unet: bool = True):
    if not (folder / "vae").is_dir():
        raise ModelError(f"model folder {folder} (from {reference!r}) has no vae/ subfolder")
    vae = _load_component(folder, "vae", VAE_CLASSES, dtype)
    unet = _load_component(folder, "unet", UNET_CLASSES, dtype) if load_unet and (folder / "unet").is_dir() else None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    return vae, unet, scheduler


def _load_from_hub(reference: str, dtype: torch.dtype):
    import diffusers

    try:
        options = dict(use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False)
        vae = diffusers.AutoencoderKL.from_pretrained(reference, subfolder="vae", **options)
        unet = diffusers.UNet2DConditionModel.from_pretrained(reference, subfolder="unet", **options)
        scheduler = dict(diffusers.DDIMScheduler.load_config(reference, subfolder="scheduler"))
    except Exception as exc:  # the hub client raises many kinds: offline, 404, gated, no safetensors
        raise ModelError(
            f"could not load hub model {reference!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "The hub must be reachable and the repository must hold safetensors weights; otherwise copy a "
            "mirror to a local folder or bucket and pass its path or URL."
        ) from None
    return vae, unet, scheduler


@functools.lru_cache(maxsize=8)
def _load_cached(reference: str, unet_reference: str, device: str, dtype: torch.dtype) -> LatentDiffusionModel:
    folder = resolve_folder(reference)
    if folder is None:
        vae, unet, scheduler = _load_from_hub(reference, dtype)
    else:
        vae, unet, scheduler = _load_from_folder(reference, folder, dtype, load_unet=not unet_reference)
    unet_folder = None
    if unet_reference:
        unet_folder = resolve_folder(unet_reference)
        if unet_folder is None:
            raise ModelError(f"unet {unet_reference!r} is not a folder or an fsspec URL of one")
        unet = _load_component(unet_folder.parent, unet_folder.name, UNET_CLASSES, dtype)
    modules = {name: m for name, m in (("vae", vae), ("unet", unet)) if m is not None}
    for module in modules.values():
        module.to(device).eval().requires_grad_(False)
    model = LatentDiffusionModel(reference, vae, unet, scheduler, b"", folder, unet_folder)
    model.fingerprint = fingerprint(modules, (model.scaling_factor, model.shift_factor), schedule_signature(scheduler))
    model.autoencoder_fingerprint = fingerprint({"vae": vae}, (model.scaling_factor, model.shift_factor))
    return model


def load_model(reference: str, device: str = "cpu", dtype: torch.dtype = torch.float32, unet: str = "") -> LatentDiffusionModel:
    """Load a model once per process (per reference, UNet, device and dtype); later calls return the same
    object. `unet` names a folder whose UNet replaces the model's unet/ (a former one, a fine-tuned one).

    The modules are in eval mode with gradients off: codecs share them and must not change them.
    """
    return _load_cached(canonical_reference(reference), canonical_reference(unet) if unet else "", str(device), dtype)


# ---------------------------------------------------------------- built-ins


def builtin_names() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "vae").is_dir())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def parameter_count(folder: Path) -> int:
    """Numbers stored in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    count = 0
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():
                count += math.prod(weights.get_slice(name).get_shape())
    return count


def builtin_models() -> list[dict[str, Any]]:
    """Name, path, parameter count, bytes on disk and fingerprint (hex) of each shipped model."""
    rows = []
    for name in builtin_names():
        model = load_model(f"builtin:{name}")
        rows.append(
            {
                "name": f"builtin:{name}",
                "path": str(BUILTIN_DIR / name),
                "parameters": model.parameters,
                "bytes": folder_bytes(BUILTIN_DIR / name),
                "fingerprint": model.fingerprint.hex(),
                # Trained add-ons that codecs keep beside the model, e.g. latent_denoise/ (its predictors).
                "components": sorted(model.modules()) + sorted(
                    p.name for p in (BUILTIN_DIR / name).iterdir() if p.is_dir() and p.name not in ("vae", "unet", "scheduler")
                ),
            }
        )
    return rows
