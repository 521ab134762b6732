"""Images ⇄ latents of a model's autoencoder, for images of any size.

Images are edge-padded to a multiple of `multiple` pixels (the autoencoder's 8× downsampling times
whatever the diffusion UNet needs), encoded, and cropped back after decoding. Latents are in the
diffusion model's space: (mode of the posterior − shift) × scaling_factor, as Stable Diffusion does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

VAE_DOWNSAMPLING = 8


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def latent_size(model, height: int, width: int, multiple: int = 1) -> tuple[int, int, int]:
    """(C, h, w) latent of an image edge-padded to what the VAE and the UNet (if the model has one) need, and
    to `multiple` latent px."""
    if model.unet is None:
        unet_multiple, channels = 1, model.vae.config.latent_channels
    else:
        unet_multiple, channels = 2 ** (len(model.unet.config.block_out_channels) - 1), model.unet.config.in_channels
    h, w = padded_size(height, width, VAE_DOWNSAMPLING * math.lcm(unet_multiple, multiple))
    return channels, h // VAE_DOWNSAMPLING, w // VAE_DOWNSAMPLING


def images_to_tensor(images: list[np.ndarray], size: tuple[int, int], device, dtype) -> torch.Tensor:
    """A batch in [-1, 1], each image edge-padded (replicated borders) to `size`."""
    batch = []
    for image in images:
        x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float() / 127.5 - 1  # a writable copy
        pad_h, pad_w = size[0] - image.shape[0], size[1] - image.shape[1]
        if pad_h or pad_w:
            # replicate needs a 3-D/4-D input and at least 1 pixel; it works for 1-pixel images too
            x = F.pad(x.unsqueeze(0), (0, pad_w, 0, pad_h), mode="replicate").squeeze(0)
        batch.append(x)
    return torch.stack(batch).to(dtype)


def tensor_to_images(x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(p[:h, :w]) for p, (h, w) in zip(pixels, sizes)]


def encode_latents(model, x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → diffusion-space latents (deterministic: the posterior's mode)."""
    vae = model.vae
    encoded = vae.encode(x)
    latent = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
    return (latent - model.shift_factor) * model.scaling_factor


def picture_statistics(model, latents: torch.Tensor) -> list:
    """The pooled statistics of the pictures of diffusion-space latents (a decoder that normalises over the
    whole picture, parts/taef2.py), for `decode_latents` of crops of them."""
    return model.vae.pool_statistics(latents / model.scaling_factor + model.shift_factor)


def decode_latents(model, latents: torch.Tensor, statistics: list | None = None) -> torch.Tensor:
    """Diffusion-space latents → [-1, 1] images. `statistics`: for each latent of the batch, the
    `picture_statistics` of the picture it is a crop of, so that it decodes as it does inside it."""
    raw = latents / model.scaling_factor + model.shift_factor
    if statistics is None:
        return model.vae.decode(raw).sample
    stacked = [tuple(torch.cat(parts) for parts in zip(*block)) for block in zip(*statistics)]
    return model.vae.decode(raw, statistics=stacked).sample
