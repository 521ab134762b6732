"""Training crops: full-size crops from any image, drawn only from the caller's generator."""

import numpy as np
import torch

from diffarc.codecs.parts.crops import center_crops, fit_crop, latent_crops, random_crops, training_latents

from ..conftest import photo_like

IMAGES = [photo_like(40, 56, 0), photo_like(20, 70, 1), photo_like(90, 33, 2)]


def test_fit_crop_mirror_pads_only_what_is_smaller_than_the_crop():
    image = IMAGES[1]  # 20 × 70
    fitted = fit_crop(image, 32)
    assert fitted.shape == (32, 70, 3)
    assert np.array_equal(fitted[:20], image) and np.array_equal(fitted[20:], image[::-1][:12])
    assert fit_crop(IMAGES[0], 32) is IMAGES[0]


def test_random_crops_are_a_function_of_the_generator():
    first = random_crops(IMAGES, 6, 32, np.random.default_rng(7))
    assert first.shape == (6, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, random_crops(IMAGES, 6, 32, np.random.default_rng(7)))
    assert not torch.equal(first, random_crops(IMAGES, 6, 32, np.random.default_rng(8)))


def test_center_crops_take_the_middle_of_at_most_limit_images():
    crops = center_crops(IMAGES, 16, limit=2)
    assert crops.shape == (2, 3, 16, 16)
    middle = IMAGES[0][12:28, 20:36]
    assert torch.allclose(crops[0], torch.from_numpy(middle).permute(2, 0, 1).float() / 127.5 - 1)


def test_training_latents_encode_each_image_and_its_mirror_once():
    seen = []

    def encode(x):  # a stand-in encoder: 8× average pooling, as shapes go
        seen.append(x.shape)
        return torch.nn.functional.avg_pool2d(x, 8)

    latents = training_latents(encode, IMAGES, 32, "cpu", mirrored=True)
    assert len(latents) == 6 and len(seen) == 6
    # Sides are cut to multiples of 8, then padded up to the crop.
    assert [tuple(z.shape) for z in latents[::2]] == [(3, 5, 7), (3, 4, 8), (3, 11, 4)]
    assert torch.allclose(latents[1], latents[0].flip(-1), atol=1e-6)
    assert len(training_latents(encode, IMAGES, 32, "cpu", mirrored=False)) == 3


def test_latent_crops_cut_equal_squares_at_random():
    latents = [torch.randn(4, 6, 9), torch.randn(4, 12, 5)]
    crops = latent_crops(latents, 5, 4, np.random.default_rng(0))
    assert crops.shape == (5, 4, 4, 4)
    assert torch.equal(crops, latent_crops(latents, 5, 4, np.random.default_rng(0)))
