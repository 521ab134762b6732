"""Training crops: image crops in [-1, 1] and latent crops of images passed once through a frozen encoder.

Every draw comes from the caller's numpy Generator, so a training loop that seeds it by step number
sees the same batches after a resume.
"""

from __future__ import annotations

import numpy as np
import torch


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


@torch.no_grad()
def training_latents(encode, images: list[np.ndarray], crop: int, device, mirrored: bool) -> list[torch.Tensor]:
    """Each image (and its mirror image) through a frozen encoder once: (C, h, w) latents to crop from."""
    latents = []
    for image in images:
        image = fit_crop(image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8], crop)
        for view in (image, image[:, ::-1]) if mirrored else (image,):
            x = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
            latents.append(encode(x)[0])
    return latents


def latent_crops(latents: list[torch.Tensor], count: int, side: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, C, side, side): random latent, random position."""
    out = []
    for _ in range(count):
        z = latents[rng.integers(len(latents))]
        y, x = rng.integers(z.shape[1] - side + 1), rng.integers(z.shape[2] - side + 1)
        out.append(z[:, y : y + side, x : x + side])
    return torch.stack(out)
