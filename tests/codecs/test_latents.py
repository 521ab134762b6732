"""Images ⇄ latents for any image size, on a tiny diffusers model saved by the test."""

import dataclasses
import numpy as np
import pytest
import torch

from diffarc.codecs.parts.latents import (
    VAE_DOWNSAMPLING, decode_latents, encode_latents, images_to_tensor, latent_size, padded_size, tensor_to_images,
)  # fmt: skip
from diffarc.codecs.parts.models import load_model

from ..conftest import photo_like, save_tiny_ldm

SIZES = [(1, 1), (1, 4000), (17, 9), (40, 56), (64, 48)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(save_tiny_ldm(tmp_path_factory.mktemp("ldm"))))


def test_padded_size_rounds_each_side_up_to_a_multiple():
    assert padded_size(1, 1, 16) == (16, 16)
    assert padded_size(17, 9, 8) == (24, 16)
    assert padded_size(48, 64, 16) == (48, 64)
    assert padded_size(1, 4000, 16) == (16, 4000)


def test_latent_size_pads_to_what_the_vae_and_unet_need_and_to_whole_tiles(model):
    # The tiny UNet has two levels: the latent must be even, so images pad to multiples of 16 pixels.
    assert latent_size(model, 40, 56) == (4, 6, 8)
    assert latent_size(model, 1, 1) == (4, 2, 2)
    assert latent_size(model, 1, 4000) == (4, 2, 500)
    assert latent_size(model, 40, 56, multiple=3) == (4, 6, 12)  # lcm(2, 3) = 6 latent px


def test_latent_size_of_an_autoencoder_without_a_unet_pads_to_the_vae_alone():
    taef2 = dataclasses.replace(load_model("builtin:taef2"), unet=None)  # as the folder is without unet/
    assert latent_size(taef2, 40, 56) == (32, 5, 7)
    assert latent_size(taef2, 40, 56, multiple=4) == (32, 8, 8)


@pytest.mark.parametrize("height, width", SIZES)
def test_images_round_trip_through_tensors_at_any_size(height, width):
    image = photo_like(height, width, seed=height + width)
    size = padded_size(height, width, 16)
    x = images_to_tensor([image, image[::-1].copy()], size, "cpu", torch.float32)
    assert x.shape == (2, 3, *size) and x.min() >= -1 and x.max() <= 1
    back = tensor_to_images(x, [(height, width)] * 2)
    assert np.array_equal(back[0], image) and np.array_equal(back[1], image[::-1])
    # Padding replicates the last row and column.
    padded = tensor_to_images(x, [size])[0]
    assert np.array_equal(padded[height:, :width], np.repeat(image[-1:], size[0] - height, axis=0))
    assert np.array_equal(padded[:height, width:], np.repeat(image[:, -1:], size[1] - width, axis=1))


@pytest.mark.parametrize("height, width", SIZES)
def test_latents_of_any_size_decode_to_the_padded_size(model, height, width):
    c, h, w = latent_size(model, height, width)
    x = images_to_tensor([photo_like(height, width, 0)], (h * VAE_DOWNSAMPLING, w * VAE_DOWNSAMPLING), "cpu", torch.float32)
    with torch.no_grad():
        z = encode_latents(model, x)
        assert z.shape == (1, c, h, w)
        decoded = tensor_to_images(decode_latents(model, z), [(height, width)])[0]
    assert decoded.shape == (height, width, 3) and decoded.dtype == np.uint8


def test_latents_are_in_the_diffusion_models_scaled_space(model):
    x = images_to_tensor([photo_like(32, 32, 1)], (32, 32), "cpu", torch.float32)
    with torch.no_grad():
        z = encode_latents(model, x)
        assert torch.allclose(z, model.vae.encode(x).latent_dist.mode() * model.scaling_factor)
        assert torch.allclose(decode_latents(model, z), model.vae.decode(z / model.scaling_factor).sample, atol=1e-6)
    assert model.scaling_factor != 1.0  # the scaling is really applied (diffusers' default, 0.18215)
