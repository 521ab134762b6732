"""The per-image colour transform (parts/colour.py): fitted by least squares, sent in 24 bytes, applied exactly."""

import numpy as np
import pytest

from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.parts.colour import COLOUR_BYTES, apply_colour, fit_colour
from diffarc.codecs.parts.metrics import psnr

from ..conftest import photo_like


def cast(image: np.ndarray) -> np.ndarray:
    """A colour cast like the autoencoder's: reds pulled toward orange, a green offset, some desaturation."""
    matrix = np.array([[0.85, 0.12, 0.0], [0.05, 0.8, 0.05], [0.0, 0.1, 0.75]])
    return np.clip(np.rint(image.astype(np.float64) @ matrix + [4, 12, -6]), 0, 255).astype(np.uint8)


def test_a_fitted_transform_takes_a_colour_cast_back_to_within_a_level():
    image = photo_like(64, 96, 3)
    colour = fit_colour(image, cast(image))
    assert len(colour) == COLOUR_BYTES
    restored = apply_colour(cast(image), colour)
    assert psnr(image, restored) > psnr(image, cast(image)) + 10
    assert np.abs(restored.astype(int) - image).mean() < 1.0


def test_the_identity_changes_nothing_and_the_output_stays_8_bit():
    image = photo_like(20, 30, 4)
    identity = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype="<f2").tobytes()
    np.testing.assert_array_equal(apply_colour(image, identity), image)
    brighter = np.array([[2, 0, 0], [0, 2, 0], [0, 0, 2], [-300, 0, 300]], dtype="<f2").tobytes()
    out = apply_colour(image, brighter)
    assert out.dtype == np.uint8 and out[..., 0].max() <= 255 and out[..., 2].min() >= 0


@pytest.mark.parametrize("damage", [b"\x00" * 10, np.array([np.inf] + [0] * 11, dtype="<f2").tobytes()])
def test_what_is_not_a_transform_is_refused(damage):
    with pytest.raises(BitstreamError):
        apply_colour(photo_like(8, 8, 1), damage)
