"""Training crops: image crops in [-1, 1] and latent crops of images passed once through a frozen encoder.

Every draw comes from the caller's numpy Generator, so a training loop that seeds it by step number
sees the same batches after a resume.

A frozen encoder's latents can be kept on disk between runs (`cache=` the encoder's fingerprint): taef2's
encoder costs about 20 CPU-minutes over the training set with mirrors, which every resumed or repeated
run would otherwise pay again. The cache is `$DIFFARC_LATENT_CACHE` (default `~/.cache/diffarc/latents/`),
one safetensors file per image and encoder, named by the SHA-256 of the image's pixels.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch

LATENT_CACHE_ENV = "DIFFARC_LATENT_CACHE"


def fit_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """Mirror-pad an image smaller than the crop so every image yields full crops."""
    pad_h, pad_w = max(0, crop - image.shape[0]), max(0, crop - image.shape[1])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    return image


def random_crops(images: list[np.ndarray], count: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, 3, crop, crop) in [-1, 1]: random image, random position, random horizontal flip."""
    out = []
    for _ in range(count):
        image = fit_crop(images[rng.integers(len(images))], crop)
        y = rng.integers(image.shape[0] - crop + 1)
        x = rng.integers(image.shape[1] - crop + 1)
        patch = image[y : y + crop, x : x + crop]
        out.append(patch[:, ::-1] if rng.random() < 0.5 else patch)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def center_crops(images: list[np.ndarray], crop: int, limit: int = 16) -> torch.Tensor:
    """(min(limit, len(images)), 3, crop, crop) in [-1, 1]: the centre of each image, for validation."""
    out = []
    for image in images[:limit]:
        image = fit_crop(image, crop)
        y, x = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
        out.append(image[y : y + crop, x : x + crop])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def latent_cache_dir() -> Path:
    return Path(os.environ.get(LATENT_CACHE_ENV) or Path.home() / ".cache" / "diffarc" / "latents")


@torch.no_grad()
def training_latents(
    encode, images: list[np.ndarray], crop: int, device, mirrored: bool, cache: str | None = None
) -> list[torch.Tensor]:
    """Each image (and its mirror image) through a frozen encoder once: (C, h, w) latents to crop from.

    `cache`: the encoder's fingerprint (hex); latents are then read from and written to the disk cache."""
    from safetensors.torch import load_file, save_file

    folder = latent_cache_dir() / cache if cache else None
    latents = []
    for image in images:
        image = np.ascontiguousarray(fit_crop(image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8], crop))
        views = ("image", "mirror") if mirrored else ("image",)
        path = None
        if folder is not None:
            digest = hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()
            path = folder / f"{digest}.safetensors"
            stored = load_file(str(path)) if path.is_file() else {}
            if all(view in stored for view in views):
                latents.extend(stored[view].to(device) for view in views)
                continue
        encoded = {}
        for view in views:
            pixels = image if view == "image" else np.ascontiguousarray(image[:, ::-1])
            x = torch.tensor(pixels).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1  # a copy: images may be read-only
            encoded[view] = encode(x)[0]
        latents.extend(encoded.values())
        if path is not None:  # written whole under a fresh name, then renamed: a kill leaves no half file
            folder.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
            save_file({view: z.detach().cpu().contiguous() for view, z in encoded.items()}, str(staging))
            staging.replace(path)
    return latents


def mirrored_views(images: list[np.ndarray], crop: int, mirrored: bool) -> list[np.ndarray]:
    """Each image as `training_latents` encodes it (cut to whole latent px, grown to the crop) and its mirror:
    the pixels of each latent it returns, in its order."""
    views = []
    for image in images:
        image = fit_crop(image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8], crop)
        views.extend([image, image[:, ::-1]] if mirrored else [image])
    return views


def latent_crops(latents: list[torch.Tensor], count: int, side: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, C, side, side): random latent, random position."""
    out = []
    for _ in range(count):
        z = latents[rng.integers(len(latents))]
        y, x = rng.integers(z.shape[1] - side + 1), rng.integers(z.shape[2] - side + 1)
        out.append(z[:, y : y + side, x : x + side])
    return torch.stack(out)
