"""Training pairs of the latent detail decoder: the latents of training images and of their AVIF bases.

    training image ─► crops.training_latents (the autoencoder's latent cache) ─────────────────► z_x
    training image ─► AVIF at (quality, scale), whole ─► base picture ─► autoencoder's encoder ─► z_b
    draw: a random image, one of its bases, the same random crop of z_x and z_b

Choices:
- A base's latent costs an encoder pass (0.3–1.5 s on two cores for a training image), so each image has a
  fixed set of VARIANTS bases, made once and kept on disk beside the originals' latents (under
  `<latent cache>/<autoencoder fingerprint>/avif-bases/`, one file per image holding all its bases), not a
  fresh AVIF at every draw. Across the 563 training images the variants cover every quality in QUALITIES at
  scale 1, and scales 2 and 4, each image with its own qualities (drawn from a generator seeded by the
  image's pixels, so the set is the same in every run).
- The bases are coded from the whole image, as the codec codes it (AVIF's artefacts on a crop are not those
  on a photograph), then cut as the originals' latents are (`crops.fit_crop` of the image trimmed to a
  multiple of 8), so the two latents are aligned position for position.
- No flips or rotations: a latent of a flipped picture is not the flipped latent (the encoder is not
  equivariant), so they would teach the network latents the encoder never makes.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import torch

from ..parts.crops import fit_crop, latent_cache_dir, training_latents
from ..parts.latents import encode_latents, tensor_to_images
from ..parts.models import LatentDiffusionModel, fingerprint
from .bases import AvifBase

QUALITIES = (0, 5, 10, 15, 20, 25, 30, 35)  # the range the codec's presets use; higher ones are extrapolated
VARIANT_SCALES = (1, 1, 1, 2, 4)  # the bases each training image gets: three at full resolution, one at 1/2, one at 1/4
SPEED = 6  # the codec's default AVIF speed
BASES_FOLDER = "avif-bases"
DOWNSAMPLING = 8


def autoencoder_fingerprint(autoencoder: LatentDiffusionModel) -> str:
    """Hex fingerprint of the autoencoder alone (weights and latent scaling): the latent caches' key."""
    return fingerprint({"vae": autoencoder.vae}, (autoencoder.scaling_factor, autoencoder.shift_factor)).hex()


def variants(image: np.ndarray) -> list[dict]:
    """The base settings of one training image: VARIANT_SCALES, each at its own quality (module docstring)."""
    rng = np.random.default_rng(int(hashlib.sha256(image.tobytes()).hexdigest()[:16], 16))
    qualities = rng.choice(QUALITIES, size=len(VARIANT_SCALES), replace=False)
    return [{"quality": int(q), "scale": s, "speed": SPEED} for q, s in zip(qualities, VARIANT_SCALES)]


def _key(config: dict) -> str:
    return f"q{config['quality']}-s{config['scale']}-v{config['speed']}"


class LatentPairs:
    """(z_x, [z_b of each base]) of every image, made or read from the disk caches once."""

    def __init__(self, autoencoder: LatentDiffusionModel, images: list[np.ndarray], crop: int, device,
                 configs: list[dict] | None = None):  # fmt: skip
        """`configs`: the bases of every image (validation); default: each image's own `variants`."""
        self.autoencoder, self.crop, self.device = autoencoder, crop, device
        cache = autoencoder_fingerprint(autoencoder)
        self.folder = latent_cache_dir() / cache / BASES_FOLDER
        encode = lambda x: encode_latents(autoencoder, x)  # noqa: E731
        self.originals = training_latents(encode, images, crop, device, mirrored=False, cache=cache)
        self.configs = [configs or variants(image) for image in images]
        self.bases = [self.base_latents(image, image_configs) for image, image_configs in zip(images, self.configs)]

    @torch.no_grad()
    def base_latents(self, image: np.ndarray, configs: list[dict]) -> list[torch.Tensor]:
        """The latents of an image's bases at `configs`, from the cache or encoded (and then cached)."""
        from safetensors.torch import load_file, save_file

        trimmed = np.ascontiguousarray(fit_crop(image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8], self.crop))
        path = self.folder / f"{hashlib.sha256(repr(trimmed.shape).encode() + trimmed.tobytes()).hexdigest()}.safetensors"
        stored = load_file(str(path)) if path.is_file() else {}
        missing = [config for config in configs if _key(config) not in stored]
        for config in missing:
            picture = tensor_to_images(AvifBase().encode_with_picture(image, config)[1], [image.shape[:2]])[0]
            cut = fit_crop(picture[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8], self.crop)
            x = torch.from_numpy(np.ascontiguousarray(cut)).permute(2, 0, 1)[None].float().to(self.device) / 127.5 - 1
            stored[_key(config)] = encode_latents(self.autoencoder, x)[0].cpu()
        if missing:  # written whole under a fresh name, then renamed: a kill leaves no half file
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
            save_file({k: v.contiguous() for k, v in stored.items()}, str(staging))
            staging.replace(path)
        return [stored[_key(config)].to(self.device) for config in configs]

    def draw(self, rng: np.random.Generator, images: int, per_image: int) -> tuple[torch.Tensor, ...]:
        """(z_x, z_b, quality, scale) of `images` × `per_image` crops: (B, C, s, s) twice, then (B,) twice."""
        side = self.crop // DOWNSAMPLING
        originals, bases, qualities, scales = [], [], [], []
        for index in rng.integers(len(self.originals), size=images):
            choice = int(rng.integers(len(self.bases[index])))
            original, base, config = self.originals[index], self.bases[index][choice], self.configs[index][choice]
            for _ in range(per_image):
                y, x = rng.integers(original.shape[1] - side + 1), rng.integers(original.shape[2] - side + 1)
                originals.append(original[:, y : y + side, x : x + side])
                bases.append(base[:, y : y + side, x : x + side])
                qualities.append(float(config["quality"]))
                scales.append(float(config["scale"]))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return torch.stack(originals), torch.stack(bases), as_tensor(qualities), as_tensor(scales)

    def centre_crops(self) -> dict:
        """Every (image, base) pair's centre crop, in the validation batch's layout."""
        side, rows = self.crop // DOWNSAMPLING, []
        for original, bases, configs in zip(self.originals, self.bases, self.configs):
            y, x = (original.shape[1] - side) // 2, (original.shape[2] - side) // 2
            for base, config in zip(bases, configs):
                rows.append((original[:, y : y + side, x : x + side], base[:, y : y + side, x : x + side], config))
        if not rows:
            return {}
        return {
            "x": torch.stack([r[0] for r in rows]),
            "base": torch.stack([r[1] for r in rows]),
            "rate": torch.tensor([float(r[2]["quality"]) for r in rows], device=self.device),
            "scale": torch.tensor([float(r[2]["scale"]) for r in rows], device=self.device),
        }

