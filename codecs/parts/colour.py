"""A colour transform per image, fitted by the encoder and sent in 24 bytes: it undoes an autoencoder's colour casts.

    encoder: decoded picture D, original O ──least squares──► A (3×3), b (3) with O ≈ D·A + b ──► 12 fp16
    decoder: D ──► round(clip(D·A + b, 0, 255))

Why: builtin:ldm-small's autoencoder turns hues per image, even with no quantization at all: a red hat
decodes orange, green foliage beige; a channel's mean over a whole Kodak image moves by up to 15 levels,
on its training images as well. Every latent codec inherits that. Fine-tuning the decoder alone did not
bring the colour back (MODELS.md). The encoder, which sees both pictures, can. On Kodak's unquantized
reconstructions it gains 0.7 dB on average and 2.9 dB on kodim04.

Deterministic on every machine: the decoder forms each output as four float64 products of exact values
(fp16 coefficients, 8-bit pixels) summed in one fixed order, without BLAS, then rounds.
"""

from __future__ import annotations

import numpy as np

from ..base import Param
from ..errors import BitstreamError

COLOUR_BYTES = 24  # A's rows for R, G, B, then b: 12 little-endian fp16, the last bytes of a payload
COLOUR_PARAM = Param(
    "colour", str, "affine", "affine: the encoder sends a 24-byte colour transform that undoes the autoencoder's colour "
    "casts (parts/colour.py); off: none, as in streams from before it", choices=("affine", "off"), absent="off",
)  # fmt: skip


def fit_colour(original: np.ndarray, decoded: np.ndarray) -> bytes:
    """The transform (as sent) taking the decoded H×W×3 uint8 picture closest to the original, in MSE."""
    x = decoded.reshape(-1, 3).astype(np.float64)
    y = original.reshape(-1, 3).astype(np.float64)
    solution, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
    matrix = solution[:3].astype(np.float16).astype(np.float64)
    # The offset refitted to the matrix as rounded, so fp16 rounding of A costs no mean colour.
    offset = (y - x @ matrix).mean(axis=0)
    return np.concatenate([matrix, offset[None]]).astype("<f2").tobytes()


def split_colour(payload: bytes, config: dict, codec: str) -> tuple[bytes, bytes | None]:
    """(the rest of the payload, its colour transform or None, as the stream's `colour` parameter says)."""
    if config["colour"] == "off":
        return payload, None
    if len(payload) < COLOUR_BYTES:
        raise BitstreamError(f"{codec} payload is {len(payload)} bytes, too short for its colour transform")
    return payload[:-COLOUR_BYTES], payload[-COLOUR_BYTES:]


def apply_colour(decoded: np.ndarray, colour: bytes) -> np.ndarray:
    """The decoded picture through a transform read from a stream (BitstreamError if it is not one)."""
    if len(colour) != COLOUR_BYTES:
        raise BitstreamError(f"a colour transform is {COLOUR_BYTES} bytes, not {len(colour)}")
    values = np.frombuffer(colour, dtype="<f2").astype(np.float64).reshape(4, 3)
    if not np.isfinite(values).all():
        raise BitstreamError("the stream's colour transform holds a non-finite value")
    x = decoded.astype(np.float64)
    out = np.empty_like(x)
    for c in range(3):
        out[..., c] = ((x[..., 0] * values[0, c] + x[..., 1] * values[1, c]) + x[..., 2] * values[2, c]) + values[3, c]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
